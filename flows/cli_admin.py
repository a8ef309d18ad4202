"""``ckreg gc`` and ``ckreg delete``: server-side storage lifecycle commands that talk to the
database and the store directly (like ``ckreg token create``), not over REST."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any

import typer

from flows.cli_settings import current_settings, echo_database

admin_app = typer.Typer()

SHOWN = 50  # keys printed per list unless --all


def human_bytes(count: int) -> str:
    """``1536`` -> ``'1.5 KiB'``."""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{count} B"


@contextmanager
def _registry() -> Iterator[tuple[Any, Any]]:
    """A session on the configured database (upgraded) and the configured store."""
    from registry.api.app import open_settings_store
    from registry.db import make_engine, session_scope, upgrade_database

    settings = current_settings()
    echo_database(settings)
    upgrade_database(settings.database_url)
    engine = make_engine(settings.database_url)
    try:
        with session_scope(engine) as session:
            yield session, open_settings_store(settings)
    finally:
        engine.dispose()


class _Bars:
    """One tqdm bar (on stderr) per gc stage: listing the store, then deleting."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bars: dict[str, Any] = {}

    def __call__(self, stage: str, advance: int, total: int | None) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        if stage not in self.bars:
            desc = "scanning blobs" if stage == "scan" else "deleting orphans"
            self.bars[stage] = tqdm(total=total, desc=desc, unit=" obj", leave=False)
        self.bars[stage].update(advance)

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()


def _print_keys(title: str, keys: list[str], show_all: bool) -> None:
    if not keys:
        return
    typer.echo(f"{title} ({len(keys)}):")
    for key in keys if show_all else keys[:SHOWN]:
        typer.echo(f"  {key}")
    if not show_all and len(keys) > SHOWN:
        typer.echo(f"  ... and {len(keys) - SHOWN} more (--all lists every one)")


def _print_report(report: Any, show_all: bool) -> None:
    verb = "would delete" if report.dry_run else "deleted"
    sizes = {info.key: info.size for info in report.orphans}
    gone = [info.key for info in report.orphans] if report.dry_run else report.deleted
    _print_keys(f"orphan blobs ({verb})", [f"{k}  {human_bytes(sizes[k])}" for k in gone], show_all)
    _print_keys("stale uploads (aborted)", [u.key for u in report.stale_uploads], show_all)
    _print_keys("stale temp objects (removed)", [i.key for i in report.stale_temps], show_all)
    _print_keys("kept: referenced or touched again", report.kept_on_recheck, show_all)
    _print_keys("rows whose codec refs do not resolve", report.unresolved_rows, show_all)
    reclaimed = report.orphan_bytes if report.dry_run else report.deleted_bytes
    typer.echo(
        f"{report.scanned} blobs scanned, {report.referenced} keys referenced, "
        f"{report.young} unreferenced but younger than {report.grace_s:g} s (kept); "
        f"{verb} {len(gone)} orphan blobs, {human_bytes(reclaimed)}"
    )
    if report.dry_run:
        typer.echo("dry run: nothing was deleted; pass --delete to reclaim")


@admin_app.command("gc")
def gc_command(
    delete: Annotated[
        bool, typer.Option("--delete", help="Really delete (default: a dry run that only reports).")
    ] = False,
    grace_s: Annotated[
        float | None,
        typer.Option(min=0, help="Keep unreferenced blobs younger than this (CKREG_GC_GRACE_S)."),
    ] = None,
    upload_ttl_s: Annotated[
        float | None,
        typer.Option(min=0, help="Abort uploads older than this (CKREG_UPLOAD_TTL_S)."),
    ] = None,
    show_all: Annotated[
        bool, typer.Option("--all", help="List every key, not the first 50.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
) -> None:
    """Garbage-collect the object store: blobs no file, artifact or upload references, and
    presigned uploads never completed. A dry run unless --delete."""
    from registry.services.gc import collect_garbage, report_summary

    settings = current_settings()
    bars = _Bars(enabled=not quiet and not as_json)
    try:
        with _registry() as (session, store):
            report = collect_garbage(
                session=session,
                store=store,
                grace_s=settings.gc_grace_s if grace_s is None else grace_s,
                upload_ttl_s=settings.upload_ttl_s if upload_ttl_s is None else upload_ttl_s,
                dry_run=not delete,
                progress=bars,
            )
    finally:
        bars.close()
    if as_json:
        typer.echo(json.dumps(report_summary(report, limit=10**9 if show_all else 1000)))
    else:
        _print_report(report, show_all)


@admin_app.command("delete")
def delete_command(
    checkpoint_id: Annotated[int, typer.Argument(help="The checkpoint to delete.")],
    force: Annotated[
        bool, typer.Option(help="Delete even while merged descendants or merge runs need it.")
    ] = False,
) -> None:
    """Delete a checkpoint (server side) and say which blobs were released to gc."""
    from registry.errors import RegistryError
    from registry.services.deletion import delete_checkpoint_report

    with _registry() as (session, store):
        try:
            report = delete_checkpoint_report(
                session=session, store=store, checkpoint_id=checkpoint_id, force=force
            )
        except RegistryError as exc:
            typer.echo(f"error: {exc.message}", err=True)
            raise typer.Exit(1) from None
    checkpoint = report.checkpoint
    typer.echo(f"checkpoint {checkpoint.id} '{checkpoint.name}' is {checkpoint.status}")
    _print_keys(
        f"released to gc ({human_bytes(report.released_bytes)}; reclaimed by the next "
        "'ckreg gc --delete' after the grace period)",
        report.released,
        True,
    )
    _print_keys("kept: shared with other checkpoints", report.kept_shared, True)
    _print_keys("kept: other files decode against them", report.kept_as_codec_ref, True)
