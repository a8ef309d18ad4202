"""``ckreg family compress``: store fine-tunes of one base as one merged task vector plus TALL
masks (lossy, opt-in). A server-side command: it runs the ``family_compress`` flow in this
process against the registry's database and store (CKREG_* settings)."""

from __future__ import annotations

import json
import os
from typing import Annotated, Any

import typer

from flows.cli_settings import current_settings, echo_database

family_app = typer.Typer(
    help="Family compression: fine-tunes of one base stored as one task vector plus TALL masks.",
    no_args_is_help=True,
)


def _ids(text: str) -> list[int]:
    try:
        ids = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise typer.BadParameter(
            f"--task-vectors must be comma-separated ids, got {text!r}"
        ) from None
    if not ids:
        raise typer.BadParameter("--task-vectors names no checkpoint")
    return ids


def _print_report(report: dict[str, Any]) -> None:
    typer.echo(f"{'id':>6}  {'name':<24} {'metric':<20} {'orig':>7} {'rebuilt':>7} {'kept':>7} λ")
    for m in report["members"]:
        typer.echo(
            f"{m['checkpoint_id']:>6}  {m['name'][:24]:<24} {m['metric'][:20]:<20} "
            f"{m['original']:>7.4f} {m['reconstructed']:>7.4f} {m['retention']:>7.2%} {m['lam']}"
        )
    original, family = report["original_bytes"], report["family_bytes"]
    ratio = original / family if family else float("inf")
    typer.echo(
        f"originals {original:,} B -> family form ~{family:,} B (τ_MTL + bit-packed masks, "
        f"{ratio:.1f}x smaller); outcome: {report['outcome']}"
    )
    if report["outcome"] == "kept":
        typer.echo(
            f"kept the originals: a member retained less than {report['min_retention']:.2%} "
            "of its own metric"
        )


@family_app.command("compress")
def compress(
    base: Annotated[int, typer.Option("--base", help="Id of the family's base checkpoint.")],
    task_vectors: Annotated[
        str, typer.Option("--task-vectors", help="Comma-separated ids of its fine-tunes (>= 2).")
    ],
    min_retention: Annotated[
        float,
        typer.Option(
            min=0.0, max=1.0, help="Share of its own metric every member must keep (0.99 = 99 %)."
        ),
    ] = 0.99,
    keep_originals: Annotated[
        bool, typer.Option(help="Store the family form next to the originals (<name>.tall).")
    ] = False,
    evaluator: Annotated[
        str | None,
        typer.Option(help="Evaluator plugin (default: the base checkpoint's 'evaluator')."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Rebuild each member as base + mask * merged, score it against its original with the
    evaluator, and replace the originals only if every member keeps --min-retention."""
    from flows.family_flow import family_compress
    from flows.runtime import configure
    from registry.db import upgrade_database
    from registry.errors import RegistryError
    from registry.services.family import check_family

    settings = current_settings()
    echo_database(settings)
    # Prefect's telemetry only logs lock warnings against the embedded SQLite; keep it quiet.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    upgrade_database(settings.database_url)
    runtime = configure(settings)
    members = _ids(task_vectors)
    try:
        with runtime.session() as session:  # bad input: a clear message before any flow run
            check_family(session=session, base_id=base, member_ids=members)
        report = family_compress(
            base,
            members,
            evaluator=evaluator,
            min_retention=min_retention,
            keep_originals=keep_originals,
            progress=not quiet,
        )
    except (RegistryError, LookupError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    if as_json:
        typer.echo(json.dumps(report, indent=2))
    else:
        _print_report(report)
