"""Chunked merges streamed from a real S3 endpoint (moto_server) fetch every input byte once:
TIES's whole-tensor pass and a slice-statistics method's sweeps spill what they fetched to a
local scratch file (``mergeops.spill``) and read it back for later passes; the scratch file is
gone after the merge, also after a failure; outputs equal the merge of the local files."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save

from mergeops import chunking, engine, spill
from mergeops.io import write_safetensors
from mergeops.methods import base as mb
from mergeops.plan import PlanRequest, build_plan
from registry.safetensors_check import inspect_safetensors_header
from registry.services.validation import tensor_index
from registry.storage import ObjectStore, open_store
from registry.storage.codecs import StoredBlob
from registry.storage.range_source import BlobTensorSource
from tests.registry.test_range_rows import Wire

SHAPES = {"big": (96, 128), "wide": (64, 256), "norm": (128,)}
BIG_BYTES = (96 * 128 + 64 * 256) * 2  # bfloat16 bytes of the two sliced tensors per input
SLICES = 96 // 16 + 64 // 8  # 16 KiB float32 per slice: 16 and 8 rows
OWN: dict[str, dict[str, Any]] = {
    "ties": {"weight": 0.5, "density": 0.5},
    "sce": {},
    "multislerp": {"weight": 0.5},
}
MK = {"tie_break": "mergekit"}  # TIES cuts from whole task vectors (``tensor_stats``)


@pytest.fixture
def s3(s3_store_url: str, s3_endpoint: str) -> Iterator[tuple[ObjectStore, Wire]]:
    store = open_store(s3_store_url, endpoint_url=s3_endpoint,
                       aws_access_key_id="testing", aws_secret_access_key="testing")  # fmt: skip
    yield store, Wire(store.client)  # type: ignore[attr-defined]


@pytest.fixture
def models(tmp_path: Path) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(7)
    base = {k: torch.randn(s, generator=gen) for k, s in SHAPES.items()}
    return [{k: (v + 0.1 * i * torch.randn(v.shape, generator=gen)).to(torch.bfloat16)
             for k, v in base.items()} for i in range(4)]  # fmt: skip


def _remote(store: ObjectStore, tensors: dict[str, torch.Tensor], name: str) -> BlobTensorSource:
    """Upload one checkpoint; its source reads one range request per slice (no read-ahead)."""
    data = save(tensors)
    info = store.put_bytes(data)
    header = inspect_safetensors_header(
        lambda start, length: data[start : start + length], len(data), name=f"{name}.safetensors"
    )
    blob = StoredBlob(info.key, info.size)
    return BlobTensorSource(store, blob, name, index=tensor_index(header), read_ahead_bytes=0)


def _local(folder: Path, models: list[dict[str, torch.Tensor]]) -> list[Path]:
    folder.mkdir()
    paths = [folder / f"m{i}.safetensors" for i in range(len(models))]
    for path, tensors in zip(paths, models, strict=True):
        write_safetensors(path, tensors)
    return paths


def _merge(method: str, params: dict[str, Any], inputs: list[Any]) -> dict[str, torch.Tensor]:
    own = OWN[method]
    plan = build_plan(PlanRequest(method=method, models=inputs[1:], base=inputs[0], device="cpu",
                                  params=params, model_params=[own] * 3))  # fmt: skip
    return engine.merge_to_dicts(plan).merged


@pytest.fixture
def small(monkeypatch: pytest.MonkeyPatch) -> None:
    """Slices of 16 KiB float32 and no in-memory keep: everything re-read goes to the file."""
    monkeypatch.setattr(chunking, "CHUNK_BYTES", 16 * 1024)
    monkeypatch.setattr(chunking, "KEEP_BYTES", 0)


@pytest.mark.usefixtures("small")
@pytest.mark.parametrize(("method", "params", "whole"), [
    ("ties", MK, True),  # whole τ_t for the cuts, then the merge pass
    ("ties", {}, False),  # ties kept by position: whole τ_t, or sweeps where the engine has them
    ("sce", {"select_topk": 0.5}, False),  # statistics sweeps over the slices, then the merge
    ("multislerp", {}, False),  # a Gram sweep, then the merge
])  # fmt: skip
def test_remote_chunked_merge_fetches_each_byte_once(
    s3: tuple[ObjectStore, Wire],
    models: list[dict[str, torch.Tensor]],
    tmp_path: Path,
    method: str,
    params: dict[str, Any],
    whole: bool,
) -> None:
    store, wire = s3
    expected = _merge(method, params, _local(tmp_path / "local", models))
    sources = [_remote(store, tensors, f"m{i}") for i, tensors in enumerate(models)]
    wire.reset()
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    spilled: list[int] = []
    close = spill.Spill.close

    def spy(self: spill.Spill) -> None:
        spilled.append(self.written)
        close(self)

    with pytest.MonkeyPatch.context() as patch, spill.scratch_under(scratch):
        patch.setattr(spill.Spill, "close", spy)
        got = _merge(method, params, sources)
    input_bytes = sum(t.numel() * t.element_size() for m in models for t in m.values())
    assert wire.body_bytes == input_bytes  # every byte fetched once, whatever the passes
    assert sum(s.stats.bytes for s in sources) == input_bytes
    if whole:  # one request per whole tensor of the chunked tensors
        assert wire.ops["GetObject"] == 4 * (2 + 1)
    else:  # at most one request per slice (a method may still read a tensor whole)
        assert wire.ops["GetObject"] <= 4 * (SLICES + 1)
    assert len(spilled) == 2 and sum(spilled) == 4 * BIG_BYTES  # both big tensors, all inputs
    assert list(scratch.iterdir()) == []  # each spill file removed once its tensor is merged
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key].view(torch.uint8), got[key].view(torch.uint8)), key


@pytest.mark.usefixtures("small")
@pytest.mark.parametrize(("method", "params"), [("ties", MK), ("sce", {"select_topk": 0.5})])
def test_spill_file_removed_when_the_merge_fails(
    s3: tuple[ObjectStore, Wire],
    models: list[dict[str, torch.Tensor]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    method: str,
    params: dict[str, Any],
) -> None:
    store, _ = s3
    sources = [_remote(store, tensors, f"m{i}") for i, tensors in enumerate(models)]
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    seen: list[Path] = []
    merge_rows = type(mb.get_method(method)).merge_rows

    def failing(self: Any, inputs: mb.TensorInputs, stats: Any, offset: int, ctx: Any) -> Any:
        if offset:  # the second slice: the spill file is written and in use by now
            seen.extend(scratch.iterdir())
            raise mb.MergeError(f"injected failure in '{inputs.name}'")
        return merge_rows(self, inputs, stats, offset, ctx)

    monkeypatch.setattr(type(mb.get_method(method)), "merge_rows", failing)
    with spill.scratch_under(scratch), pytest.raises(mb.MergeError, match="injected failure"):
        _merge(method, params, sources)
    # the failing tensor's spill file, and the next tensor's when its first reads had started
    assert 1 <= len(seen) <= 2 and all(p.name.startswith(".ckreg-spill-") for p in seen)
    assert list(scratch.iterdir()) == []


def test_spill_region_round_trip_and_errors(tmp_path: Path) -> None:
    """Rows recorded out of order read back exactly; a closed spill refuses reads."""
    store = spill.Spill(tmp_path)
    tensor = torch.randn(10, 6).to(torch.bfloat16)
    region = store.region("t", (10, 6), torch.bfloat16)
    assert not region.complete
    for start, stop in [(6, 10), (0, 3), (3, 6)]:
        region.record(start, tensor[start:stop].clone())
    assert region.complete and store.written == tensor.numel() * 2
    buffer = torch.empty(4 * 6 * 2, dtype=torch.uint8)
    assert torch.equal(
        region.read_into(2, 6, buffer).view(torch.uint8), tensor[2:6].view(torch.uint8)
    )
    with pytest.raises(spill.SpillError, match="wrong size"):
        region.read_into(0, 2, buffer)
    assert store.path is not None and store.path.parent == tmp_path
    store.close()
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(spill.SpillError, match="closed"):
        region.read(0, 1)


@pytest.mark.usefixtures("small")
def test_merge_to_dir_spills_into_its_staging_folder(
    s3: tuple[ObjectStore, Wire], models: list[dict[str, torch.Tensor]], tmp_path: Path
) -> None:
    store, _ = s3
    sources = [_remote(store, tensors, f"m{i}") for i, tensors in enumerate(models)]
    plan = build_plan(PlanRequest(method="ties", models=sources[1:], base=sources[0],
                                  device="cpu", params=MK, model_params=[OWN["ties"]] * 3))  # fmt: skip
    paths: list[Path | None] = []
    close = spill.Spill.close

    def spy(self: spill.Spill) -> None:
        paths.append(self.path)
        close(self)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(spill.Spill, "close", spy)
        engine.merge_to_dir(plan, tmp_path / "out", max_shard_size="1GB", progress=False)
    parents = {p.parent for p in paths if p is not None}  # one file per chunked tensor
    assert len(paths) == 2 and len(parents) == 1
    assert parents.pop().name.startswith(".out.partial-")  # the merge's staging folder
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".ckreg-spill")]
