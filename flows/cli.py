"""The ``ckreg`` command: registry client commands, ``merge``, and the server-side commands
``serve``, ``worker``, ``db upgrade``, ``token create``, ``policy ...`` and ``mlflow sync``."""

from __future__ import annotations

import gc
import os

# Idle OpenMP threads sleep instead of spinning unless the user chose a policy: spinning made
# 2-thread merges up to 8x slower on a busy machine. OpenMP reads this once, when torch loads,
# so it is set before anything here can import torch (merge, worker and serve all merge).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from typing import Annotated

import typer

from flows.cli_admin import admin_app
from flows.cli_family import family_app
from flows.cli_policies import policy_app
from flows.cli_search import search_app
from flows.cli_settings import current_settings, echo_database
from flows.cli_tokens import token_commands
from flows.kernel_env import configure_kernels

configure_kernels()  # CKREG_FUSED_KERNELS, CKREG_KERNEL_DIR, CC (mergeops reads no environment)

app = typer.Typer(
    help="ckreg: a checkpoint registry with automated merge pipelines.", no_args_is_help=True
)
db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
token_app = typer.Typer(help="API tokens.", no_args_is_help=True)
mlflow_app = typer.Typer(help="MLflow lineage.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(token_app, name="token")
token_app.registered_commands.extend(token_commands.registered_commands)  # list, revoke
app.add_typer(policy_app, name="policy")
app.add_typer(mlflow_app, name="mlflow")
app.add_typer(family_app, name="family")
app.add_typer(search_app, name="search")  # client-side (REST): start | watch | ls | cancel
app.registered_commands.extend(admin_app.registered_commands)  # gc, delete


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"ckreg {version('ckreg')}")
        except PackageNotFoundError:  # running from a source tree that was never installed
            typer.echo("ckreg (not installed: version unknown)")
        raise typer.Exit()


@app.callback()
def main(
    _version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """ckreg: a checkpoint registry with automated merge pipelines.

    Client commands (register, ls, show, merges, ...) talk to CKREG_API_URL; server-side
    commands (serve, worker, token, db, gc, ...) use CKREG_DATABASE_URL / CKREG_HOME directly
    and print which database they use.
    """


def _mount_client_commands() -> None:
    """register / ls / show / lineage / download (registry.client.cli) and merge (mergeops.cli)."""
    from mergeops.cli import merge_command
    from mergeops.cli_lora import make_extract_lora_command
    from mergeops.cli_moe import moe_app, set_register_hooks
    from registry.client import cli_pull
    from registry.client.adapters import register_adapter
    from registry.client.cli import registry_app
    from registry.client.cli_merges import merges_app
    from registry.client.moe import register_compressed, register_moe

    app.registered_commands.extend(registry_app.registered_commands)
    app.add_typer(merges_app, name="merges")
    app.command("merge")(merge_command)
    app.add_typer(moe_app, name="moe")
    set_register_hooks(build=register_moe, compress=register_compressed)  # ckreg moe ... --register
    from flows.cli_moe_flows import moe_flow_app  # ckreg moe build-flow / compress-flow

    moe_app.registered_commands.extend(moe_flow_app.registered_commands)
    app.command("extract-lora")(make_extract_lora_command(register_adapter))
    app.command("pull")(cli_pull.pull)


_mount_client_commands()


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Bind address (default: CKREG_HOST).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default: CKREG_PORT).")] = None,
    mode: Annotated[
        str | None, typer.Option(help="embedded | server (default: CKREG_PREFECT_MODE).")
    ] = None,
    cron_tick: Annotated[float, typer.Option(help="Seconds between cron checks (embedded).")] = 5.0,
    workers: Annotated[
        int,
        typer.Option(
            min=1,
            max=64,
            help="API processes sharing the port (one uses about one core). With more than "
            "one, this process serves no HTTP: it runs the embedded flows once and the API "
            "processes hand it their work.",
        ),
    ] = 1,
) -> None:
    """Upgrade the database and run the registry; embedded mode runs the flows in-process."""
    import uvicorn

    from flows.launchers import EmbeddedLauncher, ServerLauncher
    from flows.processes import stop_children_on_exit
    from flows.serving import serve_workers
    from registry.api.app import create_app, server_options
    from registry.db import upgrade_database

    stop_children_on_exit()  # SIGTERM, SIGINT and kill -9 leave no Prefect API behind
    settings = current_settings()
    echo_database(settings)
    # Prefect's telemetry only logs lock warnings against the embedded SQLite; keep it quiet.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    upgrade_database(settings.database_url)
    chosen = mode or settings.prefect_mode
    if chosen not in ("embedded", "server"):
        raise typer.BadParameter(f"--mode must be embedded or server, not {chosen!r}")
    launcher = (
        EmbeddedLauncher(settings, cron_tick_s=cron_tick).start()
        if chosen == "embedded"
        else ServerLauncher()
    )
    try:
        if workers > 1:
            serve_workers(
                workers=workers,
                host=host or settings.host,
                port=port or settings.port,
                options=server_options(settings),
                launcher=launcher if isinstance(launcher, EmbeddedLauncher) else None,
            )
            return
        uvicorn.run(
            create_app(settings, launcher=launcher),
            host=host or settings.host,
            port=port or settings.port,
            log_level="info",
            **server_options(settings),  # type: ignore[arg-type]
        )
    finally:
        if isinstance(launcher, EmbeddedLauncher):
            launcher.stop()


@app.command()
def worker(
    limit: Annotated[int | None, typer.Option(help="Most flow runs at once.")] = None,
    recover: Annotated[
        bool,
        typer.Option(
            help="Sweep for merge runs whose worker died (lease expired, CKREG_MERGE_LEASE_S) "
            "and re-submit them; also plans on_register runs whose event was lost."
        ),
    ] = True,
    schedule_sync: Annotated[
        float, typer.Option(help="Seconds between syncs of cron policy schedules.")
    ] = 30.0,
    api_wait: Annotated[
        float,
        typer.Option(
            min=0,
            help="Seconds to wait at start for the Prefect API (PREFECT_API_URL) to answer "
            "before giving up with an error.",
        ),
    ] = 120.0,
) -> None:
    """Serve the flows as Prefect deployments (server mode; needs PREFECT_API_URL).

    Run as many workers as you like against one Prefect server and database: each merge run
    is leased to one worker and its output adopted exactly once.
    """
    from flows.processes import stop_children_on_exit
    from flows.runtime import configure
    from flows.worker import PrefectUnreachable, serve_worker
    from registry.db import upgrade_database

    stop_children_on_exit()  # no flow-run subprocess outlives the worker
    settings = current_settings()
    echo_database(settings)
    upgrade_database(settings.database_url)
    try:
        serve_worker(
            configure(settings),
            limit=limit,
            recover=recover,
            sync_every_s=schedule_sync,
            api_wait_s=api_wait,
        )
    except PrefectUnreachable as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None


@db_app.command("upgrade")
def db_upgrade(
    revision: Annotated[str, typer.Argument(help="Target revision.")] = "head",
) -> None:
    """Bring the database (CKREG_DATABASE_URL) to the latest schema."""
    from registry.db import upgrade_database

    settings = current_settings()
    echo_database(settings)
    url = settings.database_url
    upgrade_database(url, revision)
    typer.echo(f"database at {url.split('@')[-1]} is at {revision}")


@token_app.command("create")
def token_create(
    name: Annotated[str, typer.Option(help="Who or what the token is for.")],
    scope: Annotated[
        list[str], typer.Option("--scope", help="read | write | admin (repeatable).")
    ] = ["write"],  # noqa: B006 - typer reads the default
) -> None:
    """Create an API token and print its secret (shown once)."""
    from registry.db import make_engine, session_scope, upgrade_database
    from registry.services import create_token

    settings = current_settings()
    echo_database(settings)
    upgrade_database(settings.database_url)
    engine = make_engine(settings.database_url)
    try:
        with session_scope(engine) as session:
            _, secret = create_token(session=session, name=name, scopes=scope)
    finally:
        engine.dispose()
    typer.echo(secret)


@mlflow_app.command("sync")
def mlflow_sync(
    retry_failed: Annotated[
        bool, typer.Option(help="Also retry events MLflow had rejected.")
    ] = False,
) -> None:
    """Send queued MLflow events (checkpoints, merges) now."""
    from flows.tracking import TrackingUnavailable, tracker_from_settings

    tracker = tracker_from_settings(current_settings())
    try:
        sent = tracker.sync(raise_on_outage=True, retry_failed=retry_failed)
    except TrackingUnavailable as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"sent {sent} events; {tracker.pending} still queued")


def entry() -> None:
    """The ``ckreg`` console script: ``app``, then a quick interpreter exit. The interpreter's
    last garbage collections walk every object alive, and a merge imported torch (about 0.45 s
    of walking at exit, a tenth of a 270M merge's wall time); frozen objects are skipped. Every
    file was closed by then, and the operating system takes back the memory."""
    try:
        app()
    finally:
        gc.freeze()
