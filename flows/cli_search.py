"""``python -m flows.cli_search start|watch|cancel POLICY_ID``: run, follow and stop a search
policy's search on this machine, against the registry database of ``CKREG_*`` settings.

Server-side (like ``ckreg worker``): ``start`` runs the ``merge_search`` flow in-process and
resumes a killed or cancelled search; ``watch`` prints its progress from the policy's
``search_state``; ``cancel`` stops it at its next candidate.
"""

from __future__ import annotations

import time
from typing import Annotated, Any

import typer

search_app = typer.Typer(help="Run, watch and cancel merge searches.", no_args_is_help=True)
PolicyArg = Annotated[int, typer.Argument(help="Id of a policy with a 'search' field.")]


def _state(policy_id: int) -> dict[str, Any] | None:
    from flows.runtime import current_runtime
    from registry.services import searches

    with current_runtime().session() as session:
        return searches.get_search_state(session=session, policy_id=policy_id)


def _line(state: dict[str, Any] | None) -> str:
    if not state:
        return "not started"
    scores = [h["score"] for h in state.get("history", [])]
    best = f"best {max(scores):.4f}" if scores else "no candidate yet"
    line = (f"{state.get('status', '?')}: {state.get('evaluations', 0)} evaluations, "
            f"{state.get('elapsed_s', 0.0):.1f} s, {best}")  # fmt: skip
    if state.get("checkpoint_id") is not None:
        line += f"; registered checkpoint {state['checkpoint_id']}"
    return line + (" (cancel requested)" if state.get("cancel") else "")


@search_app.command()
def start(policy_id: PolicyArg) -> None:
    """Run (or resume) the search until its budget is spent; prints the registered checkpoint."""
    from flows.search_flow import merge_search

    checkpoint_id = merge_search(policy_id)
    typer.echo(_line(_state(policy_id)))
    if checkpoint_id is None:
        raise typer.Exit(1)


@search_app.command()
def watch(
    policy_id: PolicyArg,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Poll until it ends.")] = False,
    interval: Annotated[float, typer.Option(help="Seconds between polls.")] = 2.0,
) -> None:
    """Print the search's status, evaluations, elapsed time and best score."""
    while True:
        state = _state(policy_id)
        typer.echo(_line(state))
        if not follow or (state or {}).get("status") in ("finished", "cancelled"):
            return
        time.sleep(interval)


@search_app.command()
def cancel(policy_id: PolicyArg) -> None:
    """Stop the search at its next candidate (``start`` resumes it later)."""
    from flows.search_flow import cancel_search

    cancel_search(policy_id)
    typer.echo(f"cancel requested for the search of policy {policy_id}")


if __name__ == "__main__":
    search_app()
