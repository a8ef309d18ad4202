"""Staging a merge's output folder so a failed merge leaves nothing behind.

``staged_output(out_dir)`` yields a temporary folder next to ``out_dir`` and renames it into
place only when the block succeeds; on any exception the temporary folder is removed.
``swap_into_place`` replaces a file or folder by a staged one.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class OutputError(ValueError):
    """The output location or a stream name is unusable."""


@contextmanager
def staged_output(out_dir: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """A temporary folder renamed to ``out_dir`` on success and deleted on failure.

    A non-empty ``out_dir`` is refused up front unless ``overwrite``; then it is replaced only
    after success (moved aside, the new folder renamed in, the old one deleted).
    """
    target = Path(out_dir)
    if target.exists() and not target.is_dir():
        raise OutputError(f"output '{target}' exists and is not a folder")
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise OutputError(
            f"output folder '{target}' already exists and is not empty (use --overwrite)"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.partial-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.replaced-{uuid.uuid4().hex[:8]}"
        target.rename(old)
    staging.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def swap_into_place(staged: Path, path: Path) -> Path:
    """Replace ``path`` (file or folder) by ``staged``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
    shutil.move(str(staged), str(path))
    return path
