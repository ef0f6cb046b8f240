"""transformers 5's default MoE experts (``torch._grouped_mm``) traced in fp32 and under autocast: the fake
kernel is given the CPU kernel's fp32 support (kernel_corrections.fp32_grouped_mm_meta)."""

from __future__ import annotations

from pathlib import Path

import pytest

from estimator.loader import load_config
from tests.hf.conftest import write_config
from tests.hf.tiny_configs import TINY_CONFIGS

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")


def test_fake_fp32_grouped_mm_is_the_real_kernels_output() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    from estimator.measure.kernel_corrections import fp32_grouped_mm_meta

    offs = [4, 8, 12, 16]
    real = torch._grouped_mm(torch.randn(16, 8), torch.randn(4, 8, 12), offs=torch.tensor(offs, dtype=torch.int32))
    with fp32_grouped_mm_meta(), FakeTensorMode():
        fake = torch._grouped_mm(torch.randn(16, 8), torch.randn(4, 8, 12),
                                 offs=torch.tensor(offs, dtype=torch.int32))
        got = (fake.shape, fake.dtype, fake.stride(), fake.untyped_storage().nbytes())
    assert got == (real.shape, real.dtype, real.stride(), real.untyped_storage().nbytes())


@pytest.mark.parametrize("name, precision", [("mixtral", "fp32"), ("qwen3_moe", "amp-bf16")])
def test_transformers_moe_verify_exact(tmp_path: Path, name: str, precision: str) -> None:
    """The real transformers model (grouped_mm experts) traced and run: every verify figure equal."""
    from estimator.measure.verify import run_verify

    folder = write_config(tmp_path, TINY_CONFIGS[name])
    cfg = load_config(overrides=["device=cpu", "optimizer.name=adamw", f"training.precision={precision}",
                                 "model.engine=transformers", "training.seq_len=16", "training.batch_size=2"],
                      base={"model": {"hf_config": str(folder)}})
    result = run_verify(cfg, "cpu")
    assert [(r.key, r.estimated, r.measured) for r in result.rows if r.estimated != r.measured] == []
