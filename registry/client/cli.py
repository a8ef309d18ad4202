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
from typing import TYPE_CHECKING, Annotated, Any

import typer

from registry.settings import get_settings

if TYPE_CHECKING:
    from registry.client.api import Client

registry_app = typer.Typer(help="Register, browse and download checkpoints.", no_args_is_help=True)

UrlOption = Annotated[
    str | None, typer.Option("--url", help="Registry URL (default: CKREG_API_URL).")
]
TokenOption = Annotated[
    str | None, typer.Option("--token", help="API token (default: CKREG_TOKEN).")
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print raw JSON.")]
SHOW_ORDER = (
    "id",
    "name",
    "kind",
    "status",
    "base_id",
    "task",
    "run",
    "step",
    "tags",
    "total_bytes",
)
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
    """A client from options or settings; server and input errors become a clean exit 1."""
    # Imported here: they pull in torch, which ``ckreg --help`` must not wait for.
    from registry.client.api import Client, ClientError
    from registry.client.layouts import LayoutError
    from registry.safetensors_check import HeaderError

    settings = get_settings()
    try:
        with Client(url or settings.api_url, token=token or settings.token) as client:
            yield client
    except ClientError as exc:
        typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
        raise typer.Exit(1) from exc
    except (HeaderError, LayoutError, OSError) as exc:
        typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
        raise typer.Exit(1) from exc


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
    include_training_state: Annotated[
        bool,
        typer.Option(help="Also upload optimizer/scheduler/RNG state (skipped by default)."),
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
    url: UrlOption = None,
    token: TokenOption = None,
) -> None:
    """Upload a checkpoint and print its id.

    PATH is a .safetensors file, a directory with model.safetensors or a sharded
    model.safetensors.index.json, a PEFT adapter directory, or a Hugging Face Trainer
    checkpoint-N directory (step and loss read from trainer_state.json).

    Examples:

      ckreg register out/model.safetensors --kind base --name llama-tiny

      ckreg register out/checkpoint-500 --base 1 --task math --run r7 --metric acc=0.81 --tag nightly
    """
    metrics = parse_metrics(metric or [])
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
            include_training_state=include_training_state,
            progress=not quiet,
        )
    typer.echo(
        f"registered checkpoint {checkpoint['id']} '{checkpoint['name']}' ({checkpoint['status']})"
    )


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
    """Show one checkpoint with its files.

    Example:

      ckreg show 12
    """
    with _client(url, token) as client:
        checkpoint = client.get_checkpoint(checkpoint_id)
    if as_json:
        typer.echo(json.dumps(checkpoint, indent=2))
        return
    keys = [k for k in SHOW_ORDER if k in checkpoint] + [
        k for k in checkpoint if k not in SHOW_ORDER
    ]
    for key in keys:
        if key != "files":
            typer.echo(f"{key:>12}: {checkpoint[key]}")
    typer.echo("       files:")
    columns = ("name", "size", "stored_size", "codec", "role", "sha256")  # stored: at rest
    typer.echo(format_table(checkpoint.get("files", []), columns))


@registry_app.command()
def lineage(
    checkpoint_id: Annotated[int, typer.Argument(metavar="ID", help="Checkpoint id.")],
    depth: Annotated[int, typer.Option(help="How many generations up and down.")] = 5,
    as_json: JsonOption = False,
    url: UrlOption = None,
    token: TokenOption = None,
) -> None:
    """Print where a checkpoint came from and what was made from it, as an indented tree.

    Example:

      ckreg lineage 12 --depth 3
    """
    with _client(url, token) as client:
        graph = client.lineage(checkpoint_id, depth=depth)
    if as_json:
        typer.echo(json.dumps(graph, indent=2))
        return
    typer.echo("\n".join(lineage_tree(graph)))


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


def format_table(rows: list[dict[str, Any]], columns: tuple[str, ...]) -> str:
    """Left-aligned plain-text table of ``columns`` (lists joined by commas, None shown as '-')."""

    def cell(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, list):
            return ",".join(map(str, value)) or "-"
        return str(value)

    cells = [[cell(row.get(column)) for column in columns] for row in rows]
    widths = [
        max([len(column)] + [len(line[i]) for line in cells]) for i, column in enumerate(columns)
    ]
    lines = [[column.upper() for column in columns], *cells]
    return "\n".join(
        "  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)).rstrip() for line in lines
    )


def lineage_tree(graph: dict[str, Any]) -> list[str]:
    """Indented tree: the checkpoint, its ancestors (parents first) and its descendants."""
    root = int(graph["checkpoint_id"])
    lines = [f"checkpoint {root}"]
    for title, edges, near, far in (
        ("ancestors", graph.get("ancestors", []), "child_id", "parent_id"),
        ("descendants", graph.get("descendants", []), "parent_id", "child_id"),
    ):
        if edges:
            lines.append(f"  {title}:")
            lines += _walk(edges, root, near, far, indent=2)
    return lines


def _walk(edges: list[dict[str, Any]], node: int, near: str, far: str, *, indent: int) -> list[str]:
    """Depth-first lines from ``node`` following edges whose ``near`` end is the current node."""
    lines = []
    for edge in sorted((e for e in edges if e[near] == node), key=lambda e: e[far]):
        lines.append(f"{'  ' * indent}└─ {edge[far]} ({edge['role']})")
        if indent < 64:  # a cycle in bad data must not recurse forever
            lines += _walk(edges, edge[far], near, far, indent=indent + 1)
    return lines
