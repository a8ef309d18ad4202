"""Scoring the registry's merged checkpoints for the merge-quality table.

Merged weights are downloaded over REST (``GET /checkpoints/{id}/files/{name}``) and scored on
the zoo's TEST split here, with ``DigitsEvaluator(split="test")``; the flows already scored each
merge on the VALIDATION split (the policies' ``digits`` evaluator) and stored that as metrics,
which fill the table's ``val_avg`` column.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from bench.quality_registry import Registry
from bench.zoo.evaluator import DigitsEvaluator
from bench.zoo.loaded import Row

StateDict = dict[str, torch.Tensor]


class OutputScorer:
    """Downloads merged checkpoints once and scores them on test; reads their validation metrics."""

    def __init__(
        self,
        registry: Registry,
        zoo_dir: Path,
        tasks: Sequence[str],
        evaluator: Callable[..., Any] = DigitsEvaluator,
    ) -> None:
        """``evaluator(zoo_dir, split=..., tasks=...)`` builds the zoo's evaluator (digits or
        ``bench.lmzoo``'s ``LMTasksEvaluator``)."""
        self.registry = registry
        self.test = evaluator(zoo_dir, split="test")
        self.per_task = {t: evaluator(zoo_dir, split="test", tasks=[t]) for t in tasks}
        self._tmp = tempfile.TemporaryDirectory(prefix="ckreg-mq-")
        self._states: dict[int, StateDict] = {}

    def close(self) -> None:
        self._tmp.cleanup()

    def state(self, checkpoint_id: int) -> StateDict:
        """The checkpoint's tensors (every ``*.safetensors`` file it holds), fetched over REST."""
        if checkpoint_id not in self._states:
            checkpoint = self.registry.get_checkpoint(checkpoint_id)
            folder = Path(self._tmp.name) / str(checkpoint_id)
            folder.mkdir()
            state: StateDict = {}
            for file in checkpoint["files"]:
                if file["name"].endswith(".safetensors"):
                    path = self.registry.download_file(
                        checkpoint_id, file["name"], folder, progress=False
                    )
                    state |= load_file(str(path))
            if not state:
                raise ValueError(f"checkpoint {checkpoint_id} has no safetensors weights")
            self._states[checkpoint_id] = state
        return self._states[checkpoint_id]

    def test_metrics(self, checkpoint_id: int) -> dict[str, float]:
        """Per-task test accuracy (and normalised accuracy) of a merged backbone."""
        return self.test.evaluate(self.state(checkpoint_id))

    def validation(self, checkpoint_id: int, name: str = "accuracy/avg") -> float | None:
        """The flows' evaluation metric ``name`` (validation split) of a checkpoint, if stored."""
        found = [
            m
            for m in self.registry.metrics(checkpoint_id)
            if m["name"] == name and m["source"] == "evaluation"
        ]
        return float(found[-1]["value"]) if found else None

    def per_task_rows(
        self, section: str, method: str, outputs: Mapping[str, int], params: dict[str, Any]
    ) -> Row:
        """One row from one merged checkpoint per task (trajectory merges), each scored on its task."""
        test: dict[str, float] = {}
        val: list[float] = []
        for task, checkpoint_id in outputs.items():
            metrics = self.per_task[task].evaluate(self.state(checkpoint_id))
            test[f"accuracy/{task}"] = metrics[f"accuracy/{task}"]
            test[f"normalized_accuracy/{task}"] = metrics[f"normalized_accuracy/{task}"]
            stored = self.validation(checkpoint_id, f"accuracy/{task}")
            if stored is not None:
                val.append(stored)
        for kind in ("accuracy", "normalized_accuracy"):
            test[f"{kind}/avg"] = _mean([test[f"{kind}/{t}"] for t in outputs])
        validation = _mean(val) if len(val) == len(outputs) else None
        return Row(section, method, params, validation, test)

    def continual_row(
        self,
        method: str,
        steps: Sequence[int | StateDict],
        tasks: Sequence[str],
        params: dict[str, Any],
    ) -> Row:
        """Final test metrics plus ``continual/seen_avg`` (mean over arrival steps of the average
        accuracy on the tasks seen so far); a step is a checkpoint id or a state dict."""
        seen: list[float] = []
        metrics: dict[str, float] = {}
        for t, step in enumerate(steps, start=1):
            state = self.state(step) if isinstance(step, int) else step
            metrics = self.test.evaluate(state)
            seen.append(_mean([metrics[f"accuracy/{task}"] for task in tasks[:t]]))
        last = steps[-1]
        validation = self.validation(last) if isinstance(last, int) else None
        return Row(
            "continual", method, params, validation, metrics | {"continual/seen_avg": _mean(seen)}
        )


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)
