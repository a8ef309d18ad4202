"""One step at a time of a merge search, resumable from a JSON state (``flows.search_flow``).

``CmaSearch`` scores merges of the policy's inputs with CMA-ES-proposed method parameters;
``M2n2Search`` evolves an archive that starts with the inputs themselves and grows by SLERP
children (``mergeops.search.m2n2``). Each ``step()`` scores one candidate and returns its
record; ``state()`` is what the flow stores after every step, so a killed search loses at
most the candidate it was scoring.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from mergeops.search import Archive, Box, CmaEs, Proposal, child_state_dict
from registry.services.searches import SearchSpec

StateDict = dict[str, torch.Tensor]


class CmaSearch:
    """CMA-ES over ``spec.space``; ``score(params)`` merges with those params and returns the
    metric to maximise."""

    def __init__(
        self,
        spec: SearchSpec,
        fixed: Mapping[str, Any],
        score: Callable[[dict[str, Any]], tuple[float, StateDict]],
        state: Mapping[str, Any] | None,
    ) -> None:
        self.fixed, self.score = dict(fixed), score
        if state:
            self.es = CmaEs.from_state(state["optimizer"])
            self.pending: list[float] = list(state["pending"])
            self.best: dict[str, Any] | None = state.get("best")
        else:
            box = Box.from_space({k: list(v) for k, v in spec.space.items()})
            self.es = CmaEs(box, seed=spec.seed, popsize=spec.popsize)
            self.pending, self.best = [], None

    def step(self) -> dict[str, Any]:
        points = self.es.ask()
        point = points[len(self.pending)]
        params = {**self.fixed, **self.es.box.to_params(point)}
        value, _ = self.score(params)
        self.pending.append(-value)  # CMA-ES minimises
        record = {"params": params, "score": value, "generation": self.es.generation}
        if self.best is None or value > self.best["score"]:
            self.best = {"params": params, "score": value}
        if len(self.pending) == len(points):
            self.es.tell(points, self.pending)
            self.pending = []
        return record

    def state(self) -> dict[str, Any]:
        return {"optimizer": self.es.state_dict(), "pending": self.pending, "best": self.best}

    def recipe(self) -> dict[str, Any]:
        """The best candidate's merge parameters."""
        assert self.best is not None
        return {"params": self.best["params"], "score": self.best["score"]}


class M2n2Search:
    """M2N2 over an archive seeded with the inputs; ``scores(state_dict)`` gives per-example
    scores on the validation split, ``load(checkpoint_id)`` an input's weights."""

    def __init__(
        self,
        spec: SearchSpec,
        inputs: list[int],
        load: Callable[[int], StateDict],
        scores: Callable[[StateDict], torch.Tensor],
        state: Mapping[str, Any] | None,
    ) -> None:
        self.load_input, self.scores = load, scores
        self.cache: dict[str, StateDict] = {}
        if state:
            self.archive = Archive.from_state(state["archive"])
            self.recipes: dict[str, Any] = dict(state["recipes"])
            self.queue: list[int] = list(state["queue"])
            self.steps: int = state["steps"]
        else:
            self.archive = Archive(capacity=spec.archive_size, alpha=spec.alpha, seed=spec.seed)
            self.recipes = {f"input-{i}": {"checkpoint_id": i} for i in inputs}
            self.queue, self.steps = list(inputs), 0

    def weights(self, member: str) -> StateDict:
        """A member's weights, rebuilt from its recipe (inputs are loaded, children re-made)."""
        if member not in self.cache:
            recipe = self.recipes[member]
            if "checkpoint_id" in recipe:
                self.cache[member] = self.load_input(recipe["checkpoint_id"])
            else:
                proposal = Proposal(0, 1, recipe["mix"], recipe["split"])
                a, b = self.weights(recipe["a"]), self.weights(recipe["b"])
                self.cache[member] = child_state_dict(a, b, proposal)
        return self.cache[member]

    def step(self) -> dict[str, Any]:
        if self.queue:
            member = f"input-{self.queue.pop(0)}"
        else:
            first = self.weights(self.archive.ids[0])
            proposal = self.archive.propose(self.steps, n_tensors=len(first))
            member = f"child-{self.steps}"
            self.recipes[member] = {
                "a": self.archive.ids[proposal.parent_a], "b": self.archive.ids[proposal.parent_b],
                "mix": proposal.mix, "split": proposal.split,
            }  # fmt: skip
            self.steps += 1
        scores = self.scores(self.weights(member))
        slot = self.archive.offer(member, scores)
        self._evict()
        return {"member": member, "recipe": self.recipes[member], "score": float(scores.mean()),
                "kept": slot is not None}  # fmt: skip

    def _evict(self) -> None:
        for member in list(self.cache):
            if member not in self.archive.ids:
                del self.cache[member]

    def state(self) -> dict[str, Any]:
        return {"archive": self.archive.state_dict(), "recipes": self.recipes,
                "queue": self.queue, "steps": self.steps}  # fmt: skip

    def best_member(self) -> str:
        return self.archive.ids[self.archive.best()]

    def recipe(self) -> dict[str, Any]:
        """The best member's derivation: nested SLERP recipes down to input checkpoints."""

        def tree(member: str) -> dict[str, Any]:
            recipe = dict(self.recipes[member])
            if "a" in recipe:
                recipe["a"], recipe["b"] = tree(recipe["a"]), tree(recipe["b"])
            return recipe

        best = self.best_member()
        score = float(self.archive.scores[self.archive.best()].mean())
        return {"member": best, "derivation": tree(best), "score": score}
