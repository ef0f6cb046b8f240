"""Layers that repeat, described once: the compressed step must equal the flat, materialised one exactly."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from estimator import load_config
from estimator.events import Event
from estimator.periodic import Segment, periodic_programs, summary_of
from estimator.simulate import CompressedStep, assemble_step, simulate, step_events
from estimator.timeline import find_peak, replay, summarize


def _same(config, device: str) -> CompressedStep:  # noqa: ANN001
    fast = simulate(config, device)
    flat = assemble_step(*step_events(config, device))
    assert isinstance(fast, CompressedStep)
    assert fast.first_peak == flat.first_peak
    assert fast.steady_peak == flat.steady_peak
    assert fast.saved_activation_bytes == flat.saved_activation_bytes
    assert fast.input_bytes == flat.input_bytes
    return fast


@settings(max_examples=25, deadline=None)
@given(layers=st.integers(17, 60), dim=st.sampled_from([4, 8, 96]), batch=st.integers(1, 5),
       optimizer=st.sampled_from(["sgd", "momentum", "adagrad", "rmsprop", "adam", "adamw", "adafactor", "lion"]),
       precision=st.sampled_from(["fp32", "bf16", "amp-bf16", "fp16"]), device=st.sampled_from(["cpu", "cuda"]),
       impl=st.sampled_from(["auto", "for-loop", "foreach"]))
def test_mlp_compressed_equals_flat(layers: int, dim: int, batch: int, optimizer: str, precision: str, device: str,
                                    impl: str) -> None:
    cfg = load_config(None, [f"model.num_layers={layers}", f"model.dim={dim}", f"training.batch_size={batch}",
                             f"optimizer.name={optimizer}", f"training.precision={precision}",
                             f"optimizer.implementation={impl}"])
    _same(cfg, device)


@pytest.mark.parametrize("preset", ["llama-2-7b", "gpt2-medium", "pythia-410m"])
@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_transformer_presets_compressed_equal_flat(preset: str, optimizer: str) -> None:
    cfg = load_config(None, ["training.seq_len=32", f"optimizer.name={optimizer}", "training.batch_size=2"],
                      base={"model": {"preset": preset}})
    for device in ("cpu", "cuda"):
        _same(cfg, device)


def test_hundred_thousand_layers_cost_the_blocks_not_the_layers() -> None:
    """The seed's MLP with 100,000 layers: the programs hold a handful of blocks, and the peak is the one the
    flat step's closed form gives (the steady step peaks in backward or the optimizer step)."""
    cfg = load_config(None, ["model.num_layers=100000"])
    step = simulate(cfg, "cpu")
    assert isinstance(step, CompressedStep)
    assert sum(len(s.events) for p in step.programs for s in p) < 200
    # activations: one B x D output per layer, saved (the seed's B·D·layers) plus the head's output
    assert step.saved_activation_bytes == 2 * 4 * 100000 * 4 + 2 * 4


def test_summary_repeat_matches_expanded_events() -> None:
    block = (Event("a", "activation", 8, "forward"), Event("t", "temporary", 4, "forward"),
             Event("t", "temporary", -4, "forward"))
    for count in (1, 2, 7):
        events = [Event(f"{e.name}{i}" if e.name == "a" else f"t{i}", e.role, e.nbytes, e.phase)
                  for i in range(count) for e in block]
        s = Segment(block, count).summary
        peak = find_peak(events)
        assert (s.rise, s.rise_index, dict(s.rise_roles)) == (peak.bytes, peak.index, peak.by_role)
        assert s.delta == sum(t.nbytes for t in replay(events).values())
    shrinking = (Event("x", "temporary", 4, "backward"), Event("y", "activation", -8, "backward"))
    s = Segment(shrinking, 5).summary
    assert (s.rise, s.rise_index, s.delta) == (4, 0, -20)


def test_not_periodic_falls_back() -> None:
    """A size that grows with the layer count (not by repetition) is refused by the check."""
    def build(n: int) -> list[list[Event]]:
        return [[Event("w", "parameter", n * n, "setup")]]

    assert periodic_programs(build, 100) is None
    program = periodic_programs(lambda n: [[Event(f"h{i}", "activation", 4, "forward") for i in range(n)]], 100)
    assert program is not None and summary_of(program[0]) == summarize(
        [Event(f"h{i}", "activation", 4, "forward") for i in range(100)])


@pytest.mark.parametrize("sets", [("model.num_layers=40", "optimizer.name=adam"),
                                  ("model.num_layers=24", "training.precision=amp-bf16", "optimizer.name=adagrad")])
def test_cuda_rounding_at_the_peak_from_programs_equals_the_flat_replay(sets: tuple[str, ...]) -> None:
    """What CUDA's 512-byte blocks add at the peak, per role, read off the programs without flattening."""
    import dataclasses

    from estimator.api import estimate

    cfg = load_config(None, list(sets))
    est = estimate(cfg, "cuda")
    assert isinstance(est.step, CompressedStep) and est.step.exact_programs is not None
    flat = dataclasses.replace(est, step=assemble_step(*step_events(cfg, "cuda")))
    assert est.block_rounding_at_peak() == flat.block_rounding_at_peak()
    assert est.block_rounding_at_peak()


@pytest.mark.parametrize(("name", "extra"), [("deepseek-v3", {"first_dense_layers": 3}),
                                             ("qwen2-moe", {"moe_layer_step": 2, "d_ff": 10}),
                                             ("mixtral", {})])
def test_moe_compressed_equals_flat(name: str, extra: dict) -> None:
    """MoE blocks after dense first layers, or every second layer: read off two whole periods, exact."""
    from tests.moe.conftest import SMALL

    model = {"family": "moe", **SMALL[name], **extra, "num_layers": 21}
    cfg = load_config(None, ["training.seq_len=8", "optimizer.name=adamw"], base={"model": model})
    for device in ("cpu", "cuda"):
        _same(cfg, device)
