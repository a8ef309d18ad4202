"""``DigitsEvaluator``: scores merged backbones of a built zoo (the ``digits`` evaluator).

``DigitsEvaluator(zoo_dir)`` or ``DigitsEvaluator.from_config({"zoo_dir": ...})``; with no
directory (how the ``ckreg.evaluators`` entry point is instantiated) it uses the default zoo
under the settings' home, building it on first use.

A merged state dict holds backbone tensors only; each task is scored through its own
fine-tuned head from the zoo (or through ``heads.<task>.*`` when the state dict carries one, as
merged trajectory checkpoints do). Choose hyperparameters on ``split="validation"`` (default);
report on ``split="test"``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from bench.zoo.data import SPLITS, TaskData, task_data
from bench.zoo.manifest import load_manifest, load_tensors
from bench.zoo.model import Params, accuracy, check_backbone, head_from, logits, mean_loss
from bench.zoo.train import diagonal_fisher

DEFAULT_PROXY_SIZE = 64
DEFAULT_FISHER_EXAMPLES = 256


def _subset(data: TaskData, size: int, seed: int) -> TaskData:
    order = torch.randperm(len(data.y), generator=torch.Generator().manual_seed(seed))[:size]
    return TaskData(x=data.x[order], y=data.y[order])


def _as_float(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", torch.float32) for k, v in state_dict.items()}


def default_zoo_dir() -> Path:
    """The zoo used when none is named (entry-point loading calls ``DigitsEvaluator()``):
    ``<settings.home>/zoo/digits-seed0``, built on first use (about a minute on 2 cores)."""
    from bench.zoo.build import ensure_zoo
    from registry.settings import get_settings

    settings = get_settings()
    return ensure_zoo(settings.zoo_dir or settings.home / "zoo" / "digits-seed0")


class DigitsObjective:
    """Sum over tasks of the mean cross-entropy on a small validation proxy set (for fw)."""

    def __init__(self, heads: Mapping[str, Params], proxies: Mapping[str, TaskData]) -> None:
        self.heads = dict(heads)
        self.proxies = dict(proxies)

    def loss(self, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Scalar loss of a backbone parameter dict; differentiable in ``params``."""
        check_backbone(params, source="objective params")
        reference = params["fc1.weight"]
        total = reference.new_zeros(())
        for task, data in self.proxies.items():
            head = {k: v.to(reference.device, reference.dtype) for k, v in self.heads[task].items()}
            x = data.x.to(reference.device, reference.dtype)
            total = total + mean_loss(params, head, x, data.y.to(reference.device))
        return total


class DigitsEntropy:
    """AdaMerging's objective: mean prediction entropy of every task head on unlabeled inputs
    (labels never read), summed over tasks; differentiable in the backbone parameters."""

    def __init__(self, heads: Mapping[str, Params], inputs: Mapping[str, torch.Tensor]) -> None:
        self.heads = dict(heads)
        self.inputs = dict(inputs)

    def loss(self, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        reference = params["fc1.weight"]
        total = reference.new_zeros(())
        for task, x in self.inputs.items():
            head = {k: v.to(reference.device, reference.dtype) for k, v in self.heads[task].items()}
            probs = torch.softmax(logits(params, head, x.to(reference.device, reference.dtype)), -1)
            total = total - (probs * probs.clamp_min(1e-12).log()).sum(-1).mean()
        return total


class DigitsEvaluator:
    """Per-task accuracy of a backbone on one split of a built zoo."""

    name = "digits"

    def __init__(
        self,
        zoo_dir: Path | str | None = None,
        *,
        split: str = "validation",
        tasks: Sequence[str] | None = None,
        proxy_size: int = DEFAULT_PROXY_SIZE,
        fisher_examples: int = DEFAULT_FISHER_EXAMPLES,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
        self.zoo_dir = Path(zoo_dir) if zoo_dir is not None else default_zoo_dir()
        self.manifest = load_manifest(self.zoo_dir)
        self.split = split
        self.tasks = list(tasks) if tasks is not None else self.manifest.task_names
        unknown = [t for t in self.tasks if t not in self.manifest.tasks]
        if unknown:
            raise KeyError(
                f"tasks {unknown} are not in the zoo at {str(self.zoo_dir)!r}; "
                f"it has {', '.join(self.manifest.task_names)}"
            )
        self.proxy_size = proxy_size
        self.fisher_examples = fisher_examples
        self.heads = {
            t: load_tensors(self.zoo_dir, self.manifest.tasks[t].head) for t in self.tasks
        }
        seed = self.manifest.seed
        self._data = {t: task_data(t, split, seed=seed) for t in self.tasks}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> DigitsEvaluator:
        """Build from a config dict: ``zoo_dir`` (required), ``split``, ``tasks``, ``proxy_size``."""
        if "zoo_dir" not in config:
            raise KeyError(f"digits evaluator config needs 'zoo_dir'; got keys {sorted(config)}")
        allowed = {"zoo_dir", "split", "tasks", "proxy_size", "fisher_examples"}
        extra = sorted(set(config) - allowed)
        if extra:
            raise KeyError(f"unknown digits evaluator options {extra}; allowed: {sorted(allowed)}")
        options = {k: v for k, v in config.items() if k != "zoo_dir"}
        return cls(config["zoo_dir"], **options)

    def _head(self, state_dict: Params, task: str) -> Params:
        return head_from(state_dict, task) or self.heads[task]

    def evaluate(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, float]:
        """``accuracy/<task>``, ``accuracy/avg`` and, against each task's own fine-tune on this
        split, ``normalized_accuracy/<task>`` and ``normalized_accuracy/avg``."""
        params = _as_float(state_dict)
        check_backbone(params)
        metrics: dict[str, float] = {}
        for task in self.tasks:
            data = self._data[task]
            metrics[f"accuracy/{task}"] = accuracy(params, self._head(params, task), data.x, data.y)
            reference = self.manifest.tasks[task].accuracy.get(f"finetune/{self.split}")
            if reference:
                metrics[f"normalized_accuracy/{task}"] = metrics[f"accuracy/{task}"] / reference
        for kind in ("accuracy", "normalized_accuracy"):
            values = [metrics[f"{kind}/{t}"] for t in self.tasks if f"{kind}/{t}" in metrics]
            if values:
                metrics[f"{kind}/avg"] = sum(values) / len(values)
        return metrics

    def per_example(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per task, 1.0 where an example of this split is classified right, else 0.0."""
        params = _as_float(state_dict)
        check_backbone(params)
        out = {}
        with torch.no_grad():
            for task in self.tasks:
                data = self._data[task]
                scores = logits(params, self._head(params, task), data.x)
                out[task] = (scores.argmax(-1) == data.y).float()
        return out

    def objective(self) -> DigitsObjective:
        """Task losses on ``proxy_size`` validation examples per task (never the test split)."""
        seed = self.manifest.seed
        proxies = {
            t: _subset(task_data(t, "validation", seed=seed), self.proxy_size, seed)
            for t in self.tasks
        }
        return DigitsObjective(self.heads, proxies)

    def unlabeled_objective(self) -> DigitsEntropy:
        """Prediction entropy on ``proxy_size`` unlabeled validation inputs per task (adamerging)."""
        seed = self.manifest.seed
        inputs = {
            t: _subset(task_data(t, "validation", seed=seed), self.proxy_size, seed).x
            for t in self.tasks
        }
        return DigitsEntropy(self.heads, inputs)

    def gram_probe(self) -> Any:
        """Layer-input Grams of a backbone on each task's train inputs (regmean_plusplus)."""
        from bench.zoo.grams import DigitsGramProbe

        return DigitsGramProbe(self.manifest.seed)

    def feature_probe(self) -> Any:
        """Backbone activations on this split's inputs of every task (pleas, ot_fusion)."""
        from bench.zoo.multi_init import DigitsFeatureProbe

        return DigitsFeatureProbe(torch.cat([self._data[t].x for t in self.tasks]))

    def fisher(
        self, state_dict: Mapping[str, torch.Tensor], *, task: str | None = None
    ) -> dict[str, torch.Tensor]:
        """Diagonal Fisher of the backbone on train examples of ``task`` (default: the mean over
        this evaluator's tasks), keyed like the backbone."""
        params = _as_float(state_dict)
        check_backbone(params)
        backbone = {k: v for k, v in params.items() if not k.startswith("heads.")}
        tasks = [task] if task is not None else self.tasks
        total: dict[str, torch.Tensor] = {}
        for name in tasks:
            if name not in self.manifest.tasks:
                raise KeyError(f"task {name!r} is not in the zoo at {str(self.zoo_dir)!r}")
            head = (
                self._head(params, name)
                if name in self.heads
                else load_tensors(self.zoo_dir, self.manifest.tasks[name].head)
            )
            train = _subset(
                task_data(name, "train", seed=self.manifest.seed), self.fisher_examples, 0
            )
            for key, value in diagonal_fisher(backbone, head, train.x).items():
                total[key] = total.get(key, 0) + value / len(tasks)
        return total
