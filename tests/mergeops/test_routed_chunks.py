"""Routed plans (``ckreg merge --config`` with slices, gradients, filters) merge large tensors
of elementwise methods in row slices, bit-identical to merging them whole; TIES and DARE keep
the inputs their whole-tensor pass read (within ``chunking.KEEP_BYTES``, beyond it in a spill
file for remote inputs) instead of reading them again."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch

from mergeops import chunking, engine
from mergeops.io import SafetensorsFile, write_safetensors
from mergeops.plan import PlanRequest, build_plan
from mergeops.routing import TensorRoute
from tests.mergeops.mergekit.harness import Zoo, build_zoo, run_ckreg

SHAPES = {"big": (96, 128), "norm": (128,), "ids": (4,)}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Zoo:
    return build_zoo(tmp_path_factory.mktemp("routed-zoo"))


def _filtered(zoo: Zoo, method: str) -> dict[str, Any]:
    """A mergekit YAML with a weight filter (so the plan is routed), float32 compute."""
    weight = [{"filter": "mlp", "value": 0.5}, {"value": 0.9}]
    sparse = {"density": 0.6} if method in ("ties", "dare_ties") else {}
    models = [{"model": zoo.path("float32", name),
               "parameters": {"weight": weight if name == "ft1" else 0.7, **sparse}}
              for name in ("ft1", "ft2", "ft3")]  # fmt: skip
    config: dict[str, Any] = {"merge_method": method, "models": models, "dtype": "float32"}
    if method != "linear":
        config["base_model"] = zoo.path("float32", "base")
    return config


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "ties", "dare_ties"])
def test_routed_yaml_merges_chunked_match_whole(
    monkeypatch: pytest.MonkeyPatch, zoo: Zoo, tmp_path: Path, method: str
) -> None:
    config = _filtered(zoo, method)
    monkeypatch.setattr(chunking, "CHUNK_BYTES", 1 << 40)
    whole = run_ckreg(config, tmp_path / "whole")
    chunked_keys: list[str] = []
    original = chunking.ChunkedMerge.run

    def spy(self: chunking.ChunkedMerge, out_dtype: torch.dtype, *args: Any) -> Any:
        chunked_keys.append(self.key)
        return original(self, out_dtype, *args)

    monkeypatch.setattr(chunking.ChunkedMerge, "run", spy)
    monkeypatch.setattr(chunking, "CHUNK_BYTES", 4 * 64 * 4)  # 4 rows of 64 per slice
    sliced = run_ckreg(config, tmp_path / "sliced")
    assert any("down_proj" in key for key in chunked_keys), chunked_keys
    assert whole.keys() == sliced.keys()
    for key in whole:
        assert torch.equal(whole[key].view(torch.uint8), sliced[key].view(torch.uint8)), key


def _files(tmp_path: Path) -> list[Path]:
    gen = torch.Generator().manual_seed(4)
    paths = []
    for index in range(4):
        state = {k: torch.randn(s, generator=gen).to(torch.bfloat16) for k, s in SHAPES.items()
                 if k != "ids"}  # fmt: skip
        state["ids"] = torch.arange(4)
        paths.append(tmp_path / f"m{index}.safetensors")
        write_safetensors(paths[-1], state)
    return paths


def _routed_merge(paths: list[Path], method: str, **params: Any) -> dict[str, torch.Tensor]:
    """The plain plan's tensors as routes (each input by source and name)."""
    own = {"weight": 0.5, **({"density": 0.5} if method == "ties" else {})}
    plan = build_plan(PlanRequest(method=method, models=paths[1:], base=paths[0], device="cpu",
                                  params=params, model_params=[own] * 3))  # fmt: skip
    routes = [
        TensorRoute(key, plan.metas[key], [(m, key) for m in plan.models], (plan.base, key), plan.ctx)
        for key in plan.keys
    ]  # fmt: skip
    return engine.merge_to_dicts(dataclasses.replace(plan, routes=routes)).merged


MK = {"tie_break": "mergekit"}  # TIES cuts from whole task vectors (``tensor_stats``)


@pytest.mark.parametrize(("method", "params", "keep", "whole_reads", "remote"), [
    ("task_arithmetic", {}, 1 << 30, 0, True),  # no whole-tensor pass: slices only
    ("ties", MK, 1 << 30, 4, True),  # base + 3 models read whole once, then sliced from memory
    ("ties", MK, 0, 4, True),  # nothing kept: each read whole once, then sliced from the spill
    ("ties", MK, 1 << 30, 4, False),  # local files: read again (page cache), not held in memory
])  # fmt: skip
def test_routed_big_tensor_read_in_slices(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    method: str,
    params: dict[str, Any],
    keep: int,
    whole_reads: int,
    remote: bool,
) -> None:
    if remote:  # behave like a source whose second read is a second fetch (S3)
        monkeypatch.setattr(SafetensorsFile, "rereads_cheaply", False)
    paths = _files(tmp_path)
    monkeypatch.setattr(chunking, "CHUNK_BYTES", 1 << 40)
    expected = _routed_merge(paths, method, **params)
    reads: list[int] = []
    original = SafetensorsFile.get_rows

    def spy(self: SafetensorsFile, key: str, start: int, stop: int) -> torch.Tensor:
        if key == "big":
            reads.append(stop - start)
        return original(self, key, start, stop)

    original_into = SafetensorsFile.get_rows_into

    def spy_into(self: SafetensorsFile, key: str, start: int, stop: int, buf: Any) -> Any:
        if key == "big":  # slices read into reused buffers
            reads.append(stop - start)
        return original_into(self, key, start, stop, buf)

    original_map = SafetensorsFile.map_rows

    def spy_map(self: SafetensorsFile, key: str, start: int, stop: int) -> Any:
        if key == "big":  # local slices cast from the file's pages
            reads.append(stop - start)
        return original_map(self, key, start, stop)

    monkeypatch.setattr(SafetensorsFile, "get_rows", spy)
    monkeypatch.setattr(SafetensorsFile, "get_rows_into", spy_into)
    monkeypatch.setattr(SafetensorsFile, "map_rows", spy_map)
    monkeypatch.setattr(chunking, "CHUNK_BYTES", 16 * 128 * 4)  # 16 rows per slice
    monkeypatch.setattr(chunking, "KEEP_BYTES", keep)
    got = _routed_merge(paths, method, **params)
    assert reads.count(96) == whole_reads
    sliced_rows = sum(r for r in reads if r < 96)
    assert sliced_rows == (0 if whole_reads and remote else 4 * 96)
    for key in expected:
        assert torch.equal(expected[key].view(torch.uint8), got[key].view(torch.uint8)), key


def test_routed_bf16_passthrough_is_sliced_and_matches_whole(
    monkeypatch: pytest.MonkeyPatch, zoo: Zoo, tmp_path: Path
) -> None:
    """A frankenmerge computing in bfloat16 (mergekit ``dtype``) slices its large tensors."""
    sources = [("ft1", [0, 3], 0.7), ("ft2", [1, 4], 1.3)]
    config: dict[str, Any] = {
        "slices": [{"sources": [{"model": zoo.path("bfloat16", name), "layer_range": layers,
                                 "parameters": {"scale": scale}}]}
                   for name, layers, scale in sources],
        "merge_method": "passthrough",
        "dtype": "bfloat16",
    }  # fmt: skip
    monkeypatch.setattr(chunking, "CHUNK_BYTES", 1 << 40)
    whole = run_ckreg(config, tmp_path / "whole")
    chunked_keys: list[str] = []
    original = chunking.ChunkedMerge.run

    def spy(self: chunking.ChunkedMerge, *args: Any) -> Any:
        chunked_keys.append(self.key)
        return original(self, *args)

    monkeypatch.setattr(chunking.ChunkedMerge, "run", spy)
    monkeypatch.setattr(chunking, "CHUNK_BYTES", 4 * 64 * 4)
    sliced = run_ckreg(config, tmp_path / "sliced")
    assert any("down_proj" in key for key in chunked_keys), chunked_keys
    assert whole.keys() == sliced.keys()
    for key in whole:
        assert whole[key].dtype == torch.bfloat16, key
        assert torch.equal(whole[key].view(torch.uint8), sliced[key].view(torch.uint8)), key


@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
def test_routed_inputs_of_mixed_dtypes_slice_like_whole(
    monkeypatch: pytest.MonkeyPatch, zoo: Zoo, tmp_path: Path, method: str
) -> None:
    """Inputs stored in different dtypes (float32 and bfloat16 checkpoints in one config) are
    read slice by slice in their own dtypes."""
    config = _filtered(zoo, method)
    config["models"][1]["model"] = zoo.path("bfloat16", "ft2")
    config["base_model"] = zoo.path("bfloat16", "base")
    monkeypatch.setattr(chunking, "CHUNK_BYTES", 1 << 40)
    whole = run_ckreg(config, tmp_path / "whole")
    monkeypatch.setattr(chunking, "CHUNK_BYTES", 4 * 64 * 4)
    sliced = run_ckreg(config, tmp_path / "sliced")
    for key in whole:
        assert torch.equal(whole[key].view(torch.uint8), sliced[key].view(torch.uint8)), key
