"""A small CMA-ES (Hansen's (μ/μ_w, λ) evolution strategy, https://arxiv.org/abs/1604.00772)
over a box of merge-method parameters, with an ask/tell interface and a JSON state so a
killed search resumes where it stopped.

The search runs in the unit cube (each parameter scaled to [0, 1]); a sample outside the box
is clipped (repair), and the clipped point is both evaluated and used in the update. Each
generation's samples are drawn from a generator seeded by (seed, generation), so asking again
after a restart gives the same candidates. Minimises the loss it is told.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Box:
    """Named parameter ranges: ``low[i] ≤ x[i] ≤ high[i]``."""

    names: tuple[str, ...]
    low: tuple[float, ...]
    high: tuple[float, ...]

    @classmethod
    def from_space(cls, space: Mapping[str, Sequence[float]]) -> Box:
        """A box from ``{"density": [0.1, 1.0], ...}``; raises ``ValueError`` naming a bad range."""
        if not space:
            raise ValueError("search space is empty: give at least one 'name: [low, high]'")
        low, high = [], []
        for name, bounds in space.items():
            if len(bounds) != 2 or not float(bounds[0]) < float(bounds[1]):
                raise ValueError(
                    f"search space '{name}': need [low, high] with low < high, got {list(bounds)}"
                )
            low.append(float(bounds[0]))
            high.append(float(bounds[1]))
        return cls(tuple(space), tuple(low), tuple(high))

    def to_params(self, unit: torch.Tensor) -> dict[str, float]:
        """The parameters at a unit-cube point."""
        return {
            name: lo + float(u) * (hi - lo)
            for name, lo, hi, u in zip(self.names, self.low, self.high, unit, strict=True)
        }


class CmaEs:
    """Ask/tell CMA-ES in the unit cube of ``box`` (default population 4 + ⌊3 ln d⌋)."""

    def __init__(
        self, box: Box, *, seed: int = 0, sigma: float = 0.3, popsize: int | None = None
    ) -> None:
        d = len(box.names)
        self.box, self.seed, self.dim = box, seed, d
        self.popsize = popsize or 4 + int(3 * math.log(d))
        if self.popsize < 2:
            raise ValueError(f"CMA-ES population {self.popsize} too small; need at least 2")
        mu = self.popsize // 2
        w = torch.log(torch.tensor(mu + 0.5, dtype=torch.float64)) - torch.log(
            torch.arange(1, mu + 1, dtype=torch.float64)
        )
        self.weights = w / w.sum()
        self.mu_eff = float(1 / (self.weights**2).sum())
        m = self.mu_eff
        self.c_sigma = (m + 2) / (d + m + 5)
        self.d_sigma = 1 + 2 * max(0.0, math.sqrt((m - 1) / (d + 1)) - 1) + self.c_sigma
        self.c_c = (4 + m / d) / (d + 4 + 2 * m / d)
        self.c_1 = 2 / ((d + 1.3) ** 2 + m)
        self.c_mu = min(1 - self.c_1, 2 * (m - 2 + 1 / m) / ((d + 2) ** 2 + m))
        self.chi_n = math.sqrt(d) * (1 - 1 / (4 * d) + 1 / (21 * d * d))
        self.mean = torch.full((d,), 0.5, dtype=torch.float64)
        self.sigma = sigma
        self.cov = torch.eye(d, dtype=torch.float64)
        self.p_sigma = torch.zeros(d, dtype=torch.float64)
        self.p_c = torch.zeros(d, dtype=torch.float64)
        self.generation = 0
        self.best: tuple[dict[str, float], float] | None = None

    # ---- ask / tell -------------------------------------------------------------------------
    def ask(self) -> list[torch.Tensor]:
        """This generation's candidates (unit-cube points), the same on every call."""
        gen = torch.Generator().manual_seed(self.seed * 100_003 + self.generation)
        z = torch.randn(self.popsize, self.dim, generator=gen, dtype=torch.float64)
        values, vectors = torch.linalg.eigh(self.cov)
        scale = vectors @ torch.diag(values.clamp_min(1e-20).sqrt())
        return [(self.mean + self.sigma * scale @ row).clamp(0, 1) for row in z]

    def tell(self, points: Sequence[torch.Tensor], losses: Sequence[float]) -> None:
        """Update from one generation's points and their losses (lower is better)."""
        if len(points) != len(losses) or len(points) < len(self.weights):
            raise ValueError(f"tell needs {self.popsize} points with losses, got {len(losses)}")
        order = sorted(range(len(losses)), key=lambda i: losses[i])
        best = order[0]
        if self.best is None or losses[best] < self.best[1]:
            self.best = (self.box.to_params(points[best]), float(losses[best]))
        steps = torch.stack(
            [(points[i] - self.mean) / self.sigma for i in order[: len(self.weights)]]
        )
        y_w = self.weights @ steps
        self.mean = self.mean + self.sigma * y_w
        values, vectors = torch.linalg.eigh(self.cov)
        inv_sqrt = vectors @ torch.diag(values.clamp_min(1e-20).rsqrt()) @ vectors.T
        cs, cc, m = self.c_sigma, self.c_c, self.mu_eff
        self.p_sigma = (1 - cs) * self.p_sigma + math.sqrt(cs * (2 - cs) * m) * inv_sqrt @ y_w
        norm = float(self.p_sigma.norm())
        h_sigma = (
            norm / math.sqrt(1 - (1 - cs) ** (2 * (self.generation + 1)))
            < (1.4 + 2 / (self.dim + 1)) * self.chi_n
        )
        self.p_c = (1 - cc) * self.p_c + h_sigma * math.sqrt(cc * (2 - cc) * m) * y_w
        rank_mu = (steps.T * self.weights) @ steps
        rank_one = torch.outer(self.p_c, self.p_c) + (1 - h_sigma) * cc * (2 - cc) * self.cov
        self.cov = (1 - self.c_1 - self.c_mu) * self.cov + self.c_1 * rank_one + self.c_mu * rank_mu
        self.cov = (self.cov + self.cov.T) / 2
        self.sigma *= math.exp((cs / self.d_sigma) * (norm / self.chi_n - 1))
        self.generation += 1

    # ---- state --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """A JSON-able snapshot (taken between generations)."""
        return {
            "box": {"names": list(self.box.names), "low": list(self.box.low), "high": list(self.box.high)},
            "seed": self.seed, "popsize": self.popsize, "generation": self.generation,
            "sigma": self.sigma, "mean": self.mean.tolist(), "cov": self.cov.tolist(),
            "p_sigma": self.p_sigma.tolist(), "p_c": self.p_c.tolist(),
            "best": None if self.best is None else {"params": self.best[0], "loss": self.best[1]},
        }  # fmt: skip

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> CmaEs:
        """The optimizer ``state_dict`` was taken from."""
        box = Box(
            tuple(state["box"]["names"]), tuple(state["box"]["low"]), tuple(state["box"]["high"])
        )
        es = cls(box, seed=state["seed"], sigma=state["sigma"], popsize=state["popsize"])
        es.generation = state["generation"]
        for name in ("mean", "cov", "p_sigma", "p_c"):
            setattr(es, name, torch.tensor(state[name], dtype=torch.float64))
        best = state.get("best")
        es.best = None if best is None else (dict(best["params"]), float(best["loss"]))
        return es
