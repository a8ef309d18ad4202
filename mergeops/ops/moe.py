"""Tensor math for merging the experts of one MoE layer (MC-SMoE and Sub-MoE).

An expert is a dict of its three projections: ``gate`` and ``up`` of shape (I, H) whose rows are
the expert's I intermediate neurons, and ``down`` of shape (H, I) whose columns are.

- MC-SMoE, "Merge, Then Compress" (https://arxiv.org/abs/2310.01334): dominant experts by routing
  frequency, the others joined to the most similar dominant one by router-logit cosine, neurons
  aligned by permutation, frequency-weighted average, optional low-rank + sparse compression.
- Sub-MoE (https://arxiv.org/abs/2506.23266): experts clustered by output similarity, per group a
  joint SVD ``[W_1 … W_k] = U S [V_1 … V_k]ᵀ`` with shared U truncated to rank r,
  ``V_m = Σ f_i V_i / Σ f_i``, ``W_m = U_r S_r V_mᵀ``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from scipy.optimize import linear_sum_assignment

Expert = dict[str, torch.Tensor]
PROJECTIONS = ("gate", "up", "down")


def routing_frequency(router_logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Fraction of tokens (rows of ``router_logits`` (T, E)) that route to each expert."""
    chosen = router_logits.topk(top_k, dim=-1).indices
    counts = torch.bincount(chosen.flatten(), minlength=router_logits.shape[-1]).float()
    return counts / max(router_logits.shape[0], 1)


def cosine_matrix(features: torch.Tensor) -> torch.Tensor:
    """(E, E) cosine similarity between the rows of ``features`` (E, D)."""
    unit = torch.nn.functional.normalize(features.float(), dim=-1)
    return unit @ unit.T


def expert_output(
    expert: Expert, inputs: torch.Tensor, act: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """The gated MLP ``down(act(gate x) * up x)`` on ``inputs`` (T, H)."""
    hidden = act(inputs @ expert["gate"].T) * (inputs @ expert["up"].T)
    return hidden @ expert["down"].T


def _dominant(frequency: torch.Tensor, count: int) -> list[int]:
    # ties broken by the lower index, so the choice is deterministic
    order = sorted(range(len(frequency)), key=lambda e: (-float(frequency[e]), e))
    return sorted(order[:count])


def group_by_dominant(
    frequency: torch.Tensor, similarity: torch.Tensor, num_groups: int
) -> list[list[int]]:
    """MC-SMoE grouping: the ``num_groups`` most used experts lead; each other joins the most
    similar leader. Returns groups, leader first, in leader order."""
    return group_around(_dominant(frequency, num_groups), similarity)


def group_around(leaders: Sequence[int], similarity: torch.Tensor) -> list[list[int]]:
    """Every non-leader joins its most similar leader (ties to the lower index); groups in
    leader order, leader first."""
    groups = {leader: [leader] for leader in leaders}
    for expert in range(similarity.shape[0]):
        if expert not in groups:
            best = max(leaders, key=lambda leader: (float(similarity[expert, leader]), -leader))
            groups[best].append(expert)
    return [groups[leader] for leader in leaders]


def farthest_leaders(frequency: torch.Tensor, similarity: torch.Tensor, count: int) -> list[int]:
    """``count`` mutually dissimilar experts: the most used first, then repeatedly the expert least
    similar to every leader so far (ties to the more used) — a deterministic k-center start."""
    leaders = [int(frequency.argmax())]
    while len(leaders) < count:
        rest = [e for e in range(len(frequency)) if e not in leaders]
        leaders.append(
            max(
                rest,
                key=lambda e: (
                    -max(float(similarity[e, m]) for m in leaders),
                    float(frequency[e]),
                    -e,
                ),
            )
        )
    return sorted(leaders)


def group_balanced(
    frequency: torch.Tensor, similarity: torch.Tensor, num_groups: int
) -> list[list[int]]:
    """Equal-size groups (E / num_groups each) around ``farthest_leaders``, by the optimal
    assignment (Hungarian) that maximises the total similarity of members to their leader."""
    total = len(frequency)
    size = total // num_groups
    leaders = farthest_leaders(frequency, similarity, num_groups)
    others = [e for e in range(total) if e not in leaders]
    slots = [leader for leader in leaders for _ in range(size - 1)]
    groups = {leader: [leader] for leader in leaders}
    if others:
        cost = -torch.stack([similarity[others, leader] for leader in slots], dim=1).numpy()
        rows, cols = linear_sum_assignment(cost)
        for row, col in zip(rows, cols, strict=True):
            groups[slots[col]].append(others[row])
    return [groups[leader] for leader in leaders]


def centered_cosine_matrix(features: torch.Tensor) -> torch.Tensor:
    """Cosine similarity after removing the mean over experts: for experts fine-tuned from one
    MLP, what they share dominates the plain cosine and hides which experts are alike."""
    centered = features.float() - features.float().mean(dim=0, keepdim=True)
    return cosine_matrix(centered)


def neuron_features(expert: Expert) -> torch.Tensor:
    """(I, 3H) per-neuron weights: its gate row, up row and down column."""
    return torch.cat([expert["gate"], expert["up"], expert["down"].T], dim=1).float()


def align_to(reference: Expert, expert: Expert) -> Expert:
    """``expert`` with its intermediate neurons permuted to best match ``reference``'s (Hungarian
    on the cosine of their weights); the permuted expert computes the same function."""
    similarity = cosine_matrix_between(neuron_features(reference), neuron_features(expert))
    _, perm = linear_sum_assignment(-similarity.numpy())
    index = torch.as_tensor(perm)
    return {
        "gate": expert["gate"][index],
        "up": expert["up"][index],
        "down": expert["down"][:, index],
    }


def cosine_matrix_between(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """(A, B) cosine similarity between rows of ``left`` (A, D) and ``right`` (B, D)."""
    return (
        torch.nn.functional.normalize(left, dim=-1) @ torch.nn.functional.normalize(right, dim=-1).T
    )


def weighted_merge(experts: Sequence[Expert], weights: torch.Tensor) -> Expert:
    """Σ w_i E_i / Σ w_i, projection by projection (uniform when every weight is zero)."""
    w = weights.float()
    w = torch.ones_like(w) if float(w.sum()) <= 0 else w
    w = w / w.sum()
    return {
        p: sum(wi * e[p].float() for wi, e in zip(w, experts, strict=True)) for p in PROJECTIONS
    }  # type: ignore[misc]


def low_rank_plus_sparse(weight: torch.Tensor, rank: int, sparse_fraction: float) -> torch.Tensor:
    """MC-SMoE's compression of a merged weight: its rank-``rank`` SVD part plus the largest
    ``sparse_fraction`` of the residual's entries (by magnitude), returned dense."""
    u, s, vh = torch.linalg.svd(weight.float(), full_matrices=False)
    low = (u[:, :rank] * s[:rank]) @ vh[:rank]
    residual = weight.float() - low
    keep = round(sparse_fraction * residual.numel())
    if keep <= 0:
        return low
    threshold = residual.abs().flatten().kthvalue(residual.numel() - keep + 1).values
    return low + residual * (residual.abs() >= threshold)


def shared_basis_factors(
    weights: Sequence[torch.Tensor], frequency: torch.Tensor, rank: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sub-MoE for one projection, factored: joint SVD of ``[W_1 … W_k]`` (shared U), rank
    ``rank``, frequency-weighted average of the experts' V blocks; returns ``(U_r S_r, V_mᵀ)``
    of shapes (d_out, r) and (r, d_in), whose product is the merged weight."""
    stacked = torch.cat([w.float() for w in weights], dim=1)
    u, s, vh = torch.linalg.svd(stacked, full_matrices=False)
    r = len(s) if rank is None else min(rank, len(s))
    blocks = vh[:r].split(weights[0].shape[1], dim=1)  # each (r, d_in): V_iᵀ
    f = frequency.float()
    f = torch.ones_like(f) if float(f.sum()) <= 0 else f
    v_merged = sum(fi * block for fi, block in zip(f / f.sum(), blocks, strict=True))
    return u[:, :r] * s[:r], v_merged  # type: ignore[return-value]


def shared_basis_merge(
    weights: Sequence[torch.Tensor], frequency: torch.Tensor, rank: int | None
) -> torch.Tensor:
    """Sub-MoE for one projection: ``W_m = U_r S_r V_mᵀ`` (see ``shared_basis_factors``)."""
    left, right = shared_basis_factors(weights, frequency, rank)
    return left @ right


def sub_moe_factors(
    experts: Sequence[Expert], frequency: torch.Tensor, rank: int | None
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """A group of experts merged by Sub-MoE, kept factored: projection -> (U_r S_r, V_mᵀ)."""
    return {p: shared_basis_factors([e[p] for e in experts], frequency, rank) for p in PROJECTIONS}


def sub_moe_merge(experts: Sequence[Expert], frequency: torch.Tensor, rank: int | None) -> Expert:
    """A group of experts merged by Sub-MoE's shared-basis SVD, projection by projection."""
    return {p: shared_basis_merge([e[p] for e in experts], frequency, rank) for p in PROJECTIONS}
