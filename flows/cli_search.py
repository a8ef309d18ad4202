"""``ckreg search start | watch | ls | cancel``: merge searches through the registry's REST API
(``ckreg serve`` in embedded or server mode; ``CKREG_API_URL``, ``CKREG_TOKEN``).

``start`` queues a search policy's search (resuming its cancelled or failed latest search unless
``--fresh``) and with ``--follow`` prints its progress until it ends; ``watch`` follows a search;
``cancel`` stops it at its next candidate.
"""

from __future__ import annotations

import json
import time
from typing import Annotated, Any

import typer

from registry.client.cli import JsonOption, TokenOption, UrlOption, _client

search_app = typer.Typer(
    help="Start, watch, list and cancel merge searches (search policies).", no_args_is_help=True
)
FollowOption = Annotated[
    bool, typer.Option("--follow", "-f", help="Print progress until the search ends.")
]
IntervalOption = Annotated[float, typer.Option(help="Seconds between polls with --follow.")]
SearchArg = Annotated[int, typer.Argument(help="Id of a search (from 'ckreg search start').")]


def search_line(found: dict[str, Any]) -> str:
    """``search 3 (policy 2, cma_es): running, 5/16 evaluations, 1.2 s, best 0.9123``."""
    best = found.get("best_score")
    line = (
        f"search {found['id']} (policy {found['policy_id']}, {found['algorithm']}): "
        f"{found['status']}, {found['evaluations']}/{found['budget_evaluations']} evaluations, "
        f"{found['elapsed_s']:.1f} s, "
        + (f"best {best:.4f}" if best is not None else "no score yet")
    )
    if found.get("checkpoint_id") is not None:
        line += f"; registered checkpoint {found['checkpoint_id']}"
    if found.get("error"):
        line += f": {found['error']}"
    from registry.client.searches import SEARCH_ENDED  # the client loads torch: not at --help

    if found.get("cancel_requested") and found["status"] not in SEARCH_ENDED:
        line += " (cancel requested)"
    return line


def _follow(client: Any, found: dict[str, Any], interval: float, as_json: bool) -> dict[str, Any]:
    from registry.client.searches import SEARCH_ENDED

    last = None
    while True:
        line = search_line(found)
        if line != last and not as_json:
            typer.echo(line)
        last = line
        if found["status"] in SEARCH_ENDED:
            return found
        time.sleep(interval)
        found = client.search(found["id"])


def _end(found: dict[str, Any], as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(found, indent=2))
    if found["status"] in ("failed", "cancelled"):
        raise typer.Exit(1)


@search_app.command()
def start(
    policy_id: Annotated[int, typer.Argument(help="Id of a policy with a 'search' field.")],
    fresh: Annotated[
        bool, typer.Option("--fresh", help="Start a new search instead of resuming one.")
    ] = False,
    follow: FollowOption = False,
    interval: IntervalOption = 2.0,
    url: UrlOption = None,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """Queue the policy's search; refused (exit 1) while one of it is queued or running."""
    with _client(url, token) as client:
        found = client.start_search(policy_id, resume=not fresh)
        if found.get("resumed") and not as_json:
            typer.echo(f"resuming search {found['id']} at {found['evaluations']} evaluations")
        if follow:
            found = _follow(client, found, interval, as_json)
        elif not as_json:
            typer.echo(search_line(found))
        _end(found, as_json)


@search_app.command()
def watch(
    search_id: SearchArg,
    follow: FollowOption = False,
    interval: IntervalOption = 2.0,
    url: UrlOption = None,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """Print the search's status, evaluations of its budget, elapsed time and best score."""
    with _client(url, token) as client:
        found = client.search(search_id)
        if follow:
            found = _follow(client, found, interval, as_json)
        elif not as_json:
            typer.echo(search_line(found))
        if as_json:
            typer.echo(json.dumps(found, indent=2))


@search_app.command("ls")
def list_searches(
    policy: Annotated[int | None, typer.Option("--policy", help="Only this policy's.")] = None,
    status: Annotated[
        str | None, typer.Option(help="queued|running|finished|cancelled|failed.")
    ] = None,
    limit: Annotated[int, typer.Option(help="Most searches shown.")] = 20,
    url: UrlOption = None,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """Searches, newest first."""
    with _client(url, token) as client:
        page = client.searches(policy_id=policy, status=status, limit=limit)
        if as_json:
            typer.echo(json.dumps(page, indent=2))
            return
        for found in page["items"]:
            typer.echo(search_line(found))
        if not page["items"]:
            typer.echo("no searches")


@search_app.command()
def cancel(
    search_id: SearchArg,
    url: UrlOption = None,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """Stop the search (a running one at its next candidate); 'start' resumes it later."""
    with _client(url, token) as client:
        found = client.cancel_search(search_id)
        typer.echo(json.dumps(found, indent=2) if as_json else search_line(found))


if __name__ == "__main__":
    search_app()
