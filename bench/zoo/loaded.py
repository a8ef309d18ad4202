"""A built zoo loaded into memory, and the result rows its quality tables are made of."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bench.zoo.manifest import ZooManifest, load_manifest, load_tensors

StateDict = dict[str, torch.Tensor]


@dataclass
class Zoo:
    """A built zoo's models in memory."""

    manifest: ZooManifest
    base: StateDict
    tasks: dict[str, StateDict]
    second_moments: dict[str, StateDict]
    fishers: dict[str, StateDict]
    irrelevant: list[StateDict]
    irrelevant_second_moments: list[StateDict]


def load_zoo(zoo_dir: Path | str) -> Zoo:
    """Read every model of the zoo (a few MB) into memory."""
    manifest = load_manifest(zoo_dir)
    tasks = manifest.tasks
    return Zoo(
        manifest=manifest,
        base=load_tensors(zoo_dir, manifest.base),
        tasks={t: load_tensors(zoo_dir, e.model) for t, e in tasks.items()},
        second_moments={t: load_tensors(zoo_dir, e.second_moment) for t, e in tasks.items()},
        fishers={t: load_tensors(zoo_dir, e.fisher) for t, e in tasks.items()},
        irrelevant=[load_tensors(zoo_dir, e.model) for e in manifest.irrelevant],
        irrelevant_second_moments=[
            load_tensors(zoo_dir, e.second_moment) for e in manifest.irrelevant
        ],
    )


@dataclass
class Row:
    """One line of the results table: chosen params, validation score, test metrics."""

    section: str
    method: str
    params: dict[str, Any] = field(default_factory=dict)
    validation: float | None = None
    test: dict[str, float] = field(default_factory=dict)
