"""The analytic exact matmul count against torch's FlopCounterMode on a real step of the Cruncher."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from estimator import estimate, load_config  # noqa: E402


@pytest.mark.parametrize(("batch", "dim", "layers"), [(2, 4, 2), (8, 16, 3), (3, 32, 1), (64, 128, 4)])
def test_matmul_flops_match_flop_counter_mode(batch: int, dim: int, layers: int) -> None:
    from torch.nn import functional as F
    from torch.utils.flop_counter import FlopCounterMode

    from estimator.measure.mlp import build_cruncher

    cfg = load_config(overrides=[f"training.batch_size={batch}", f"model.dim={dim}", f"model.num_layers={layers}"])
    model = build_cruncher(dim, layers)
    x, y = torch.randn(batch, dim), torch.randn(batch)
    with FlopCounterMode(display=False) as counter:
        loss = F.mse_loss(model(x), y)
        forward = counter.get_total_flops()
        loss.backward()
    flops = estimate(cfg).flops
    assert counter.get_total_flops() == flops.matmul
    assert forward == flops.matmul_forward == flops.forward  # forward: exactly 2·B·P
    p = dim * dim * layers + dim
    assert flops.per_step == 6 * batch * p
    assert flops.matmul == 6 * batch * p - 2 * batch * dim * dim
