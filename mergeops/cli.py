"""``ckreg merge``: run a merge YAML (mergekit's schema, extended) into an output folder.

The lead's ``flows/cli.py`` mounts this with ``app.command("merge")(merge_command)`` or
``app.add_typer(merge_app)``; the function stays thin over ``config`` and ``merge_files``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

merge_app = typer.Typer(help="Merge checkpoints with mergeops (no server needed).")


def merge_command(
    config: Annotated[
        Path,
        typer.Option(
            "--config",
            "-c",
            exists=True,
            dir_okay=False,
            readable=True,
            help="Merge YAML: merge_method, base_model, models[].model/.parameters, "
            "parameters, dtype (mergekit's schema), plus mergeops extensions "
            "(models[].metric/second_moment/fisher, objective, state, max_shard_size).",
        ),
    ],
    out: Annotated[
        Path,
        typer.Option("--out", "-o", help="Output folder; must not exist or be empty."),
    ],
    device: Annotated[
        str | None, typer.Option(help="auto (CUDA when present), cpu, cuda or cuda:N.")
    ] = None,
    dtype: Annotated[
        str | None, typer.Option(help="Output dtype (default: the base model's).")
    ] = None,
    max_shard_size: Annotated[
        str | None, typer.Option(help="Largest output shard, e.g. 2GB or 500MiB.")
    ] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar over tensors.")] = True,
) -> None:
    """Merge the checkpoints a YAML config names and write sharded safetensors to --out.

    Example: ckreg merge --config merge.yml --out merged/
    """
    # Imported here, not with the module: they pull in torch, which ``ckreg --help`` never needs.
    from mergeops import merge_files
    from mergeops.config import load_config, to_merge_kwargs
    from mergeops.io.readers import SourceError
    from mergeops.io.writer import OutputError
    from mergeops.methods.base import MergeError

    try:
        kwargs = to_merge_kwargs(load_config(config), root=config.parent)
        for key, value in (
            ("device", device),
            ("dtype", dtype),
            ("max_shard_size", max_shard_size),
        ):
            if value is not None:
                kwargs[key] = value
        result = merge_files(out_dir=out, progress=progress, **kwargs)
    except (MergeError, SourceError, OutputError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=2) from None
    typer.echo(
        f"merged {result.tensor_count} tensors with {kwargs['method']} into {result.out_dir} "
        f"({len(result.files)} shard(s), {result.bytes_written} bytes written)"
    )
    for stream, folder in result.extra_outputs.items():
        typer.echo(f"  extra output '{stream}': {folder}")


@merge_app.callback()
def _group() -> None:
    """Merge checkpoints with mergeops."""


merge_app.command("merge")(merge_command)
