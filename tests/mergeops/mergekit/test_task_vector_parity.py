"""Task-vector methods against mergekit 0.1.5 on the tiny Llama zoo (``harness.py``): one YAML
config run through both tools, float32 within 1e-6 relative and bfloat16 within 1 ulp.

The zoo's deltas are multiples of 2^-8, so TIES and breadcrumbs cuts fall inside groups of equal
magnitudes (RMSNorm weights most of all): those cases pass only with mergekit's tie choice.
DARE and DELLA draw with a different RNG than mergekit, so they are compared exactly where
nothing is drawn (density 1) and statistically otherwise.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tests.mergeops.mergekit.harness import (
    Zoo,
    assert_close,
    load_folder,
    run_ckreg,
    run_mergekit,
)

WEIGHTS = {"ft1": 0.5, "ft2": 0.7, "ft3": 0.3}
DTYPES = ["float32", "bfloat16"]


def config(
    zoo: Zoo,
    dtype: str,
    method: str,
    params: dict[str, Any],
    per_model: dict[str, Any],
    *,
    weighted: bool = True,
) -> dict[str, Any]:
    """A mergekit YAML dict: base + ft1..ft3 with ``per_model`` params (and their weights)."""
    models = [
        {
            "model": zoo.path(dtype, name),
            "parameters": {**per_model, **({"weight": weight} if weighted else {})},
        }
        for name, weight in WEIGHTS.items()
    ]
    out: dict[str, Any] = {
        "merge_method": method,
        "base_model": zoo.path(dtype, "base"),
        "models": models,
        "dtype": dtype,
    }
    if params:
        out["parameters"] = params
    return out


#: (method, global params, per-model params); sce and ram take no weights.
EXACT_CASES: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    ("task_arithmetic", {"lambda": 0.8, "normalize": True}, {}),
    ("ties", {}, {}),  # density left out: 1.0 under mergekit
    ("ties", {"lambda": 1.2}, {"density": 0.4}),  # threshold ties everywhere
    ("ties", {"rescale": True, "int8_mask": True}, {"density": 0.3}),
    ("dare_ties", {}, {"density": 1.0}),
    ("dare_linear", {"normalize": True}, {}),
    ("breadcrumbs", {}, {"density": 0.5, "gamma": 0.05}),
    ("breadcrumbs_ties", {"rescale": True}, {"density": 0.6, "gamma": 0.02}),
    ("della", {"lambda": 0.9}, {}),
    ("della_linear", {}, {"epsilon": 0.1}),
    ("sce", {}, {}),
    ("sce", {"select_topk": 0.5}, {}),
    ("ram", {}, {}),
    ("ram", {"epsilon": 0.005}, {}),
    ("ramplus_tl", {}, {}),
    ("ramplus_tl", {"r": 0.3, "alpha": 0.5, "epsilon": 0.005}, {}),
]
UNWEIGHTED = {"sce", "ram", "ramplus_tl"}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("method", "params", "per_model"), EXACT_CASES)
def test_matches_mergekit(
    zoo: Zoo,
    tmp_path: Path,
    dtype: str,
    method: str,
    params: dict[str, Any],
    per_model: dict[str, Any],
) -> None:
    cfg = config(zoo, dtype, method, params, per_model, weighted=method not in UNWEIGHTED)
    theirs = run_mergekit(cfg, tmp_path / "mergekit")
    ours = run_ckreg(cfg, tmp_path / "ckreg")
    if method == "ramplus_tl" and dtype == "bfloat16":
        # mergekit writes ramplus_tl's float32 promotion as is (its λ_t is float32 and no
        # out_dtype is set); ckreg writes the config's dtype: the same values, rounded once.
        assert {t.dtype for t in theirs.values() if t.is_floating_point()} == {torch.float32}
        theirs = {k: v.to(torch.bfloat16) for k, v in theirs.items()}
    assert_close(ours, theirs, dtype)


def test_position_tie_break_differs_where_ties_straddle_the_cut(zoo: Zoo, tmp_path: Path) -> None:
    """The bf16 norm vectors tie at the threshold: ckreg's own rule keeps other entries."""
    cfg = config(zoo, "bfloat16", "ties", {}, {"density": 0.4})
    theirs = run_mergekit(cfg, tmp_path / "mergekit")
    cfg["parameters"] = {"tie_break": "position"}
    ours = run_ckreg(cfg, tmp_path / "ckreg")
    norm = "model.layers.0.input_layernorm.weight"
    assert not torch.equal(ours[norm], theirs[norm])


def _l1(tensor: torch.Tensor) -> float:
    return float(tensor.double().abs().sum())


@pytest.mark.parametrize("method", ["dare_linear", "della_linear"])
def test_random_drops_match_mergekit_statistically(zoo: Zoo, tmp_path: Path, method: str) -> None:
    """One model, density 0.5, L1 rescale: both keep about half the entries and the task
    vector's L1 norm (up to rounding), so both outputs lie as far from the base in L1."""
    cfg = config(zoo, "float32", method, {}, {"density": 0.5, "weight": 1.0}, weighted=False)
    cfg["models"] = cfg["models"][:1]
    theirs = run_mergekit(cfg, tmp_path / "mergekit")
    ours = run_ckreg(cfg, tmp_path / "ckreg")
    base = load_folder(Path(zoo.path("float32", "base")))
    tuned = load_folder(Path(zoo.path("float32", "ft1")))
    for key in ("model.embed_tokens.weight", "model.layers.1.mlp.up_proj.weight"):
        tau = _l1(tuned[key] - base[key])
        kept = []
        for merged in (ours, theirs):
            delta = merged[key] - base[key]
            assert abs(_l1(delta) / tau - 1) < 1e-4
            kept.append(float((delta != 0).float().mean()))
        assert abs(kept[0] - kept[1]) < 0.05
        assert 0.3 < kept[0] < 0.6
