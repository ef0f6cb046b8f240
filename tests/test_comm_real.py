"""Communication volume against real gloo ranks: every collective each rank calls, read off torch's flight
recorder during the ``verify --parallel`` harness, equals the estimate kind by kind, to the byte, in the
first, the second and a later step (estimator/measure/comm_record.py)."""

from __future__ import annotations

import pytest

from estimator import load_config
from estimator.measure.comm_record import measured_communication
from estimator.parallel import per_rank_estimate

TINY = {"family": "transformer", "d_model": 16, "num_heads": 2, "vocab_size": 32, "max_seq_len": 8}


def _tiny(*extra: str):  # noqa: ANN202
    return load_config(None, ["model.num_layers=2", "training.seq_len=8", "training.batch_size=1",
                              "optimizer.name=adam", "training.precision=fp32", *extra], base={"model": dict(TINY)})


CASES = [
    # DDP: one all-reduce per step, the bucket rebuild's two int32 broadcasts in the second step
    ("ddp", 2, load_config(None, [])),
    # ZeRO-1 on a transformer with 2 micro-batches: DDP's all-reduce after each (the rebuild in the first step's
    # second forward), 36 parameter broadcasts once per step
    ("zero1", 2, _tiny("training.grad_accum_steps=2")),
    # FSDP2 on 3 ranks with uneven rows (D=10): padded gathers, the root gathered again, gloo's all-reduces
    ("zero3", 3, load_config(None, ["model.dim=10"])),
    # FSDP2 keeping blocks gathered, with MixedPrecisionPolicy over fp32 shards: one bf16 gather per unit, the
    # gradients reduced in fp32
    ("fsdp", 2, _tiny("parallel.reshard_after_forward=false", "training.precision=bf16",
                      "training.master_weights=true", "optimizer.name=sgd")),
]


@pytest.mark.slow
@pytest.mark.parametrize(("strategy", "n", "config"), CASES, ids=[c[0] for c in CASES])
def test_recorded_collectives_equal_the_estimate(strategy: str, n: int, config) -> None:  # noqa: ANN001
    torch = pytest.importorskip("torch")
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available in this torch build")
    from estimator.measure.distributed import measure_distributed

    for m in measure_distributed(config, strategy, n, timeout=120):
        want = per_rank_estimate(config, strategy, n, "cpu", m.rank).communication_volume
        got = measured_communication(m)
        assert want is not None and got is not None
        for step in ("first_step", "second_step", "steady_step"):
            assert getattr(got, step).logical() == getattr(want, step).logical(), (m.rank, step)
