"""The merge-method interface and its explicit registry.

A method is a thin adapter over pure tensor math in ``mergeops.ops``. It declares, as class
attributes, what it is and what it needs; the engine (``mergeops.engine``) does all reading,
validation of inputs, device/dtype handling and writing, and calls the method's hooks:

Streaming methods (``StreamingMethod``), per tensor name, in a stable order:

1. ``validate(ctx)`` once, before anything is read or written (bad params, missing inputs).
2. Optional first pass(es) for model-wide statistics: ``stats_collector(ctx)`` returns a
   ``StatsCollector`` (or ``None``); the engine feeds it every tensor (``observe``) and asks
   ``next_pass()`` after each full sweep; when it says ``False`` the engine stores
   ``collector.result()`` in ``ctx.stats``. Exact multi-pass statistics (radix top-k,
   norms) fit this.
3. ``merge_tensor(inputs, ctx) -> TensorResult`` for every tensor. ``inputs`` holds float32
   tensors on ``ctx.device``; the engine casts ``TensorResult.merged`` to the output dtype.
   ``TensorResult.extras`` are additional output streams (per-model masks, the task
   vector, ...), each written as its own sharded safetensors folder named by the stream;
   extras are written with the dtype they are emitted in (pack bool masks to uint8 first).
4. ``finish(ctx)`` once after the last tensor (stateful methods update ``ctx.state`` here).

Large tensors of elementwise methods are merged in row slices (``mergeops.chunking``):
``ElementwiseMethod`` needs nothing else, ``tensor_stats`` gives TIES-like methods whole task
vectors one model at a time, and ``SliceStatsMethod`` (slerp, model_stock, ...) sweeps the
slices through a ``TensorStatsPass`` for per-tensor reductions (norms, angles, counts).

Whole-model methods (``WholeModelMethod``, e.g. fw) get the sources themselves in
``merge_model(inputs, ctx)`` and return whole dicts; ``load_state_dict`` helps load one
source at a time, so a method can keep memory constant in the pool size. ``output_shapes``
declares output shapes other than the inputs' (pleas's wider layers, ``mergeops.reshape``).

Stateful methods (``Need.STATE``) implement ``new_state``/``load_state``/``save_state``;
the engine loads ``state_path`` when it exists (else ``new_state``), exposes the object as
``ctx.state`` and saves it after a successful merge, before the output is moved into place.

Per-model parameters (``weight``, ``density``, ...) live in ``model_params_model``; global
params in ``params_model``. Both are frozen pydantic models that forbid unknown fields, so a
validation error names the parameter. A global value for a per-model field is the default
for every model (mergekit semantics), which the engine resolves with ``split_params``.

Register a method with the ``@register`` class decorator in its module and import the
module from ``mergeops/methods/__init__.py``.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from mergeops import math_init  # noqa: F401 - MKL's vector math initialised before any method runs
from mergeops.sources import Objective, TensorMeta, TensorSource


class MergeError(ValueError):
    """A merge cannot run or failed; the message names the model, tensor or parameter."""


class Need(StrEnum):
    """Inputs a method may require beyond the models themselves."""

    BASE = "base"
    METRICS = "metrics"
    SECOND_MOMENTS = "second_moments"
    FISHER = "fisher"
    OBJECTIVE = "objective"
    STATE = "state"
    GRAMS = "grams"


#: Side inputs read per model per tensor, keyed by the name used in ``TensorInputs.side``.
SIDE_INPUTS: dict[Need, str] = {
    Need.SECOND_MOMENTS: "second_moment",
    Need.FISHER: "fisher",
    Need.GRAMS: "gram",
}


class MethodParams(BaseModel):
    """Base class of a method's global parameters (frozen; unknown names are errors)."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)


class ModelParams(BaseModel):
    """Base class of a method's per-model parameters (frozen; unknown names are errors)."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)


class NoModelParams(ModelParams):
    """For methods without per-model parameters."""


@dataclass
class MergeContext:
    """Everything a method may consult besides the current tensor.

    ``stats`` holds the first-pass result; ``state`` the stateful method's state object;
    ``scratch`` is free for the method to keep cross-tensor bookkeeping in.
    """

    method: str
    model_names: list[str]
    params: MethodParams
    model_params: list[ModelParams]
    device: torch.device
    out_dtype: torch.dtype | None = None
    #: dtype the inputs are handed in: float32 by default; a mergekit config's ``dtype``, or
    #: None (the inputs' own dtype) when a mergekit config gives none, as mergekit computes.
    compute_dtype: torch.dtype | None = torch.float32
    has_base: bool = False
    metrics: list[float | None] = field(default_factory=list)
    objective: Objective | None = None
    seed: int = 0
    stats: Any = None
    state: Any = None
    scratch: dict[str, Any] = field(default_factory=dict)

    def generator(self, tensor_name: str, model_index: int) -> torch.Generator:
        """A generator seeded from (seed, tensor, model): results do not depend on order."""
        digest = hashlib.sha256(f"{self.seed}:{tensor_name}:{model_index}".encode()).digest()
        gen = torch.Generator(device=self.device)
        gen.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
        return gen


@dataclass
class TensorInputs:
    """One tensor name's inputs: float32 tensors on the context's device.

    ``models[i]`` belongs to ``ctx.model_names[i]``; ``side['second_moment'][i]`` and
    ``side['fisher'][i]`` are the matching side inputs when the method needs them.
    """

    name: str
    models: list[torch.Tensor]
    base: torch.Tensor | None = None
    side: dict[str, list[torch.Tensor]] = field(default_factory=dict)

    def task_vectors(self) -> list[torch.Tensor]:
        """τ_t = θ_t - θ0 for every model (requires a base)."""
        if self.base is None:
            raise MergeError(f"tensor '{self.name}': task vectors need a base model")
        return [model - self.base for model in self.models]


@dataclass
class TensorResult:
    """A method's output for one tensor name.

    ``merged`` goes to the main output (``None`` leaves the tensor out); ``extras`` maps an
    output stream name (e.g. ``"mask.ft-1"``, ``"task_vector"``) to tensors keyed by name.
    """

    merged: torch.Tensor | None
    extras: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)


@dataclass
class ModelInputs:
    """Inputs of a whole-model method: lazy sources, not loaded tensors."""

    models: list[TensorSource]
    base: TensorSource | None = None
    side: dict[str, list[TensorSource]] = field(default_factory=dict)


@dataclass
class ModelResult:
    """A whole-model method's output: the merged state dict and any extra streams."""

    merged: dict[str, torch.Tensor]
    extras: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)


class StatsCollector(ABC):
    """Accumulates model-wide statistics over one or more streaming passes."""

    @abstractmethod
    def observe(self, inputs: TensorInputs, ctx: MergeContext) -> None:
        """Take one tensor name's inputs into account (called for every tensor per pass)."""

    def next_pass(self) -> bool:
        """Called after each full sweep; return True to request another sweep."""
        return False

    @abstractmethod
    def result(self) -> Any:
        """The statistics, stored by the engine in ``ctx.stats``."""


class MergeMethod(ABC):
    """Common declaration of every merge method (see the module docstring)."""

    name: ClassVar[str]
    paper: ClassVar[str]
    params_model: ClassVar[type[MethodParams]]
    model_params_model: ClassVar[type[ModelParams]] = NoModelParams
    needs: ClassVar[frozenset[Need]] = frozenset()
    #: Inputs used when given but not required (e.g. ota's base).
    optional: ClassVar[frozenset[Need]] = frozenset()
    streaming: ClassVar[bool] = True
    #: Values for params a mergekit config omits (mergekit's own defaults, e.g. ties density
    #: 1.0); ckreg's schema (``conventions: ckreg``) keeps the pydantic defaults instead.
    mergekit_defaults: ClassVar[dict[str, Any]] = {}

    def validate(self, ctx: MergeContext) -> None:  # noqa: B027 - optional hook
        """Check params against the inputs before anything is read; raise ``MergeError``."""

    def check_model_count(self, params: MethodParams, count: int) -> None:  # noqa: B027
        """Refuse params that do not fit ``count`` models (``MergeError``); needs no input,
        so the registry checks it when a merge is requested (optional hook)."""

    # ---- side inputs -------------------------------------------------------------------
    def check_side_input(self, kind: str, source: TensorSource, key: str, meta: TensorMeta) -> None:
        """Up-front check that a side input holds ``key`` with the weights' shape."""
        try:
            side_shape = source.metadata(key).shape
        except KeyError:
            raise MergeError(f"{kind} of model '{source.name}' has no tensor '{key}'") from None
        if tuple(side_shape) != tuple(meta.shape):
            raise MergeError(
                f"shape mismatch for '{key}': {kind} of model '{source.name}' "
                f"{tuple(side_shape)}, weights {tuple(meta.shape)}"
            )

    def read_side_input(
        self, kind: str, source: TensorSource, key: str, device: torch.device
    ) -> torch.Tensor:
        """Read one side tensor as float32 on ``device`` (override for compressed layouts)."""
        return source.get(key).to(device=device, dtype=torch.float32)

    # ---- state (Need.STATE) ------------------------------------------------------------
    def new_state(self, ctx: MergeContext) -> Any:
        """A fresh state object for the first run of a stateful method."""
        raise NotImplementedError(f"method '{self.name}' keeps no state")

    def load_state(self, path: Path, ctx: MergeContext) -> Any:
        """Load the state saved by ``save_state``."""
        raise NotImplementedError(f"method '{self.name}' keeps no state")

    def save_state(self, state: Any, path: Path) -> None:
        """Persist ``state`` at ``path`` (a file or folder the method chooses)."""
        raise NotImplementedError(f"method '{self.name}' keeps no state")

    def finish(self, ctx: MergeContext) -> None:  # noqa: B027 - optional hook
        """Called once after all tensors were merged."""


_F = TypeVar("_F", bound=Callable[..., Any])


def reads_no_inputs(tensor_stats: _F) -> _F:
    """Marks a ``tensor_stats`` that never calls ``task_vector``: the engine may then start
    reading a tensor's slices before calling it (``stats_read_inputs``)."""
    tensor_stats.reads_no_inputs = True  # type: ignore[attr-defined]
    return tensor_stats


def stats_read_inputs(method: MergeMethod) -> bool:
    """Whether ``method``'s ``tensor_stats`` may read whole inputs (not marked with
    ``reads_no_inputs``; an override of a marked one is not marked)."""
    return not getattr(getattr(type(method), "tensor_stats", None), "reads_no_inputs", False)


class StreamingMethod(MergeMethod):
    """A method the engine drives tensor by tensor.

    An elementwise method may also set ``chunkable = True`` and implement ``tensor_stats`` and
    ``merge_rows``: the engine then merges large tensors slice by slice (``mergeops.chunking``),
    bounding memory by the slice size instead of the largest tensor.
    """

    streaming: ClassVar[bool] = True
    chunkable: ClassVar[bool] = False
    slices_in_any_dtype: ClassVar[bool] = False
    """True when ``merge_rows`` of a slice gives that slice of ``merge_tensor`` in any compute
    dtype (elementwise arithmetic, statistics that do not need float32): a mergekit config's
    ``dtype: bfloat16`` then merges large tensors in row slices too (``chunking.any_dtype``)."""

    def slices_in_dtype(self, ctx: MergeContext) -> bool:
        """``slices_in_any_dtype`` for these params (a method may refuse some)."""
        return self.slices_in_any_dtype

    def stats_collector(self, ctx: MergeContext) -> StatsCollector | None:
        """A collector for a first pass, or None when the method needs none."""
        return None

    @abstractmethod
    def merge_tensor(self, inputs: TensorInputs, ctx: MergeContext) -> TensorResult:
        """Merge one tensor name's inputs."""

    def tensor_stats(
        self,
        key: str,
        shape: tuple[int, ...],
        task_vector: Callable[[int], torch.Tensor],
        ctx: MergeContext,
    ) -> list[Any]:
        """Per-model statistics of the whole tensor that slices need (chunkable methods).

        ``task_vector(i)`` reads the whole float32 τ_i, one model at a time.
        """
        raise NotImplementedError(f"method '{self.name}' is not chunkable")

    def stats_sweep(
        self, key: str, shape: tuple[int, ...], ctx: MergeContext
    ) -> TensorStatsPass | None:
        """A sweep over the tensor's row slices whose ``result()`` is what ``tensor_stats``
        would return, for params where the statistics need no whole tensor; None (the
        default): the engine calls ``tensor_stats``."""
        return None

    def merge_rows(
        self, inputs: TensorInputs, stats: list[Any], offset: int, ctx: MergeContext
    ) -> torch.Tensor:
        """The merged rows of one slice starting at flat index ``offset`` (chunkable methods);
        must equal the matching rows of ``merge_tensor`` bit for bit."""
        raise NotImplementedError(f"method '{self.name}' is not chunkable")


class ElementwiseMethod(StreamingMethod):
    """A streaming method whose ``merge_tensor`` is elementwise with no whole-tensor
    statistics: a row slice merges exactly like the whole tensor, so it is chunkable as is."""

    chunkable: ClassVar[bool] = True

    @reads_no_inputs
    def tensor_stats(
        self,
        key: str,
        shape: tuple[int, ...],
        task_vector: Callable[[int], torch.Tensor],
        ctx: MergeContext,
    ) -> list[Any]:
        """No whole-tensor statistics."""
        return [None] * len(ctx.model_params)

    def merge_rows(
        self, inputs: TensorInputs, stats: list[Any], offset: int, ctx: MergeContext
    ) -> torch.Tensor:
        """The merged rows of one slice: ``merge_tensor`` of the slice."""
        merged = self.merge_tensor(inputs, ctx).merged
        assert merged is not None
        return merged


class TensorStatsPass(ABC):
    """Statistics of one tensor gathered over its row slices, in order (``SliceStatsMethod``).

    The engine calls ``observe`` for every slice of the tensor (``offset``: the slice's first
    flat index), then ``next_pass``: True asks for another sweep over the same slices (e.g. a
    dot product of directions needs the norms of a first sweep). After the last sweep,
    ``result()`` is what ``merge_rows`` receives as ``stats``.
    """

    flat_block: int = 0
    """Non-zero: the pass reduces fixed flat blocks of this many entries, and the engine may
    feed it flat pieces of one block each (``(1, n)`` tensors; ``offset`` their first entry)
    instead of row slices where it can read them so (local files, on the CPU). No block then
    straddles two slices, so none is gathered (copied) from two."""

    @abstractmethod
    def observe(self, inputs: TensorInputs, offset: int) -> None:
        """Take one slice into account."""

    def next_pass(self) -> bool:
        """Called after each sweep; True requests another one."""
        return False

    @abstractmethod
    def result(self) -> Any:
        """The statistics handed to ``merge_rows``."""

    def close(self) -> None:  # noqa: B027 - optional hook: most passes hold nothing to release
        """Release what the sweeps held (worker threads); called once they end, on an error
        too."""


class SliceStatsMethod(StreamingMethod):
    """A method whose per-tensor statistics are reductions over the tensor's elements (norms,
    angles, counts, energies) and whose merge is elementwise once they are known.

    ``stats_pass`` returns a ``TensorStatsPass`` (or None when the method needs none for these
    params); the engine sweeps a large tensor's row slices through it, once per pass, then
    merges slice by slice with ``merge_rows``. ``merge_tensor`` runs the same two steps on the
    whole tensor as one slice, so both paths agree bit for bit provided the pass reduces in
    fixed blocks (``mergeops.ops.blocks``) rather than over whatever slice it is given.
    ``can_chunk(ctx)`` may refuse slicing for params whose statistics are not reductions.
    """

    chunkable: ClassVar[bool] = True
    slice_stats: ClassVar[bool] = True

    @abstractmethod
    def stats_pass(
        self, key: str, shape: tuple[int, ...], ctx: MergeContext
    ) -> TensorStatsPass | None:
        """A fresh statistics pass for tensor ``key`` of ``shape``, or None."""

    @abstractmethod
    def merge_rows(
        self, inputs: TensorInputs, stats: Any, offset: int, ctx: MergeContext
    ) -> torch.Tensor:
        """The merged rows of one slice given the finished statistics."""

    def can_chunk(self, ctx: MergeContext) -> bool:
        """Whether these params allow merging in row slices."""
        return True

    def merge_tensor(self, inputs: TensorInputs, ctx: MergeContext) -> TensorResult:
        """The whole tensor: its statistics from one slice, then ``merge_rows``."""
        shape = tuple(inputs.models[0].shape)
        stats = sweep_stats(self.stats_pass(inputs.name, shape, ctx), lambda: [(0, inputs)])
        return TensorResult(self.merge_rows(inputs, stats, 0, ctx))


def sweep_stats(
    stats_pass: TensorStatsPass | None,
    slices: Callable[[], Iterable[tuple[int, TensorInputs]]],
) -> Any:
    """Run ``stats_pass`` over ``slices()`` (offset, inputs) as many times as it asks."""
    if stats_pass is None:
        return None
    try:
        while True:
            for offset, inputs in slices():
                stats_pass.observe(inputs, offset)
            if not stats_pass.next_pass():
                return stats_pass.result()
    finally:
        stats_pass.close()


class WholeModelMethod(MergeMethod):
    """A method that needs all tensors at once (e.g. fw's gradient steps)."""

    streaming: ClassVar[bool] = False

    @abstractmethod
    def merge_model(self, inputs: ModelInputs, ctx: MergeContext) -> ModelResult:
        """Merge whole models; return float32 (or any) tensors, the engine casts ``merged``."""

    def output_shapes(
        self, metas: Mapping[str, TensorMeta], ctx: MergeContext
    ) -> dict[str, tuple[int, ...]] | None:
        """Shapes of the output tensors that differ from the inputs' ``metas`` (a wider
        model), called after ``validate``; None (the default): the inputs' shapes. The engine
        checks ``merge_model``'s tensors against them (``mergeops.reshape``)."""
        return None


def load_state_dict(source: TensorSource, device: torch.device) -> dict[str, torch.Tensor]:
    """Load every tensor of ``source`` as float32 on ``device`` (floating tensors only cast)."""
    out: dict[str, torch.Tensor] = {}
    for key in list(source.keys()):
        tensor = source.get(key).to(device=device)
        out[key] = tensor.float() if tensor.is_floating_point() else tensor
    return out


# ---- registry ------------------------------------------------------------------------------
_REGISTRY: dict[str, type[MergeMethod]] = {}
_M = TypeVar("_M", bound=type[MergeMethod])


def register(cls: _M) -> _M:
    """Class decorator adding a method to the registry under ``cls.name``."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise MergeError(f"merge method '{cls.name}' is registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def available_methods() -> list[str]:
    """Names of all registered methods, sorted."""
    return sorted(_REGISTRY)


def get_method(name: str) -> MergeMethod:
    """A fresh instance of the method called ``name``."""
    try:
        return _REGISTRY[name]()
    except KeyError:
        raise MergeError(
            f"unknown merge method '{name}'; available: {', '.join(available_methods())}"
        ) from None


def split_params(
    method: MergeMethod,
    params: Mapping[str, Any],
    model_params: Sequence[Mapping[str, Any]],
    model_names: Sequence[str],
) -> tuple[MethodParams, list[ModelParams]]:
    """Validate global and per-model params; global values of per-model fields are defaults.

    Raises ``MergeError`` naming the parameter (and the model for per-model values).
    """
    per_model_fields = _field_names(method.model_params_model)
    global_fields = _field_names(method.params_model)
    defaults = {k: v for k, v in params.items() if k in per_model_fields and k not in global_fields}
    unknown = [k for k in params if k not in per_model_fields | global_fields]
    if unknown:
        raise MergeError(
            f"unknown parameter '{unknown[0]}' for method '{method.name}'; "
            f"accepted: {', '.join(sorted(per_model_fields | global_fields))}"
        )
    global_values = {k: v for k, v in params.items() if k in global_fields}
    try:
        method_params = method.params_model.model_validate(global_values)
    except ValidationError as exc:
        raise MergeError(f"bad parameters for method '{method.name}': {_brief(exc)}") from None
    resolved: list[ModelParams] = []
    for name, own in zip(model_names, model_params, strict=True):
        try:
            resolved.append(method.model_params_model.model_validate({**defaults, **own}))
        except ValidationError as exc:
            raise MergeError(
                f"bad parameters for model '{name}' (method '{method.name}'): {_brief(exc)}"
            ) from None
    return method_params, resolved


def _field_names(model: type[BaseModel]) -> set[str]:
    names = set()
    for name, info in model.model_fields.items():
        names.add(name)
        if info.alias:
            names.add(info.alias)
    return names


def _brief(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "params"
        parts.append(f"{loc}: {err['msg']} (got {err.get('input')!r})")
    return "; ".join(parts)
