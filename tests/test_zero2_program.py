"""ZeRO-2's dropped-gradient forward/backward read off a periodic program (``parallel/dropped.py``) against the
same read off the model's flat events: every rank's summary equal, on dense and MoE models, in several
precisions, with checkpointing and accumulation, on the CPU and CUDA, for several world sizes."""

from __future__ import annotations

import pytest

from estimator import load_config
from estimator.parallel.base import RankContext
from estimator.parallel.dropped import DroppedGradients, DroppedProgram, _drop_names, _dropped_program, _learn_signs
from estimator.parallel.zero import zero_partition

CASES = [
    ("llama-2-7b", ["training.precision=amp-bf16"], "cuda"),
    ("llama-2-7b", ["training.precision=fp32", "training.activation_checkpointing=full"], "cpu"),
    ("llama-2-7b", ["training.precision=bf16", "training.master_weights=true", "training.grad_accum_steps=3"],
     "cuda"),
    ("mixtral-8x7b", ["training.precision=amp-bf16", "model.moe_layer_step=2", "model.d_ff=14336"], "cuda"),
    ("deepseek-v3", ["training.precision=bf16"], "cpu"),  # dense layers before the MoE ones; 256 experts a layer
]


def _same(a, b) -> bool:  # noqa: ANN001 - two Summary values, roles compared as mappings
    return (a.length, a.delta, dict(a.roles), a.rise, a.rise_index, a.rise_phase, dict(a.rise_roles),
            a.first_phase) == (b.length, b.delta, dict(b.roles), b.rise, b.rise_index, b.rise_phase,
                               dict(b.rise_roles), b.first_phase)


@pytest.mark.parametrize(("preset", "extra", "device"), CASES)
def test_every_rank_from_the_program_equals_the_flat_events(preset: str, extra: list[str], device: str) -> None:
    cfg = load_config(None, extra, base={"model": {"preset": preset}})
    for n in (2, 3, 8):
        ctx = RankContext(cfg, n, device)
        program = _dropped_program(ctx)
        assert isinstance(program, DroppedProgram), (preset, extra, n)
        flat = DroppedGradients(ctx.flat_body())
        assert len(program.drops) == len(ctx.trainable)
        parts = zero_partition(ctx.trainable, n)
        for owned in [set(), {p.name for p in ctx.trainable}, *({p.name for p in part} for part in parts)]:
            assert _same(program.summary(owned), flat.summary(owned)), (preset, extra, n, sorted(owned)[:3])


def test_a_gradient_freed_inside_the_body_falls_back_to_the_flat_events() -> None:
    """Tied embeddings: the second gradient is summed into a new ``.grad`` (the first freed), which the program
    path does not model; the flat events are used and the ranks are as before."""
    cfg = load_config(None, ["model.num_layers=24"], base={"model": {"preset": "gpt2"}})
    ctx = RankContext(cfg, 4, "cuda")
    assert _dropped_program(ctx) is None


def test_the_names_rule_pairs_drops_with_parameters_by_their_numbers() -> None:
    true = ["blocks.2.w.grad", "blocks.1.w.grad", "blocks.0.w.grad", "head.grad"]
    signs = _learn_signs({"blocks.#.w.grad": true[:3], "head.grad": true[3:]})
    assert signs == {"blocks.#.w.grad": (-1,), "head.grad": ()}
    positions = [(i, name, 8) for i, name in enumerate(["blocks.0.w.grad"] * 4 + ["head.grad"])]
    universe = [f"blocks.{k}.w.grad" for k in range(4)] + ["head.grad"]
    assert _drop_names(positions, universe, signs) == {0: "blocks.3.w.grad", 1: "blocks.2.w.grad",
                                                       2: "blocks.1.w.grad", 3: "blocks.0.w.grad", 4: "head.grad"}
    assert _drop_names(positions[:3] + positions[4:], universe, signs) is None  # a parameter without a drop
    # experts: the layer descending, the expert ascending inside it; an order no direction gives is refused
    experts = ["l.1.e.0.grad", "l.1.e.1.grad", "l.0.e.0.grad", "l.0.e.1.grad"]
    assert _learn_signs({"l.#.e.#.grad": experts}) == {"l.#.e.#.grad": (-1, 1)}
    assert _learn_signs({"l.#.e.#.grad": ["l.1.e.0.grad", "l.0.e.1.grad", "l.1.e.1.grad", "l.0.e.0.grad"]}) is None
