"""Parity with mergekit 0.1.5 for the averaging-family methods: slerp, nuslerp, multislerp,
karcher, model_stock, nearswap, passthrough, arcee_fusion — the same YAML through mergekit and
``ckreg merge`` on the tiny Llama zoo, ≤ 1e-6 relative in float32 and ≤ 1 ulp in bfloat16
(``harness.assert_close``). Most are bit-equal on CPU; nuslerp, multislerp and karcher take
their norms and dots from a float64 Gram pass and differ from mergekit's float32 by ≤ 2.4e-7
here (docs/mergekit.md, "Known differences")."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import mergeops
from tests.mergeops.mergekit.harness import (
    CkregMergeFailed,
    Zoo,
    assert_close,
    run_ckreg,
    run_mergekit,
)

Config = dict[str, Any]


def _entry(zoo: Zoo, dtype: str, name: str, **parameters: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {"model": zoo.path(dtype, name)}
    if parameters:
        entry["parameters"] = parameters
    return entry


def _config(zoo: Zoo, dtype: str, method: str, models: list[dict[str, Any]], *,
            base: str | None = None, **parameters: Any) -> Config:  # fmt: skip
    config: Config = {"merge_method": method, "models": models, "dtype": dtype}
    if base is not None:
        config["base_model"] = zoo.path(dtype, base)
    if parameters:
        config["parameters"] = parameters
    return config


def slerp(zoo: Zoo, dtype: str) -> Config:
    models = [_entry(zoo, dtype, "base"), _entry(zoo, dtype, "ft1")]
    return _config(zoo, dtype, "slerp", models, base="base", t=0.3)


def slerp_gradients(zoo: Zoo, dtype: str) -> Config:
    """mergekit's classic slerp: ``slices`` and per-layer ``t`` gradients with filters."""
    sources = [{"model": zoo.path(dtype, n), "layer_range": [0, 4]} for n in ("ft2", "ft1")]
    t = [
        {"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
        {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
        {"value": 0.5},
    ]
    return {"merge_method": "slerp", "slices": [{"sources": sources}],
            "base_model": zoo.path(dtype, "ft2"), "parameters": {"t": t}, "dtype": dtype}  # fmt: skip


def nuslerp(zoo: Zoo, dtype: str) -> Config:
    models = [_entry(zoo, dtype, "ft1", weight=1.0), _entry(zoo, dtype, "ft2", weight=2.0)]
    return _config(zoo, dtype, "nuslerp", models)


def nuslerp_base(zoo: Zoo, dtype: str) -> Config:
    models = [_entry(zoo, dtype, "ft1", weight=0.3), _entry(zoo, dtype, "ft3", weight=0.5)]
    return _config(zoo, dtype, "nuslerp", models, base="base")


def nuslerp_row_wise(zoo: Zoo, dtype: str) -> Config:
    config = nuslerp_base(zoo, dtype)
    config["parameters"] = {"nuslerp_flatten": False, "nuslerp_row_wise": True}
    return config


def nuslerp_per_row(zoo: Zoo, dtype: str) -> Config:
    config = nuslerp(zoo, dtype)
    config["parameters"] = {"nuslerp_flatten": False}
    return config


def multislerp(zoo: Zoo, dtype: str) -> Config:
    models = [_entry(zoo, dtype, name, weight=w)
              for name, w in (("ft1", 1.0), ("ft2", 0.5), ("ft3", 2.0))]  # fmt: skip
    return _config(zoo, dtype, "multislerp", models)


def multislerp_base(zoo: Zoo, dtype: str) -> Config:
    config = multislerp(zoo, dtype)
    config["base_model"] = zoo.path(dtype, "base")
    config["parameters"] = {"normalize_weights": False, "eps": 1e-6}
    return config


def karcher(zoo: Zoo, dtype: str) -> Config:
    models = [_entry(zoo, dtype, name) for name in ("ft1", "ft2", "ft3")]
    return _config(zoo, dtype, "karcher", models, max_iter=5, tol=1e-6)


def karcher_base(zoo: Zoo, dtype: str) -> Config:
    """A base-agnostic method: mergekit merges ``base_model`` as one more (last) input."""
    models = [_entry(zoo, dtype, name) for name in ("ft1", "ft2")]
    return _config(zoo, dtype, "karcher", models, base="base")


def model_stock(zoo: Zoo, dtype: str) -> Config:
    models = [_entry(zoo, dtype, name) for name in ("ft1", "ft2", "ft3")]
    return _config(zoo, dtype, "model_stock", models, base="base")


def model_stock_filter_wise(zoo: Zoo, dtype: str) -> Config:
    models = [_entry(zoo, dtype, name) for name in ("base", "ft1", "ft2")]
    return _config(zoo, dtype, "model_stock", models, base="base", filter_wise=True)


def nearswap(zoo: Zoo, dtype: str) -> Config:
    # fine-tune deltas are multiples of 2**-8 up to 4·2**-8: t = 0.006 mixes every way
    models = [_entry(zoo, dtype, "base"), _entry(zoo, dtype, "ft1")]
    return _config(zoo, dtype, "nearswap", models, base="base", t=0.006)


def passthrough(zoo: Zoo, dtype: str) -> Config:
    return _config(zoo, dtype, "passthrough", [_entry(zoo, dtype, "ft2", scale=0.5)])


def arcee_fusion(zoo: Zoo, dtype: str) -> Config:
    models = [_entry(zoo, dtype, "base"), _entry(zoo, dtype, "ft3")]
    return _config(zoo, dtype, "arcee_fusion", models, base="base")


def arcee_fusion_out_float32(zoo: Zoo, dtype: str) -> Config:
    """mergekit's float32 mask promotes a bfloat16 result to float32, which it writes as such
    unless ``out_dtype`` says otherwise; ckreg writes ``dtype``, so compare with out_dtype."""
    return {**arcee_fusion(zoo, dtype), "out_dtype": "float32"}


CASES: dict[str, Callable[[Zoo, str], Config]] = {
    f.__name__: f
    for f in (slerp, slerp_gradients, nuslerp, nuslerp_base, nuslerp_row_wise, nuslerp_per_row,
              multislerp, multislerp_base, karcher, karcher_base, model_stock,
              model_stock_filter_wise, nearswap, passthrough, arcee_fusion, arcee_fusion_out_float32)
}  # fmt: skip
BF16 = ("slerp", "slerp_gradients", "nuslerp_base", "multislerp_base", "karcher",
        "model_stock", "nearswap", "arcee_fusion_out_float32")  # fmt: skip


@pytest.mark.parametrize(
    ("case", "dtype"),
    [(name, "float32") for name in CASES] + [(name, "bfloat16") for name in BF16],
)
def test_matches_mergekit(case: str, dtype: str, zoo: Zoo, tmp_path: Path) -> None:
    config = CASES[case](zoo, dtype)
    theirs = run_mergekit(config, tmp_path / "mergekit")
    ours = run_ckreg(config, tmp_path / "ckreg")
    assert_close(ours, theirs, config.get("out_dtype", dtype))


@pytest.mark.parametrize(
    ("method", "models", "base", "needle"),
    [
        ("slerp", ("ft1", "ft2", "ft3"), "base", "got 3: "),
        ("nearswap", ("ft1", "ft2"), "base", "got 2: "),
        ("arcee_fusion", ("ft1", "ft2"), "base", "got 2: "),
        ("model_stock", ("ft1",), "base", "got 1: "),
        ("passthrough", ("ft1",), "base", "got 2: "),
    ],
)
def test_wrong_model_counts_fail_in_both(
    method: str, models: tuple[str, ...], base: str, needle: str, zoo: Zoo, tmp_path: Path
) -> None:
    """mergekit refuses these input counts too; ckreg says how many it got."""
    params = {"t": 0.5} if method in ("slerp", "nearswap") else {}
    config = _config(zoo, "float32", method, [_entry(zoo, "float32", m) for m in models],
                     base=base, **params)  # fmt: skip
    with pytest.raises(Exception):  # noqa: B017 - mergekit raises assorted types
        run_mergekit(config, tmp_path / "mergekit")
    with pytest.raises(CkregMergeFailed) as info:
        run_ckreg(config, tmp_path / "ckreg")
    assert f"method '{method}' needs" in info.value.message and needle in info.value.message


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_slerp_of_a_tensor_over_one_chunk_matches_mergekit(dtype: torch.dtype) -> None:
    """Tensors over 1M entries: mergekit takes slerp's norms and dot chunk by chunk, so the
    summation order (and the last bits) depend on the chunking; ours chunks the same way."""
    from mergekit.merge_methods.api import merge_tensors

    gen = torch.Generator().manual_seed(3)
    base = torch.randn(1100, 1000, generator=gen)
    other = (base + 0.5 * torch.randn(1100, 1000, generator=gen)).to(dtype)
    base = base.to(dtype)
    # mergekit's whole-chunk norms split over torch's threads, so its last bits depend on
    # the thread count; ours do not. Compare with its one-thread result, ours at any count.
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        theirs = merge_tensors([base, other], "slerp", parameters={"t": 0.4}, base_index=0)
        ours_one = mergeops.merge("slerp", [{"w": other}], base={"w": base}, t=0.4, device="cpu")
    finally:
        torch.set_num_threads(threads)
    ours = mergeops.merge("slerp", [{"w": other}], base={"w": base}, t=0.4, device="cpu")
    assert torch.equal(ours["w"], theirs)
    assert torch.equal(ours["w"], ours_one["w"])
