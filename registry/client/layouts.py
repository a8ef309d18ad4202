"""What to upload for a path given to ``Client.register``: layout detection, hashing, progress.

Layouts understood (checked in this order inside a directory):
- PEFT adapter: ``adapter_config.json`` + ``adapter_model.safetensors`` (kind ``adapter``);
- sharded: ``model.safetensors.index.json`` + the shards it names;
- single: ``model.safetensors``;
plus ``config.json`` and ``generation_config.json`` when present, and, for a Hugging Face Trainer checkpoint directory,
``trainer_state.json`` (step = ``global_step``, loss = last ``log_history`` entry with ``loss``).
A path to a ``.safetensors`` file is uploaded alone.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from registry.safetensors_check import (
    INDEX_FILE_NAME,
    inspect_safetensors_file,
    validate_index_json,
)

CHUNK = 1 << 20
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
SINGLE_WEIGHTS = "model.safetensors"
TRAINER_STATE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
EXTRA_FILES = ("config.json", "generation_config.json")


class LayoutError(ValueError):
    """The path is not a checkpoint layout ``register`` understands."""


@dataclass(frozen=True)
class UploadPlan:
    """Files to upload plus what the layout tells about the checkpoint."""

    layout: str
    name: str
    files: list[Path]
    kind: str = "finetune"
    step: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    optimizer_file: Path | None = None


def plan_upload(path: Path) -> UploadPlan:
    """Inspect ``path`` (a ``.safetensors`` file or a checkpoint directory); returns its plan."""
    if path.is_file():
        if path.suffix != ".safetensors":
            raise LayoutError(
                f"'{path}' is not a .safetensors file (other formats are never loaded)"
            )
        inspect_safetensors_file(path)
        return UploadPlan(layout="file", name=path.stem, files=[path])
    if not path.is_dir():
        raise LayoutError(f"'{path}' does not exist")
    layout, kind, files = _weights_in(path)
    files += [path / extra for extra in EXTRA_FILES if (path / extra).is_file()]
    step, metrics = read_trainer_state(path / TRAINER_STATE)
    optimizer = path / OPTIMIZER_FILE
    return UploadPlan(
        layout=layout if step is None else f"trainer/{layout}",
        name=path.resolve().name,
        files=files,
        kind=kind,
        step=step,
        metrics=metrics,
        optimizer_file=optimizer if optimizer.is_file() else None,
    )


def _weights_in(directory: Path) -> tuple[str, str, list[Path]]:
    if (directory / ADAPTER_CONFIG).is_file() and (directory / ADAPTER_WEIGHTS).is_file():
        inspect_safetensors_file(directory / ADAPTER_WEIGHTS)
        return "adapter", "adapter", [directory / ADAPTER_WEIGHTS, directory / ADAPTER_CONFIG]
    index = directory / INDEX_FILE_NAME
    if index.is_file():
        present = {p.name for p in directory.iterdir() if p.is_file()}
        shards = sorted(set(validate_index_json(index.read_bytes(), uploaded=present).values()))
        for shard in shards:
            inspect_safetensors_file(directory / shard)
        return "sharded", "finetune", [index] + [directory / shard for shard in shards]
    if (directory / SINGLE_WEIGHTS).is_file():
        inspect_safetensors_file(directory / SINGLE_WEIGHTS)
        return "single", "finetune", [directory / SINGLE_WEIGHTS]
    raise LayoutError(
        f"no weights found in '{directory}': expected {SINGLE_WEIGHTS}, {INDEX_FILE_NAME} + shards, "
        f"or {ADAPTER_CONFIG} + {ADAPTER_WEIGHTS}"
    )


def read_trainer_state(path: Path) -> tuple[int | None, dict[str, float]]:
    """``(global_step, {"loss": last logged loss})`` from a Trainer's ``trainer_state.json``."""
    if not path.is_file():
        return None, {}
    try:
        state: dict[str, Any] = json.loads(path.read_text())
    except ValueError as exc:
        raise LayoutError(f"'{path}' is not valid JSON: {exc}") from exc
    step = state.get("global_step")
    losses = [
        entry["loss"]
        for entry in state.get("log_history", [])
        if isinstance(entry.get("loss"), int | float)
    ]
    metrics = {"loss": float(losses[-1])} if losses else {}
    return (int(step) if isinstance(step, int) else None), metrics


def sha256_file(path: Path, *, progress: bool = False) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    for chunk in iter_file(path, progress=progress, desc=f"sha256 {path.name}", leave=False):
        digest.update(chunk)
    return digest.hexdigest()


def iter_file(path: Path, *, progress: bool, desc: str, leave: bool = True) -> Iterator[bytes]:
    """Stream a file's bytes, advancing a tqdm bar (to stderr) when ``progress`` is set."""
    size = path.stat().st_size
    with (
        path.open("rb") as handle,
        tqdm(
            total=size, desc=desc, unit="B", unit_scale=True, disable=not progress, leave=leave
        ) as bar,
    ):
        while chunk := handle.read(CHUNK):
            bar.update(len(chunk))
            yield chunk
