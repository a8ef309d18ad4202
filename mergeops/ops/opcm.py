"""OPCM continual merging by orthogonal projection ("Merging Models on the Fly", arXiv 2501.09522).

Pure tensor math plus a small state object. The state holds the merged task vector
θ^(t) - θ0 (float32), λ_t, the running sum of task-vector norms and the order in which models
were folded; it converts to and from safetensors tensors + string metadata (never pickle).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

STATE_FORMAT = "ckreg.opcm-state/v1"


@dataclass
class OpcmState:
    """Where a continual merge stands after ``count`` folds.

    ``task_vector`` is the merged task vector τ̄^(t) = θ^(t) - θ0 (float32), so the merged model
    is ``base + task_vector`` and the state is only as large as one model.
    """

    task_vector: dict[str, torch.Tensor]
    lam: float
    norm_sum: float
    order: list[str] = field(default_factory=list)
    alpha: float = 0.5
    base: str | None = None

    @property
    def count(self) -> int:
        """How many models have been folded."""
        return len(self.order)


def split_rank(singular_values: torch.Tensor, alpha: float) -> int:
    """First (0-based) index where ``cumsum(S)/ΣS > alpha``; 0 when ``ΣS = 0``."""
    total = singular_values.sum()
    if total <= 0:
        return 0
    above = (singular_values.cumsum(0) / total) > alpha
    return int(above.to(torch.int8).argmax().item())


def project_task_vector(
    merged_task_vector: torch.Tensor, task_vector: torch.Tensor, alpha: float
) -> torch.Tensor:
    """``τ̃ = U P Vᵀ`` with ``P = Uᵀ τ V``, ``diag(P)`` and ``P[:r,:r]`` zeroed (2-D only).

    Computed as ``τ - U_k (P_k ⊙ Z) V_kᵀ`` from the reduced SVD (k = min(m, n)), which is exactly
    the full-SVD formula: entries of P outside the kxk block are never zeroed, so the parts of τ
    orthogonal to τ̄'s row/column spaces are kept without forming an mxm U. A zero τ̄ leaves τ
    unprojected.
    """
    tv = task_vector.float()
    if tv.ndim != 2:
        return tv
    mtv = merged_task_vector.float()
    u, s, vh = torch.linalg.svd(mtv, full_matrices=False)
    if s.sum() <= 0:
        return tv
    rank = split_rank(s, alpha)
    coeffs = u.T @ tv @ vh.T
    zeroed = torch.zeros_like(coeffs, dtype=torch.bool)
    zeroed.fill_diagonal_(True)
    zeroed[:rank, :rank] = True
    return tv - u @ (coeffs * zeroed) @ vh


def fold_tensor(
    merged_task_vector: torch.Tensor, task_vector: torch.Tensor, lam: float, alpha: float
) -> torch.Tensor:
    """One tensor's unnormalised update ``u = λ_{t-1}·τ̄ + τ̃_t`` (τ̃ = τ_t off 2-D weights)."""
    return lam * merged_task_vector.float() + project_task_vector(
        merged_task_vector, task_vector, alpha
    )


def next_lambda(update_norm: float, norm_sum: float, count: int, previous: float) -> float:
    """``λ_t = ‖u‖ / (norm_sum / count)``; ``previous`` when ``u`` or every τ is zero."""
    if update_norm == 0.0 or norm_sum == 0.0:
        return previous
    return update_norm / (norm_sum / count)


def _check(name: str, key: str, base: Mapping[str, torch.Tensor], other: Mapping) -> None:
    if key not in other:
        raise KeyError(f"model '{name}' lacks tensor '{key}' present in the base")
    if tuple(base[key].shape) != tuple(other[key].shape):
        raise ValueError(
            f"shape mismatch for '{key}': base {tuple(base[key].shape)}, model '{name}' "
            f"{tuple(other[key].shape)}"
        )


def fold(
    state: OpcmState | None,
    *,
    base: Mapping[str, torch.Tensor],
    model: Mapping[str, torch.Tensor],
    name: str,
    alpha: float = 0.5,
) -> OpcmState:
    """Fold one model into the continual merge; returns a new state (``state`` is untouched).

    First fold: ``θ^(1) = θ_1``, ``λ_1 = 1``. Later: ``u = λ_{t-1}·τ̄ + τ̃_t``,
    ``λ_t = ‖u‖ / mean_{i≤t} ‖τ_i‖`` (norms over all parameters), ``θ^(t) = θ0 + u/λ_t``.
    ``alpha`` only applies when starting (``state`` None); later folds keep the state's own
    alpha. A state with no folds yet (``count == 0``) starts like ``None``.
    """
    if state is not None and name in state.order:
        raise ValueError(f"model '{name}' was already folded into this OPCM state")
    fresh = state is None or state.count == 0
    alpha = alpha if state is None else state.alpha
    updates: dict[str, torch.Tensor] = {}
    tv_norm_sq = update_norm_sq = 0.0
    for key in base:
        _check(name, key, base, model)
        tv = model[key].float() - base[key].float()
        if fresh:
            updates[key] = tv
        else:
            assert state is not None
            _check("opcm state", key, base, state.task_vector)
            updates[key] = fold_tensor(state.task_vector[key], tv, state.lam, alpha)
        tv_norm_sq += float(tv.square().sum())
        update_norm_sq += float(updates[key].square().sum())
    if fresh:
        return OpcmState(updates, 1.0, math.sqrt(tv_norm_sq), [name], alpha)
    assert state is not None
    norm_sum = state.norm_sum + math.sqrt(tv_norm_sq)
    lam = next_lambda(math.sqrt(update_norm_sq), norm_sum, state.count + 1, state.lam)
    merged = {key: u / lam for key, u in updates.items()}
    return OpcmState(merged, lam, norm_sum, [*state.order, name], alpha, state.base)


def merged_model(state: OpcmState, base: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``θ^(t) = θ0 + τ̄^(t)`` (float32)."""
    return {key: base[key].float() + state.task_vector[key] for key in base}


def state_to_tensors(state: OpcmState) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Safetensors tensors (τ̄^(t), float32) and string metadata for ``state``."""
    info = {
        "lambda": state.lam,
        "norm_sum": state.norm_sum,
        "count": state.count,
        "order": state.order,
        "alpha": state.alpha,
        "base": state.base,
    }
    tensors = {key: t.float().contiguous() for key, t in state.task_vector.items()}
    return tensors, {"format": STATE_FORMAT, "opcm": json.dumps(info)}


def state_from_tensors(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]
) -> OpcmState:
    """Inverse of :func:`state_to_tensors` (floats round-trip exactly through JSON)."""
    if metadata.get("format") != STATE_FORMAT:
        raise ValueError(f"not an OPCM state: format {metadata.get('format')!r}")
    info = json.loads(metadata["opcm"])
    if info["count"] != len(info["order"]):
        raise ValueError(f"corrupt OPCM state: count {info['count']} but order {info['order']}")
    task_vector = {key: t.float() for key, t in tensors.items()}
    return OpcmState(
        task_vector, info["lambda"], info["norm_sum"], info["order"], info["alpha"], info["base"]
    )
