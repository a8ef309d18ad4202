"""Evaluator names: what the ``ckreg.evaluators`` entry-point group offers, checked up front.

The registry only checks names here; loading and running an evaluator is the flows' business.
"""

from __future__ import annotations

from importlib.metadata import entry_points

from registry.errors import InvalidInput

EVALUATOR_GROUP = "ckreg.evaluators"


def available_evaluators() -> list[str]:
    """Names registered in the ``ckreg.evaluators`` entry-point group, sorted."""
    return sorted({ep.name for ep in entry_points(group=EVALUATOR_GROUP)})


def check_evaluator(name: str | None, *, owner: str) -> None:
    """Refuse an evaluator ``name`` that is not installed (``None`` means no evaluator).

    ``owner`` prefixes the message, e.g. ``"policy 'nightly'"``; the message lists what exists.
    """
    if name is None:
        return
    available = available_evaluators()
    if name not in available:
        raise InvalidInput(
            f"{owner}: unknown evaluator '{name}'; "
            f"available: {', '.join(available) or '(none installed)'}"
        )
