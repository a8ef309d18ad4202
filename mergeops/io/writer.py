"""Sharded safetensors output with an index, staged so a failed merge leaves nothing behind.

``staged_output(out_dir)`` (``mergeops.io.staging``, re-exported here) yields a temporary
folder renamed into place only when the block succeeds. ``ShardedWriter`` fills one folder
with ``model-0000i-of-0000n.safetensors`` shards of at most ``max_shard_size`` bytes (one tensor larger than that gets a shard of its own) and writes
``model.safetensors.index.json``; every shard's ``__metadata__`` carries the given metadata.
Shards are written by ``write_safetensors`` (not ``safetensors.torch.save_file``, whose header
key order changes from write to write), so identical merges give byte-identical files.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType

import torch

from mergeops.io.background import BackgroundWrites
from mergeops.io.readers import INDEX_NAME
from mergeops.io.staging import OutputError, staged_output, swap_into_place
from mergeops.io.streamed import HeaderEntry, StreamedShards, TensorSpec, header_bytes

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
SAFETENSORS_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.complex64: "C64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint64: "U64",
    torch.uint32: "U32",
    torch.uint16: "U16",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


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


def safetensors_dtype(name: str, tensor: torch.Tensor) -> str:
    """The safetensors dtype tag of ``tensor`` (named ``name`` in the error)."""
    tag = SAFETENSORS_DTYPES.get(tensor.dtype)
    if tag is None:
        raise OutputError(
            f"tensor '{name}' has dtype {tensor.dtype}, which safetensors cannot store"
        )
    return tag


def _entry(name: str, tensor: torch.Tensor) -> HeaderEntry:
    size = tensor.numel() * tensor.element_size()
    tag = safetensors_dtype(name, tensor)
    return HeaderEntry(name, tag, tuple(tensor.shape), size, tensor.element_size())


def spec_entry(spec: TensorSpec) -> HeaderEntry:
    """The header entry of a declared tensor (named in the error if safetensors lacks its dtype)."""
    tag = SAFETENSORS_DTYPES.get(spec.dtype)
    if tag is None:
        raise OutputError(
            f"tensor '{spec.name}' has dtype {spec.dtype}, which safetensors cannot store"
        )
    return HeaderEntry(spec.name, tag, tuple(spec.shape), spec.nbytes, spec.dtype.itemsize)


def _safetensors_header(
    tensors: Mapping[str, torch.Tensor], order: list[str], metadata: Mapping[str, str]
) -> bytes:
    """Sorted-key header JSON (data in ``order``), space-padded to 8 bytes, with its length."""
    try:
        return header_bytes([_entry(name, tensors[name]) for name in order], metadata)
    except ValueError as exc:
        if isinstance(exc, OutputError):
            raise
        raise OutputError(str(exc)) from None


def write_safetensors(
    path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> int:
    """Write ``tensors`` as a byte-deterministic safetensors file; returns the data bytes.

    Tensors are laid out by element size (largest first, so every tensor stays aligned) and
    then by name, and streamed one at a time; a failed write removes the partial file.
    """
    order = sorted(tensors, key=lambda name: (-tensors[name].element_size(), name))
    header = _safetensors_header(tensors, order, metadata or {})
    written = 0
    try:
        with Path(path).open("wb") as handle:
            handle.write(header)
            for name in order:
                # torch tensors are little-endian on every platform torch supports
                flat = tensors[name].detach().to("cpu").contiguous().reshape(-1)
                if flat.numel():
                    handle.write(flat.view(torch.uint8).numpy().data)
                    written += flat.numel() * flat.element_size()
    except BaseException:
        Path(path).unlink(missing_ok=True)
        raise
    return written


class ShardedWriter:
    """Writes tensors into size-bounded shards of one folder (a context manager).

    With ``layout`` (every tensor's name, shape and dtype in the order they will be added),
    shards are written in place as tensors arrive (``mergeops.io.streamed``) and nothing is
    held; without it, each shard is held until full. Both give the same bytes. A declared
    tensor may also arrive in slices (``write_rows`` at byte offsets, then ``rows_done``);
    with ``background``, slices are written by a background thread (bounded queue) while the
    merge goes on, and a failed write surfaces at the next call, ``close`` or ``discard``.
    """

    def __init__(
        self,
        directory: Path,
        *,
        max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
        metadata: dict[str, str] | None = None,
        layout: Sequence[TensorSpec] | None = None,
        background: bool = False,
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
        self._streamed: StreamedShards | None = None
        if layout is not None:
            entries = [spec_entry(spec) for spec in layout]
            _safetensors_header({}, [], self.metadata)  # checked before any tensor is merged
            self._streamed = StreamedShards(
                self.directory, entries, self.max_shard_size, self.metadata
            )
            self._shards = [[e.name for e in shard] for shard in self._streamed.shards]
        self._done: set[str] = set()
        self._row_bytes: dict[str, int] = {}
        self._writes = BackgroundWrites() if background and layout is not None else None

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Write (declared layout) or queue one tensor; flushes a full shard when queued."""
        if self._streamed is not None:
            if self._writes is not None:  # the caller may reuse ``tensor``: write it now
                self._writes.drain()
            self._write_declared(name, tensor)
            return
        if name in self._pending or any(name in shard for shard in self._shards):
            raise OutputError(f"tensor '{name}' written twice to '{self.directory.name}'")
        safetensors_dtype(name, tensor)
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > self.max_shard_size:
            self._flush()
        self._pending[name] = tensor.detach().to("cpu").contiguous()
        self._pending_bytes += size
        self.tensor_count += 1

    def _declared(self, name: str) -> HeaderEntry:
        """``name``'s declared entry, refusing undeclared and already written tensors."""
        slot = self._streamed.slot(name) if self._streamed is not None else None
        where = f"'{self.directory.name}'"
        if slot is None:
            raise OutputError(f"tensor '{name}' is not in the declared layout of {where}")
        if name in self._done:
            raise OutputError(f"tensor '{name}' written twice to {where}")
        return slot.entry

    def _write_declared(self, name: str, tensor: torch.Tensor) -> None:
        assert self._streamed is not None
        entry = self._declared(name)
        got = (safetensors_dtype(name, tensor), tuple(tensor.shape))
        if got != (entry.tag, entry.shape) or name in self._row_bytes:
            raise OutputError(
                f"tensor '{name}' is {got[0]} {got[1]}, but the layout of "
                f"'{self.directory.name}' declared {entry.tag} {entry.shape}"
                + (" (and it was partly written in slices)" if name in self._row_bytes else "")
            )
        self._done.add(name)
        self.bytes_written += self._streamed.write(name, tensor)
        self.tensor_count += 1

    def write_rows(
        self,
        name: str,
        byte_offset: int,
        data: torch.Tensor,
        release: Callable[[], None] | None = None,
    ) -> None:
        """Write ``data`` (contiguous uint8 on the CPU: bytes of the output dtype) at
        ``byte_offset`` inside declared tensor ``name``; ``release`` runs once it is written
        (on the background thread with ``background``), or at once if it is refused."""
        try:
            entry = self._declared(name)
            end = byte_offset + data.numel()
            if data.dtype != torch.uint8 or not data.is_contiguous() or data.device.type != "cpu":
                raise OutputError(f"slice of tensor '{name}' must be contiguous CPU bytes")
            if byte_offset < 0 or end > entry.nbytes:
                raise OutputError(f"bytes {byte_offset}:{end} of tensor '{name}' are outside "
                                  f"its {entry.nbytes} declared bytes")  # fmt: skip
        except BaseException:
            if release is not None:
                release()
            raise
        self._row_bytes[name] = self._row_bytes.get(name, 0) + data.numel()
        assert self._streamed is not None
        streamed = self._streamed
        if self._writes is not None:
            job = lambda: streamed.write_rows(name, byte_offset, data)  # noqa: E731
            self._writes.submit(job, data.numel(), release)
            return
        try:
            streamed.write_rows(name, byte_offset, data)
        finally:
            if release is not None:
                release()

    def rows_done(self, name: str) -> None:
        """Declared tensor ``name`` was sent whole by ``write_rows``."""
        entry = self._declared(name)
        sent = self._row_bytes.get(name, 0)
        if sent != entry.nbytes:
            raise OutputError(f"tensor '{name}' got {sent} of its {entry.nbytes} bytes in slices")
        assert self._streamed is not None
        streamed = self._streamed
        self._done.add(name)
        if self._writes is not None:
            self._writes.submit(lambda: streamed.finish(name), 0)
        else:
            streamed.finish(name)
        self.bytes_written += entry.nbytes
        self.tensor_count += 1

    def _flush(self) -> None:
        if not self._pending:
            return
        index = len(self._shards) + 1
        write_safetensors(self.directory / f"shard-{index}.tmp", self._pending, self.metadata)
        self._shards.append(list(self._pending))
        self.bytes_written += self._pending_bytes
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> list[Path]:
        """Flush, name the shards ``model-i-of-n`` and write the index; returns shard paths."""
        if self._writes is not None:
            self._writes.close()
        if self._streamed is not None and self._streamed.missing():
            missing = self._streamed.missing()
            raise OutputError(
                f"{len(missing)} declared tensor(s) never written to "
                f"'{self.directory.name}', e.g. '{missing[0]}'"
            )
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
        else:
            self.discard()

    def discard(self) -> None:
        """Remove the shards written so far (after a failure) and drop what is queued."""
        if self._writes is not None:
            self._writes.stop()
        if self._streamed is not None:
            self._streamed.discard()
        for index in range(1, len(self._shards) + 1):
            (self.directory / f"shard-{index}.tmp").unlink(missing_ok=True)
        self._pending, self._pending_bytes = {}, 0


__all__ = [
    "DEFAULT_MAX_SHARD_SIZE",
    "SAFETENSORS_DTYPES",
    "OutputError",
    "ShardedWriter",
    "check_stream_name",
    "parse_size",
    "safetensors_dtype",
    "spec_entry",
    "staged_output",
    "swap_into_place",
    "write_safetensors",
]
