"""Local inputs of a row-chunked merge are cast straight from the file's pages
(``SafetensorsFile.map_rows``): the same rows as a pread, clear errors for bad ranges and
truncated files, pages dropped from the resident set once read, and the same merged bytes."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

import mergeops
from mergeops import chunking
from mergeops.io.readers import SafetensorsFile, ShardedCheckpoint, SourceError
from mergeops.slice_reads import InputRows
from tests.mergeops.test_prefetch import family, write_family

SLICE = 8 * 128 * 4  # 8 rows of embed (96, 128) per slice


def test_mapped_rows_equal_the_read_rows(tmp_path: Path) -> None:
    paths = write_family(tmp_path, family())
    source = SafetensorsFile(paths[1])
    mapped = source.map_rows("embed", 5, 8)
    assert mapped.tensor.dtype == torch.bfloat16 and mapped.tensor.shape == (3, 128)
    assert torch.equal(mapped.tensor, source.get_rows("embed", 5, 8))
    mapped.release()
    again = source.map_rows("embed", 5, 8)  # released pages map again from the page cache
    assert torch.equal(again.tensor, source.get_rows("embed", 5, 8))
    assert source.map_rows("embed", 4, 4).tensor.shape == (0, 128)
    with pytest.raises(SourceError, match="not in tensor"):
        source.map_rows("embed", 90, 200)
    with pytest.raises(KeyError):
        source.map_rows("missing", 0, 1)


def test_sharded_checkpoint_maps_rows_of_the_right_shard(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(3)
    a, b = torch.randn(64, 32, generator=gen), torch.randn(16, 32, generator=gen)
    folder = tmp_path / "ckpt"
    folder.mkdir()
    save_file({"a": a}, str(folder / "model-00001-of-00002.safetensors"))
    save_file({"b": b}, str(folder / "model-00002-of-00002.safetensors"))
    source = ShardedCheckpoint(folder)
    assert torch.equal(source.map_rows("b", 2, 9).tensor, b[2:9])
    assert torch.equal(source.map_rows("a", 60, 64).tensor, a[60:64])


def test_a_truncated_file_is_an_error_not_a_crash(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_file({"w": torch.ones(256, 64)}, str(path))
    source = SafetensorsFile(path)  # header read while the file was whole
    with path.open("r+b") as file:
        file.truncate(path.stat().st_size - 4096)
    with pytest.raises(SourceError, match="truncated"):
        source.map_rows("w", 200, 256)
    assert torch.equal(source.map_rows("w", 0, 8).tensor, torch.ones(8, 64))


def _rss_file_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no RssFile in /proc/self/status")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_released_slices_leave_the_resident_set(tmp_path: Path) -> None:
    """Casting 64 MiB of rows slice by slice keeps a few MiB of the file resident when each
    slice is released, and most of it when none is (the control: the pages were mapped)."""
    path = tmp_path / "big.safetensors"
    rows, row = 4096, 8192  # bf16: 16 KiB a row, 64 MiB in all
    save_file({"w": torch.ones(rows, row, dtype=torch.bfloat16)}, str(path))
    path.read_bytes()  # in the page cache, as a merge's inputs usually are
    out = torch.empty(64, row)

    def sweep(release: bool) -> float:
        source = SafetensorsFile(path)
        before = _rss_file_mib()
        grown = 0.0
        for start in range(0, rows, 64):  # 1 MiB slices
            mapped = source.map_rows("w", start, start + 64)
            out.copy_(mapped.tensor)
            if release:
                mapped.release()
            grown = max(grown, _rss_file_mib() - before)
        return grown

    assert sweep(release=True) < 12
    assert sweep(release=False) > 48


def test_chunked_merge_casts_local_inputs_from_their_mapping(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = write_family(tmp_path / "in", family())
    monkeypatch.setattr(chunking, "CHUNK_BYTES", SLICE)
    calls: list[tuple[str, int, int]] = []
    original = SafetensorsFile.map_rows

    def spy(self: SafetensorsFile, key: str, start: int, stop: int) -> Any:
        calls.append((key, start, stop))
        return original(self, key, start, stop)

    monkeypatch.setattr(SafetensorsFile, "map_rows", spy)
    outputs = {}
    for label in ("mapped", "read"):
        if label == "read":
            monkeypatch.setattr(InputRows, "rows_mapped", lambda self: None)
        out = tmp_path / label
        mergeops.merge_files("ties", paths[1:], base=paths[0], out_dir=out, device="cpu",
                             progress=False, params={"density": 0.5})  # fmt: skip
        outputs[label] = load_file(next(out.glob("*.safetensors")))
        if label == "mapped":
            assert {key for key, _, _ in calls} == {"embed", "mlp"}  # the chunked tensors
            assert len(calls) >= 4 * (96 // 8)
    assert outputs["mapped"].keys() == outputs["read"].keys()
    for key, tensor in outputs["mapped"].items():
        assert torch.equal(tensor, outputs["read"][key]), key
