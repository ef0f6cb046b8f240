"""Exact parameter counts and dtypes of a checkpoint from its safetensors headers (no weights read).

The format (huggingface/safetensors, README "Format"): 8 bytes, an unsigned little-endian 64-bit
integer N, the size of the header; then N bytes of UTF-8 JSON, a mapping from tensor name to
``{"dtype": "BF16", "shape": [rows, cols], "data_offsets": [begin, end]}`` (offsets into the byte
buffer that follows), plus an optional ``"__metadata__"`` mapping of strings; then the tensors'
bytes. The reference implementation refuses a header over 100,000,000 bytes; so does this reader.
A sharded checkpoint has ``model.safetensors.index.json`` (transformers' ``save_pretrained``):
``{"metadata": {"total_size": bytes}, "weight_map": {tensor name: shard file}}``; each shard's header
is read. Only ``8 + N`` bytes of each file are ever read.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from estimator.errors import EstimatorError

MAX_HEADER_BYTES = 100_000_000
"""The largest header the reference implementation accepts (safetensors' ``MAX_HEADER_SIZE``)."""
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a checkpoint: its name, dtype (safetensors' spelling, e.g. ``BF16``) and shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class CheckpointCount:
    """What a checkpoint's headers say: its tensors, and the shard files that could not be read."""

    files: tuple[str, ...]
    tensors: tuple[TensorEntry, ...]
    missing: tuple[str, ...] = field(default=())  # shards the index names that are not on disk

    @property
    def parameters(self) -> int:
        return sum(t.numel for t in self.tensors)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def by_dtype(self) -> dict[str, int]:
        """Elements per dtype, largest first."""
        counts: dict[str, int] = {}
        for t in self.tensors:
            counts[t.dtype] = counts.get(t.dtype, 0) + t.numel
        return dict(sorted(counts.items(), key=lambda kv: -kv[1]))

    @property
    def complete(self) -> bool:
        return not self.missing

    def to_json(self) -> dict[str, Any]:
        return {"files": list(self.files), "tensors": len(self.tensors), "parameters": self.parameters,
                "bytes": self.nbytes, "by_dtype": self.by_dtype, "missing_files": list(self.missing)}


def read_header(path: str | Path) -> dict[str, Any]:
    """The JSON header of one ``.safetensors`` file (``__metadata__`` included); one-line errors."""
    p = Path(path)
    try:
        with p.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise EstimatorError(f"{p}: not a safetensors file (shorter than its 8-byte header length)")
            (size,) = struct.unpack("<Q", head)
            if size > MAX_HEADER_BYTES:
                raise EstimatorError(f"{p}: safetensors header of {size:,} bytes (at most {MAX_HEADER_BYTES:,})")
            raw = f.read(size)
    except OSError as exc:
        raise EstimatorError(f"cannot read {p}: {exc.strerror or exc}") from None
    if len(raw) < size:
        raise EstimatorError(f"{p}: truncated safetensors header ({len(raw):,} of {size:,} bytes)")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise EstimatorError(f"{p}: the safetensors header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise EstimatorError(f"{p}: the safetensors header must be a JSON object")
    return header


def tensor_entries(path: str | Path) -> list[TensorEntry]:
    """Every tensor the header of ``path`` lists (``__metadata__`` left out), checked for shape."""
    entries = []
    for name, info in read_header(path).items():
        if name == "__metadata__":
            continue
        shape = info.get("shape") if isinstance(info, dict) else None
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        dtype = info.get("dtype") if isinstance(info, dict) else None
        if (not isinstance(dtype, str) or not isinstance(shape, list)
                or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
                or not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets))):
            raise EstimatorError(f"{path}: tensor {name!r}: expected dtype, shape and data_offsets, got {info!r}")
        entries.append(TensorEntry(name, dtype, tuple(shape), offsets[1] - offsets[0]))
    return entries


def checkpoint_count(folder: str | Path) -> CheckpointCount | None:
    """The checkpoint in ``folder``: the sharded index if present, else ``model.safetensors``; None if
    neither is there. Shards the index names but the folder lacks are listed as missing."""
    d = Path(folder)
    index = d / INDEX
    if index.is_file():
        try:
            data = json.loads(index.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise EstimatorError(f"{index}: cannot read the safetensors index ({exc})") from None
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise EstimatorError(f"{index}: expected a 'weight_map' of tensor name -> shard file")
        shards = tuple(dict.fromkeys(weight_map.values()))
        present = [s for s in shards if (d / s).is_file()]
        tensors = [t for s in present for t in tensor_entries(d / s)]
        return CheckpointCount(tuple(present), tuple(tensors), tuple(s for s in shards if s not in present))
    single = d / SINGLE
    if single.is_file():
        return CheckpointCount((SINGLE,), tuple(tensor_entries(single)))
    return None


def summary_line(count: CheckpointCount, config_parameters: int) -> str:
    """One line: the checkpoint's count beside the config's, with a flag when they differ."""
    files = f"{len(count.files)} file{'s' if len(count.files) != 1 else ''}"
    dtypes = ", ".join(f"{dtype} {n:,}" for dtype, n in count.by_dtype.items())
    text = f"checkpoint (safetensors headers, {files}): {count.parameters:,} parameters ({dtypes})"
    if count.missing:
        return text + f"; {len(count.missing)} of {len(count.missing) + len(count.files)} shards not on disk, " \
                      "so the count is partial"
    diff = count.parameters - config_parameters
    if diff == 0:
        return text + " = the config's count"
    return (text + f" ≠ the config's {config_parameters:,} ({diff:+,}): the checkpoint holds other tensors than "
            "the model built from config.json (an untied head, saved buffers, or another architecture)")
