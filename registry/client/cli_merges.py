"""``ckreg merges ls | show | watch`` and what ``ckreg register`` prints about the merges its
checkpoint triggered (``--wait`` follows them to the end)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from registry.client.cli import JsonOption, TokenOption, UrlOption, _client
from registry.client.cli_format import format_table

if TYPE_CHECKING:
    from registry.client.api import Client

merges_app = typer.Typer(
    help="Start (from a mergekit YAML), list, show and follow merge runs.", no_args_is_help=True
)

TERMINAL = ("succeeded", "failed")
LS_COLUMNS = ("id", "status", "method", "policy_id", "inputs", "output", "created_at")
POLL_S = 0.5
SHOW_KEYS = (
    "id", "status", "method", "params", "policy_id", "base_id", "evaluator",
    "output_checkpoint_id", "mlflow_run_id", "created_at", "started_at", "finished_at",
)  # fmt: skip


def run_line(run: dict[str, Any]) -> str:
    """``merge run 7 (ties, policy 2, inputs 3,4): succeeded -> checkpoint 9``."""
    origin = f"policy {run['policy_id']}" if run.get("policy_id") is not None else "ad hoc"
    inputs = ",".join(str(i["checkpoint_id"]) for i in run.get("inputs", []))
    line = f"merge run {run['id']} ({run['method']}, {origin}, inputs {inputs}): {run['status']}"
    if run["status"] == "succeeded" and run.get("output_checkpoint_id") is not None:
        line += f" -> checkpoint {run['output_checkpoint_id']}"
    if run["status"] == "failed" and run.get("error"):
        line += f": {run['error']}"
    return line


def _rows(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        run
        | {
            "inputs": [i["checkpoint_id"] for i in run.get("inputs", [])],
            "output": run.get("output_checkpoint_id"),
        }
        for run in runs
    ]


@merges_app.command("ls")
def list_runs(
    status: Annotated[str | None, typer.Option(help="queued|running|succeeded|failed.")] = None,
    policy: Annotated[
        int | None, typer.Option("--policy", help="Only runs of this policy.")
    ] = None,
    checkpoint: Annotated[
        int | None, typer.Option("--checkpoint", help="Only runs taking this checkpoint.")
    ] = None,
    limit: Annotated[int, typer.Option(help="At most this many rows.")] = 50,
    as_json: JsonOption = False,
    url: UrlOption = None,
    token: TokenOption = None,
) -> None:
    """List merge runs, newest first.

    Examples:

      ckreg merges ls --status failed

      ckreg merges ls --checkpoint 12 --json
    """
    filters = {"status": status, "policy_id": policy, "input_checkpoint_id": checkpoint}
    with _client(url, token) as client:
        page = client.list_merge_runs(**filters, limit=limit)
    if as_json:
        typer.echo(json.dumps(page, indent=2))
        return
    typer.echo(format_table(_rows(page["items"]), LS_COLUMNS))
    typer.echo(f"({len(page['items'])} of {page['total']})")


@merges_app.command("show")
def show_run(
    run_id: Annotated[int, typer.Argument(metavar="ID", help="Merge run id.")],
    as_json: JsonOption = False,
    url: UrlOption = None,
    token: TokenOption = None,
) -> None:
    """Show one merge run: method, params, inputs (with names), output, timings and error.

    Example:

      ckreg merges show 7
    """
    with _client(url, token) as client:
        run = client.merge_run(run_id)
        names = {i["checkpoint_id"]: _name(client, i["checkpoint_id"]) for i in run["inputs"]}
    if as_json:
        typer.echo(json.dumps(run, indent=2))
        return
    for key in SHOW_KEYS:
        typer.echo(f"{key:>20}: {run.get(key)}")
    if run.get("error"):
        typer.echo(f"{'error':>20}: {run['error']}")
    typer.echo(f"{'inputs':>20}:")
    rows = [i | {"name": names[i["checkpoint_id"]]} for i in run["inputs"]]
    typer.echo(format_table(rows, ("position", "checkpoint_id", "name", "weight", "params")))


def _name(client: Client, checkpoint_id: int) -> str:
    from registry.client.api import ClientError

    try:
        return str(client.get_checkpoint(checkpoint_id)["name"])
    except ClientError:
        return "?"


@merges_app.command("create")
def create_run(
    config: Annotated[
        Path,
        typer.Option("--config", help="A mergekit YAML; checkpoint ids or names as models."),
    ],
    evaluator: Annotated[str | None, typer.Option(help="Score the output with it.")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Follow the run to its end.")] = False,
    timeout: Annotated[float, typer.Option(help="With --wait: give up after this.")] = 3600.0,
    url: UrlOption = None,
    token: TokenOption = None,
) -> None:
    """Start a merge on the registry from a mergekit YAML whose models are checkpoints:
    ``12`` / ``ckreg/12`` (an id) or ``ckreg/my-ft`` (the newest ready one of that name).
    The same config again returns the existing run. Exit 1 if a waited-for run failed.

    Example:

      ckreg merges create --config merge.yml --wait
    """
    try:
        text = config.read_text()
    except OSError as exc:
        raise typer.BadParameter(f"cannot read {config}: {exc}", param_hint="--config") from None
    with _client(url, token) as client:
        run = client.merge_config(text, evaluator=evaluator)
        typer.echo(run_line(run) + (" (existing run)" if run.get("reused") else ""))
        if wait:
            runs = follow(client, lambda: [client.merge_run(run["id"])], timeout=timeout)
            _finish(runs, timeout)


@merges_app.command("watch")
def watch_run(
    run_id: Annotated[int, typer.Argument(metavar="ID", help="Merge run id.")],
    timeout: Annotated[float, typer.Option(help="Give up after this many seconds.")] = 3600.0,
    url: UrlOption = None,
    token: TokenOption = None,
) -> None:
    """Follow a merge run until it ends: one line per status change; exit 1 if it failed.

    Example:

      ckreg merges watch 7
    """
    with _client(url, token) as client:
        runs = follow(client, lambda: [client.merge_run(run_id)], timeout=timeout)
    _finish(runs, timeout)


def follow(
    client: Client, fetch: Any, *, timeout: float, until_planned: bool = False
) -> list[dict[str, Any]]:
    """Poll ``fetch() -> runs`` printing each status change until every run has ended (or, with
    ``until_planned``, until ``fetch`` stops raising ``_Planning``) or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    shown: dict[int, str] = {}
    runs: list[dict[str, Any]] = []
    while True:
        try:
            runs = fetch()
            planned = True
        except _Planning as planning:
            runs, planned = planning.runs, False
        for run in runs:
            if shown.get(run["id"]) != run["status"]:
                shown[run["id"]] = run["status"]
                typer.echo(run_line(run))
        ended = all(run["status"] in TERMINAL for run in runs)
        if planned and (until_planned or ended):
            return runs
        if time.monotonic() > deadline:
            return runs
        time.sleep(POLL_S)


class _Planning(Exception):
    """Some on_register policy has not planned its run yet."""

    def __init__(self, runs: list[dict[str, Any]], waiting: list[dict[str, Any]]) -> None:
        super().__init__("planning")
        self.runs, self.waiting = runs, waiting


def report_triggered(client: Client, checkpoint_id: int, *, wait: bool, timeout: float) -> None:
    """After ``register``: print the merge runs the checkpoint set off. ``wait`` follows them
    to the end and exits 1 if one failed (printing its error) or ``timeout`` passed."""
    waiting: list[dict[str, Any]] = []
    announced: set[int] = set()

    def fetch() -> list[dict[str, Any]]:
        nonlocal waiting
        found = client.merge_triggers(checkpoint_id)
        runs = sorted(found["runs"], key=lambda run: run["id"])
        waiting = found["waiting"]
        for policy in waiting if wait else ():
            if policy["id"] not in announced:  # say what --wait waits for before it does
                announced.add(policy["id"])
                typer.echo(f"policy {policy['id']} '{policy['name']}' takes it: run being planned")
        if waiting:
            raise _Planning(runs, waiting)
        return runs

    from registry.client.transport import ClientError

    try:
        runs = follow(client, fetch, timeout=timeout if wait else 3.0, until_planned=not wait)
    except ClientError as exc:
        if wait:
            raise
        # The checkpoint is registered; an older server without triggered-by must not fail it.
        typer.secho(f"warning: could not list the merge runs it triggered: {exc}", err=True)
        return
    for policy in waiting:
        typer.echo(
            f"policy {policy['id']} '{policy['name']}' will merge this checkpoint "
            f"(not planned yet: ckreg merges ls --checkpoint {checkpoint_id})"
        )
    if not runs and not waiting:
        typer.echo("no merge run triggered")
    if wait:
        _finish(runs + [{"status": "planning"}] * bool(waiting), timeout)


def _finish(runs: list[dict[str, Any]], timeout: float) -> None:
    """Exit 1 naming the failed runs, or the unfinished ones after ``timeout``."""
    failed = [run for run in runs if run["status"] == "failed"]
    unfinished = [run for run in runs if run["status"] not in TERMINAL]
    for run in failed:
        typer.secho(f"error: {run_line(run)}", err=True, fg=typer.colors.RED)
    if unfinished:
        typer.secho(
            f"error: {len(unfinished)} merge run(s) still not finished after {timeout:.0f}s",
            err=True,
            fg=typer.colors.RED,
        )
    if failed or unfinished:
        raise typer.Exit(1)
