"""Parameter counts and dtypes from safetensors headers (estimator/safetensors_header.py), against torch."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from estimator.errors import EstimatorError
from estimator.safetensors_header import checkpoint_count, read_header, summary_line, tensor_entries

torch = pytest.importorskip("torch")
save_file = pytest.importorskip("safetensors.torch").save_file

TENSORS = {"embed.weight": ((128, 64), torch.bfloat16), "block.0.proj.weight": ((96, 64), torch.float32),
           "block.0.proj.bias": ((96,), torch.float16), "scale": ((), torch.float32)}


def _tensors(names: list[str] | None = None) -> dict:
    return {name: torch.zeros(shape, dtype=dtype) for name, (shape, dtype) in TENSORS.items()
            if names is None or name in names}


def test_single_file_counts_equal_torch(tmp_path: Path) -> None:
    tensors = _tensors()
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    count = checkpoint_count(tmp_path)
    assert count is not None and count.files == ("model.safetensors",) and count.complete
    assert count.parameters == sum(t.numel() for t in tensors.values()) == 128 * 64 + 96 * 64 + 96 + 1
    assert count.nbytes == sum(t.numel() * t.element_size() for t in tensors.values())
    assert count.by_dtype == {"BF16": 128 * 64, "F32": 96 * 64 + 1, "F16": 96}
    assert {e.name: e.shape for e in tensor_entries(tmp_path / "model.safetensors")} == {
        name: tuple(t.shape) for name, t in tensors.items()}
    assert read_header(tmp_path / "model.safetensors")["__metadata__"] == {"format": "pt"}


def test_sharded_index_and_a_missing_shard(tmp_path: Path) -> None:
    first, second = ["embed.weight", "scale"], ["block.0.proj.weight", "block.0.proj.bias"]
    save_file(_tensors(first), tmp_path / "model-00001-of-00002.safetensors")
    save_file(_tensors(second), tmp_path / "model-00002-of-00002.safetensors")
    weight_map = {**dict.fromkeys(first, "model-00001-of-00002.safetensors"),
                  **dict.fromkeys(second, "model-00002-of-00002.safetensors")}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": 0},
                                                                       "weight_map": weight_map}))
    count = checkpoint_count(tmp_path)
    assert count is not None and count.complete and len(count.files) == 2
    assert count.parameters == 128 * 64 + 96 * 64 + 96 + 1
    assert summary_line(count, count.parameters).endswith("= the config's count")
    assert "(+1)" in summary_line(count, count.parameters - 1)  # flagged: the checkpoint has more
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    partial = checkpoint_count(tmp_path)
    assert partial is not None and partial.missing == ("model-00002-of-00002.safetensors",)
    assert partial.parameters == 128 * 64 + 1 and "1 of 2 shards not on disk" in summary_line(partial, 0)


def test_no_checkpoint_is_none(tmp_path: Path) -> None:
    assert checkpoint_count(tmp_path) is None


@pytest.mark.parametrize("content, message", [
    (b"\x01\x02", "not a safetensors file"),
    (struct.pack("<Q", 200_000_000), "safetensors header of 200,000,000 bytes"),
    (struct.pack("<Q", 50) + b"{}", "truncated safetensors header"),
    (struct.pack("<Q", 3) + b"[1]", "must be a JSON object"),
    (struct.pack("<Q", 4) + b"{x: ", "is not JSON"),
])
def test_bad_headers_are_one_line(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)
    with pytest.raises(EstimatorError, match=message):
        read_header(path)


def test_bad_entry(tmp_path: Path) -> None:
    header = json.dumps({"w": {"dtype": "F32", "shape": [2, -1], "data_offsets": [0, 8]}}).encode()
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(EstimatorError, match="tensor 'w': expected dtype, shape and data_offsets"):
        checkpoint_count(tmp_path)
