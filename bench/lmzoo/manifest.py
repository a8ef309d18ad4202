"""``manifest.json`` of a built LM zoo: Hugging Face directories, side files, accuracies.

Field names follow the digits zoo's manifest where the benchmark reads them (``base``,
``tasks[t].model / second_moment / fisher / trajectory``, ``irrelevant``), so the REST driver
(``bench.quality_plan`` / ``bench.quality_steps``) serves both zoos; every ``model`` here is a
directory written by ``save_pretrained`` and ``adapter`` a PEFT adapter directory.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict

MANIFEST_NAME = "manifest.json"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True)


class LMTrajectoryEntry(_Frozen):
    step: int
    loss: float  # answer cross-entropy on 128 fixed train examples at this step
    model: str


class LMTaskEntry(_Frozen):
    """One task: its fine-tune (an HF directory), adapter, side files, trajectory, accuracies."""

    name: str
    model: str
    sharded: bool
    adapter: str
    second_moment: str
    fisher: str
    trajectory: list[LMTrajectoryEntry]
    # layer-input Grams on the task's train examples (regmean); None in zoos built before them
    gram: str | None = None
    # "finetune/<split>", "adapter/<split>", "base/<split>": exact match on this task
    accuracy: dict[str, float]


class LMIrrelevantEntry(_Frozen):
    """A fine-tune on shuffled answers: a distractor for fw's pool."""

    index: int
    model: str
    second_moment: str


class LMZooManifest(_Frozen):
    version: int = 1
    kind: str = "lm"
    seed: int
    config: dict[str, float | int | str]
    eval_sizes: dict[str, int]
    lora: dict[str, float | int]  # r, lora_alpha
    base: str
    base_accuracy: dict[str, float]
    tasks: dict[str, LMTaskEntry]
    irrelevant: list[LMIrrelevantEntry]

    @property
    def task_names(self) -> list[str]:
        return list(self.tasks)


def write_manifest(out_dir: Path, manifest: LMZooManifest) -> Path:
    path = out_dir / MANIFEST_NAME
    path.write_text(json.dumps(manifest.model_dump(), indent=2) + "\n")
    return path


def load_manifest(zoo_dir: Path | str) -> LMZooManifest:
    """Read an LM zoo's manifest; a missing one or a digits zoo is an error naming the folder."""
    path = Path(zoo_dir) / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"no LM zoo at {str(zoo_dir)!r}: {MANIFEST_NAME} missing "
            "(build one with `python -m bench.lmzoo.build --out DIR`)"
        )
    data = json.loads(path.read_text())
    if data.get("kind") != "lm":
        raise ValueError(
            f"the zoo at {str(zoo_dir)!r} is not an LM zoo (kind {data.get('kind')!r})"
        )
    return LMZooManifest.model_validate(data)
