"""The hf family: any transformers architecture built from its config.json and traced (docs/hf.md)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from estimator.api import estimate
from estimator.config import TrainingConfig
from estimator.errors import EstimatorError
from estimator.families.hf import HFModelConfig, module_section
from estimator.loader import load_config
from tests.hf.conftest import write_config
from tests.hf.tiny_configs import TINY_CONFIGS

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

BERT = {"model_type": "bert", "architectures": ["BertForMaskedLM"], "vocab_size": 128, "hidden_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128, "max_position_embeddings": 64}
T5 = {"model_type": "t5", "architectures": ["T5ForConditionalGeneration"], "vocab_size": 128, "d_model": 64,
      "d_kv": 16, "d_ff": 128, "num_layers": 2, "num_heads": 4, "is_encoder_decoder": True, "pad_token_id": 0,
      "eos_token_id": 1, "decoder_start_token_id": 0}
VIT = {"model_type": "vit", "architectures": ["ViTForImageClassification"], "hidden_size": 64, "num_hidden_layers": 2,
       "num_attention_heads": 4, "intermediate_size": 128, "image_size": 32, "patch_size": 8, "num_labels": 10}


def _load(folder: Path, *sets: str) -> object:
    return load_config(overrides=["device=cpu", "optimizer.name=adamw", "training.precision=fp32", *sets],
                       base={"model": {"hf_config": str(folder)}})


@pytest.mark.parametrize("values, task", [
    ({"model_type": "x", "architectures": ["GPT2LMHeadModel"]}, "causal_lm"),
    ({"model_type": "x", "architectures": ["BertForMaskedLM"]}, "masked_lm"),
    ({"model_type": "x", "architectures": ["T5ForConditionalGeneration"]}, "seq2seq_lm"),
    ({"model_type": "x", "architectures": ["RobertaForSequenceClassification"]}, "sequence_classification"),
    ({"model_type": "x", "image_size": 224}, "image_classification"),
    ({"model_type": "x", "is_encoder_decoder": True}, "seq2seq_lm"),
    ({"model_type": "x"}, "causal_lm"),
])
def test_task_from_architectures_or_keys(values: dict, task: str) -> None:
    assert HFModelConfig(config=values).resolved_task() == task


def test_batch_of_each_head() -> None:
    batch = TrainingConfig(batch_size=3, seq_len=8)
    assert module_section(HFModelConfig(config=BERT), batch)["inputs"] == [
        {"shape": [3, 8], "dtype": "int64", "high": 128}]
    assert module_section(HFModelConfig(config=VIT), TrainingConfig(batch_size=3))["inputs"] == [
        {"shape": [3, 3, 32, 32], "dtype": "float32"}, {"shape": [3], "dtype": "int64", "high": 10}]
    with pytest.raises(EstimatorError, match="training.seq_len: an image model has no sequence"):
        module_section(HFModelConfig(config=VIT), batch)


def test_engine_choice_and_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    llama, bert = write_config(tmp_path / "llama", TINY_CONFIGS["llama"]), write_config(tmp_path / "bert", BERT)
    assert _load(llama).model.family == "transformer"  # covered: the analytic family by default
    assert _load(llama, "model.engine=transformers").model.family == "hf"
    assert _load(bert).model.family == "hf"  # not covered: the real model
    merged = _load(bert, "model.config.num_hidden_layers=1").model
    assert merged.config["num_hidden_layers"] == 1 and merged.config["hidden_size"] == 64
    with pytest.raises(EstimatorError, match="^model.engine: the analytic families cover .*not 'bert'; use engine: "
                                             "transformers"):
        _load(bert, "model.engine=analytic")
    with pytest.raises(EstimatorError, match="^model.engine: expected one of analytic, transformers, got 'torch'"):
        _load(llama, "model.engine=torch")
    monkeypatch.setattr("estimator.families.hf.transformers_installed", lambda: False)
    with pytest.raises(EstimatorError, match=r"^model.hf_config: model_type 'bert' is built by transformers, which "
                                             r"is not installed .*pip install 'estimator\[hf\]'"):
        _load(bert)


def test_a_head_transformers_lacks_is_one_line(tmp_path: Path) -> None:
    cfg = _load(write_config(tmp_path / "vit", VIT), "model.task=causal_lm", "training.seq_len=4")
    with pytest.raises(EstimatorError, match="^model.task: transformers has no AutoModelForCausalLM for model_type "
                                             "'vit'"):
        estimate(cfg)


@pytest.mark.parametrize("values, cls", [(BERT, "BertForMaskedLM"), (T5, "T5ForConditionalGeneration"),
                                         (VIT, "ViTForImageClassification")])
def test_uncovered_architectures_are_traced(tmp_path: Path, values: dict, cls: str) -> None:
    sets = [] if values is VIT else ["training.seq_len=16"]
    est = estimate(_load(write_config(tmp_path / cls, values), *sets))
    model = getattr(transformers, cls)(transformers.AutoConfig.for_model(**values))
    assert est.parameters == sum(p.numel() for p in model.parameters())  # measured by torch
    assert est.memory.parameters == 4 * est.parameters and est.saved_activations > 0
    assert est.peak_bytes > est.memory.parameters + est.memory.gradients
    assert est.flops.matmul > 0 and est.batch.batch_size == 2


def test_checkpoint_beside_the_config(tmp_path: Path) -> None:
    values = {**TINY_CONFIGS["llama"], "tie_word_embeddings": False}
    model = transformers.LlamaForCausalLM(transformers.AutoConfig.for_model(**values))
    model.save_pretrained(tmp_path / "ckpt")  # config.json + model.safetensors, as the hub has them
    assert (tmp_path / "ckpt" / "model.safetensors").is_file()
    cfg = _load(tmp_path / "ckpt", "training.seq_len=16")
    n = sum(p.numel() for p in model.parameters())
    assert cfg.checkpoint.parameters == estimate(cfg).parameters == n == 78_144
    assert cfg.checkpoint.by_dtype == {"F32": n}
    tied = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps({**tied, "tie_word_embeddings": True}))
    retied = _load(tmp_path / "ckpt", "training.seq_len=16")
    from estimator.safetensors_header import summary_line

    line = summary_line(retied.checkpoint, estimate(retied).parameters)
    assert "≠ the config's 69,952 (+8,192)" in line  # the checkpoint's untied head: 128 x 64 more


def test_verify_of_an_hf_config_runs_transformers_model_by_default(tmp_path: Path) -> None:
    """`verify --model DIR` of a covered type: transformers' LlamaForCausalLM is run and traced (no engine given)."""
    import os
    import subprocess
    import sys

    from estimator.hf_config import engine_default

    llama = write_config(tmp_path / "llama", TINY_CONFIGS["llama"])
    with engine_default("transformers"):
        assert _load(llama).model.family == "hf" and _load(llama, "model.engine=analytic").model.family == "transformer"
        assert _load(write_config(tmp_path / "mixtral", TINY_CONFIGS["mixtral"])).model.family == "moe"
    proc = subprocess.run([sys.executable, "-m", "estimator", "verify", "--model", str(llama), "--device", "cpu",
                           "-p", "fp32", "--set", "training.seq_len=16", "--json"],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "COLUMNS": "200"})
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["config"]["model"]["family"] == "hf" and "LlamaForCausalLM" in data["measured"]["model"]
    for key in ("peak_bytes", "first_step_peak_bytes", "activations", "flops_matmul"):
        assert data["comparison"][key]["estimated"] == data["comparison"][key]["measured"], key


@pytest.mark.parametrize("checkpointing", ["full"])
def test_verify_runs_the_transformers_model_exactly(tmp_path: Path, checkpointing: str) -> None:
    """transformers' Llama with its own activation_checkpointing_enable(), measured on the CPU."""
    from estimator.measure.verify import run_verify

    cfg = _load(write_config(tmp_path / "llama", TINY_CONFIGS["llama"]), "model.engine=transformers",
                "training.seq_len=16", f"training.activation_checkpointing={checkpointing}")
    result = run_verify(cfg, "cpu")
    m = result.measurement
    assert "LlamaForCausalLM" in result.to_json()["measured"]["model"]
    assert result.estimate.peak_bytes == m.real_steady_step.peak_bytes - m.baseline_bytes
    assert result.estimate.first_step_peak_bytes == m.real_first_step.peak_bytes - m.baseline_bytes
    assert result.estimate.saved_activations == m.activations
    assert result.estimate.flops.matmul == m.flops_matmul
