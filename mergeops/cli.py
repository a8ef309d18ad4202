"""``ckreg merge``: run a merge YAML (mergekit's schema, extended) into an output folder.

The lead's ``flows/cli.py`` mounts this with ``app.command("merge")(merge_command)`` or
``app.add_typer(merge_app)``; the function stays thin over ``config`` and ``merge_files``.
"""

from __future__ import annotations

import gc
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
            help="Merge YAML in mergekit's schema (merge_method, base_model, models or slices with layer_range, "
            "gradients, filter lists, dtype/out_dtype, tokenizer, chat_template, model+lora), "
            "plus mergeops extensions (models[].metric/second_moment/fisher, objective, "
            "state, max_shard_size, conventions: ckreg).",
        ),
    ],
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            "-o",
            help="Output model folder; must not exist or be empty unless --overwrite.",
        ),
    ],
    device: Annotated[
        str | None, typer.Option(help="auto (CUDA when present), cpu, cuda or cuda:N.")
    ] = None,
    dtype: Annotated[
        str | None,
        typer.Option(
            help="Output dtype (the YAML's out_dtype); default: the YAML's dtype, else the inputs'."
        ),
    ] = None,
    max_shard_size: Annotated[
        str | None, typer.Option(help="Largest output shard, e.g. 2GB or 500MiB.")
    ] = None,
    random_seed: Annotated[
        int | None,
        typer.Option("--random-seed", help="Seed for random methods (DARE, DELLA, ...)."),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option(help="Replace a non-empty --out once the merge succeeded.")
    ] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar over tensors.")] = True,
) -> None:
    """Merge the checkpoints a YAML config names into a loadable model folder at --out.

    The folder holds sharded safetensors, config.json, generation_config.json, the tokenizer
    and a model card. Example: ckreg merge --config merge.yml --out merged/
    """
    # Imported here, not with the module: they pull in torch, which ``ckreg --help`` never needs.
    from mergeops.config import run_config
    from mergeops.io.readers import SourceError
    from mergeops.io.writer import OutputError
    from mergeops.methods.base import MergeError

    overrides = {"device": device, "out_dtype": dtype, "max_shard_size": max_shard_size,
                 "seed": random_seed}  # fmt: skip
    try:
        result = run_config(config, out, overrides=overrides, overwrite=overwrite,
                            progress=progress)  # fmt: skip
    except (MergeError, SourceError, OutputError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=2) from None
    typer.echo(
        f"merged {result.tensor_count} tensors with {result.method} into {result.out_dir} "
        f"({len(result.files)} shard(s), {result.bytes_written} bytes written)"
    )
    for stream, folder in result.extra_outputs.items():
        typer.echo(f"  extra output '{stream}': {folder}")


@merge_app.callback()
def _group() -> None:
    """Merge checkpoints with mergeops."""


merge_app.command("merge")(merge_command)


def merge_entry() -> None:
    """``merge_app`` as a script (``python -c 'from mergeops.cli import merge_entry;
    merge_entry()' merge ...``), with the quick exit of ``ckreg`` (``flows.cli.entry``)."""
    try:
        merge_app()
    finally:
        gc.freeze()
