"""mergekit 0.1.5's six example configs (its repository's ``examples/``), scaled to the tiny
4-layer zoo: hub names become local models, layer ranges shrink, ``dtype`` follows the zoo.

linear, ties (density/weight gradients and a weight filter, int8_mask), gradient-slerp
(filtered ``t`` gradients over a slice), orcamini-platy-44layer (passthrough frankenmerge),
bakllama (a three-model frankenmerge with explicit embedding/head slices) and a model_stock
config in the style of the merges published with that method.
"""

from __future__ import annotations

from typing import Any

from tests.mergeops.mergekit.harness import Zoo


def linear(zoo: Zoo, dtype: str) -> dict[str, Any]:
    return {
        "models": [
            {"model": zoo.path(dtype, "ft1"), "parameters": {"weight": 1.0}},
            {"model": zoo.path(dtype, "ft2"), "parameters": {"weight": 0.3}},
            {"model": zoo.path(dtype, "ft3"), "parameters": {"weight": 0.5}},
        ],
        "merge_method": "linear",
        "dtype": dtype,
    }


def ties(zoo: Zoo, dtype: str) -> dict[str, Any]:
    return {
        "models": [
            {"model": zoo.path(dtype, "ft1"),
             "parameters": {"density": [1, 0.7, 0.1], "weight": 1.0}},
            {"model": zoo.path(dtype, "ft2"),
             "parameters": {"density": 0.5, "weight": [0, 0.3, 0.7, 1]}},
            {"model": zoo.path(dtype, "ft3"),
             "parameters": {"density": 0.33,
                            "weight": [{"filter": "mlp", "value": 0.5}, {"value": 0}]}},
        ],
        "merge_method": "ties",
        "base_model": zoo.path(dtype, "base"),
        "parameters": {"normalize": True, "int8_mask": True},
        "dtype": dtype,
    }  # fmt: skip


def gradient_slerp(zoo: Zoo, dtype: str) -> dict[str, Any]:
    return {
        "slices": [
            {"sources": [
                {"model": zoo.path(dtype, "ft1"), "layer_range": [0, 4]},
                {"model": zoo.path(dtype, "ft2"), "layer_range": [0, 4]},
            ]}
        ],
        "merge_method": "slerp",
        "base_model": zoo.path(dtype, "ft1"),
        "parameters": {"t": [
            {"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
            {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
            {"value": 0.5},
        ]},
        "dtype": dtype,
    }  # fmt: skip


def orcamini_platy(zoo: Zoo, dtype: str) -> dict[str, Any]:
    return {
        "slices": [
            {"sources": [{"model": zoo.path(dtype, "ft1"), "layer_range": [0, 3]}]},
            {"sources": [{"model": zoo.path(dtype, "ft2"), "layer_range": [1, 4]}]},
        ],
        "merge_method": "passthrough",
        "dtype": dtype,
    }


def bakllama(zoo: Zoo, dtype: str) -> dict[str, Any]:
    return {
        "slices": [
            {"sources": [{"model": zoo.path(dtype, "ft1"), "layer_range": [0, 2]}]},
            {"sources": [{"model": zoo.path(dtype, "ft2"), "layer_range": [1, 3]}]},
            {"sources": [{"model": zoo.path(dtype, "ft3"), "layer_range": [2, 4]}]},
        ],
        "merge_method": "passthrough",
        "dtype": dtype,
    }


def model_stock(zoo: Zoo, dtype: str) -> dict[str, Any]:
    return {
        "models": [
            {"model": zoo.path(dtype, "ft1")},
            {"model": zoo.path(dtype, "ft2")},
            {"model": zoo.path(dtype, "ft3")},
        ],
        "merge_method": "model_stock",
        "base_model": zoo.path(dtype, "base"),
        "dtype": dtype,
    }


EXAMPLES = {
    "linear": linear,
    "ties": ties,
    "gradient-slerp": gradient_slerp,
    "orcamini-platy-44layer": orcamini_platy,
    "bakllama": bakllama,
    "model_stock": model_stock,
}
