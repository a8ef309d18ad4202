"""Methods with whole-tensor statistics (``SliceStatsMethod``: norms, angles, counts) merge
large tensors in row slices with statistics swept over the slices: the result is bit-identical
to the whole-tensor merge, whatever the slice and block sizes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

import mergeops
from mergeops import chunking
from mergeops.methods.base import SliceStatsMethod, get_method
from mergeops.ops import blocks
from mergeops.ops.blocks import FlatBlocks, blocks_of

SHAPES = {"embed": (96, 128), "mlp": (40, 192), "norm": (128,), "odd": (50, 30)}

CASES: list[tuple[str, int, dict[str, Any]]] = [
    ("slerp", 1, {"t": 0.3}),
    ("slerp", 1, {"t": 0.8}),
]


def _family(dtype: torch.dtype, count: int, seed: int = 11) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(s, generator=gen) for k, s in SHAPES.items()}
    models = [base]
    for _ in range(count):
        models.append({k: base[k] + torch.randn(s, generator=gen) * 0.3 for k, s in SHAPES.items()})
    return [{k: v.to(dtype) for k, v in m.items()} for m in models]


def _merge(
    monkeypatch: pytest.MonkeyPatch, chunk: int, method: str, family: list[Any], **kw: Any
) -> dict[str, torch.Tensor]:
    monkeypatch.setattr(chunking, "CHUNK_BYTES", chunk)
    return mergeops.merge(method, family[1:], base=family[0], device="cpu", **kw)


def _bits_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key].view(torch.uint8), b[key].view(torch.uint8)), key


def assert_sliced_matches_whole(
    monkeypatch: pytest.MonkeyPatch,
    method: str,
    models: list[dict[str, torch.Tensor]],
    base: dict[str, torch.Tensor] | None,
    **params: Any,
) -> dict[str, torch.Tensor]:
    """Merge whole, in 8-row and in 24-row slices of 'embed', with 1000-entry statistics
    blocks (straddling slices and rows): all three bit-identical. Returns the whole merge."""
    monkeypatch.setattr(blocks, "BLOCK", 1000)
    monkeypatch.setattr(chunking, "CHUNK_BYTES", 4096)
    assert chunking.rows_for(get_method(method), SHAPES["embed"]) == 8  # 12 slices
    runs = []
    for chunk in (1 << 40, 4096, 3 * 4096):
        monkeypatch.setattr(chunking, "CHUNK_BYTES", chunk)
        runs.append(mergeops.merge(method, models, base=base, device="cpu", **params))
    for sliced in runs[1:]:
        _bits_equal(runs[0], sliced)
    return runs[0]


@pytest.mark.parametrize(("method", "count", "params"), CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_sliced_statistics_match_whole(
    monkeypatch: pytest.MonkeyPatch,
    method: str,
    count: int,
    params: dict[str, Any],
    dtype: torch.dtype,
) -> None:
    family = _family(dtype, count)
    assert isinstance(get_method(method), SliceStatsMethod)
    assert chunking.rows_for(get_method(method), (96, 128)) == 0  # small: merged whole ...
    assert_sliced_matches_whole(monkeypatch, method, family[1:], family[0], **params)


def test_flat_blocks_are_independent_of_slicing() -> None:
    tensor = torch.arange(5000, dtype=torch.float32).reshape(50, 100)
    expected = [b[0].clone() for b in blocks_of([tensor], 700)]
    assert [b.shape[1] for b in expected] == [700] * 7 + [100]
    for rows in (1, 3, 7, 50):
        cutter, got = FlatBlocks(700), []
        for start in range(0, 50, rows):
            got += [b[0].clone() for b in cutter.feed([tensor[start : start + rows]])]
        got += [b[0].clone() for b in cutter.flush()]
        assert len(got) == len(expected)
        assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    with pytest.raises(ValueError, match="positive"):
        FlatBlocks(0)


def test_flat_blocks_gather_into_one_reused_buffer() -> None:
    """A block straddling slices is gathered into the cutter's own buffer, the same buffer
    every time (no allocation per block); blocks inside a slice are views of it."""
    tensor = torch.arange(3000, dtype=torch.float32).reshape(30, 100)
    cutter, pointers = FlatBlocks(700), set()
    for start in range(0, 30, 4):
        piece = tensor[start : start + 4]
        for (block,) in cutter.feed([piece]):
            inside = piece.data_ptr() <= block.data_ptr() < piece.data_ptr() + piece.nbytes
            if not inside:
                pointers.add(block.data_ptr())
            first = int(block[0, 0].item())
            assert torch.equal(block[0], torch.arange(first, first + 700, dtype=torch.float32))
    assert len(pointers) == 1
    (last,) = [block[0].clone() for (block,) in cutter.flush()]
    assert torch.equal(last, torch.arange(2800, 3000, dtype=torch.float32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sliced_slerp_of_a_large_tensor_matches_mergekit(dtype: torch.dtype) -> None:
    """Over 1M entries and in row slices (default slice size): still mergekit's numbers."""
    from mergekit.merge_methods.api import merge_tensors

    gen = torch.Generator().manual_seed(5)
    base = torch.randn(1100, 1024, generator=gen)
    other = (base + 0.5 * torch.randn(1100, 1024, generator=gen)).to(dtype)
    base = base.to(dtype)
    assert chunking.rows_for(get_method("slerp"), (1100, 1024)) == 512
    theirs = merge_tensors([base, other], "slerp", parameters={"t": 0.4}, base_index=0)
    ours = mergeops.merge("slerp", [{"w": other}], base={"w": base}, t=0.4, device="cpu")
    assert torch.equal(ours["w"], theirs)


@pytest.mark.parametrize("where", ["base", "model"])
def test_a_nan_in_a_late_slice_is_named_by_the_first_sweep(
    monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    from mergeops.methods.base import MergeError

    monkeypatch.setattr(chunking, "CHUNK_BYTES", 4096)
    family = _family(torch.float32, 1)
    target = family[0] if where == "base" else family[1]
    target["embed"][90, 5] = float("nan")  # in the last slice
    role = "base" if where == "base" else "model"
    with pytest.raises(MergeError, match=f"tensor 'embed' of {role}.*NaN or Inf"):
        _merge(monkeypatch, 4096, "slerp", family, t=0.5)


def _slerp_files(
    tmp_path: Path, dtype: torch.dtype, poison: bool = False
) -> tuple[list[Path], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A base and one model folder holding ``w`` (160 rows of 640: rows straddle blocks)."""
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(160, 640, generator=gen).to(dtype)
    other = (base.float() + 0.4 * torch.randn(160, 640, generator=gen)).to(dtype)
    if poison:
        other[151, 7] = float("inf")  # in the last flat piece
    folders = []
    for name, tensor in (("base", base), ("ft", other)):
        (tmp_path / name).mkdir()
        save_file({"w": tensor}, str(tmp_path / name / "model.safetensors"))
        folders.append(tmp_path / name)
    return folders, {"w": base}, {"w": other}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_slerp_of_local_files_sweeps_whole_blocks(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, dtype: torch.dtype
) -> None:
    """From local files the statistics sweeps read flat pieces of exactly one block (offsets
    on block boundaries, across rows), so no block is gathered from two slices, and the
    result is the whole-tensor merge's, bit for bit."""
    from mergeops.methods.averaging.slerp import SlerpStats

    monkeypatch.setattr(blocks, "BLOCK", 3000)  # 34 blocks and a tail of 400 entries
    (base_dir, model_dir), base, other = _slerp_files(tmp_path, dtype)
    whole = mergeops.merge("slerp", [other], base=base, t=0.3, device="cpu")
    monkeypatch.setattr(chunking, "CHUNK_BYTES", 4 * 640 * 4)  # 4-row slices
    assert chunking.rows_for(get_method("slerp"), (160, 640)) == 4
    offsets: list[tuple[int, int]] = []
    gathers = []
    observe, gather = SlerpStats.observe, FlatBlocks._gather

    def spy_observe(self: SlerpStats, inputs: Any, offset: int) -> None:
        offsets.append((offset, inputs.base.numel()))
        observe(self, inputs, offset)

    def spy_gather(self: FlatBlocks, *args: Any) -> None:
        gathers.append(args[1:])
        gather(self, *args)

    monkeypatch.setattr(SlerpStats, "observe", spy_observe)
    monkeypatch.setattr(FlatBlocks, "_gather", spy_gather)
    out = tmp_path / "out"
    mergeops.merge_files("slerp", [model_dir], base=base_dir, out_dir=out, params={"t": 0.3})
    pieces = [(offset, 3000) for offset in range(0, 102_000, 3000)] + [(102_000, 400)]
    assert offsets == pieces * 2  # two sweeps, each over whole blocks
    assert gathers == [(0, 400)] * 2  # only the tail, which is a block of its own
    (shard,) = out.glob("*.safetensors")
    merged = load_file(str(shard))["w"]
    assert merged.dtype == dtype
    assert torch.equal(merged.view(torch.uint8), whole["w"].view(torch.uint8))


def test_a_non_finite_value_in_a_flat_piece_is_named(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from mergeops.methods.base import MergeError

    monkeypatch.setattr(blocks, "BLOCK", 3000)
    monkeypatch.setattr(chunking, "CHUNK_BYTES", 4 * 640 * 4)
    (base_dir, model_dir), _, _ = _slerp_files(tmp_path, torch.float32, poison=True)
    with pytest.raises(MergeError, match=r"tensor 'w' of model.*NaN or Inf"):
        mergeops.merge_files(
            "slerp", [model_dir], base=base_dir, out_dir=tmp_path / "out", params={"t": 0.3}
        )
    assert not (tmp_path / "out").exists()
