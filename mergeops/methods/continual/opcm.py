"""opcm — continual merging by orthogonal projection (arXiv 2501.09522), a stateful method.

Each run folds its models, in the order given, into the state loaded from ``state_path``
(a fresh state when the file does not exist) and outputs θ^(t) = θ0 + τ̄^(t). One statistics
pass per folded model computes u = λ·τ̄ + τ̃ in place in the state and the model-wide norms
that give λ_t; the merge pass only adds the base. The state is one safetensors file: the
merged task vector (float32) plus JSON metadata (λ, Σ‖τ_i‖, count, arrival order, alpha).
"""

from __future__ import annotations

import math
from pathlib import Path

from pydantic import Field
from safetensors import safe_open

from mergeops.io import write_safetensors
from mergeops.methods.base import (
    MergeContext,
    MergeError,
    MethodParams,
    Need,
    StatsCollector,
    StreamingMethod,
    TensorInputs,
    TensorResult,
    register,
)
from mergeops.ops.opcm import (
    OpcmState,
    fold_tensor,
    next_lambda,
    state_from_tensors,
    state_to_tensors,
)


class OpcmParams(MethodParams):
    """``alpha``: share of τ̄'s singular-value mass whose subspace τ_t is projected out of."""

    alpha: float = Field(0.5, gt=0, lt=1)


def save_opcm_state(state: OpcmState, path: str | Path) -> None:
    """Write ``state`` as one safetensors file (tensors + JSON metadata; no pickle)."""
    tensors, metadata = state_to_tensors(state)
    write_safetensors(Path(path), tensors, metadata)


def load_opcm_state(path: str | Path) -> OpcmState:
    """Read a state written by :func:`save_opcm_state`."""
    with safe_open(str(path), framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
        metadata = handle.metadata() or {}
    try:
        return state_from_tensors(tensors, metadata)
    except (ValueError, KeyError) as exc:
        raise MergeError(f"cannot read OPCM state '{path}': {exc}") from None


class OpcmFolds(StatsCollector):
    """Pass j folds model j into ``ctx.state`` (in place; the engine saves only on success)."""

    def __init__(self, ctx: MergeContext) -> None:
        self.state: OpcmState = ctx.state
        self.names = ctx.model_names
        self.index = 0
        self._reset()

    def _reset(self) -> None:
        self.seen: set[str] = set()
        self.tv_norm_sq = self.update_norm_sq = 0.0

    def observe(self, inputs: TensorInputs, ctx: MergeContext) -> None:
        state, key = self.state, inputs.name
        tv = inputs.task_vectors()[self.index]
        if state.count == 0:
            update = tv
        elif key not in state.task_vector:
            raise MergeError(f"opcm state lacks tensor '{key}' of model '{self.names[self.index]}'")
        else:
            merged_tv = state.task_vector[key].to(tv.device)
            update = fold_tensor(merged_tv, tv, state.lam, state.alpha)
        state.task_vector[key] = update.cpu()  # the state lives on the CPU
        self.seen.add(key)
        self.tv_norm_sq += float(tv.double().square().sum())
        self.update_norm_sq += float(update.double().square().sum())

    def next_pass(self) -> bool:
        state, name = self.state, self.names[self.index]
        extra = sorted(set(state.task_vector) - self.seen)
        if extra:
            raise MergeError(f"opcm state has tensor '{extra[0]}' that model '{name}' lacks")
        if state.count == 0:
            state.lam, state.norm_sum = 1.0, math.sqrt(self.tv_norm_sq)
        else:
            state.norm_sum += math.sqrt(self.tv_norm_sq)
            lam = next_lambda(
                math.sqrt(self.update_norm_sq), state.norm_sum, state.count + 1, state.lam
            )
            for key in state.task_vector:
                state.task_vector[key] = state.task_vector[key] / lam
            state.lam = lam
        state.order.append(name)
        self.index += 1
        self._reset()
        return self.index < len(self.names)

    def result(self) -> list[str]:
        return list(self.state.order)


@register
class Opcm(StreamingMethod):
    """Fold models one at a time into a persisted continual merge."""

    name = "opcm"
    paper = "https://arxiv.org/abs/2501.09522"
    params_model = OpcmParams
    needs = frozenset({Need.BASE, Need.STATE})

    def new_state(self, ctx: MergeContext) -> OpcmState:
        params = ctx.params
        assert isinstance(params, OpcmParams)
        return OpcmState({}, 1.0, 0.0, [], params.alpha)

    def load_state(self, path: Path, ctx: MergeContext) -> OpcmState:
        return load_opcm_state(path)

    def save_state(self, state: OpcmState, path: Path) -> None:
        save_opcm_state(state, path)

    def stats_collector(self, ctx: MergeContext) -> StatsCollector | None:
        params, state = ctx.params, ctx.state
        assert isinstance(params, OpcmParams) and isinstance(state, OpcmState)
        if state.count and state.alpha != params.alpha:
            raise MergeError(
                f"opcm: the state was built with alpha {state.alpha}, params ask {params.alpha}"
            )
        folded = [name for name in ctx.model_names if name in state.order]
        if folded:
            raise MergeError(f"opcm: model '{folded[0]}' was already folded ({state.order})")
        return OpcmFolds(ctx)

    def merge_tensor(self, inputs: TensorInputs, ctx: MergeContext) -> TensorResult:
        assert inputs.base is not None
        return TensorResult(inputs.base + ctx.state.task_vector[inputs.name].to(inputs.base))
