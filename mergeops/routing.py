"""Per-tensor routes: merges whose inputs and params vary by output tensor.

A routed plan (mergekit ``slices``, gradients, ``filter:`` lists, vocabulary remaps) lists,
per output tensor, which source and which input tensor name each input comes from, the base
(if any), and a ``MergeContext`` carrying that tensor's resolved params. The engine streams
the routes in order with the same read-ahead as plain merges; inputs are handed to the method
in ``ctx.compute_dtype`` (None: as stored) after an optional transform (vocabulary rows).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass

import torch

from mergeops import finite
from mergeops.methods import base as mb
from mergeops.prefetch import Prefetcher, Read
from mergeops.sources import TensorMeta, TensorSource

Transform = Callable[[list[torch.Tensor]], list[torch.Tensor]]
"""Maps the loaded [inputs..., base] of one route to what the method gets."""


@dataclass
class TensorRoute:
    """One output tensor of a routed plan."""

    key: str
    meta: TensorMeta
    inputs: list[tuple[TensorSource, str]]
    base: tuple[TensorSource, str] | None
    ctx: mb.MergeContext
    transform: Transform | None = None

    def reads(self) -> list[tuple[TensorSource, str]]:
        """(source, tensor name) of every input, base last."""
        return [*self.inputs, *([self.base] if self.base is not None else [])]

    def roles(self) -> list[str]:
        roles = [f"model '{s.name}' ('{k}')" for s, k in self.inputs]
        return roles + ([f"base '{self.base[0].name}' ('{self.base[1]}')"] if self.base else [])


def _read(source: TensorSource, key: str) -> Read:
    meta = source.metadata(key)
    return Read(math.prod(meta.shape) * meta.dtype.itemsize, lambda: source.get(key))


def _cast(tensor: torch.Tensor, route: TensorRoute) -> torch.Tensor:
    tensor = tensor.to(route.ctx.device)
    dtype = route.ctx.compute_dtype
    return tensor if dtype is None or not tensor.is_floating_point() else tensor.to(dtype)


def stream_routes(
    routes: list[TensorRoute],
    prefetcher: Prefetcher,
    counter: list[int],
    read: Callable[[TensorRoute], bool] = lambda route: True,
) -> Iterator[tuple[TensorRoute, mb.TensorInputs | None]]:
    """(route, method inputs) per route, later routes read ahead; inputs are None for a
    non-floating output (copied from its base or first input by the caller) and for a route
    ``read`` declines (the caller reads it itself)."""
    floating = [r.meta.dtype.is_floating_point and read(r) for r in routes]
    batches = ([_read(s, k) for s, k in r.reads()] if f else []
               for r, f in zip(routes, floating, strict=True))  # fmt: skip
    with closing(prefetcher.stream(batches)) as stream:
        for route, is_float, pending in zip(routes, floating, stream, strict=True):
            if not is_float:
                yield route, None
                continue
            raw = [p.result() for p in pending]
            counter[0] += sum(t.numel() * t.element_size() for t in raw)
            loaded = [_cast(t, route) for t in raw]
            finite.check_inputs(route.key, route.roles(), [finite.input_flag(t) for t in loaded])
            if route.transform is not None:
                loaded = route.transform(loaded)
            count = len(route.inputs)
            base = loaded[count] if route.base is not None else None
            yield route, mb.TensorInputs(name=route.key, models=loaded[:count], base=base)


def passthrough(route: TensorRoute) -> torch.Tensor:
    """A non-floating output: the base's tensor, else the first input's."""
    source, key = route.base if route.base is not None else route.inputs[0]
    return source.get(key)


def check_route_shapes(route: TensorRoute) -> None:
    """All inputs of a route (without a transform) share the output's shape."""
    if route.transform is not None:
        return
    for source, key in route.reads():
        shape = tuple(source.metadata(key).shape)
        if shape != tuple(route.meta.shape):
            raise mb.MergeError(
                f"shape mismatch for '{route.key}': model '{source.name}' tensor '{key}' "
                f"{shape}, expected {tuple(route.meta.shape)}"
            )
