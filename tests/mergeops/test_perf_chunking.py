"""Row-chunked merging is bit-identical to whole-tensor merging, and the fast selection and
row readers give exactly what the plain versions give."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import mergeops
from mergeops import chunking
from mergeops.io import SafetensorsFile, ShardedCheckpoint, write_safetensors
from mergeops.methods.base import get_method
from mergeops.ops.sparsify import kth_smallest, threshold_mask, topk_cut
from mergeops.plan import PlanRequest, build_plan

SHAPES = {"embed": (96, 128), "mlp": (40, 192), "norm": (128,), "odd": (50, 30)}


def _family(dtype: torch.dtype, quantized: bool) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(7)
    base = {k: torch.randn(s, generator=gen) for k, s in SHAPES.items()}
    models = [base]
    for _ in range(3):
        delta = {k: torch.randn(s, generator=gen) * 0.1 for k, s in SHAPES.items()}
        if quantized:  # many equal magnitudes: ties at the threshold span several slices
            delta = {k: (v * 8).round() / 8 for k, v in delta.items()}
        models.append({k: base[k] + delta[k] for k in SHAPES})
    out = [{k: v.to(dtype) for k, v in m.items()} for m in models]
    out[1]["embed"][0, :3] = -0.0  # signed zeros must survive unchanged
    return out


CASES: list[tuple[str, dict[str, Any]]] = [
    ("linear", {"weight": [1.0, 0.8, 0.6]}),
    ("linear", {"weight": [1.0, -0.5, 0.25], "normalize": False}),
    ("task_arithmetic", {"weight": [1.0, 0.8, 0.6], "lambda": 0.7}),
    ("ties", {"weight": [1.0, 0.8, 0.6], "density": [0.5, 0.2, 1.0]}),
    ("ties", {"weight": [1.0, 0.8, 0.6], "density": 0.3, "trim_scope": "model"}),
    ("ties", {"weight": [1.0, 0.8, 0.6], "density": 0.4, "normalize": False}),
    ("ties", {"weight": [1.0, 0.8, 0.6], "density": 0.5, "rescale": True, "tie_break": "mergekit"}),
    ("dare_linear", {"weight": [1.0, 0.8, 0.6], "density": [0.5, 0.9, 1.0]}),
    ("dare_ties", {"weight": [1.0, 0.8, 0.6], "density": 0.6}),
    ("della", {"weight": [1.0, 0.8, 0.6], "density": [0.6, 0.8, 1.0], "epsilon": 0.1}),
    ("della_linear", {"weight": [1.0, 0.8, 0.6], "density": 0.7, "rescale_by": "l1"}),
    ("breadcrumbs", {"weight": [1.0, 0.8, 0.6], "density": [0.7, 0.9, 1.0], "gamma": 0.05}),
    (
        "breadcrumbs_ties",
        {
            "weight": [1.0, 0.8, 0.6],
            "density": 0.8,
            "gamma": 0.02,
            "tie_break": "mergekit",
            "rescale": True,
        },
    ),
]


def _merge(
    monkeypatch: pytest.MonkeyPatch, chunk: int, method: str, family: list[Any], **kw: Any
) -> dict[str, torch.Tensor]:
    monkeypatch.setattr(chunking, "CHUNK_BYTES", chunk)
    base, models = family[0], family[1:]
    needs_base = method != "linear"
    return mergeops.merge(
        method, models, base=base if needs_base else None, device="cpu", seed=3, **kw
    )


def _bits_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key].view(torch.uint8), b[key].view(torch.uint8)), key


@pytest.mark.parametrize(("method", "params"), CASES)
@pytest.mark.parametrize("quantized", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_chunked_matches_whole(
    monkeypatch: pytest.MonkeyPatch,
    method: str,
    params: dict[str, Any],
    quantized: bool,
    dtype: torch.dtype,
) -> None:
    family = _family(dtype, quantized)
    whole = _merge(monkeypatch, 1 << 40, method, family, **params)
    chunked = _merge(monkeypatch, 4096, method, family, **params)  # 8 rows of 128 per slice
    _bits_equal(whole, chunked)
    as_bf16 = _merge(monkeypatch, 4096, method, family, dtype="bfloat16", **params)
    _bits_equal(_merge(monkeypatch, 1 << 40, method, family, dtype="bfloat16", **params), as_bf16)


def test_chunk_rows_only_for_large_aligned_tensors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(chunking, "CHUNK_BYTES", 4096)
    family = _family(torch.bfloat16, False)
    plan = build_plan(PlanRequest(method="ties", models=family[1:], base=family[0]))
    assert chunking.chunk_rows(plan, "embed") == 8
    assert chunking.chunk_rows(plan, "norm") == 0  # 1-D
    assert chunking.chunk_rows(plan, "odd") == 0  # row of 30 is not lane-aligned
    slerp_like = build_plan(PlanRequest(method="fisher", models=family[1:], fisher=family[1:]))
    assert chunking.chunk_rows(slerp_like, "embed") == 0


def test_chunked_files_and_rowless_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    family = _family(torch.bfloat16, True)
    paths = []
    for i, model in enumerate(family):
        path = tmp_path / f"m{i}" / "model.safetensors"
        path.parent.mkdir()
        write_safetensors(path, model)
        paths.append(path.parent)

    class NoRows:  # a source without get_rows (like a range-read registry source)
        def __init__(self, tensors: dict[str, torch.Tensor], name: str) -> None:
            self.name, self._t = name, tensors

        def keys(self) -> list[str]:
            return list(self._t)

        def get(self, key: str) -> torch.Tensor:
            return self._t[key]

        def metadata(self, key: str) -> mergeops.TensorMeta:
            return mergeops.TensorMeta(self._t[key].dtype, tuple(self._t[key].shape))

    params = {"weight": [1.0, 0.8, 0.6], "density": 0.3}
    whole = _merge(monkeypatch, 1 << 40, "ties", family, **params)
    from_files = _merge(monkeypatch, 4096, "ties", [str(p) for p in paths], **params)
    rowless = [NoRows(m, f"n{i}") for i, m in enumerate(family)]
    _bits_equal(whole, from_files)
    _bits_equal(whole, _merge(monkeypatch, 4096, "ties", rowless, **params))
    fresh = _family(torch.bfloat16, True)  # in-place task vectors never touch the inputs
    for tensors, again in zip(family, fresh, strict=True):
        _bits_equal(tensors, again)


def test_row_reads(tmp_path: Path) -> None:
    tensors = {"a": torch.randn(7, 5).to(torch.bfloat16), "s": torch.tensor(3.0)}
    write_safetensors(tmp_path / "model.safetensors", tensors)
    source = SafetensorsFile(tmp_path / "model.safetensors")
    assert torch.equal(source.get("a"), tensors["a"])
    assert torch.equal(source.get("s"), tensors["s"])
    assert torch.equal(source.get_rows("a", 2, 5), tensors["a"][2:5])
    assert source.get_rows("a", 6, 20).shape == (1, 5)
    assert torch.equal(ShardedCheckpoint(tmp_path).get_rows("a", 0, 3), tensors["a"][:3])


@pytest.mark.parametrize("n", [100, 2_000_000])
def test_kth_smallest_and_cut_exact(n: int) -> None:
    gen = torch.Generator().manual_seed(1)
    flat = (torch.randn(n, generator=gen) * 4).round().abs()  # heavy ties
    for rank in (1, n // 3, n // 2 + 1, n):
        assert float(kth_smallest(flat, rank)) == float(flat.kthvalue(rank).values)
    cut = topk_cut(flat, 0.3)
    assert cut is not None
    k = int(0.3 * n)
    reference = threshold_mask(flat, cut.threshold, k - int((flat > cut.threshold).sum()))
    assert int(reference.sum()) == k
    pieces = [cut.mask_rows(flat[a : a + 777], a) for a in range(0, n, 777)]
    assert torch.equal(torch.cat(pieces), reference)


@pytest.mark.parametrize("scale", [None, 0.5])
def test_passthrough_chunked_matches_whole(
    monkeypatch: pytest.MonkeyPatch, scale: float | None
) -> None:
    family = _family(torch.bfloat16, True)
    params = {} if scale is None else {"scale": [scale]}

    def run(chunk: int) -> dict[str, torch.Tensor]:
        monkeypatch.setattr(chunking, "CHUNK_BYTES", chunk)
        return mergeops.merge("passthrough", family[1:2], device="cpu", dtype="float32", **params)

    whole, chunked = run(1 << 40), run(4096)
    assert chunking.rows_for(get_method("passthrough"), (4096, 128)) > 0  # it does chunk
    _bits_equal(whole, chunked)


BF16_EXTRA: list[tuple[str, dict[str, Any]]] = [
    ("ties", {"weight": [1.0, 0.8, 0.6], "density": [0.5, 0.2, 1.0], "tie_break": "mergekit"}),
    ("breadcrumbs", {"density": 0.8, "gamma": 0.05, "tie_break": "mergekit"}),
    ("dare_ties", {"weight": [1.0, 0.8, 0.6], "density": 0.6, "rescale_by": "l1"}),
    ("ties", {"density": 0.4, "tie_break": "mergekit", "trim_scope": "model"}),
]


@pytest.mark.parametrize(("method", "params"), CASES + BF16_EXTRA)
def test_bfloat16_compute_slices_and_matches_whole(
    monkeypatch: pytest.MonkeyPatch, method: str, params: dict[str, Any]
) -> None:
    """A mergekit config's ``dtype: bfloat16`` computes in bfloat16. The task-vector methods
    and linear are elementwise there too, their statistics taken on τ in bfloat16 either way,
    so large tensors merge in row slices (bounded memory) with the whole tensor's bits; the
    float32 sweeps of the position rule and the model-wide threshold keep whole tensors."""
    family = _family(torch.bfloat16, True)
    kw = {**params, "compute_dtype": "bfloat16"}
    whole = _merge(monkeypatch, 1 << 40, method, family, **kw)
    sliced_rows = []
    real = chunking.ChunkedMerge.__init__

    def counted(self: Any, job: Any, rows: int, *args: Any, **kwargs: Any) -> None:
        sliced_rows.append(rows)
        real(self, job, rows, *args, **kwargs)

    monkeypatch.setattr(chunking.ChunkedMerge, "__init__", counted)
    chunked = _merge(monkeypatch, 4096, method, family, **kw)
    _bits_equal(whole, chunked)
    assert all(t.dtype == torch.bfloat16 for t in chunked.values())
    float32_sweeps = method in ("ties", "breadcrumbs", "breadcrumbs_ties") and (
        params.get("tie_break", "position") != "mergekit" or "trim_scope" in params
    )
    assert bool(sliced_rows) != float32_sweeps, sliced_rows


def test_slerp_in_bfloat16_is_sliced_and_matches_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    """slerp works in float32 whatever the compute dtype (as mergekit's does), over fixed
    blocks: a ``dtype: bfloat16`` merge slices large tensors with the whole tensor's bits."""
    family = _family(torch.bfloat16, False)
    kw = {"t": 0.4, "compute_dtype": "bfloat16"}
    whole = mergeops.merge("slerp", family[1:2], base=family[0], device="cpu", **kw)
    monkeypatch.setattr(chunking, "CHUNK_BYTES", 4096)
    assert chunking.rows_for(get_method("slerp"), tuple(family[0]["embed"].shape)) > 0
    chunked = mergeops.merge("slerp", family[1:2], base=family[0], device="cpu", **kw)
    _bits_equal(whole, chunked)
