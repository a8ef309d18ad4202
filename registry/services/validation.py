"""Validation of a checkpoint's uploaded files on complete: hashes, headers, layout, NaN/Inf.

Everything is read through range reads, so validation never downloads whole tensors unless the
NaN/Inf scan is switched on (``Settings.scan_nonfinite``).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from typing import Any

from registry.errors import IntegrityMismatch, InvalidInput, ValidationFailed
from registry.models import Artifact, ArtifactRole, Checkpoint, CheckpointKind
from registry.safetensors_check import (
    INDEX_FILE_NAME,
    HeaderError,
    SafetensorsHeader,
    TensorEntry,
    inspect_safetensors_header,
    scan_nonfinite,
    validate_index_json,
)
from registry.services.common import check_sha256
from registry.settings import Settings
from registry.storage import ObjectStore

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MAX_JSON_BYTES = 64 * 1024 * 1024
HEADER_PREFETCH = 1024 * 1024  # one request covers the length prefix and typical headers


def _reader(store: ObjectStore, key: str) -> Callable[[int, int], bytes]:
    return lambda offset, length: store.read_range(key, offset, length)


def _prefetching_reader(
    store: ObjectStore, key: str, size: int, *, prefetch: int = HEADER_PREFETCH
) -> Callable[[int, int], bytes]:
    """A ``read_range`` that fetches the first ``prefetch`` bytes (at most ``size``) once.

    Reads inside that prefix are served from it, so parsing a header takes one request; a
    header longer than the prefix costs one more request, for the bytes past it only.
    """
    head = b""

    def read_range(offset: int, length: int) -> bytes:
        nonlocal head
        if not head and offset < prefetch:
            head = store.read_range(key, 0, min(prefetch, size))
        if offset + length <= len(head):
            return head[offset : offset + length]
        if offset < len(head):
            return head[offset:] + store.read_range(key, len(head), offset + length - len(head))
        return store.read_range(key, offset, length)

    return read_range


def inspect_artifact(
    *, store: ObjectStore, settings: Settings, artifact: Artifact
) -> SafetensorsHeader:
    """Parse and check one stored safetensors file (and scan for NaN/Inf when configured)."""
    read_range = _reader(store, artifact.blob_key)
    try:
        header = inspect_safetensors_header(
            _prefetching_reader(store, artifact.blob_key, artifact.size),
            artifact.size,
            name=artifact.name,
            max_header_bytes=settings.max_header_bytes,
        )
        if settings.scan_nonfinite:
            scan_nonfinite(read_range, header, name=artifact.name)
    except HeaderError as exc:
        raise ValidationFailed(str(exc), file=exc.file, tensor=exc.tensor) from exc
    return header


def check_declared_hashes(files: Mapping[str, Artifact], declared: Mapping[str, str]) -> None:
    """Every declared sha256 names an uploaded file and matches what the store hashed."""
    for name, value in declared.items():
        if name not in files:
            raise ValidationFailed(
                f"sha256 declared for file '{name}', which was not uploaded; uploaded: {sorted(files)}",
                file=name,
            )
        digest = check_sha256(value, what=f"file '{name}'")
        if files[name].sha256 != digest:
            raise IntegrityMismatch(
                f"file '{name}': declared sha256 {digest} but the uploaded bytes hash to {files[name].sha256}",
                file=name,
            )


def _read_json(store: ObjectStore, artifact: Artifact) -> bytes:
    if artifact.size > MAX_JSON_BYTES:
        raise ValidationFailed(
            f"file '{artifact.name}' is {artifact.size} bytes, over the {MAX_JSON_BYTES}-byte limit for JSON",
            file=artifact.name,
        )
    return store.read_range(artifact.blob_key, 0, artifact.size)


def _check_sharded(
    files: Mapping[str, Artifact], headers: Mapping[str, SafetensorsHeader], index: bytes
) -> None:
    """The index lists only uploaded shards, and every tensor sits in exactly the shard it names."""
    try:
        weight_map = validate_index_json(index, uploaded=set(files))
    except HeaderError as exc:
        raise ValidationFailed(str(exc), file=exc.file, tensor=exc.tensor) from exc
    for tensor, shard in weight_map.items():
        if shard not in headers:
            raise ValidationFailed(
                f"file '{INDEX_FILE_NAME}', tensor '{tensor}': shard '{shard}' is not a safetensors file",
                file=INDEX_FILE_NAME,
                tensor=tensor,
            )
        if tensor not in headers[shard].tensors:
            raise ValidationFailed(
                f"file '{INDEX_FILE_NAME}', tensor '{tensor}': listed in shard '{shard}', which does not hold it",
                file=INDEX_FILE_NAME,
                tensor=tensor,
            )
    listed_shards = set(weight_map.values())
    for shard, header in headers.items():
        if shard not in listed_shards:
            raise ValidationFailed(
                f"file '{shard}': shard is not listed in '{INDEX_FILE_NAME}'", file=shard
            )
        for tensor in header.tensors:
            if weight_map.get(tensor) != shard:
                raise ValidationFailed(
                    f"file '{shard}', tensor '{tensor}': index maps it to {weight_map.get(tensor)!r}, "
                    "each tensor must be in exactly one shard",
                    file=shard,
                    tensor=tensor,
                )


def _check_unique_tensors(headers: Mapping[str, SafetensorsHeader]) -> None:
    seen: dict[str, str] = {}
    for file, header in headers.items():
        for tensor in header.tensors:
            if tensor in seen:
                raise ValidationFailed(
                    f"file '{file}', tensor '{tensor}': also in file '{seen[tensor]}'",
                    file=file,
                    tensor=tensor,
                )
            seen[tensor] = file


def _check_adapter(store: ObjectStore, files: Mapping[str, Artifact]) -> None:
    for required in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if required not in files:
            raise ValidationFailed(
                f"adapter checkpoint is missing file '{required}'", file=required
            )
    try:
        config: Any = json.loads(_read_json(store, files[ADAPTER_CONFIG]))
    except (ValueError, RecursionError) as exc:  # RecursionError: nested too deeply
        raise ValidationFailed(
            f"file '{ADAPTER_CONFIG}' is not valid JSON: {exc}", file=ADAPTER_CONFIG
        ) from exc
    if not isinstance(config, dict):
        raise ValidationFailed(
            f"file '{ADAPTER_CONFIG}' must hold a JSON object", file=ADAPTER_CONFIG
        )


def validate_files(
    *,
    store: ObjectStore,
    settings: Settings,
    checkpoint: Checkpoint,
    files: list[Artifact],
    declared_sha256: Mapping[str, str],
) -> dict[str, SafetensorsHeader]:
    """Check a checkpoint's files; returns the parsed header of every safetensors file by name.

    Raises ``ValidationFailed`` (or ``IntegrityMismatch``) naming the file and tensor.
    """
    by_name = {artifact.name: artifact for artifact in files}
    check_declared_hashes(by_name, declared_sha256)
    weights = [a for a in files if a.role == ArtifactRole.weights]
    if not weights:
        raise ValidationFailed(
            f"checkpoint {checkpoint.id} '{checkpoint.name}' has no .safetensors file; uploaded: {sorted(by_name)}"
        )
    headers = {
        a.name: inspect_artifact(store=store, settings=settings, artifact=a) for a in weights
    }
    if checkpoint.kind == CheckpointKind.adapter:
        _check_adapter(store, by_name)
    if INDEX_FILE_NAME in by_name:
        _check_sharded(by_name, headers, _read_json(store, by_name[INDEX_FILE_NAME]))
    elif len(headers) > 1 and checkpoint.kind != CheckpointKind.adapter:
        raise ValidationFailed(
            f"checkpoint '{checkpoint.name}' has {len(headers)} safetensors files but no '{INDEX_FILE_NAME}'",
            file=INDEX_FILE_NAME,
        )
    _check_unique_tensors(headers)
    return headers


def tensor_index(header: SafetensorsHeader) -> dict[str, Any]:
    """The JSON-able tensor index stored on the artifact row (absolute byte ranges)."""
    return {name: entry_json(entry) for name, entry in header.tensors.items()}


def entry_json(entry: TensorEntry) -> dict[str, Any]:
    return {
        "dtype": entry.dtype,
        "shape": list(entry.shape),
        "start": entry.start,
        "end": entry.end,
    }


# ---- request values (names, metadata, params) -------------------------------------------------

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def check_text(value: str | None, *, what: str) -> str | None:
    """``value`` unless it holds a control character (NUL, newline, ...), which names refuse."""
    if value is not None and _CONTROL.search(value):
        raise InvalidInput(f"{what} {value!r} holds a control character; use printable text")
    return value


def check_json_values(value: Any, *, what: str) -> None:
    """Refuse non-finite numbers, integers outside int64 and NUL text anywhere in ``value``."""
    stack: list[tuple[Any, str]] = [(value, what)]
    while stack:
        item, where = stack.pop()
        if isinstance(item, dict):
            stack.extend((child, f"{where}.{key}") for key, child in item.items())
        elif isinstance(item, list | tuple):
            stack.extend((child, f"{where}.{i}") for i, child in enumerate(item))
        elif isinstance(item, float) and not math.isfinite(item):
            raise InvalidInput(f"{where} is {item}: numbers must be finite")
        elif isinstance(item, int) and not isinstance(item, bool):
            if not INT64_MIN <= item <= INT64_MAX:
                raise InvalidInput(f"{where} is {item}: integers must fit in 64 bits")
        elif isinstance(item, str) and "\x00" in item:
            raise InvalidInput(f"{where} holds a NUL character")


def check_json_size(value: Any, *, what: str, limit: int) -> None:
    """Refuse a JSON value whose serialised form is larger than ``limit`` bytes."""
    size = len(json.dumps(value, separators=(",", ":"), default=str).encode())
    if size > limit:
        raise InvalidInput(f"{what} is {size} bytes of JSON; the limit is {limit} bytes")
