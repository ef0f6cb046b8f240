"""Mixed-precision layouts (issue 9): bytes per parameter, fp32 master weights, FSDP2's MixedPrecisionPolicy."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from estimator import load_config
from estimator.api import estimate
from estimator.cli import app
from estimator.layouts import bytes_per_parameter
from estimator.parallel import model_state_bytes, per_rank_estimate, per_rank_estimates
from tests.fsdp_ranks import assert_fsdp2_ranks_match

runner = CliRunner()
TINY = {"family": "transformer", "d_model": 16, "num_heads": 2, "vocab_size": 32, "max_seq_len": 8}
GIB = 1 << 30


def _tiny(*extra: str):  # noqa: ANN202
    return load_config(None, ["model.num_layers=2", "training.seq_len=8", "training.batch_size=1",
                              "optimizer.name=adam", "training.precision=bf16", "training.master_weights=true",
                              *extra], base={"model": dict(TINY)})


def test_bytes_per_parameter_of_each_layout() -> None:
    """Adam (2 state tensors): autocast 4 + 4 + 8, pure bf16 2 + 2 + 4, bf16 + fp32 master 2 + 2 + 12 (ZeRO's K=12)."""
    assert bytes_per_parameter("amp-bf16", False, 2) == {"parameters": 4, "gradients": 4, "optimizer_state": 8}
    assert bytes_per_parameter("bf16", False, 2) == {"parameters": 2, "gradients": 2, "optimizer_state": 4}
    assert bytes_per_parameter("bf16", True, 2) == {"parameters": 2, "gradients": 2, "optimizer_state": 12}
    assert bytes_per_parameter("fp16", True, 0) == {"parameters": 2, "gradients": 2, "optimizer_state": 4}


def test_master_weights_need_a_16_bit_precision() -> None:
    result = runner.invoke(app, ["estimate", "--set", "training.master_weights=true"])
    assert result.exit_code == 2
    assert "training.master_weights" in result.output and "bf16 and fp16" in result.output
    assert "Traceback" not in result.output


def test_master_copy_is_optimizer_state_on_one_device() -> None:
    """The seed's Cruncher, 36 parameters, Adam: state = 36·4 (master) + 2·36·4 (m, v in fp32) = 432 B."""
    est = estimate(load_config(None, ["training.precision=bf16", "training.master_weights=true",
                                      "optimizer.name=adam"]), "cpu")
    assert (est.memory.parameters, est.memory.gradients, est.memory.optimizer_state) == (72, 72, 432)


def test_zero_paper_model_states_for_llama_2_7b_on_8_gpus() -> None:
    """Rajbhandari et al. 2020, section 5 with K=12: ZeRO-2 2Ψ + 14Ψ/N = 23.53 GiB, ZeRO-3 16Ψ/N = 12.55 GiB."""
    cfg = load_config(None, ["model.preset=llama-2-7b", "training.precision=bf16", "training.master_weights=true",
                             "optimizer.name=adamw"])
    psi = 6_738_415_616
    zero2 = model_state_bytes(cfg, "zero2", 8)
    assert sum(zero2.values()) == 2 * psi + 14 * psi / 8
    assert round(sum(zero2.values()) / GIB, 2) == 23.53
    zero3 = model_state_bytes(cfg, "zero3", 8)
    assert zero3 == {"parameters": 4 * psi / 8, "gradients": 4 * psi / 8, "optimizer_state": 8 * psi / 8}
    assert round(sum(zero3.values()) / GIB, 2) == 12.55


def test_zero_partitions_the_master_copy() -> None:
    """ZeRO-1/2 with master weights: every rank holds the 16-bit weights; its partition's master and state are
    12 bytes per element, summing to 12Ψ over the ranks."""
    cfg = _tiny()
    psi = sum(p.numel for p in _params(cfg))
    for strategy in ("zero1", "zero2"):
        ranks = per_rank_estimates(cfg, strategy, 2, "cpu")
        assert all(r.parameters == 2 * psi for r in ranks)
        assert sum(r.optimizer_state for r in ranks) == 12 * psi


def test_fsdp2_mixed_precision_keeps_fp32_shards() -> None:
    """Under zero3 the fp32 shards are the master copy: 4 + 4 + 8 bytes per local element, no extra copy."""
    cfg = _tiny()
    psi = sum(p.numel for p in _params(cfg))  # every tensor of the tiny model splits evenly over 2 ranks
    for r in per_rank_estimates(cfg, "zero3", 2, "cpu"):
        assert (r.parameters, r.gradients, r.optimizer_state) == (4 * psi // 2, 4 * psi // 2, 8 * psi // 2)


def test_reducing_in_16_bits_lowers_the_backward_peak() -> None:
    fp32 = per_rank_estimate(_tiny(), "zero3", 2, "cpu")
    bf16 = per_rank_estimate(_tiny("parallel.reduce_dtype=param"), "zero3", 2, "cpu")
    assert bf16.peak_bytes < fp32.peak_bytes
    assert (bf16.parameters, bf16.gradients) == (fp32.parameters, fp32.gradients)


def _params(cfg):  # noqa: ANN001, ANN202
    from estimator.families.base import get_family

    return get_family(cfg.model.family).parameters(cfg.model)


@pytest.mark.parametrize("overrides", [["optimizer.name=adam"], ["optimizer.name=adamw",
                                                                  "optimizer.implementation=foreach"]])
def test_master_weights_exact_against_a_real_step(overrides: list[str]) -> None:
    """The Megatron-style step (fp32 masters stepped, copied back into bf16 weights) measured by torch."""
    pytest.importorskip("torch")
    from estimator.measure.verify import run_verify

    cfg = load_config(None, ["model.dim=64", "model.num_layers=3", "training.batch_size=8",
                             "training.precision=bf16", "training.master_weights=true", *overrides])
    result = run_verify(cfg, "cpu")
    assert [(r.key, r.estimated, r.measured) for r in result.rows if r.estimated != r.measured] == []


def test_fsdp2_mixed_precision_policy_exact_on_real_ranks() -> None:
    """fully_shard(mp_policy=MixedPrecisionPolicy(bf16, fp32)) on 2 gloo ranks: states and peaks to the byte."""
    assert_fsdp2_ranks_match(_tiny())


def test_verify_refuses_master_weights_without_a_torch_engine() -> None:
    pytest.importorskip("torch")
    from estimator.errors import EstimatorError
    from estimator.measure.distributed import measure_distributed

    with pytest.raises(EstimatorError, match="training.master_weights"):
        measure_distributed(_tiny(), "zero1", 2)


def test_cpu_offload_moves_the_model_states_to_the_host() -> None:
    """FSDP2's CPUOffloadPolicy: the rank's shards, gradients and optimizer state are host bytes, equal to what
    the same rank holds on the device without offload; the device peak drops by at least the resident states."""
    on_device = per_rank_estimate(_tiny(), "zero3", 2, "cpu")
    offloaded = per_rank_estimate(_tiny("parallel.offload=true"), "zero3", 2, "cpu")
    assert (offloaded.parameters, offloaded.gradients, offloaded.optimizer_state) == (0, 0, 0)
    assert offloaded.host == {"parameters": on_device.parameters, "gradients": on_device.gradients,
                              "optimizer_state": on_device.optimizer_state,
                              "optimizer_step_tensors": on_device.optimizer_step_tensors}
    assert offloaded.peak_bytes <= on_device.peak_bytes - on_device.parameters - on_device.optimizer_state
    data = runner.invoke(app, ["estimate", "--model", "gpt2", "--set", "training.seq_len=32", "--set",
                               "parallel.offload=true", "--parallel", "fsdp", "-n", "4", "--json"])
    rank = json.loads(data.stdout)["distributed"]["ranks"][0]
    assert rank["host_memory"]["total"] == sum(v for k, v in rank["host_memory"].items() if k != "total") > 0


def test_offload_needs_fsdp() -> None:
    result = runner.invoke(app, ["estimate", "--model", "gpt2", "--set", "parallel.offload=true", "--parallel", "ddp"])
    assert result.exit_code == 2 and "parallel.offload" in result.output and "Traceback" not in result.output


def test_fit_offers_the_layouts_and_accumulation() -> None:
    """A step that does not fit under zero3: the master-weight layout, CPU offload and micro-batches of 1
    accumulated to the same global batch are among the alternatives, each re-estimated."""
    from estimator.fit import alternatives
    from estimator.hardware import get_gpu

    cfg = load_config(None, ["model.preset=llama-2-7b", "training.batch_size=4", "parallel.strategy=zero3",
                             "parallel.world_size=2"])
    found = {a.change: a for a in alternatives(cfg, get_gpu("a100-40gb"), "zero3", 2)}
    assert "--set parallel.offload=true (model states in host memory)" in found
    assert "-p bf16 --set training.master_weights=true" in found
    accumulated = found["-b 1 --set training.grad_accum_steps=4"]
    assert accumulated.needed_bytes < max(a.needed_bytes for a in found.values())


def test_mlp_autocast_under_fsdp2_is_refused_in_one_line() -> None:
    """Not modelled for the mlp family (it was an internal error): one line, exit 2."""
    result = runner.invoke(app, ["estimate", "-p", "amp-bf16", "--parallel", "zero3"])
    assert result.exit_code == 2 and "training.precision" in result.output and "internal" not in result.output


def test_fit_offers_the_smallest_tensor_parallel_degree() -> None:
    """One device that does not fit: the smallest of TP 2, 4, 8 that fits is offered (else 8), re-estimated
    as the worst TP rank."""
    from estimator.fit import alternatives
    from estimator.hardware import get_gpu

    cfg = load_config(None, ["model.preset=llama-2-7b", "training.batch_size=1"])
    found = [a for a in alternatives(cfg, get_gpu("a100-40gb"), None, 1) if a.change.startswith("--parallel tp")]
    assert len(found) == 1
    t = int(found[0].change.rsplit(" ", 1)[1])
    assert found[0].fits or t == 8
    expected = per_rank_estimate(cfg.model_copy(update={"parallel": cfg.parallel.model_copy(
        update={"strategy": "tp", "world_size": t, "tp_size": t})}), "tp", t, "cuda")
    assert found[0].needed_bytes >= expected.peak_bytes
