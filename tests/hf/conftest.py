"""Helpers for tests/hf: tiny config.json files, and a Hugging Face hub cache laid out as huggingface_hub does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.hf.tiny_configs import TINY_CONFIGS

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def write_config(folder: Path, values: dict) -> Path:
    """``folder/config.json`` holding ``values``; returns the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(values))
    return folder


def hub_snapshot(cache: Path, repo: str, revision: str = "main", commit: str = COMMIT) -> Path:
    """The snapshot folder of ``repo`` in the hub cache ``cache``, created with ``refs/{revision}``.

    huggingface_hub's layout ("Manage the huggingface_hub cache system"): ``models--{org}--{name}/refs/
    {revision}`` holds the commit hash, ``models--{org}--{name}/snapshots/{hash}/`` the files.
    """
    root = cache / ("models--" + repo.replace("/", "--"))
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / revision).write_text(commit)
    snapshot = root / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    return snapshot


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty hub cache in ``tmp_path`` that huggingface_hub is pointed at, offline."""
    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


@pytest.fixture
def tiny_llama_hub(hub_cache: Path) -> Path:
    """``tiny-org/tiny-llama`` in the hub cache: config.json only."""
    write_config(hub_snapshot(hub_cache, "tiny-org/tiny-llama"), TINY_CONFIGS["llama"])
    return hub_cache
