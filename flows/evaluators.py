"""Evaluator plugins: resolve a name in the ``ckreg.evaluators`` entry-point group.

An evaluator (``mergeops.sources.Evaluator``) scores a state dict and, for data-informed
methods, provides an ``Objective`` (fw) or a Fisher estimate (fisher).
"""

from __future__ import annotations

from functools import cache
from importlib.metadata import entry_points

from mergeops.sources import Evaluator

GROUP = "ckreg.evaluators"


class EvaluatorNotFound(LookupError):
    """No evaluator of that name is installed; the message lists the available ones."""


def available_evaluators() -> list[str]:
    """Names of the installed evaluators, sorted."""
    return sorted({ep.name for ep in entry_points(group=GROUP)})


@cache
def load_evaluator(name: str) -> Evaluator:
    """An instance of the evaluator registered as ``name`` (created once per process)."""
    matches = [ep for ep in entry_points(group=GROUP) if ep.name == name]
    if not matches:
        raise EvaluatorNotFound(
            f"unknown evaluator '{name}'; available: "
            f"{', '.join(available_evaluators()) or '(none installed)'} "
            f"(entry-point group '{GROUP}')"
        )
    factory = matches[0].load()
    evaluator = factory() if callable(factory) else factory
    if not isinstance(evaluator, Evaluator):
        raise TypeError(
            f"evaluator '{name}' ({matches[0].value}) does not implement "
            "evaluate/objective/fisher of mergeops.sources.Evaluator"
        )
    return evaluator
