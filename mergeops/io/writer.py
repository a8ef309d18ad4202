"""Sharded safetensors output with an index, staged so a failed merge leaves nothing behind.

``staged_output(out_dir)`` yields a temporary folder next to ``out_dir`` and renames it into
place only when the block succeeds; on any exception the temporary folder is removed.
``ShardedWriter`` fills one folder with ``model-0000i-of-0000n.safetensors`` shards of at most
``max_shard_size`` bytes (one tensor larger than that gets a shard of its own) and writes
``model.safetensors.index.json``; every shard's ``__metadata__`` carries the given metadata.
"""

from __future__ import annotations

import json
import re
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType

import torch
from safetensors.torch import save_file

from mergeops.io.readers import INDEX_NAME

DEFAULT_MAX_SHARD_SIZE = 5 * 1024**3
_UNITS = {
    "": 1,
    "B": 1,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
    "KIB": 1024,
    "MIB": 1024**2,
    "GIB": 1024**3,
}
_STREAM_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class OutputError(ValueError):
    """The output location or a stream name is unusable."""


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string such as ``"2GB"`` or ``"500MiB"``."""
    if isinstance(size, int):
        value = size
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", size)
        unit = match.group(2).upper() if match else "?"
        if match is None or unit not in _UNITS:
            raise OutputError(f"cannot read size '{size}' (use bytes or e.g. '2GB', '500MiB')")
        value = int(float(match.group(1)) * _UNITS[unit])
    if value <= 0:
        raise OutputError(f"max shard size must be positive, got {size!r}")
    return value


def check_stream_name(name: str) -> str:
    """Extra output streams become sub-folders; only plain names are allowed."""
    if not _STREAM_NAME.match(name):
        raise OutputError(f"output stream name '{name}' must match {_STREAM_NAME.pattern}")
    return name


@contextmanager
def staged_output(out_dir: str | Path) -> Iterator[Path]:
    """A temporary folder renamed to ``out_dir`` on success and deleted on failure."""
    target = Path(out_dir)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise OutputError(f"output folder '{target}' already exists and is not empty")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.partial-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if target.exists():
        target.rmdir()
    staging.rename(target)


class ShardedWriter:
    """Writes tensors into size-bounded shards of one folder (a context manager)."""

    def __init__(
        self,
        directory: Path,
        *,
        max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
        metadata: dict[str, str] | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.max_shard_size = parse_size(max_shard_size)
        self.metadata = {"format": "pt", **(metadata or {})}
        self.bytes_written = 0
        self.tensor_count = 0
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[list[str]] = []

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Queue one tensor (copied to CPU); flushes a shard when the size limit is reached."""
        if name in self._pending or any(name in shard for shard in self._shards):
            raise OutputError(f"tensor '{name}' written twice to '{self.directory.name}'")
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > self.max_shard_size:
            self._flush()
        self._pending[name] = tensor.detach().to("cpu").contiguous()
        self._pending_bytes += size
        self.tensor_count += 1

    def _flush(self) -> None:
        if not self._pending:
            return
        index = len(self._shards) + 1
        save_file(self._pending, str(self.directory / f"shard-{index}.tmp"), self.metadata)
        self._shards.append(list(self._pending))
        self.bytes_written += self._pending_bytes
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> list[Path]:
        """Flush, name the shards ``model-i-of-n`` and write the index; returns shard paths."""
        self._flush()
        total = len(self._shards)
        weight_map: dict[str, str] = {}
        paths = []
        for i, names in enumerate(self._shards, start=1):
            final = f"model-{i:05d}-of-{total:05d}.safetensors"
            (self.directory / f"shard-{i}.tmp").rename(self.directory / final)
            paths.append(self.directory / final)
            weight_map.update(dict.fromkeys(names, final))
        index = {
            "metadata": {"total_size": self.bytes_written, **self.metadata},
            "weight_map": weight_map,
        }
        (self.directory / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True))
        return paths

    def __enter__(self) -> ShardedWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
