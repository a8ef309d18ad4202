"""The sharded writer's safetensors files are byte-deterministic and load back exactly."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import mergeops
from mergeops.io.writer import (
    SAFETENSORS_DTYPES,
    OutputError,
    ShardedWriter,
    staged_output,
    write_safetensors,
)


def _every_dtype() -> dict[str, torch.Tensor]:
    """One small tensor per storable dtype, plus a scalar, an empty and a transposed tensor."""
    gen = torch.Generator().manual_seed(0)
    tensors: dict[str, torch.Tensor] = {}
    for dtype, tag in SAFETENSORS_DTYPES.items():
        values = torch.randn(3, 5, generator=gen) * 40
        if dtype == torch.bool:
            tensors[f"t.{tag}"] = values > 0
        elif dtype.is_complex:
            tensors[f"t.{tag}"] = torch.complex(values, -values).to(dtype)
        else:
            tensors[f"t.{tag}"] = values.to(dtype)
    tensors["scalar"] = torch.tensor(2.5, dtype=torch.bfloat16)
    tensors["empty"] = torch.zeros(0, 4)
    tensors["Transposed"] = torch.arange(12.0).reshape(3, 4).t()
    return tensors


def _same(loaded: torch.Tensor, expected: torch.Tensor) -> bool:
    """Bitwise equality (NaN-safe, works for float8 and complex)."""
    if loaded.dtype != expected.dtype or loaded.shape != expected.shape:
        return False
    raw = loaded.contiguous().reshape(-1).view(torch.uint8)
    return torch.equal(raw, expected.contiguous().reshape(-1).view(torch.uint8))


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_every_dtype_loads_back_exactly(tmp_path: Path) -> None:
    tensors = _every_dtype()
    path = tmp_path / "all.safetensors"
    write_safetensors(path, tensors, {"zeta": "1", "alpha": "2"})
    loaded = load_file(path)
    assert set(loaded) == set(tensors)
    assert all(_same(loaded[k], v) for k, v in tensors.items())
    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata() == {"zeta": "1", "alpha": "2"}
        assert all(_same(handle.get_tensor(k), tensors[k]) for k in handle.keys())  # noqa: SIM118


def test_header_is_sorted_padded_and_aligned(tmp_path: Path) -> None:
    tensors = _every_dtype()
    path = tmp_path / "ours.safetensors"
    write_safetensors(path, dict(reversed(list(tensors.items()))), {"b": "1", "a": "2"})
    data = path.read_bytes()
    size = struct.unpack("<Q", data[:8])[0]
    assert size % 8 == 0
    text = data[8 : 8 + size].decode()
    header = json.loads(text)
    assert text.rstrip(" ") == json.dumps(header, sort_keys=True, separators=(",", ":"))
    assert list(header["__metadata__"]) == ["a", "b"]
    entries = {k: v for k, v in header.items() if k != "__metadata__"}
    for name, entry in entries.items():
        start, end = entry["data_offsets"]
        assert start % tensors[name].element_size() == 0, name  # every tensor stays aligned
        assert end - start == tensors[name].numel() * tensors[name].element_size()
    assert len(data) == 8 + size + max(e["data_offsets"][1] for e in entries.values())


def test_insertion_order_does_not_change_the_bytes(tmp_path: Path) -> None:
    tensors = _every_dtype()
    write_safetensors(tmp_path / "a.safetensors", tensors, {"format": "pt"})
    write_safetensors(tmp_path / "b.safetensors", dict(sorted(tensors.items())), {"format": "pt"})
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()


def _checkpoint(path: Path, seed: int) -> Path:
    gen = torch.Generator().manual_seed(seed)
    tensors = {
        f"layers.{i}.{part}": torch.randn(8, 6, generator=gen).to(dtype)
        for i in range(3)
        for part, dtype in (("weight", torch.float32), ("proj", torch.bfloat16))
    }
    tensors["embed.ids"] = torch.arange(7, dtype=torch.int64)
    tensors["layers.0.flag"] = torch.tensor([True, False, True])
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path


@pytest.mark.parametrize(
    ("method", "params"),
    [("ties", {"density": 0.5}), ("tall_masks", {})],
)
def test_identical_merges_are_byte_identical(
    tmp_path: Path, method: str, params: dict[str, float]
) -> None:
    base = _checkpoint(tmp_path / "base.safetensors", 0)
    models = [_checkpoint(tmp_path / f"m{i}.safetensors", i) for i in (1, 2)]
    outputs = []
    for run in ("first", "second"):
        out = tmp_path / run
        mergeops.merge_files(
            method,
            [str(m) for m in models],
            base=str(base),
            params=params,
            model_names=["a", "b"],
            out_dir=out,
            max_shard_size=400,
            progress=False,
        )
        outputs.append(_files(out))
    first, second = outputs
    assert sum(name.endswith(".safetensors") for name in first) > 2  # several shards
    assert first == second


def test_failed_writer_leaves_no_shards(tmp_path: Path) -> None:
    folder = tmp_path / "out"
    with pytest.raises(RuntimeError), ShardedWriter(folder, max_shard_size=10) as writer:
        writer.add("a", torch.ones(4))
        writer.add("b", torch.ones(4))  # flushes 'a' into a shard file
        raise RuntimeError("merge failed")
    assert list(folder.iterdir()) == []


def test_unstorable_dtype_is_named(tmp_path: Path) -> None:
    with (
        pytest.raises(OutputError, match=r"'q' has dtype torch\.complex128"),
        staged_output(tmp_path / "o") as staging,
    ):
        ShardedWriter(staging).add("q", torch.ones(2, dtype=torch.complex128))
    assert list(tmp_path.iterdir()) == []
