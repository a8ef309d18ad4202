"""The flows ckreg runs, in one place: what launchers and ``ckreg worker`` start."""

from __future__ import annotations

from prefect import flow

from flows.evaluate_flow import evaluate
from flows.merge_flow import merge_checkpoints
from flows.policy_flows import on_checkpoint_ready, sequential_merge
from flows.search_flow import merge_search, stale_searches

__all__ = [
    "evaluate",
    "merge_checkpoints",
    "merge_search",
    "on_checkpoint_ready",
    "sequential_merge",
    "stale_searches",
    "warm_up",
]


@flow(name="ckreg_warm_up", persist_result=False)
def _noop() -> None:
    return None


def warm_up() -> None:
    """Start Prefect's ephemeral API and import heavy modules before the first real flow."""
    import mergeops.methods  # noqa: F401 - registers every method

    _noop()
