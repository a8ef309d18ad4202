"""The zoo's data: scikit-learn's 8x8 digits, seeded splits, and the task definitions.

Every task is an input transform of the same images plus a label map (or subset), so all tasks
share the train / validation / test split of the underlying images: nothing a task trains on is
ever another task's test image.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

SPLITS = ("train", "validation", "test")
VALIDATION_FRACTION = 0.2
TEST_FRACTION = 0.2

Images = np.ndarray  # (n, 8, 8) float32 in [0, 1]


@dataclass(frozen=True)
class Task:
    """One fine-tuning task: how inputs are transformed and how labels map to classes."""

    name: str
    transform: Callable[[Images, np.random.Generator], Images]
    n_classes: int = 10
    label_map: Callable[[np.ndarray], np.ndarray] | None = None
    keep_labels: tuple[int, ...] | None = None  # label subset; None keeps every digit


@dataclass(frozen=True)
class TaskData:
    """Flattened inputs and integer targets of one task on one split."""

    x: torch.Tensor  # (n, 64) float32
    y: torch.Tensor  # (n,) int64


def _shift(images: Images, _rng: np.random.Generator) -> Images:
    """Move the digit 2 pixels right and 1 down, filling with background."""
    out = np.zeros_like(images)
    out[:, 1:, 2:] = images[:, :-1, :-2]
    return out


def _noise(images: Images, rng: np.random.Generator) -> Images:
    """Strong fixed Gaussian pixel noise (std 0.35 of the intensity range)."""
    return np.clip(images + rng.normal(0.0, 0.35, size=images.shape), 0.0, 1.0)


def _blur(images: Images, _rng: np.random.Generator) -> Images:
    """2x2 block average: a quarter-resolution digit."""
    n = images.shape[0]
    blocks = images.reshape(n, 4, 2, 4, 2).mean(axis=(2, 4))
    return np.repeat(np.repeat(blocks, 2, axis=1), 2, axis=2)


def _identity(images: Images, _rng: np.random.Generator) -> Images:
    return images


TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        Task("rot90", lambda im, _r: np.rot90(im, 1, axes=(1, 2))),
        Task("rot180", lambda im, _r: np.rot90(im, 2, axes=(1, 2))),
        Task("rot270", lambda im, _r: np.rot90(im, 3, axes=(1, 2))),
        Task("flip_lr", lambda im, _r: im[:, :, ::-1]),
        Task("flip_ud", lambda im, _r: im[:, ::-1, :]),
        Task("transpose", lambda im, _r: np.transpose(im, (0, 2, 1))),
        Task("invert", lambda im, _r: 1.0 - im),
        Task("noise", _noise),
        Task("shift", _shift),
        Task("blur", _blur),
        Task("parity", _identity, n_classes=2, label_map=lambda y: y % 2),
        Task("mod3", _identity, n_classes=3, label_map=lambda y: y % 3),
        Task("low_digits", _identity, n_classes=5, keep_labels=(0, 1, 2, 3, 4)),
    )
}
DEFAULT_TASKS: tuple[str, ...] = (
    "rot90",
    "rot180",
    "flip_lr",
    "invert",
    "noise",
    "shift",
    "parity",
    "low_digits",
)
PRETRAIN_TASK = Task("plain", _identity)


def get_task(name: str) -> Task:
    """Look a task up by name (``plain`` is the pretraining task)."""
    if name == PRETRAIN_TASK.name:
        return PRETRAIN_TASK
    if name not in TASKS:
        raise KeyError(f"unknown zoo task {name!r}; available: {', '.join(TASKS)}")
    return TASKS[name]


@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    bunch = load_digits()
    images = (bunch.images / 16.0).astype(np.float32)
    return images, bunch.target.astype(np.int64)


@lru_cache(maxsize=8)
def split_indices(seed: int) -> dict[str, np.ndarray]:
    """Stratified train / validation / test indices of the 1,797 images for one seed."""
    _, labels = _digits()
    all_idx = np.arange(labels.shape[0])
    rest, test = train_test_split(
        all_idx, test_size=TEST_FRACTION, random_state=seed, stratify=labels
    )
    val_share = VALIDATION_FRACTION / (1.0 - TEST_FRACTION)
    train, val = train_test_split(
        rest, test_size=val_share, random_state=seed + 1, stratify=labels[rest]
    )
    return {"train": np.sort(train), "validation": np.sort(val), "test": np.sort(test)}


def _task_seed(seed: int, name: str) -> int:
    return seed * 1000 + sum((i + 1) * ord(ch) for i, ch in enumerate(name))


def task_data(task: Task | str, split: str, *, seed: int = 0) -> TaskData:
    """Inputs and targets of ``task`` on ``split``; noise is fixed per (seed, task, image)."""
    task = get_task(task) if isinstance(task, str) else task
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    images, labels = _digits()
    # Transform all images with one generator so each image's noise does not depend on the split.
    rng = np.random.default_rng(_task_seed(seed, task.name))
    transformed = np.ascontiguousarray(task.transform(images, rng), dtype=np.float32)
    idx = split_indices(seed)[split]
    if task.keep_labels is not None:
        idx = idx[np.isin(labels[idx], task.keep_labels)]
    targets = labels[idx] if task.label_map is None else task.label_map(labels[idx])
    x = torch.from_numpy(transformed[idx].reshape(len(idx), -1).copy())
    return TaskData(x=x, y=torch.from_numpy(np.asarray(targets, dtype=np.int64)))


def shuffled_label_data(split: str, *, seed: int, index: int) -> TaskData:
    """Plain digits with labels permuted at random: the 'irrelevant' models' training data."""
    data = task_data(PRETRAIN_TASK, split, seed=seed)
    rng = np.random.default_rng(seed * 7919 + 104729 + index)
    return TaskData(x=data.x, y=data.y[torch.from_numpy(rng.permutation(len(data.y)))])
