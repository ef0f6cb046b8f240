"""Gradient accumulation (issue 9): micro-batches, what stays live between them, the global batch."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from estimator import load_config
from estimator.accumulation import global_batch, later_micro_batch
from estimator.api import estimate
from estimator.cli import app
from estimator.events import alloc, free
from estimator.parallel import per_rank_estimate
from estimator.simulate import step_events
from tests.fsdp_ranks import assert_fsdp2_ranks_match

runner = CliRunner()
TINY_GPT = ["model.family=transformer", "model.vocab_size=512", "model.d_model=64", "model.num_layers=2",
            "model.num_heads=4", "model.max_seq_len=64", "training.batch_size=2", "training.seq_len=32"]


def test_a_later_micro_batch_adds_each_gradient_when_its_node_is_done() -> None:
    """W's and b's incoming gradients live until the node that made them has released its inputs and the
    next allocation comes; a tied weight's first gradient waits for its second."""
    body = [alloc("h", "activation", 8, "forward"),
            alloc("W.grad", "gradient", 16, "backward"), alloc("b.grad", "gradient", 4, "backward"),
            alloc("grad_h", "temporary", 8, "backward"), free("h", "activation", 8, "backward"),
            alloc("next", "temporary", 8, "backward"),
            alloc("E.grad", "gradient", 32, "backward"), alloc("E.grad_extra", "temporary", 32, "backward"),
            alloc("E.grad_sum", "temporary", 32, "backward"), free("E.grad", "gradient", 32, "backward"),
            free("E.grad_extra", "temporary", 32, "backward"), free("E.grad_sum", "temporary", 32, "backward"),
            alloc("E.grad", "gradient", 32, "backward")]
    out = [(e.name, e.nbytes) for e in later_micro_batch(body)]
    assert out == [("h", 8), ("W.grad.incoming", 16), ("b.grad.incoming", 4), ("grad_h", 8), ("h", -8),
                   ("W.grad.incoming", -16), ("b.grad.incoming", -4), ("next", 8),
                   ("E.grad.incoming", 32), ("E.grad_extra", 32), ("E.grad_extra", -32),
                   ("E.grad.incoming", -32)]


def test_cost_does_not_grow_with_the_number_of_micro_batches() -> None:
    """Micro-batches 3..K return to the bytes the second started from: two are modelled for any K >= 2."""
    lengths = {k: len(step_events(load_config(None, [f"training.grad_accum_steps={k}"]), "cpu")[2])
               for k in (2, 64, 1 << 20)}
    assert len(set(lengths.values())) == 1
    peaks = {k: estimate(load_config(None, [f"training.grad_accum_steps={k}", "optimizer.name=adam"]), "cpu")
             .peak_bytes for k in (2, 3, 1000)}
    assert len(set(peaks.values())) == 1


def test_flops_and_global_batch_scale_with_the_micro_batches() -> None:
    one = estimate(load_config(None, TINY_GPT), "cpu")
    four = estimate(load_config(None, [*TINY_GPT, "training.grad_accum_steps=4"]), "cpu")
    assert four.flops.matmul == 4 * one.flops.matmul and four.flops.per_step == 4 * one.flops.per_step
    cfg = load_config(None, ["training.grad_accum_steps=4", "parallel.strategy=ddp", "parallel.world_size=8"])
    assert global_batch(cfg, 2) == 2 * 4 * 8
    data = json.loads(runner.invoke(app, ["estimate", "--set", "training.grad_accum_steps=4", "--parallel", "ddp",
                                          "-n", "8", "--json"]).stdout)
    assert (data["grad_accum_steps"], data["global_batch"]) == (4, 64)
    text = runner.invoke(app, ["estimate", "--set", "training.grad_accum_steps=4", "--parallel", "ddp", "-n", "8"])
    assert "global batch 2 x 4 x 8 = 64" in " ".join(text.stdout.split())


def test_bad_accumulation_is_one_line() -> None:
    result = runner.invoke(app, ["estimate", "--set", "training.grad_accum_steps=0"])
    assert result.exit_code == 2 and "training.grad_accum_steps" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("overrides", [["model.dim=64", "model.num_layers=3", "training.batch_size=8",
                                        "optimizer.name=adam", "training.grad_accum_steps=3"],
                                       [*TINY_GPT, "optimizer.name=adamw", "training.grad_accum_steps=2"]],
                         ids=["mlp-adam-k3", "gpt-tied-adamw-k2"])
def test_accumulation_exact_against_real_micro_batches(overrides: list[str]) -> None:
    pytest.importorskip("torch")
    from estimator.measure.verify import run_verify

    result = run_verify(load_config(None, overrides), "cpu")
    assert [(r.key, r.estimated, r.measured) for r in result.rows if r.estimated != r.measured] == []


def test_fsdp2_accumulation_exact_on_real_ranks() -> None:
    """FSDP2 reduce-scatters after every micro-batch and adds the shard into .grad: 2 gloo ranks, K=3."""
    assert_fsdp2_ranks_match(load_config(None, ["model.num_layers=2", "training.seq_len=8", "training.batch_size=1",
                                                "optimizer.name=adam", "training.grad_accum_steps=3"],
                                         base={"model": {"family": "transformer", "d_model": 16, "num_heads": 2,
                                                         "vocab_size": 32, "max_seq_len": 8}}))


def test_fsdp2_without_sync_keeps_the_unsharded_gradients() -> None:
    """set_requires_gradient_sync(False) until the last micro-batch: every rank holds the whole model's
    unsharded gradients between micro-batches, so the peak rises by about the gradients it no longer shards."""
    tiny = {"family": "transformer", "d_model": 16, "num_heads": 2, "vocab_size": 32, "max_seq_len": 8}
    base = ["model.num_layers=2", "training.seq_len=8", "training.batch_size=1", "optimizer.name=adam",
            "training.grad_accum_steps=3"]
    synced = per_rank_estimate(load_config(None, base, base={"model": tiny}), "zero3", 2, "cpu")
    kept = per_rank_estimate(load_config(None, [*base, "parallel.sync_every_micro_batch=false"],
                                         base={"model": tiny}), "zero3", 2, "cpu")
    assert kept.peak_bytes > synced.peak_bytes
    assert (kept.parameters, kept.gradients) == (synced.parameters, synced.gradients)
