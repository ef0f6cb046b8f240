"""What the analytic family leaves out of an hf_config's real step is said, not silently dropped (docs/hf.md)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from estimator import load_config
from estimator.cli import app

runner = CliRunner()
GPT2 = {"model_type": "gpt2", "n_embd": 32, "n_head": 4, "n_layer": 2, "n_positions": 16, "vocab_size": 96}
LLAMA = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 88, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 96, "max_position_embeddings": 16}


def _omissions(tmp_path: Path, data: dict, **section: str) -> tuple[str, ...]:
    (tmp_path / "config.json").write_text(json.dumps(data))
    return load_config(None, ["training.seq_len=16"], base={"model": {"hf_config": str(tmp_path), **section}}
                       ).analytic_omissions


def test_gpt2_dropout_defaults_to_transformers_0_1_and_is_modelled(tmp_path: Path) -> None:
    """configuration_gpt2.py defaults resid/embd/attn_pdrop to 0.1: a config.json without them has dropout, which
    the transformer family models (embd_dropout, resid_dropout, attn_dropout): nothing left out."""
    assert _omissions(tmp_path, GPT2) == ()
    (tmp_path / "config.json").write_text(json.dumps({**GPT2, "attn_pdrop": 0.2}))
    model = load_config(None, ["training.seq_len=16"], base={"model": {"hf_config": str(tmp_path)}}).model
    assert (model.embd_dropout, model.resid_dropout, model.attn_dropout) == (0.1, 0.1, 0.2)


def test_other_types_default_to_no_dropout(tmp_path: Path) -> None:
    assert _omissions(tmp_path, LLAMA) == ()
    (note,) = _omissions(tmp_path, {**LLAMA, "attention_dropout": 0.1})
    assert note.startswith("dropout (attention_dropout=0.1) is not modelled")


def test_deepseek_mla_is_modelled_and_the_transformers_engine_has_nothing_left_out(tmp_path: Path) -> None:
    deepseek = json.loads((Path(__file__).parent.parent / "configs/hf/deepseek-v3-moe.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(deepseek))
    cfg = load_config(None, ["training.seq_len=16"], base={"model": {"hf_config": str(tmp_path)}})
    assert cfg.analytic_omissions == ()  # transformers' MLA and router are modelled (deepseek_transformers)
    assert cfg.model.deepseek_transformers
    from estimator.hf_config import analytic_omissions

    assert analytic_omissions({"hf_config": str(tmp_path), "engine": "transformers"}, tmp_path) == ()
    assert analytic_omissions({"family": "transformer"}, tmp_path) == ()


def test_shown_in_the_table_and_the_json(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({**LLAMA, "attention_dropout": 0.1}))
    args = ["estimate", "--set", f"model.hf_config={tmp_path}", "--set", "training.seq_len=16"]
    text = runner.invoke(app, args)
    said = " ".join(text.stdout.split())
    assert text.exit_code == 0 and "Not in this estimate: dropout (attention_dropout=0.1" in said
    data = json.loads(runner.invoke(app, [*args, "--json"]).stdout)
    assert data["analytic_omissions"][0].startswith("dropout (attention_dropout=0.1")
    plain = json.loads(runner.invoke(app, ["estimate", "--json"]).stdout)
    assert "analytic_omissions" not in plain


@pytest.mark.parametrize("name", ["gpt2.json", "pythia-160m.json", "qwen2-0.5b.json", "tinyllama-1.1b.json"])
def test_shipped_configs(name: str, tmp_path: Path) -> None:
    data = json.loads((Path(__file__).parent.parent / "configs/hf" / name).read_text())
    assert _omissions(tmp_path, data) == ()  # GPT-2 ships with dropout 0.1 (modelled); the others with none


def test_tensor_parallel_shards_the_plain_blocks_and_says_so(tmp_path: Path) -> None:
    """The transformers-style options an hf_config sets are not modelled with TP: the estimate switches them
    off (the per-rank figures of the same architecture as a plain transformer config) and names them."""
    (tmp_path / "config.json").write_text(json.dumps(LLAMA))
    common = ["--set", "training.seq_len=16", "--set", "training.batch_size=2", "--parallel", "tp", "-n", "2", "--json"]
    hf = json.loads(runner.invoke(app, ["estimate", "--set", f"model.hf_config={tmp_path}", *common]).stdout)
    (note,) = hf["analytic_omissions"]
    assert note.startswith("under tensor parallelism") and "loss_upcast, labels_from_inputs" in note
    plain = {"family": "transformer", "d_model": 32, "num_heads": 4, "num_kv_heads": 2, "d_ff": 88, "vocab_size": 96,
             "max_seq_len": 16, "num_layers": 2, "positions": "rope", "norm": "rmsnorm", "mlp": "swiglu",
             "bias": False, "tie_embeddings": False}
    sets = [x for k, v in plain.items() for x in ("--set", f"model.{k}={v}")]
    same = json.loads(runner.invoke(app, ["estimate", "--set", "model.family=transformer", *sets,
                                          *common, "-o", "adamw", "-p", "amp-bf16"]).stdout)
    def figures(data: dict) -> list:
        return [(r["memory"], r["peak_bytes"], r["first_step_peak_bytes"]) for r in data["distributed"]["ranks"]]

    assert figures(hf) == figures(same) and hf["distributed"]["ranks"][0]["memory"]["parameters"] == 59_008


def test_a_sliding_window_no_longer_than_the_sequence_is_said(tmp_path: Path) -> None:
    """transformers keeps SDPA's is_causal while the sequence is shorter than the window, then passes a mask
    (masking_utils._ignore_causal_mask_sdpa); Qwen2's window applies only with use_sliding_window."""
    mistral = {**LLAMA, "model_type": "mistral", "sliding_window": 16}
    (note,) = _omissions(tmp_path, mistral)  # S = 16
    assert note.startswith("sliding-window attention (sliding_window=16, seq_len=16) is not modelled")
    assert _omissions(tmp_path, {**mistral, "sliding_window": 17}) == ()
    assert _omissions(tmp_path, {**mistral, "sliding_window": None}) == ()
    qwen2 = {**LLAMA, "model_type": "qwen2", "sliding_window": 8}
    assert _omissions(tmp_path, qwen2) == ()
    (note,) = _omissions(tmp_path, {**qwen2, "use_sliding_window": True})
    assert "sliding_window=8, seq_len=16" in note
