"""Models where they live: a Hugging Face hub id (``org/name``) read through ``huggingface_hub``'s cache.

Only ``config.json`` is fetched (and, when a checkpoint sits beside it in the cache, its safetensors
headers are read by ``estimator.safetensors_header``); weights are never downloaded. The cache is
the one ``huggingface_hub`` uses, looked up when called (not when imported, so a changed environment
counts): ``HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``; its layout is
``models--{org}--{name}/refs/{revision}`` (a commit hash) and ``models--{org}--{name}/snapshots/{hash}/
config.json`` (huggingface_hub's "Manage the cache" guide). With ``HF_HUB_OFFLINE=1`` the network is
never tried; otherwise a file missing from the cache is downloaded with ``hf_hub_download``, and
a failure is one line (not in the cache and offline, or the hub cannot be reached).
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path

from estimator.errors import EstimatorError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}(@[\w./-]{1,100})?$")
"""``org/name`` with an optional ``@revision`` (branch, tag or commit), as the hub spells repo ids."""
_TRUE = {"1", "ON", "YES", "TRUE"}


def is_hub_id(text: str) -> bool:
    """Whether ``text`` looks like ``org/name`` (or ``org/name@revision``)."""
    return bool(HUB_ID.match(text)) and ".." not in text


def split_revision(hub_id: str) -> tuple[str, str | None]:
    """``org/name@rev`` -> (``org/name``, ``rev``); no ``@`` -> the revision is None (``main``)."""
    repo, _, revision = hub_id.partition("@")
    return repo, revision or None


def cache_dir() -> Path:
    """huggingface_hub's cache directory as the environment says now."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HUGGINGFACE_HUB_CACHE"):
        return Path(os.environ["HUGGINGFACE_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def offline() -> bool:
    """``HF_HUB_OFFLINE`` (huggingface_hub's switch; ``TRANSFORMERS_OFFLINE`` too, as transformers reads it)."""
    return any(os.environ.get(key, "").strip().upper() in _TRUE for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_file(hub_id: str, filename: str = "config.json", field: str = "model.hub") -> Path:
    """The cached path of ``filename`` of the hub model ``hub_id``, fetched when online and missing."""
    if not is_hub_id(hub_id):
        raise EstimatorError(f"{field}: expected a hub id 'org/name' (optionally '@revision'), got {hub_id!r}")
    return _hub_file(hub_id, filename, str(cache_dir()), offline(), field)


@functools.lru_cache(maxsize=64)
def _hub_file(hub_id: str, filename: str, cache: str, is_offline: bool, field: str) -> Path:
    try:
        from huggingface_hub import hf_hub_download, try_to_load_from_cache
    except ImportError:
        raise EstimatorError(f"{field}: reading {hub_id!r} from the Hugging Face hub cache needs huggingface_hub; "
                             "pip install 'estimator[hf]'") from None
    repo, revision = split_revision(hub_id)
    where = f"{repo}{'@' + revision if revision else ''}"
    cached = try_to_load_from_cache(repo, filename, cache_dir=cache, revision=revision)
    if isinstance(cached, str):
        return Path(cached)
    if is_offline:
        raise EstimatorError(f"{field}: {filename} of {where} is not in the hub cache ({cache}) and HF_HUB_OFFLINE "
                             "is set; download it once online, or give a local path")
    import logging

    logger = logging.getLogger("huggingface_hub")
    level = logger.level
    logger.setLevel(logging.ERROR)  # its retry warnings; the failure is reported below in one line
    try:
        return Path(hf_hub_download(repo, filename, revision=revision, cache_dir=cache, etag_timeout=5))
    except Exception as exc:  # every hub failure (network, 404, gated) becomes one line
        from huggingface_hub.errors import (
            EntryNotFoundError,
            GatedRepoError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        if isinstance(exc, LocalEntryNotFoundError):
            why = "cannot reach the Hugging Face hub"
        elif isinstance(exc, GatedRepoError):
            why = "the repository is gated (log in with `hf auth login` and accept its terms)"
        elif isinstance(exc, RepositoryNotFoundError):
            why = "no such repository on the hub (or it is private)"
        elif isinstance(exc, RevisionNotFoundError):
            why = f"no revision {revision!r}"
        elif isinstance(exc, EntryNotFoundError):
            why = f"the repository has no {filename}"
        else:
            why = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        raise EstimatorError(f"{field}: {filename} of {where} is not in the hub cache ({cache}) and {why}") from None
    finally:
        logger.setLevel(level)
