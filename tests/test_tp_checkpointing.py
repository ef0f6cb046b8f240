"""Tensor parallelism with activation checkpointing per block (``training.activation_checkpointing: full``,
non-reentrant, as torchtitan's ``checkpoint_wrapper`` on the TP-parallelized model): what a checkpointed block
keeps, its recomputation in backward with the collectives it re-runs, against values measured on real gloo ranks."""

from __future__ import annotations

import pytest

from estimator import load_config
from estimator.parallel import per_rank_estimate, rank_groups

LLAMA_LIKE = {"family": "transformer", "d_model": 32, "num_heads": 4, "num_kv_heads": 2, "vocab_size": 96,
              "max_seq_len": 16, "positions": "rope", "norm": "rmsnorm", "mlp": "swiglu", "d_ff": 88,
              "bias": False, "tie_embeddings": False}
GPT2_LIKE = {"family": "transformer", "d_model": 32, "num_heads": 4, "vocab_size": 96, "max_seq_len": 16}
CKPT = "training.activation_checkpointing=full"


def _config(model: dict, *extra: str, layers: int = 2):  # noqa: ANN202
    return load_config(None, [f"model.num_layers={layers}", "training.seq_len=16", "training.batch_size=2",
                              "optimizer.name=adam", "training.precision=fp32", CKPT, *extra],
                       base={"model": dict(model)})


# Measured on 2 gloo ranks (torch 2.13, CPU; benchmarks/tp_accuracy.py), both ranks equal:
# (parameters, gradients, optimizer state, first-step peak, steady peak) in bytes.
MEASURED = [
    (LLAMA_LIKE, (), (59_008, 65_152, 118_016, 259_680, 282_980)),
    (LLAMA_LIKE, ("parallel.sequence_parallel=true",), (59_008, 65_152, 118_016, 259_680, 272_612)),
    (LLAMA_LIKE, ("training.precision=bf16",), (29_504, 32_576, 59_008, 130_142, 153_248)),
    (GPT2_LIKE, ("training.precision=bf16",), (30_016, 30_016, 60_032, 129_050, 138_108)),
]


@pytest.mark.parametrize(("model", "extra", "measured"), MEASURED)
def test_estimate_equals_the_measured_ranks(model: dict, extra: tuple[str, ...], measured: tuple[int, ...]) -> None:
    groups = rank_groups(_config(model, *extra), "tp", 2, "cpu")
    e = groups[0].estimate
    assert (e.parameters, e.gradients, e.optimizer_state, e.first_step_peak_bytes, e.peak_bytes) == measured


def test_a_checkpointed_block_keeps_its_input_only() -> None:
    """Per layer a rank keeps the block's input: T·d·a without SP (2sbh in bf16, Korthikanti et al.'s full
    recomputation), T·d·a/t with SP (the sequence-sharded stream). Layers 2 and 3 differ by exactly that."""
    for sp, per_layer in ((False, 32 * 32 * 2), (True, 32 * 32 * 2 // 2)):
        saved = [per_rank_estimate(_config(LLAMA_LIKE, "training.precision=bf16",
                                           f"parallel.sequence_parallel={str(sp).lower()}", layers=n),
                                   "tp", 2, "cpu").activations for n in (2, 3)]
        assert saved[1] - saved[0] == per_layer


def test_recomputation_reruns_the_forward_collectives_up_to_down_proj() -> None:
    """T = 32, d = 32, fp32, 2 blocks. The recomputed forward stops once down_proj has saved its input
    (torch.utils.checkpoint's early stop), before its matmul and its all-reduce: each block re-runs the
    attention output's all-reduce (4,096 B): 16 + 2 all-reduces. Under SP each block re-runs the all-gathers
    before attention and MLP (2,048 -> 4,096 B) and o_proj's reduce-scatter (gloo: an all-reduce of 4,096 B)."""
    plain = per_rank_estimate(_config(LLAMA_LIKE), "tp", 2, "cpu").communication_volume.steady_step
    assert plain.logical() == {"all_reduce": (18, 18 * 4096, 18 * 4096), "all_gather": (1, 6144, 12288)}
    sp = per_rank_estimate(_config(LLAMA_LIKE, "parallel.sequence_parallel=true"), "tp", 2, "cpu")
    assert sp.communication_volume.steady_step.logical() == {
        "all_reduce": (27, 12 * 4096 + 15 * 128, 12 * 4096 + 15 * 128),
        "all_gather": (15, 14 * 2048 + 6144, 14 * 4096 + 12288)}


# On real ranks: tests/test_comm_mesh.py runs a checkpointed block with SP on a 2 x 2 mesh (memory and every
# collective); benchmarks/tp_accuracy.py runs the cases above and more (docs/accuracy.md).
