"""``ckreg pull ID_OR_NAME DIR``: a whole checkpoint into a folder ``from_pretrained`` loads."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from registry.client.cli import TokenOption, UrlOption, _client


def pull(
    ref: Annotated[str, typer.Argument(metavar="ID_OR_NAME", help="Checkpoint id or name.")],
    dest: Annotated[Path, typer.Argument(metavar="DIR", help="Folder to download into.")],
    workers: Annotated[int, typer.Option(min=1, max=32, help="Files downloaded at once.")] = 4,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    url: UrlOption = None,
    token: TokenOption = None,
) -> None:
    """Download every file of a checkpoint (weights, config, tokenizer...) into DIR.

    Each file is checked against the registry's sha256.
    Files already in DIR with the right hash are kept.
    An interrupted pull continues where it stopped.
    A NAME means the newest ready checkpoint of that name.

    Examples:

      ckreg pull 12 ./ckpt12

      ckreg pull ties-run7 ./merged   # then from_pretrained("./merged")
    """
    from registry.client.pull import pull_checkpoint

    with _client(url, token) as client:
        folder = pull_checkpoint(client, ref, dest, workers=workers, progress=not quiet)
    typer.echo(str(folder))
