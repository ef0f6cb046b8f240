"""FSDP2 (zero3 / fsdp) of a traced module: the units chosen, the hooks' marks, hand-derived shards, real ranks."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from estimator import load_config
from estimator.cli import app
from estimator.parallel import per_rank_estimate
from tests.fsdp_ranks import assert_fsdp2_ranks_match

torch = pytest.importorskip("torch")
runner = CliRunner()
ROOT = Path(__file__).resolve().parent.parent
STACK = {"module": "tests.fsdp_module_blocks:make_stack", "inputs": [{"shape": [2, 8], "dtype": "int64", "high": 40}],
         "loss": "cross_entropy", "search_dir": str(ROOT)}
LORA = {"module": "estimator.measure.examples:make_lora_mlp", "inputs": [{"shape": [8, 32]}], "loss": "mse"}


def _config(model: dict, *extra: str):  # noqa: ANN202
    return load_config(None, ["optimizer.name=adamw", "training.precision=fp32", *extra], base={"model": dict(model)})


def _units(factory, classes=None):  # noqa: ANN001, ANN202
    from estimator.measure.module_trace import fsdp_unit_modules

    units, chosen = fsdp_unit_modules(factory(device="cpu"), classes)
    return list(units), chosen


def test_default_units_are_the_repeated_blocks() -> None:
    """The most repeated class among the parameter-holding children of a ModuleList/Sequential; ties go to
    the outermost; no repeat: the root alone."""
    from estimator.measure.examples import make_lora_mlp, make_mlp, make_tiny_lm
    from tests.fsdp_module_blocks import make_stack

    assert _units(make_stack) == (["blocks.0", "blocks.1", "blocks.2"], ("Block",))
    # LoRALinear x 2 and (inside them) Linear x 2: the outer one, met first
    assert _units(make_lora_mlp) == (["0", "2"], ("LoRALinear",))
    assert _units(make_mlp) == (["0", "2", "4"], ("Linear",))  # the ReLUs hold nothing
    # no container repeats a class: the most repeated parameter-holding class anywhere
    assert _units(make_tiny_lm) == (["up", "down", "head"], ("Linear",))
    one_each = lambda device: torch.nn.Sequential(torch.nn.Linear(4, 4, device=device),  # noqa: E731
                                                  torch.nn.LayerNorm(4, device=device))
    assert _units(one_each) == ([], ())  # nothing repeats: fully_shard on the root only
    # a class named: its outermost instances that hold parameters (here every Linear, blocks' and the head)
    names, _ = _units(make_stack, ("Linear",))
    assert names == ["blocks.0.up", "blocks.0.down", "blocks.1.up", "blocks.1.down", "blocks.2.up", "blocks.2.down",
                     "head"]


def test_a_parameter_shared_by_two_units_is_refused() -> None:
    """fully_shard refuses a parameter managed by two groups; so does the estimate, in one line."""
    from estimator.errors import EstimatorError
    from estimator.measure.module_trace import fsdp_unit_modules, unit_of_parameters
    from tests.fsdp_module_blocks import make_stack

    model = make_stack(device="cpu")
    units, _ = fsdp_unit_modules(model, None)
    assert unit_of_parameters(model, units)["blocks.2.down.bias"] == "blocks.2"
    model.blocks[1].up.weight = model.blocks[0].up.weight
    with pytest.raises(EstimatorError, match="parameter 'blocks.0.up.weight' is shared by units 'blocks.0' and "
                                             "'blocks.1'"):
        unit_of_parameters(model, units)


def test_hooks_run_where_fsdp2_runs_them() -> None:
    """Marks read off the hooked trace: the root's pre-forward first, each block's pre/post-forward, the root's
    post-forward; backward in reverse with the root's pre-backward first (its output's gradient arrives
    first); block 0's input (the embedding's output) needs a gradient, so its post-backward runs in the
    autograd graph, the root's (its input is token ids) in the final callback."""
    from estimator.parallel.fsdp import _module_trace, units_of

    cfg = _config(STACK)
    marks = [(kind, unit) for _, kind, unit in _module_trace(cfg).fsdp_marks]
    blocks = [f"blocks.{i}" for i in range(3)]
    assert marks == [("pre_forward", "root"), *[(k, b) for b in blocks for k in ("pre_forward", "post_forward")],
                     ("post_forward", "root"), ("pre_backward", "root"),
                     *[(k, b) for b in reversed(blocks) for k in ("pre_backward", "post_backward")],
                     ("post_backward", "root")]
    units = units_of(cfg, [])
    assert units["embed.weight"] == units["head.weight"] == units["norm.bias"] == "root"
    assert units["blocks.1.up.weight"] == "blocks.1"


def test_model_states_are_padded_dim0_shards() -> None:
    """Hand count: embed 40x16 = 640, per block norm 32 + up 16x24+24 = 408 + down 24x16+16 = 400 (840), final norm
    32, head 40x16 = 640: 3,832 parameters. Every tensor's rows (40, 16, 24) split evenly in 2, so a rank holds
    1,916 (7,664 B fp32), the same gradient shard, and AdamW's two states (15,328 B)."""
    e = per_rank_estimate(_config(STACK), "zero3", 2, "cpu")
    assert (e.parameters, e.gradients, e.optimizer_state) == (7_664, 7_664, 15_328)
    # LoRA: the frozen base weights are sharded too, but only the adapters have gradient and state shards:
    # a (4,32) + b (64,4) + a (4,64) + b (8,4) = 672 trainable of 3,304 (2 ranks: 336 each, 1,344 B)
    lora = per_rank_estimate(_config(LORA), "zero3", 2, "cpu")
    assert (lora.parameters, lora.gradients, lora.optimizer_state) == (6_608, 1_344, 2_688)


def test_peaks_equal_the_measured_ranks() -> None:
    """The peaks the real gloo ranks measured (torch 2.13, every rank alike; benchmarks/fsdp_accuracy.py):
    keeping the blocks gathered costs the gathered blocks between forward and backward."""
    master = ["training.precision=bf16", "training.master_weights=true"]  # MixedPrecisionPolicy(bf16, fp32)
    cases = [(STACK, "zero3", [], 45_056, 60_472), (STACK, "fsdp", ["parallel.reshard_after_forward=false"],
                                                    51_424, 66_840), (LORA, "zero3", [], 34_136, 36_840),
             (STACK, "zero3", master, 34_882, 44_468),
             (STACK, "zero3", [*master, "parallel.reduce_dtype=param"], 34_882, 42_644),
             # autocast: its weight casts are traced with the hooks (cached per unsharded leaf parameter)
             (STACK, "zero3", ["training.precision=amp-bf16"], 41_488, 56_904),
             (LORA, "fsdp", ["training.precision=amp-bf16", "parallel.reshard_after_forward=false"], 37_720, 40_424),
             # micro-batches: a reduce-scatter after each, or the unsharded gradients kept until the last
             (STACK, "zero3", ["training.grad_accum_steps=3"], 52_720, 68_136),
             (STACK, "zero3", ["training.grad_accum_steps=3", "parallel.sync_every_micro_batch=false"], 58_496,
              73_912),
             (LORA, "fsdp", ["training.grad_accum_steps=2", "parallel.sync_every_micro_batch=false"], 36_824,
              39_528),
             (STACK, "fsdp", [*master, "training.grad_accum_steps=2", "parallel.sync_every_micro_batch=false",
                              "parallel.reshard_after_forward=false"], 45_004, 60_420)]
    for model, strategy, extra, first, steady in cases:
        e = per_rank_estimate(_config(model, *extra), strategy, 2, "cpu")
        assert (e.first_step_peak_bytes, e.peak_bytes) == (first, steady)


def test_transformers_model_shards_its_decoder_layers() -> None:
    """The hf family is a traced module too: a tiny Llama (transformers' classes) is sharded on its
    LlamaDecoderLayers. Under the MixedPrecisionPolicy its rotary buffers stay fp32 (FSDP2 casts only the
    parameters): 2 x 8 fp32 elements, as measured. The peaks are the real gloo ranks' (2 ranks, every
    figure equal; benchmarks/fsdp_accuracy.py)."""
    pytest.importorskip("transformers")
    from estimator.parallel.fsdp import module_units_json

    llama = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 128, "hidden_size": 64,
             "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 256,
             "num_key_value_heads": 2, "intermediate_size": 96}
    cfg = load_config(None, ["training.seq_len=16", "training.batch_size=2", "optimizer.name=adamw",
                             "training.precision=bf16", "training.master_weights=true"],
                      base={"model": {"family": "hf", "config": llama}})
    assert module_units_json(cfg, "zero3")["units"] == ["model.model.layers.0", "model.model.layers.1"]
    e = per_rank_estimate(cfg, "zero3", 2, "cpu")
    assert (e.parameters, e.gradients, e.optimizer_state) == (156_288, 156_288, 312_576)
    assert (e.first_step_peak_bytes, e.peak_bytes) == (662_432, 964_516)


def test_output_names_the_units(tmp_path) -> None:  # noqa: ANN001
    """The estimate says which units fully_shard wraps and why (text and --json)."""
    import json

    path = tmp_path / "c.yaml"
    path.write_text(json.dumps({"model": STACK}))
    result = runner.invoke(app, ["estimate", str(path), "--parallel", "zero3", "-n", "2"])
    assert result.exit_code == 0
    assert "FSDP2 units: fully_shard on 3 x Block (blocks.0, blocks.1, blocks.2), then the root" in " ".join(
        result.stdout.split())
    result = runner.invoke(app, ["estimate", str(path), "--parallel", "fsdp", "-n", "2", "--json", "--set",
                                 "parallel.fsdp_unit_class=[Block,Embedding]"])
    assert json.loads(result.stdout)["distributed"]["fsdp_units"] == {
        "classes": ["Block", "Embedding"], "chosen_by": "parallel.fsdp_unit_class",
        "units": ["embed", "blocks.0", "blocks.1", "blocks.2"]}


def test_bad_unit_class_is_one_line(tmp_path) -> None:  # noqa: ANN001
    path = tmp_path / "c.yaml"
    path.write_text("model: {module: 'estimator.measure.examples:make_mlp', inputs: [{shape: [4, 16]}]}\n"
                    "parallel: {strategy: zero3, world_size: 2, fsdp_unit_class: Block}\n")
    result = runner.invoke(app, ["estimate", str(path)])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        "error: parallel.fsdp_unit_class: the model has no submodule of class 'Block' (its classes: Linear, ReLU)"]
    result = runner.invoke(app, ["estimate", "--parallel", "zero3", "-n", "2", "--set",
                                 "parallel.fsdp_unit_class=Linear"])
    assert result.exit_code == 2 and "error: parallel.fsdp_unit_class: chooses the units of a model.module" \
        in result.stderr


def test_the_policy_keeps_an_fp32_target() -> None:
    """Under the MixedPrecisionPolicy the batch is made for the fp32 model: mse's target stays fp32 and meets
    the 16-bit output in the loss. The LoRA example (float input cast at the root, 8 x 8 fp32 target), bf16 +
    master, AdamW, 2 ranks; the peaks the real gloo ranks measured (every figure equal)."""
    e = per_rank_estimate(_config(LORA, "training.precision=bf16", "training.master_weights=true"), "zero3", 2, "cpu")
    assert (e.parameters, e.gradients, e.first_step_peak_bytes, e.peak_bytes) == (6_608, 1_344, 21_596, 24_300)


def test_the_policy_casts_float_inputs_at_the_root() -> None:
    """FSDP2's root pre-forward casts a float input to the param dtype before gathering: the fp32 batch
    (4 x 16 x 4 = 256 B) stays, its bf16 copy (128 B) lives while the first layer saves it. make_mlp with
    cross-entropy (int64 class ids), AdamW; the peaks the real gloo ranks measured (every figure equal)."""
    mlp = {"module": "estimator.measure.examples:make_mlp", "inputs": [{"shape": [4, 16]}], "loss": "cross_entropy"}
    master = ["training.precision=bf16", "training.master_weights=true"]
    e = per_rank_estimate(_config(mlp, *master), "zero3", 2, "cpu")
    assert (e.parameters, e.first_step_peak_bytes, e.peak_bytes) == (3_464, 18_370, 23_364)
    e = per_rank_estimate(_config(mlp, *master, "parallel.reshard_after_forward=false", "parallel.reduce_dtype=param"),
                          "fsdp", 4, "cpu")
    assert (e.parameters, e.first_step_peak_bytes, e.peak_bytes) == (1_732, 9_370, 12_308)


def test_a_unit_that_runs_twice_is_refused() -> None:
    """FSDP2 reshards and re-gathers a unit each time its forward runs; the timeline models one forward per unit."""
    shared = {"module": "tests.fsdp_module_blocks:make_shared", "inputs": [{"shape": [2, 8]}], "search_dir": str(ROOT)}
    with pytest.raises(Exception, match="parallel.fsdp_unit_class: unit 'blocks.0' runs its forward more than once"):
        per_rank_estimate(_config(shared), "zero3", 2, "cpu")


def test_cpu_offload_moves_the_model_states_to_the_host() -> None:
    """CPUOffloadPolicy (estimate only, as for the transformer family): the shards, their gradients and the
    optimizer state are host bytes; the device keeps none of them."""
    plain = per_rank_estimate(_config(STACK), "zero3", 2, "cpu")
    off = per_rank_estimate(_config(STACK, "parallel.offload=true"), "zero3", 2, "cpu")
    assert (off.parameters, off.gradients, off.optimizer_state) == (0, 0, 0)
    assert (off.host["parameters"], off.host["gradients"], off.host["optimizer_state"]) == (7_664, 7_664, 15_328)
    assert off.peak_bytes < plain.peak_bytes


@pytest.mark.slow
def test_real_ranks_stack_zero3() -> None:
    """fully_shard on each Block, then the root, 2 gloo processes: every rank's figures equal the estimate
    (the other cases, LoRA's frozen weights, 4 ranks, reshard_after_forward false: benchmarks/fsdp_accuracy.py)."""
    assert_fsdp2_ranks_match(_config(STACK), "zero3", 2)

