"""What to upload for a path given to ``Client.register``: layout detection, hashing, progress.

Layouts understood (checked in this order inside a directory):
- PEFT adapter: ``adapter_config.json`` + ``adapter_model.safetensors`` (kind ``adapter``);
- sharded: ``model.safetensors.index.json`` + the shards it names;
- single: ``model.safetensors``.
Every other top-level file of the folder goes along as a checkpoint file (``config.json``,
``generation_config.json``, tokenizer files, chat templates, ``README.md``, ...), except:
- training state (``optimizer.pt``, ``scheduler.pt``, ``scaler.pt``, ``rng_state*.pth``,
  ``training_args.bin``, ``trainer_state.json``), kept only with ``include_training_state``;
- other weight formats (``*.bin``, ``*.pt``, ...: pickles are never uploaded), hidden files,
  names the registry refuses, and subfolders;
- ``second_moment.safetensors`` / ``fisher.safetensors``, uploaded as artifacts of that role.
Each kind of skip is reported in ``UploadPlan.notes``. A Trainer ``checkpoint-N`` folder's
``trainer_state.json`` gives the step (``global_step``) and loss (last logged ``loss``).
A path to a ``.safetensors`` file is uploaded alone.
"""

from __future__ import annotations

import hashlib
import json
import re
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
CONFIG_FILE = "config.json"
EXTRA_FILES = (CONFIG_FILE, "generation_config.json")  # listed right after the weights
TRAINING_STATE = re.compile(
    r"^((optimizer|scheduler|scaler)\.(pt|bin)|rng_state.*\.pth|training_args\.bin|trainer_state\.json)$"
)
OTHER_WEIGHT_FORMATS = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".h5", ".msgpack")
ARTIFACT_FILES = {"second_moment.safetensors": "second_moment", "fisher.safetensors": "fisher"}
# The registry's rule for file names (registry.services.common.check_file_name).
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,254}$")


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
    # (role, path) of tensor artifacts found in the folder (second_moment.safetensors, ...)
    artifacts: list[tuple[str, Path]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # one line per kind of skipped file

    @property
    def directory(self) -> Path | None:
        """The checkpoint folder, or None when a single file is uploaded."""
        return None if self.layout == "file" else self.files[0].parent


def plan_upload(path: Path, *, include_training_state: bool = False) -> UploadPlan:
    """Inspect ``path`` (a ``.safetensors`` file or a checkpoint directory); returns its plan.

    ``include_training_state`` uploads optimizer / scheduler / RNG state as plain files too
    (never opened here; the registry only stores them).
    """
    if path.is_file():
        if path.suffix != ".safetensors":
            raise LayoutError(
                f"'{path}' is not a .safetensors file (other formats are never loaded)"
            )
        inspect_safetensors_file(path)
        return UploadPlan(layout="file", name=path.stem, files=[path])
    if not path.is_dir():
        raise LayoutError(f"'{path}' does not exist")
    layout, kind, weights = _weights_in(path)
    extras, artifacts, notes = _other_files(path, weights, include_training_state)
    step, metrics = read_trainer_state(path / TRAINER_STATE)
    optimizer = path / OPTIMIZER_FILE
    return UploadPlan(
        layout=layout if step is None else f"trainer/{layout}",
        name=path.resolve().name,
        files=weights + extras,
        kind=kind,
        step=step,
        metrics=metrics,
        optimizer_file=optimizer if optimizer.is_file() else None,
        artifacts=artifacts,
        notes=notes,
    )


def _other_files(
    directory: Path, weights: list[Path], include_training_state: bool
) -> tuple[list[Path], list[tuple[str, Path]], list[str]]:
    """The folder's non-weight files to upload, its artifacts, and a note per kind of skip."""
    taken = {p.name for p in weights}
    entries = sorted(directory.iterdir(), key=lambda p: (p.name not in EXTRA_FILES, p.name))
    extras: list[Path] = []
    artifacts: list[tuple[str, Path]] = []
    skipped: dict[str, list[str]] = {}
    for entry in entries:
        name = entry.name
        if name in taken:
            continue
        if entry.is_dir():
            skipped.setdefault("subfolder; only top-level files are registered", []).append(
                name + "/"
            )
        elif name in ARTIFACT_FILES:
            artifacts.append((ARTIFACT_FILES[name], entry))
        elif TRAINING_STATE.match(name) and not include_training_state:
            skipped.setdefault("training state; --include-training-state to keep", []).append(name)
        elif name.endswith(".safetensors"):
            skipped.setdefault("safetensors outside the weights layout", []).append(name)
        elif name.endswith(OTHER_WEIGHT_FORMATS) and not TRAINING_STATE.match(name):
            skipped.setdefault("not safetensors; pickled weights are never uploaded", []).append(
                name
            )
        elif not SAFE_NAME.fullmatch(name) or ".." in name:
            skipped.setdefault("hidden or not a plain file name", []).append(name)
        elif entry.is_file():
            extras.append(entry)
    notes = [f"skipped {', '.join(names)} ({why})" for why, names in skipped.items()]
    return extras, artifacts, notes


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
