"""M2N2 — "Competition and Attraction Improve Model Fusion" (Abrantes et al. 2025,
https://arxiv.org/abs/2508.16204): an archive of merged models evolved by merging pairs.

Each member k has per-example scores s_k(x) ≥ 0 on the validation split. Competition: its
shared fitness is f_k = Σ_x s_k(x) / (Σ_m s_m(x))^alpha, so an example many members solve is
worth little. Parent A is drawn ∝ f; parent B ∝ its attraction to A, Σ_x max(0, s_B(x) -
s_A(x)) (what B does well where A fails). The child is SLERP(A, B) per tensor with mix w
before a random split point in the tensor order and 1 - w after; it replaces the archive's
weakest member (by shared fitness, child included) if it is fitter. Draws come from a
generator seeded by (seed, step), so a resumed search proposes what the lost one would have.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from mergeops.ops.spherical import slerp


def shared_fitness(scores: torch.Tensor, alpha: float) -> torch.Tensor:
    """f_k = Σ_x s_k(x) / (Σ_m s_m(x))^alpha for ``scores`` (members, examples); an example no
    member scores on contributes 0."""
    scores = scores.double()
    total = scores.sum(dim=0)
    share = torch.where(total > 0, scores / total.clamp_min(1e-300).pow(alpha), 0.0)
    return share.sum(dim=1)


def attraction(scores: torch.Tensor, parent: int) -> torch.Tensor:
    """Σ_x max(0, s_k(x) - s_parent(x)) for every member k (0 for the parent itself)."""
    return (scores.double() - scores[parent].double()).clamp_min(0).sum(dim=1)


def _draw(weights: torch.Tensor, generator: torch.Generator, exclude: int | None = None) -> int:
    weights = weights.clone().clamp_min(0)
    if exclude is not None:
        weights[exclude] = 0
    if float(weights.sum()) <= 0:  # nothing to prefer: uniform over the allowed members
        weights = torch.ones_like(weights)
        if exclude is not None:
            weights[exclude] = 0
    return int(torch.multinomial(weights, 1, generator=generator))


@dataclass(frozen=True)
class Proposal:
    """Which members to merge and how: SLERP mix ``mix`` before tensor ``split``, 1 - mix after."""

    parent_a: int
    parent_b: int
    mix: float
    split: int


@dataclass
class Archive:
    """Members (an id each, e.g. a checkpoint id, and their per-example scores)."""

    capacity: int
    alpha: float = 1.0
    seed: int = 0
    ids: list[str] = field(default_factory=list)
    scores: list[torch.Tensor] = field(default_factory=list)

    def fitness(self, extra: torch.Tensor | None = None) -> torch.Tensor:
        """Shared fitness of the members (and of ``extra`` last, when given)."""
        rows = self.scores + ([extra] if extra is not None else [])
        return shared_fitness(torch.stack(rows), self.alpha)

    def propose(self, step: int, n_tensors: int) -> Proposal:
        """Step ``step``'s parents (A ∝ fitness, B ∝ attraction to A), mix and split point."""
        if len(self.ids) < 2:
            raise ValueError(f"M2N2 needs at least 2 archive members, has {len(self.ids)}")
        gen = torch.Generator().manual_seed(self.seed * 100_003 + step)
        a = _draw(self.fitness(), gen)
        b = _draw(attraction(torch.stack(self.scores), a), gen, exclude=a)
        mix = float(torch.rand((), generator=gen, dtype=torch.float64))
        split = int(torch.randint(0, max(n_tensors, 1) + 1, (), generator=gen))
        return Proposal(a, b, mix, split)

    def offer(self, member_id: str, scores: torch.Tensor) -> int | None:
        """Add a child: appended while there is room, else it replaces the weakest member if it
        is fitter. Returns the slot it took, or None when it was not kept."""
        if self.scores and scores.shape != self.scores[0].shape:
            raise ValueError(
                f"child '{member_id}' scores {tuple(scores.shape)} examples, archive {tuple(self.scores[0].shape)}"
            )
        if len(self.ids) < self.capacity:
            self.ids.append(member_id)
            self.scores.append(scores.double())
            return len(self.ids) - 1
        fit = self.fitness(scores.double())
        weakest = int(torch.argmin(fit[:-1]))
        if float(fit[-1]) <= float(fit[weakest]):
            return None
        self.ids[weakest], self.scores[weakest] = member_id, scores.double()
        return weakest

    def best(self) -> int:
        """The member with the highest mean score (what a search registers)."""
        return int(torch.argmax(torch.stack([s.mean() for s in self.scores])))

    def state_dict(self) -> dict[str, Any]:
        """A JSON-able snapshot."""
        return {"capacity": self.capacity, "alpha": self.alpha, "seed": self.seed,
                "ids": list(self.ids), "scores": [s.tolist() for s in self.scores]}  # fmt: skip

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> Archive:
        """The archive ``state_dict`` was taken from."""
        return cls(capacity=state["capacity"], alpha=state["alpha"], seed=state["seed"],
                   ids=list(state["ids"]),
                   scores=[torch.tensor(s, dtype=torch.float64) for s in state["scores"]])  # fmt: skip


def child_state_dict(
    a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], proposal: Proposal,
    keys: Sequence[str] | None = None,
) -> dict[str, torch.Tensor]:  # fmt: skip
    """SLERP of ``a`` toward ``b``: t = mix for the tensors before ``split`` (in ``keys``
    order), 1 - mix after; non-floating tensors are taken from ``a``."""
    out = {}
    for index, key in enumerate(keys or list(a)):
        if key not in b:
            raise KeyError(f"parent B has no tensor '{key}'")
        if not a[key].is_floating_point():
            out[key] = a[key]
            continue
        t = proposal.mix if index < proposal.split else 1 - proposal.mix
        out[key] = slerp(t, a[key].float(), b[key].float()).to(a[key].dtype)
    return out
