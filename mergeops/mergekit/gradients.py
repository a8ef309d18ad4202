"""Parameter values as mergekit resolves them: gradients, ``filter:`` lists and precedence.

A setting is a scalar, a gradient (a list interpolated over a slice's layers at
``t = layer / (layers - 1)``, ``t = 1`` for a one-layer slice, ``t = 0`` outside layers), a
conditional ``{filter, value}`` or a list of them: the first entry whose ``filter`` is a
substring of the tensor name (or is absent or ``*``) wins. Scopes are tried from highest
precedence (source > slice > model > global); a scope whose filters match nothing passes to
the next one. Facts from mergekit 0.1.5 ``config.evaluate_setting`` / ``parameter_resolver``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

_MISSING = object()


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_scalar(value: Any) -> bool:
    return isinstance(value, bool | int | float | str)


def gradient_value(values: list[Any], t: float) -> Any:
    """A gradient's value at ``t`` in [0, 1]: piecewise linear between numeric anchors, the
    anchor at ``int(t·(n-1))`` for booleans and strings."""
    if not all(_is_number(v) for v in values):
        return values[int(t * (len(values) - 1))]
    scaled = t * (len(values) - 1)
    low = int(scaled)
    high = min(len(values) - 1, low + 1)
    frac = scaled - low
    return (1 - frac) * values[low] + frac * values[high]


def evaluate(setting: Any, tensor_name: str, t: float) -> Any:
    """The value of one setting for ``tensor_name`` at ``t``; ``_MISSING`` when no filter of
    a conditional list matches (or a gradient is empty)."""
    if isinstance(setting, Mapping):
        setting = [setting]
    if _is_scalar(setting):
        return setting
    if not isinstance(setting, list) or not setting:
        return _MISSING
    if all(_is_scalar(v) for v in setting):
        return gradient_value(setting, t)
    for condition in setting:
        pattern = condition.get("filter")
        if pattern is None or pattern == "*" or (tensor_name and pattern in tensor_name):
            return evaluate(condition["value"], tensor_name, t)
    return _MISSING


def resolve(
    name: str, scopes: Iterable[Mapping[str, Any] | None], tensor_name: str, t: float
) -> Any:
    """``name``'s value from the first scope that sets it for ``tensor_name``, else
    ``_MISSING``."""
    for scope in scopes:
        if scope is not None and name in scope:
            value = evaluate(scope[name], tensor_name, t)
            if value is not _MISSING:
                return value
    return _MISSING


def resolve_all(
    names: Iterable[str], scopes: Sequence[Mapping[str, Any] | None], tensor_name: str, t: float
) -> dict[str, Any]:
    """The resolved values of every parameter in ``names`` that some scope sets."""
    resolved = {}
    for name in names:
        value = resolve(name, scopes, tensor_name, t)
        if value is not _MISSING:
            resolved[name] = value
    return resolved


def check_setting(key: str, setting: Any, where: str) -> None:
    """Raise ``ValueError`` naming ``where``.``key`` when a setting is not one of the forms."""
    if _is_scalar(setting):
        return
    items = [setting] if isinstance(setting, Mapping) else setting
    if not isinstance(items, list) or not items:
        raise ValueError(f"{where}.{key}: expected a scalar, a gradient list or filters, "
                         f"got {setting!r}")  # fmt: skip
    if all(_is_scalar(v) for v in items):
        return
    for i, item in enumerate(items):
        if not isinstance(item, Mapping) or "value" not in item:
            raise ValueError(f"{where}.{key}[{i}]: a filter entry needs 'value' (and "
                             f"optionally 'filter'), got {item!r}")  # fmt: skip
        extra = set(item) - {"value", "filter"}
        if extra:
            raise ValueError(f"{where}.{key}[{i}]: unknown key '{sorted(extra)[0]}' "
                             "(a filter entry has 'filter' and 'value')")  # fmt: skip
        if item.get("filter") is not None and not isinstance(item["filter"], str):
            raise ValueError(f"{where}.{key}[{i}].filter must be a string")
        check_setting("value", item["value"], f"{where}.{key}[{i}]")
