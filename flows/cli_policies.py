"""``ckreg policy create|ls|show|disable|enable|run``: merge policies over the registry's REST API."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml

from flows.cli_settings import current_settings

policy_app = typer.Typer(help="Declare and manage merge policies.", no_args_is_help=True)

UrlOption = Annotated[
    str | None, typer.Option("--url", help="Registry URL (default: CKREG_API_URL).")
]
TokenOption = Annotated[
    str | None, typer.Option("--token", help="API token (default: CKREG_TOKEN).")
]
COLUMNS = ("id", "name", "method", "trigger", "cron", "evaluator", "enabled")


def _request(method: str, path: str, *, url: str | None, token: str | None, **kwargs: Any) -> Any:
    """One REST call; an error response prints the server's message and exits 1."""
    import httpx  # here, not at start-up: only these commands call the server

    settings = current_settings()
    secret = token or settings.token
    headers = {"Authorization": f"Bearer {secret}"} if secret else {}
    base = (url or settings.api_url).rstrip("/")
    try:
        response = httpx.request(
            method, f"{base}/api/v1{path}", headers=headers, timeout=30, **kwargs
        )
    except httpx.HTTPError as exc:
        typer.echo(f"error: registry at {base} unreachable: {exc}", err=True)
        raise typer.Exit(1) from None
    if response.status_code >= 400:
        try:
            detail = response.json().get("detail")
            message = detail.get("message") if isinstance(detail, dict) else detail
        except ValueError:
            message = response.text
        typer.echo(f"error ({response.status_code}): {message}", err=True)
        raise typer.Exit(1)
    return response.json()


def _parse_mapping(text: str | None, what: str) -> dict[str, Any]:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = yaml.safe_load(text)
    if not isinstance(value, dict):
        raise typer.BadParameter(f"{what} must be a JSON/YAML mapping, got {text!r}")
    return value


def build_policy(
    *,
    file: Path | None,
    fields: dict[str, Any],
    selector: dict[str, Any],
) -> dict[str, Any]:
    """The policy body from a YAML/JSON file, overridden by explicit options."""
    body: dict[str, Any] = yaml.safe_load(file.read_text()) if file else {}
    body.setdefault("selector", {}).update(
        {k: v for k, v in selector.items() if v not in (None, [])}
    )
    body.update({k: v for k, v in fields.items() if v is not None})
    return body


@policy_app.command("create")
def create(
    name: Annotated[str | None, typer.Option(help="Unique policy name.")] = None,
    method: Annotated[str | None, typer.Option(help="Merge method, e.g. ties, opcm.")] = None,
    params: Annotated[
        str | None, typer.Option(help="Method params as JSON, e.g. '{\"density\": 0.2}'.")
    ] = None,
    base: Annotated[int | None, typer.Option("--base", help="Base checkpoint id.")] = None,
    task: Annotated[
        list[str] | None, typer.Option("--task", help="Task filter (repeatable).")
    ] = None,
    tag: Annotated[
        list[str] | None, typer.Option("--tag", help="Required tag (repeatable).")
    ] = None,
    run: Annotated[str | None, typer.Option(help="Training run filter.")] = None,
    window: Annotated[
        str | None, typer.Option(help="newest_per_task | last_k_of_run | all_since_last_fold")
    ] = None,
    k: Annotated[int | None, typer.Option(help="K for last_k_of_run.")] = None,
    trigger: Annotated[str | None, typer.Option(help="on_register | cron | manual")] = None,
    cron: Annotated[str | None, typer.Option(help="Cron expression for trigger cron.")] = None,
    evaluator: Annotated[str | None, typer.Option(help="Evaluator entry-point name.")] = None,
    file: Annotated[Path | None, typer.Option("--file", "-f", help="Policy as YAML/JSON.")] = None,
    mergekit: Annotated[
        Path | None,
        typer.Option(help="mergekit YAML template instead of --method/--params."),
    ] = None,
    url: UrlOption = None,
    token: TokenOption = None,
) -> None:
    """Create a policy; the registry refuses bad ones and says why."""
    body = build_policy(
        file=file,
        fields={
            "name": name,
            "method": method,
            "trigger": trigger,
            "cron": cron,
            "evaluator": evaluator,
            "params": _parse_mapping(params, "--params") or None,
            "mergekit": mergekit.read_text() if mergekit else None,
        },
        selector={
            "base_id": base,
            "tasks": task or [],
            "tags": tag or [],
            "run": run,
            "window": window,
            "k": k,
        },
    )
    created = _request("POST", "/policies", url=url, token=token, json=body)
    typer.echo(f"created policy {created['id']} '{created['name']}'")


@policy_app.command("ls")
def list_policies(
    url: UrlOption = None,
    token: TokenOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print raw JSON.")] = False,
) -> None:
    """List policies."""
    rows = _request("GET", "/policies", url=url, token=token)
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    widths = {c: max([len(c), *(len(str(r.get(c) or "")) for r in rows)]) for c in COLUMNS}
    typer.echo("  ".join(c.ljust(widths[c]) for c in COLUMNS))
    for row in rows:
        typer.echo(
            "  ".join(
                str(row.get(c) if row.get(c) is not None else "").ljust(widths[c]) for c in COLUMNS
            )
        )


@policy_app.command("show")
def show(policy_id: int, url: UrlOption = None, token: TokenOption = None) -> None:
    """Show one policy as JSON."""
    typer.echo(
        json.dumps(_request("GET", f"/policies/{policy_id}", url=url, token=token), indent=2)
    )


@policy_app.command("disable")
def disable(policy_id: int, url: UrlOption = None, token: TokenOption = None) -> None:
    """Disable a policy (its runs are kept)."""
    row = _request("PATCH", f"/policies/{policy_id}", url=url, token=token, json={"enabled": False})
    typer.echo(f"disabled policy {row['id']} '{row['name']}'")


@policy_app.command("enable")
def enable(policy_id: int, url: UrlOption = None, token: TokenOption = None) -> None:
    """Enable a policy again."""
    row = _request("PATCH", f"/policies/{policy_id}", url=url, token=token, json={"enabled": True})
    typer.echo(f"enabled policy {row['id']} '{row['name']}'")


@policy_app.command("run")
def run_now(policy_id: int, url: UrlOption = None, token: TokenOption = None) -> None:
    """Run a policy now (manual trigger)."""
    run = _request("POST", f"/policies/{policy_id}/run", url=url, token=token)
    if run is None:
        typer.echo("nothing to merge: the selector yields too few new checkpoints")
    else:
        typer.echo(f"merge run {run['id']} {run['status']}{' (existing)' if run['reused'] else ''}")
