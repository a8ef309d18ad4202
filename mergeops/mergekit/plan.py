"""Turn a mergekit config into per-output-tensor routes, as mergekit's planner does.

``models:`` is one slice over every model's whole layer range (the base appended when it is
not listed); each slice's layer ``i`` of ``L`` is merged at ``t = i / (L - 1)`` (``t = 1``
for a one-layer slice) and written as the next output layer. Pre weights (embeddings) follow
the first slice's sources, post weights (final norm, lm_head) the last slice's, both at
``t = 0``. Shared params are resolved for the output tensor name from (slice, global);
per-model params for that model's input tensor name from (source, slice, global).
Facts from mergekit 0.1.5 ``plan.py`` / ``parameter_resolver.py``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergeops.mergekit import gradients
from mergeops.mergekit.architecture import Layout
from mergeops.mergekit.schema import MergeConfig, OutputSlice, SliceSource
from mergeops.methods.base import MergeError, MergeMethod, Need, _field_names

#: Accepted for every method and ignored where the method has no such param: mergekit's
#: ``int8_mask`` only stores masks as int8, with the same numbers.
IGNORABLE = frozenset({"int8_mask"})


@dataclass
class Route:
    """One output tensor: its inputs ``(model key, input tensor name)``, base and params."""

    out_name: str
    inputs: list[tuple[str, str]]
    base: tuple[str, str] | None
    params: dict[str, Any]
    model_params: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class _Member:
    key: str
    start: int
    parameters: Mapping[str, Any]


def uses_base(method: MergeMethod) -> bool:
    """Whether the method takes the base apart from the models (else it is one more input)."""
    return Need.BASE in method.needs | method.optional


def slices_of(config: MergeConfig, layer_counts: Mapping[str, int]) -> list[OutputSlice]:
    """The config's slices; ``models:`` as one slice over every model's layers."""
    if config.slices:
        return list(config.slices)
    keys = [m.model for m in config.models]
    if config.base_model is not None and config.base_model not in keys:
        keys.append(config.base_model)
    params = {m.model: m.parameters for m in config.models}
    counts = {layer_counts[k] for k in keys}
    if len(counts) > 1:
        found = ", ".join(f"{k}: {layer_counts[k]}" for k in keys)
        raise MergeError(f"models have different layer counts ({found}); use 'slices'")
    sources = [
        SliceSource(model=k, layer_range=(0, layer_counts[k]), parameters=params.get(k, {}))
        for k in keys
    ]
    return [OutputSlice(sources=sources)]


class Planner:
    """Routes for one config and method (see the module docstring)."""

    def __init__(
        self, config: MergeConfig, method: MergeMethod, layouts: Mapping[str, Layout]
    ) -> None:
        self.config = config
        self.method = method
        self.layouts = layouts
        self.global_fields = _field_names(method.params_model)
        self.model_fields = _field_names(method.model_params_model)
        defaults = method.mergekit_defaults if config.is_mergekit else {}
        self.global_defaults = {k: v for k, v in defaults.items() if k in self.global_fields}
        self.model_defaults = {k: v for k, v in defaults.items() if k in self.model_fields}
        self.routes: list[Route] = []

    def plan(self, slices: list[OutputSlice], reference: str) -> list[Route]:
        """Pre weights, every slice's layers renumbered, post weights."""
        self._check_keys(slices)
        ref = self.layouts[reference]
        for name in ref.pre:
            self._add(name, slices[0], 0.0, [(m, name) for m in self._members(slices[0])], 0)
        out_layer = 0
        for index, out_slice in enumerate(slices):
            members = self._members(out_slice)
            count = out_slice.num_layers
            for offset in range(count):
                t = offset / (count - 1) if count > 1 else 1.0
                first = members[0]
                templates = self._layer(first.key, first.start + offset, index)
                for template in templates:
                    pairs = [(m, template.format(m.start + offset)) for m in members]
                    self._add(template.format(out_layer), out_slice, t, pairs, index)
                out_layer += 1
        for name in ref.post:
            self._add(name, slices[-1], 0.0, [(m, name) for m in self._members(slices[-1])], -1)
        return self.routes

    def _layer(self, key: str, layer: int, index: int) -> list[str]:
        layers = self.layouts[key].layers
        if layer >= len(layers):
            raise MergeError(f"slices[{index}]: model '{key}' has {len(layers)} layers, "
                             f"layer_range reaches layer {layer}")  # fmt: skip
        return layers[layer]

    def _members(self, out_slice: OutputSlice) -> list[_Member]:
        return [_Member(s.model, s.layer_range[0], s.parameters) for s in out_slice.sources]

    def _add(
        self,
        out_name: str,
        out_slice: OutputSlice,
        t: float,
        pairs: list[tuple[_Member, str]],
        index: int,
    ) -> None:
        base_key = out_slice.base_model or self.config.base_model
        split = uses_base(self.method) and base_key is not None
        if split and base_key not in [m.key for m, _ in pairs]:
            where = f"slices[{index}].base_model" if out_slice.base_model else "base_model"
            raise MergeError(f"{where} '{base_key}' is not among the sources merged into "
                             f"'{out_name}'; list it in the slice's sources")  # fmt: skip
        global_scopes = [out_slice.parameters, self.config.parameters]
        shared = gradients.resolve_all(self.global_fields, global_scopes, out_name, t)
        route = Route(out_name, [], None, {**self.global_defaults, **shared})
        for member, in_name in pairs:
            if split and member.key == base_key:
                route.base = (member.key, in_name)
                continue
            scopes = [member.parameters, *global_scopes]
            own = gradients.resolve_all(self.model_fields, scopes, in_name, t)
            route.inputs.append((member.key, in_name))
            route.model_params.append({**self.model_defaults, **own})
        for member, in_name in pairs:
            if in_name not in self.layouts[member.key].names:
                raise MergeError(f"model '{member.key}' has no tensor '{in_name}' (needed "
                                 f"for output '{out_name}')")  # fmt: skip
        self.routes.append(route)

    def _check_keys(self, slices: list[OutputSlice]) -> None:
        scopes: list[tuple[str, Mapping[str, Any]]] = [("parameters", self.config.parameters)]
        for i, out_slice in enumerate(slices):
            where = f"slices[{i}]" if self.config.slices else "models"
            scopes.append((f"{where}.parameters", out_slice.parameters))
            for j, source in enumerate(out_slice.sources):
                scopes.append((f"{where}[{j}].parameters", source.parameters))
        accepted = self.global_fields | self.model_fields
        for where, scope in scopes:
            for key in scope:
                if key not in accepted and key not in IGNORABLE:
                    raise MergeError(f"{where}: unknown parameter '{key}' for method "
                                     f"'{self.method.name}'; accepted: "
                                     f"{', '.join(sorted(accepted))}")  # fmt: skip


def drop_ignorable(params: Mapping[str, Any], accepted: set[str]) -> dict[str, Any]:
    """``params`` without the ignorable keys the method does not take."""
    return {k: v for k, v in params.items() if k in accepted or k not in IGNORABLE}


def layer_counts(layouts: Mapping[str, Layout]) -> dict[str, int]:
    """Layers per model key."""
    return {key: layout.num_layers for key, layout in layouts.items()}


def resolve_path(root: Path, value: str) -> Path:
    """``value`` relative to ``root`` unless absolute (``~`` expanded)."""
    path = Path(value).expanduser()
    return path if path.is_absolute() else root / path
