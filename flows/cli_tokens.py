"""``ckreg token list`` and ``ckreg token revoke``: server-side token commands that talk to the
database directly (like ``ckreg token create``); the REST twins are ``GET /admin/tokens`` and
``DELETE /admin/tokens/{id}``. A revoked token is refused from its next request on."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any

import typer

from flows.cli_settings import current_settings, echo_database

token_commands = typer.Typer()


@contextmanager
def _session() -> Iterator[Any]:
    from registry.db import make_engine, session_scope, upgrade_database

    settings = current_settings()
    echo_database(settings)
    upgrade_database(settings.database_url)
    engine = make_engine(settings.database_url)
    try:
        with session_scope(engine) as session:
            yield session
    finally:
        engine.dispose()


@token_commands.command("list")
def token_list() -> None:
    """List every token: id, name, scopes, state and when it was created (never its secret)."""
    from registry.services.tokens import list_tokens

    with _session() as session:
        tokens = list_tokens(session=session)
        rows = [
            (
                str(t.id),
                t.name,
                ",".join(t.scopes),
                "revoked" if t.revoked else "active",
                t.created_at.strftime("%Y-%m-%d %H:%M:%S"),
            )
            for t in tokens
        ]
    if not rows:
        typer.echo("no tokens; create one with: ckreg token create --name NAME")
        return
    header = ("ID", "NAME", "SCOPES", "STATE", "CREATED (UTC)")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        typer.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))


@token_commands.command("revoke")
def token_revoke(
    token_id: Annotated[int, typer.Argument(help="The token's id (see `ckreg token list`).")],
) -> None:
    """Revoke a token: requests using it are refused (401) from the next one on."""
    from registry.errors import NotFound
    from registry.services.tokens import revoke_token

    with _session() as session:
        try:
            token = revoke_token(session=session, token_id=token_id)
        except NotFound as exc:
            typer.echo(f"error: {exc.message}", err=True)
            raise typer.Exit(1) from None
        typer.echo(f"revoked token {token.id} '{token.name}'")
