"""``manifest.json``: what a built zoo holds, where each file lies, and how each model scored."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict
from safetensors.torch import load_file, save_file

MANIFEST_NAME = "manifest.json"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True)


class TrajectoryEntry(_Frozen):
    """One saved point of a fine-tuning trajectory (for mwa)."""

    step: int
    loss: float  # mean cross-entropy on the task's full train split at this step
    model: str


class TaskEntry(_Frozen):
    """Everything saved for one fine-tuned task; paths are relative to the zoo directory."""

    name: str
    n_classes: int
    model: str
    head: str
    second_moment: str
    fisher: str
    steps: int
    trajectory: list[TrajectoryEntry]
    # "finetune/<split>": the fine-tune; "base/<split>": pretrained backbone + this task's head
    accuracy: dict[str, float]


class IrrelevantEntry(_Frozen):
    """A model fine-tuned on shuffled labels: a distractor for fw's pool."""

    index: int
    model: str
    second_moment: str


class ZooManifest(_Frozen):
    """The index of a built zoo."""

    version: int = 1
    seed: int
    dataset: str = "sklearn.datasets.load_digits"
    splits: dict[str, int]
    config: dict[str, float | int]
    backbone_keys: list[str]
    base: str
    base_head: str
    base_accuracy: dict[str, float]
    tasks: dict[str, TaskEntry]
    irrelevant: list[IrrelevantEntry]

    @property
    def task_names(self) -> list[str]:
        return list(self.tasks)


def write_manifest(out_dir: Path, manifest: ZooManifest) -> Path:
    """Write ``manifest.json`` (field and task order kept: byte-identical for identical zoos)."""
    path = out_dir / MANIFEST_NAME
    path.write_text(json.dumps(manifest.model_dump(), indent=2) + "\n")
    return path


def load_manifest(zoo_dir: Path | str) -> ZooManifest:
    """Read a zoo's manifest; a missing one is an error naming the directory."""
    path = Path(zoo_dir) / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"no zoo at {str(zoo_dir)!r}: {MANIFEST_NAME} missing "
            "(build one with `python -m bench.zoo.build --out DIR`)"
        )
    return ZooManifest.model_validate_json(path.read_text())


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Save contiguous float tensors as safetensors, creating parent folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(path))


def load_tensors(zoo_dir: Path | str, relative: str) -> dict[str, torch.Tensor]:
    """Load one safetensors file of the zoo by its manifest path (a folder: all its
    ``*.safetensors`` files, e.g. a sharded Hugging Face directory)."""
    path = Path(zoo_dir) / relative
    if path.is_dir():
        return {
            k: v for f in sorted(path.glob("*.safetensors")) for k, v in load_file(str(f)).items()
        }
    return load_file(str(path))
