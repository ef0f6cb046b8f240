"""The step composed from its parts' periodic programs (``simulate._composed_step``) against the flat step.

``simulate`` finds the periodic program of the forward-backward body once and of setup, the optimizer and the
tail apart, and concatenates them; these tests check it against the materialised step (and against the whole
step searched at once, the path it replaced) on dense and MoE models, in several precisions, with
checkpointing and gradient accumulation, on the CPU and CUDA: every peak and byte count equal, and the
programs expanding to the flat lists' events (each run of allocations or frees in canonical order).
"""

from __future__ import annotations

import pytest

from estimator import load_config
from estimator.events import Event
from estimator.periodic import Program, _canonical, _signature, periodic_programs
from estimator.simulate import (
    CompressedStep,
    _composed_step,
    assemble_step,
    body_program,
    layered_step,
    round_blocks,
    simulate,
    step_body_events,
    step_events,
    unrounded_step,
)

CASES = [
    ("llama-2-7b", ["training.precision=amp-bf16"], "cuda"),
    ("llama-2-7b", ["training.precision=bf16"], "cpu"),
    ("llama-2-7b", ["training.precision=fp32", "training.activation_checkpointing=full"], "cuda"),
    ("llama-2-7b", ["training.precision=amp-bf16", "training.grad_accum_steps=2", "optimizer.name=sgd"], "cpu"),
    ("gpt2-medium", ["training.precision=amp-bf16", "training.activation_checkpointing=full"], "cpu"),
    ("llama-2-7b", ["training.precision=bf16", "training.master_weights=true"], "cuda"),
    ("mixtral-8x7b", ["training.precision=amp-bf16"], "cpu"),
    ("mixtral-8x7b", ["training.precision=bf16", "training.grad_accum_steps=3"], "cuda"),  # micro-batches composed
    ("mixtral-8x7b", ["training.precision=bf16", "training.activation_checkpointing=full"], "cuda"),
    ("mixtral-8x7b", ["training.precision=amp-bf16", "model.moe_layer_step=2", "model.d_ff=14336"], "cuda"),
    ("deepseek-v3", ["training.precision=bf16"], "cpu"),  # three dense layers before the MoE ones
]


def _config(preset: str, overrides: list[str]):  # noqa: ANN202
    return load_config(None, ["training.seq_len=16", "training.batch_size=2", "model.num_layers=17", *overrides],
                       base={"model": {"preset": preset}})


def _expanded(program: Program) -> list[Event]:
    return [e for segment in program for _ in range(segment.count) for e in segment.events]


def _same_peaks(step, flat) -> None:  # noqa: ANN001
    assert step.first_peak == flat.first_peak
    assert step.steady_peak == flat.steady_peak
    assert step.saved_activation_bytes == flat.saved_activation_bytes
    assert step.saved_copy_bytes == flat.saved_copy_bytes
    assert step.input_bytes == flat.input_bytes


@pytest.mark.parametrize(("preset", "overrides", "device"), CASES)
def test_composed_step_equals_flat(preset: str, overrides: list[str], device: str) -> None:
    cfg = _config(preset, overrides)
    composed = _composed_step(cfg, device)
    assert isinstance(composed, CompressedStep)
    flat = assemble_step(*step_events(cfg, device))
    _same_peaks(composed, flat)
    # the path it replaced: the whole step searched at once
    whole = layered_step(cfg, lambda c: step_events(c, device, rounded=False),
                         round_blocks if device == "cuda" else None)
    assert isinstance(whole, CompressedStep)
    _same_peaks(whole, composed)
    # the programs are the flat lists' events, each run of allocations (or frees) of a phase in canonical order
    exact = composed.exact_programs if device == "cuda" else composed.programs
    for program, events in zip(exact, step_events(cfg, device, rounded=False), strict=True):
        assert _signature(_expanded(program)) == _canonical(events)[1]
    finish = round_blocks if device == "cuda" else list
    for rounded, program in zip(composed.programs, exact, strict=True):
        assert [e.nbytes for e in _expanded(rounded)] == [e.nbytes for e in finish(_expanded(program))]
    # the steady step's body, built alone, as the flat step has it
    assert composed.body_events() == [e for e in flat.steady_step if e.phase not in ("optimizer_step", "zero_grad")]
    if device == "cuda":
        # what a rank context composes from: the unrounded step, equal to the flat unrounded step
        unrounded = unrounded_step(cfg)
        _same_peaks(unrounded, assemble_step(*step_events(cfg, "cuda", rounded=False)))


def test_body_program_is_shared_by_optimizers_and_devices() -> None:
    """Another optimizer, or the other device, reuses the forward-backward program found once."""
    cfg = _config("llama-2-7b", ["training.precision=amp-bf16"])
    other = _config("llama-2-7b", ["training.precision=amp-bf16", "optimizer.name=adam8bit"])
    body = body_program(cfg)
    assert body is not None and body_program(other) is body
    cpu, cuda = simulate(cfg, "cpu"), simulate(other, "cuda")
    assert isinstance(cpu, CompressedStep) and isinstance(cuda, CompressedStep)
    assert cpu.programs[1][:len(body)] == body
    assert cuda.exact_programs is not None and cuda.exact_programs[2][:len(body)] == body


@pytest.mark.parametrize("preset", ["llama-2-7b", "mixtral-8x7b"])
def test_body_does_not_depend_on_master_weights(preset: str) -> None:
    """The forward-backward program is kept per (model, training less master_weights): the events agree."""
    plain = _config(preset, ["training.precision=bf16"])
    master = _config(preset, ["training.precision=bf16", "training.master_weights=true"])
    assert _signature(step_body_events(plain)) == _signature(step_body_events(master))  # (names: numbers aside)
    assert body_program(master) is body_program(plain)


def test_layered_step_without_shared_objects_searches_the_whole_steps() -> None:
    """``layered_step`` searches the events before the optimizer once where both steps hold the same objects
    (``step_events``, tensor parallelism, FSDP2); steps made of copies are searched whole, as before."""
    cfg = _config("llama-2-7b", ["training.precision=amp-bf16"])

    def copies(c):  # noqa: ANN001, ANN202
        setup, first, steady = step_events(c, "cpu")
        return setup, first, [Event(e.name, e.role, e.nbytes, e.phase) for e in steady]

    flat = assemble_step(*step_events(cfg, "cpu"))
    for build in (lambda c: step_events(c, "cpu"), copies):
        step = layered_step(cfg, build)
        assert isinstance(step, CompressedStep)
        _same_peaks(step, flat)


def _layers(first: list[Event], middle: list[Event], last: list[Event], n: int) -> list[Event]:
    """``n`` layers: a first layer, ``n - 2`` middle ones and a last, each event named by its layer."""
    out = [Event(f"l0.{e.name}", e.role, e.nbytes, e.phase) for e in first]
    for i in range(1, n - 1):
        out += [Event(f"l{i}.{e.name}", e.role, e.nbytes, e.phase) for e in middle]
    out += [Event(f"l{n - 1}.{e.name}", e.role, e.nbytes, e.phase) for e in last]
    return out


def test_search_from_two_layers_needs_a_middle_layer_when_the_edges_differ() -> None:
    """From 2 layers a pattern whose first and last layers differ from the others is not found (no layer of 2
    repeats), and only the two smallest counts are built to learn it; from 3 layers it is found and checked."""
    first = [Event("a", "activation", 8, "forward"), Event("t", "temporary", 4, "forward"),
             Event("t", "temporary", -4, "forward")]
    middle = [Event("a", "activation", 16, "forward")]
    last = [Event("a", "activation", 32, "forward")]
    built: list[int] = []

    def build(n: int) -> list[list[Event]]:
        built.append(n)
        return [_layers(first, middle, last, n)]

    assert periodic_programs(build, 40, base=2) is None
    assert built == [2, 3]
    built.clear()
    programs = periodic_programs(build, 40, base=3)
    assert programs is not None and built == [3, 4, 5]
    flat = _layers(first, middle, last, 40)
    assert [(e.role, e.nbytes, e.phase) for e in _expanded(programs[0])] == [
        (e.role, e.nbytes, e.phase) for e in flat]


def test_micro_batches_accumulated_reuse_the_single_micro_batch_events(monkeypatch: pytest.MonkeyPatch) -> None:
    """One micro-batch's forward and backward do not read ``grad_accum_steps`` or ``master_weights``: a fit's
    alternative of micro-batches of 1 accumulated simulates no layer count its batch-1 step built already, and the
    steps are those of a cold process."""
    from estimator.families import transformer_events
    from estimator.simulate import clear_caches

    built: list[int] = []
    real = transformer_events.step_events_with_marks

    def counted(model, training, shape, tp=None):  # noqa: ANN001, ANN202
        built.append(model.num_layers)
        return real(model, training, shape, tp)

    monkeypatch.setattr(transformer_events, "step_events_with_marks", counted)
    one = ["training.batch_size=1", "training.precision=amp-bf16"]
    variants = [["training.grad_accum_steps=4"], ["training.precision=bf16", "training.master_weights=true"]]
    clear_caches()
    simulate(load_config(None, one, base={"model": {"preset": "llama-2-7b"}}), "cuda")
    first = sorted(built)
    for extra in variants:
        cfg = load_config(None, [*one, *extra], base={"model": {"preset": "llama-2-7b"}})
        warm = simulate(cfg, "cuda")
        if extra == variants[0]:
            assert sorted(built) == first  # nothing built again for the accumulated micro-batches
        clear_caches()
        cold = simulate(cfg, "cuda")
        assert (warm.first_peak, warm.steady_peak) == (cold.first_peak, cold.steady_peak)
        clear_caches()
