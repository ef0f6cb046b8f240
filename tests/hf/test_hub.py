"""--model org/name and model: {hub: org/name}: config.json read through huggingface_hub's cache (docs/hf.md).

The cache is built in the test with huggingface_hub's layout; HF_HUB_OFFLINE=1, so nothing is fetched."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from estimator.api import estimate
from estimator.errors import EstimatorError
from estimator.hub import cache_dir, is_hub_id
from estimator.loader import load_config
from estimator.presets import model_section
from tests.hf.conftest import hub_snapshot, write_config
from tests.hf.tiny_configs import TINY_CONFIGS

pytest.importorskip("huggingface_hub")

TRAINING = ["training.seq_len=16", "device=cpu"]


def test_hub_section_reads_the_cached_config(tiny_llama_hub: Path, tmp_path: Path) -> None:
    hub = load_config(overrides=TRAINING, base={"model": {"hub": "tiny-org/tiny-llama"}})
    local = load_config(overrides=TRAINING, base={"model": {"hf_config": str(write_config(
        tmp_path / "local", TINY_CONFIGS["llama"]))}})
    assert hub.model == local.model
    assert (hub.model.family, hub.model.d_model, hub.model.num_kv_heads, hub.model.d_ff) == ("transformer", 64, 2, 96)
    # the analytic llama: 2·(128·64) embeddings + 2 blocks of (q, o 64·64; k, v 64·32; 3·64·96 MLP; 2 norms) + norm
    per_block = 2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 96 + 2 * 64
    assert estimate(hub).parameters == 2 * 128 * 64 + 2 * per_block + 64 == 78_144


def test_cli_model_org_name_in_a_fresh_process_imports_no_torch(tiny_llama_hub: Path) -> None:
    code = ("import sys, runpy\n"
            "sys.argv = ['estimator', 'estimate', '--model', 'tiny-org/tiny-llama', '--set', 'training.seq_len=16',"
            " '--json']\n"
            "try:\n    runpy.run_module('estimator', run_name='__main__')\n"
            "except SystemExit as e:\n    assert not e.code, e.code\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_CACHE": str(tiny_llama_hub), "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["parameters"] == 78_144 and data["config"]["model"]["family"] == "transformer"


def test_missing_offline_is_one_line(hub_cache: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "estimator", "estimate", "--model", "tiny-org/absent"],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_CACHE": str(hub_cache), "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: model.hub: config.json of tiny-org/absent is not in the "
                                                   "hub cache")
    assert "HF_HUB_OFFLINE" in lines[0] and "Traceback" not in proc.stderr


def test_revision_and_hf_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "hf-home"
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert cache_dir() == home / "hub"
    old = {**TINY_CONFIGS["llama"], "num_hidden_layers": 1}
    write_config(hub_snapshot(home / "hub", "tiny-org/tiny-llama", "v1", "1" * 40), old)
    write_config(hub_snapshot(home / "hub", "tiny-org/tiny-llama"), TINY_CONFIGS["llama"])
    assert load_config(overrides=TRAINING, base={"model": {"hub": "tiny-org/tiny-llama@v1"}}).model.num_layers == 1
    assert load_config(overrides=TRAINING, base={"model": {"hub": "tiny-org/tiny-llama"}}).model.num_layers == 2


def test_lookup_order_preset_then_path_then_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    write_config(tmp_path / "gpt2", TINY_CONFIGS["gpt2"])  # a folder named like a preset: the preset wins
    assert model_section("gpt2") == {"preset": "gpt2"}
    assert model_section("org/name") == {"hub": "org/name"}  # no such local folder: the hub
    write_config(tmp_path / "org" / "name", TINY_CONFIGS["llama"])  # now a local folder of that name
    assert model_section("org/name") == {"hf_config": "org/name"}  # relative to the current directory
    assert model_section(str(tmp_path / "org" / "name" / "config.json"))["hf_config"].endswith("config.json")
    with pytest.raises(EstimatorError, match=r"--model gpt-2: not a preset .*did you mean 'gpt2'"):
        model_section("gpt-2")


@pytest.mark.parametrize("text, ok", [("org/name", True), ("Qwen/Qwen2-0.5B", True), ("org/name@v1.0", True),
                                      ("org", False), ("a/b/c", False), ("../x", False), ("org/..", False)])
def test_hub_ids(text: str, ok: bool) -> None:
    assert is_hub_id(text) is ok


def test_bad_hub_value_is_one_line(hub_cache: Path) -> None:
    with pytest.raises(EstimatorError, match=r"^model.hub: expected a hub id 'org/name'"):
        load_config(base={"model": {"hub": "not a repo"}})
    with pytest.raises(EstimatorError, match=r"^model: give one of preset, hf_config, hub, not hf_config and hub"):
        load_config(base={"model": {"hub": "a/b", "hf_config": "x.json"}})


def _write_safetensors(path: Path, shapes: dict[str, tuple[int, ...]], dtype: str = "BF16", size: int = 2) -> None:
    """A safetensors file by the format's definition: 8-byte little-endian header length, JSON header, data."""
    import math
    import struct

    header, offset = {}, 0
    for name, shape in shapes.items():
        nbytes = math.prod(shape) * size
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(offset))


def test_checkpoint_in_the_hub_cache_beside_the_count(tiny_llama_hub: Path) -> None:
    from estimator.api import parameter_tensors

    cfg = load_config(overrides=TRAINING, base={"model": {"hub": "tiny-org/tiny-llama"}})
    snapshot = next((tiny_llama_hub / "models--tiny-org--tiny-llama" / "snapshots").iterdir())
    _write_safetensors(snapshot / "model.safetensors", {p.name: p.shape for p in parameter_tensors(cfg)})
    env = {**os.environ, "HF_HUB_CACHE": str(tiny_llama_hub), "HF_HUB_OFFLINE": "1"}
    args = [sys.executable, "-m", "estimator", "estimate", "--model", "tiny-org/tiny-llama", "--set",
            "training.seq_len=16"]
    data = json.loads(subprocess.run([*args, "--json"], capture_output=True, text=True, timeout=120, env=env,
                                     check=True).stdout)
    assert data["checkpoint"]["parameters"] == data["checkpoint"]["config_parameters"] == data["parameters"] == 78_144
    assert data["checkpoint"]["by_dtype"] == {"BF16": 78_144} and data["checkpoint"]["files"] == ["model.safetensors"]
    text = subprocess.run(args, capture_output=True, text=True, timeout=120, env=env, check=True).stdout
    assert ("checkpoint (safetensors headers, 1 file): 78,144 parameters (BF16 78,144) = the config's count"
            in " ".join(text.split()))  # rich wraps at the terminal's width
