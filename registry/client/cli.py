"""``ckreg`` registry commands (register, ls, show, lineage, download), talking to the REST API.

``registry_app`` is a typer sub-app; ``flows/cli.py`` mounts it into the top-level ``ckreg``.
The server URL and token come from ``CKREG_API_URL`` / ``CKREG_TOKEN`` unless ``--url`` /
``--token`` are given.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from registry.client.cli_format import format_table, lineage_tree

if TYPE_CHECKING:
    from registry.client.api import Client

__all__ = ["format_table", "lineage_tree", "parse_metrics", "registry_app"]

registry_app = typer.Typer(help="Register, browse and download checkpoints.", no_args_is_help=True)

UrlOption = Annotated[
    str | None, typer.Option("--url", help="Registry URL (default: CKREG_API_URL).")
]
TokenOption = Annotated[
    str | None, typer.Option("--token", help="API token (default: CKREG_TOKEN).")
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print raw JSON.")]
LS_COLUMNS = (
    "id",
    "name",
    "kind",
    "base_id",
    "task",
    "run",
    "step",
    "status",
    "tags",
    "created_at",
)


@contextmanager
def _client(url: str | None, token: str | None) -> Iterator[Client]:
    """A client from options or settings; server and input errors become a clean exit 1, and an
    unreachable server one line naming its URL."""
    # Imported here: they pull in torch, which ``ckreg --help`` must not wait for.
    import httpx

    from registry.client.api import Client, ClientError
    from registry.client.layouts import LayoutError
    from registry.safetensors_check import HeaderError
    from registry.settings import get_settings  # pydantic-settings: ~60 ms, not at start-up

    settings = get_settings()
    base_url = url or settings.api_url
    try:
        with Client(base_url, token=token or settings.token) as client:
            yield client
    except httpx.TransportError as exc:
        typer.secho(unreachable_message(base_url, exc), err=True, fg=typer.colors.RED)
        raise typer.Exit(1) from None
    except ClientError as exc:
        typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
        raise typer.Exit(1) from exc
    except (HeaderError, LayoutError, OSError) as exc:
        typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
        raise typer.Exit(1) from exc


def unreachable_message(url: str, exc: Exception) -> str:
    """``error: cannot reach the registry at URL (connection refused); ...`` on one line."""
    reason = " ".join(str(exc).split()) or type(exc).__name__
    return (
        f"error: cannot reach the registry at {url} ({reason}); is `ckreg serve` running there? "
        "(set --url or CKREG_API_URL)"
    )


def parse_metrics(values: list[str]) -> dict[str, float]:
    """``["loss=0.42", "acc=0.9"]`` -> ``{"loss": 0.42, "acc": 0.9}``; bad input -> BadParameter."""
    metrics: dict[str, float] = {}
    for item in values:
        name, sep, raw = item.partition("=")
        if not sep or not name.strip():
            raise typer.BadParameter(
                f"'{item}' is not NAME=VALUE (e.g. loss=0.42)", param_hint="--metric"
            )
        try:
            metrics[name.strip()] = float(raw)
        except ValueError:
            raise typer.BadParameter(
                f"value '{raw}' of metric '{name.strip()}' is not a number", param_hint="--metric"
            ) from None
    return metrics


@registry_app.command()
def register(
    path: Annotated[Path, typer.Argument(help=".safetensors file or checkpoint directory.")],
    base: Annotated[int | None, typer.Option("--base", help="Id of the base checkpoint.")] = None,
    task: Annotated[str | None, typer.Option(help="Task the checkpoint was trained on.")] = None,
    run: Annotated[str | None, typer.Option(help="Training run id.")] = None,
    step: Annotated[
        int | None, typer.Option(help="Training step (default: trainer_state.json).")
    ] = None,
    kind: Annotated[
        str | None, typer.Option(help="base|finetune|adapter|merged (default: detected).")
    ] = None,
    name: Annotated[
        str | None, typer.Option(help="Checkpoint name (default: file/dir name).")
    ] = None,
    tag: Annotated[list[str] | None, typer.Option("--tag", help="Tag (repeatable).")] = None,
    metric: Annotated[
        list[str] | None, typer.Option("--metric", help="NAME=VALUE (repeatable).")
    ] = None,
    second_moment: Annotated[
        Path | None,
        typer.Option("--second-moment", help="safetensors of Adam exp_avg_sq by parameter name."),
    ] = None,
    gram: Annotated[
        Path | None,
        typer.Option(
            "--gram",
            help="safetensors of layer-input Gram matrices per linear weight "
            "(registry.client.capture_gram), for regmean merges.",
        ),
    ] = None,
    features: Annotated[
        Path | None,
        typer.Option(
            "--features",
            help="safetensors of per-layer features on shared inputs "
            "(registry.client.capture_features), for pleas/ot_fusion merges.",
        ),
    ] = None,
    include_training_state: Annotated[
        bool,
        typer.Option(
            "--include-training-state",
            help="Also upload optimizer/scheduler/RNG state (skipped by default).",
        ),
    ] = False,
    no_base: Annotated[
        bool,
        typer.Option(
            "--no-base",
            help="Register a fine-tune without --base (its base is not in the registry; "
            "task-vector merges cannot use it). Without this, a fine-tune needs --base.",
        ),
    ] = False,
    wait: Annotated[
        bool,
        typer.Option("--wait", help="Wait for the merge runs it triggers; exit 1 if one fails."),
    ] = False,
    wait_timeout: Annotated[
        float, typer.Option(help="Seconds --wait waits for the merges at most.")
    ] = 3600.0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
    url: UrlOption = None,
    token: TokenOption = None,
) -> None:
    """Upload a checkpoint, print its id and the merge runs it triggered.

    PATH is a .safetensors file, a directory with model.safetensors or a sharded
    model.safetensors.index.json, a PEFT adapter directory, or a Hugging Face Trainer
    checkpoint-N directory (step and loss read from trainer_state.json).

    Examples:

      ckreg register out/model.safetensors --kind base --name llama-tiny

      ckreg register out/checkpoint-500 --base 1 --task math --run r7 --metric acc=0.81 --tag nightly

      ckreg register out/checkpoint-600 --base 1 --task math --wait

    A fine-tune (the kind detected for model weights) is refused without --base: pass
    --kind base for a pretrained model, or --no-base. On_register policies that take the
    checkpoint start merge runs: they are listed (ckreg merges watch ID follows one), and
    --wait waits for them.
    """
    from registry.client.cli_merges import report_triggered

    metrics = parse_metrics(metric or [])
    if (
        base is None
        and not no_base
        and path.exists()
        and (kind or _detected_kind(path)) == "finetune"
    ):
        typer.secho(
            f"error: '{path}' would be a fine-tune without a base. Give --base ID (the "
            "checkpoint it was trained from), --kind base for a pretrained model, or --no-base "
            "for a fine-tune whose base is not in the registry.",
            err=True,
            fg=typer.colors.RED,
        )
        raise typer.Exit(1)
    with _client(url, token) as client:
        checkpoint = client.register(
            path,
            name=name,
            kind=kind,
            base_id=base,
            task=task,
            run=run,
            step=step,
            tags=tag or [],
            metrics=metrics,
            second_moment=second_moment,
            gram=gram,
            features=features,
            include_training_state=include_training_state,
            progress=not quiet,
        )
        typer.echo(
            f"registered checkpoint {checkpoint['id']} '{checkpoint['name']}' "
            f"({checkpoint['status']})"
        )
        report_triggered(client, int(checkpoint["id"]), wait=wait, timeout=wait_timeout)


def _detected_kind(path: Path) -> str:
    """The kind ``Client.register`` gives ``path`` by default: adapter for a PEFT folder."""
    return "adapter" if (path / "adapter_config.json").is_file() else "finetune"


@registry_app.command("ls")
def list_checkpoints(
    base: Annotated[
        int | None, typer.Option("--base", help="Only children of this base id.")
    ] = None,
    kind: Annotated[str | None, typer.Option(help="base|finetune|adapter|merged.")] = None,
    task: Annotated[str | None, typer.Option(help="Only this task.")] = None,
    run: Annotated[str | None, typer.Option(help="Only this training run.")] = None,
    tag: Annotated[str | None, typer.Option(help="Only checkpoints with this tag.")] = None,
    status: Annotated[str | None, typer.Option(help="pending|ready|failed|deleted.")] = None,
    limit: Annotated[int, typer.Option(help="At most this many rows.")] = 50,
    as_json: JsonOption = False,
    url: UrlOption = None,
    token: TokenOption = None,
) -> None:
    """List checkpoints, newest first.

    Examples:

      ckreg ls --base 1 --task math

      ckreg ls --kind merged --limit 5 --json
    """
    filters = {
        "base_id": base,
        "kind": kind,
        "task": task,
        "run": run,
        "tag": tag,
        "status": status,
    }
    with _client(url, token) as client:
        page = client.list_checkpoints(**filters, limit=limit)
    if as_json:
        typer.echo(json.dumps(page, indent=2))
        return
    typer.echo(format_table(page["items"], LS_COLUMNS))
    typer.echo(f"({len(page['items'])} of {page['total']})")


@registry_app.command()
def show(
    checkpoint_id: Annotated[int, typer.Argument(metavar="ID", help="Checkpoint id.")],
    as_json: JsonOption = False,
    url: UrlOption = None,
    token: TokenOption = None,
) -> None:
    """Show one checkpoint: its fields, files, metrics, artifacts and the merge runs it took
    part in (and, for a merged checkpoint, the run that made it).

    Example:

      ckreg show 12
    """
    from registry.client.cli_views import checkpoint_details, show_lines

    with _client(url, token) as client:
        details = checkpoint_details(client, checkpoint_id)
    if as_json:
        typer.echo(json.dumps(details, indent=2))
        return
    typer.echo("\n".join(show_lines(details, format_table)))


@registry_app.command()
def lineage(
    checkpoint_id: Annotated[int, typer.Argument(metavar="ID", help="Checkpoint id.")],
    depth: Annotated[int, typer.Option(help="How many generations up and down.")] = 5,
    as_json: JsonOption = False,
    url: UrlOption = None,
    token: TokenOption = None,
) -> None:
    """Print where a checkpoint came from and what was made from it, as an indented tree:
    each node with its name, kind, task, merge method and scores.

    Example:

      ckreg lineage 12 --depth 3
    """
    from registry.client.cli_views import node_labels

    with _client(url, token) as client:
        graph = client.lineage(checkpoint_id, depth=depth)
        labels = None if as_json else node_labels(client, graph)
    if as_json:
        typer.echo(json.dumps(graph, indent=2))
        return
    typer.echo("\n".join(lineage_tree(graph, labels)))


@registry_app.command()
def download(
    checkpoint_id: Annotated[int, typer.Argument(metavar="ID", help="Checkpoint id.")],
    name: Annotated[str, typer.Argument(help="File name, e.g. model.safetensors.")],
    out: Annotated[
        str,
        typer.Option(
            "--out", "-o", help="Destination file, or directory (existing or ending in '/')."
        ),
    ] = ".",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    url: UrlOption = None,
    token: TokenOption = None,
) -> None:
    """Download one file of a checkpoint.

    Example:

      ckreg download 12 model.safetensors --out ./ckpt12/

      ckreg download 12 model.safetensors --out copy.safetensors
    """
    dest = Path(out)
    if out.endswith(("/", "\\")):
        dest.mkdir(parents=True, exist_ok=True)
    with _client(url, token) as client:
        target = client.download_file(checkpoint_id, name, dest, progress=not quiet)
    typer.echo(str(target))
