"""``LMTasksEvaluator``: exact-match accuracy per task of a merged LM (the ``lm_tasks`` evaluator).

``LMTasksEvaluator(zoo_dir, split=...)``; with no directory (how the ``ckreg.evaluators`` entry
point is instantiated) it reads the zoo from ``CKREG_ZOO_DIR`` (``Settings.zoo_dir``), which the
benchmark sets for the registry it starts. A state dict is scored as saved by
``save_pretrained`` (tied head left out); one holding LoRA factors (a merged adapter) is applied
to the zoo's base first. Accuracy is exact match of greedy decoding on held-out prompts of the
split (see ``bench.lmzoo.model.exact_match``); choose hyperparameters on ``validation``, report
``test``. ``normalized_accuracy/<task>`` divides by the task's own fine-tune on the same split.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from bench.lmzoo.manifest import LMZooManifest, load_manifest
from bench.lmzoo.model import Batch, batch, exact_match, load_weights, new_model
from bench.lmzoo.tasks import BOS, PAD, TOKEN_ID, encode, examples
from bench.lmzoo.train import diagonal_fisher

StateDict = dict[str, torch.Tensor]
PEFT_PREFIX = "base_model.model."


def load_hf_dir(folder: Path | str) -> StateDict:
    """Every ``*.safetensors`` tensor of a folder (single file, shards or adapter weights)."""
    state: StateDict = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        state |= load_file(str(path))
    if not state:
        raise FileNotFoundError(f"no safetensors weights in {str(folder)!r}")
    return state


def apply_lora(
    state: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor], scale: float
) -> StateDict:
    """Full weights from LoRA factors: base + scale·B·A for every adapted weight."""
    full = {k: v.float().clone() for k, v in base.items()}
    for key, lora_a in state.items():
        if ".lora_A." not in key:
            continue
        target = key.split(".lora_A.")[0].removeprefix(PEFT_PREFIX) + ".weight"
        lora_b = state[key.replace(".lora_A.", ".lora_B.")]
        if target not in full:
            raise KeyError(f"LoRA factor {key!r} adapts {target!r}, which the base does not have")
        full[target] += scale * (lora_b.float() @ lora_a.float())
    return full


class LMObjective:
    """Sum over tasks of the answer cross-entropy on a few validation prompts (for fw)."""

    def __init__(self, model: torch.nn.Module, proxies: Mapping[str, Batch]) -> None:
        self.model = model
        self.proxies = dict(proxies)

    def loss(self, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Differentiable in ``params`` (the saved weights; the tied head follows the embedding)."""
        tensors = dict(params)
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
        total = next(iter(tensors.values())).new_zeros(())
        for data in self.proxies.values():
            total = total + _functional_loss(self.model, tensors, data)
        return total


class LMEntropy:
    """AdaMerging's objective on the LM zoo: mean entropy of the next-token distribution at the
    end of each unlabeled prompt (where the answer starts; answers are never read), summed over
    tasks; differentiable in ``params`` through ``torch.func.functional_call``."""

    def __init__(self, model: torch.nn.Module, prompts: Mapping[str, Batch]) -> None:
        self.model = model
        self.prompts = dict(prompts)

    def loss(self, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        from torch.func import functional_call

        tensors = dict(params)
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
        total = next(iter(tensors.values())).new_zeros(())
        for data in self.prompts.values():
            kwargs = {"input_ids": data.input_ids, "attention_mask": data.attention_mask}
            logits = functional_call(self.model, tensors, args=(), kwargs=kwargs, strict=False)
            last = data.attention_mask.sum(1) - 1  # each prompt's last token
            logp = torch.log_softmax(logits.logits[torch.arange(len(last)), last], -1)
            total = total - (logp.exp() * logp).sum(-1).mean()
        return total


def prompt_batch(prompts: Sequence[str]) -> Batch:
    """``<s> prompt`` per prompt, right-padded (labels unused: all IGNORE)."""
    rows = [[TOKEN_ID[BOS], *encode(p)] for p in prompts]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), TOKEN_ID[PAD], dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return Batch(ids, mask, torch.full_like(ids, -100))


def _functional_loss(model: torch.nn.Module, tensors: StateDict, data: Batch) -> torch.Tensor:
    from torch.func import functional_call

    logits = functional_call(
        model,
        tensors,
        args=(),
        kwargs={"input_ids": data.input_ids, "attention_mask": data.attention_mask},
        strict=False,
    ).logits
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1), data.labels[:, 1:].flatten(), ignore_index=-100
    )


def default_zoo_dir() -> Path:
    """``CKREG_ZOO_DIR`` when it holds an LM zoo (entry-point loading passes no directory)."""
    from registry.settings import get_settings

    zoo_dir = get_settings().zoo_dir
    if zoo_dir is None:
        raise RuntimeError("the lm_tasks evaluator needs CKREG_ZOO_DIR pointing at a built LM zoo")
    return Path(zoo_dir)


class LMTasksEvaluator:
    """Per-task exact-match accuracy of an LM zoo model on one split."""

    name = "lm_tasks"

    def __init__(
        self,
        zoo_dir: Path | str | None = None,
        *,
        split: str = "validation",
        tasks: Sequence[str] | None = None,
        proxy_size: int = 16,
        fisher_examples: int = 16,
    ) -> None:
        self.zoo_dir = Path(zoo_dir) if zoo_dir is not None else default_zoo_dir()
        self.manifest: LMZooManifest = load_manifest(self.zoo_dir)
        if split not in self.manifest.eval_sizes:
            raise ValueError(
                f"unknown split {split!r}; expected one of {sorted(self.manifest.eval_sizes)}"
            )
        self.split = split
        self.tasks = list(tasks) if tasks is not None else self.manifest.task_names
        unknown = [t for t in self.tasks if t not in self.manifest.tasks]
        if unknown:
            raise KeyError(f"tasks {unknown} are not in the LM zoo at {str(self.zoo_dir)!r}")
        self.proxy_size, self.fisher_examples = proxy_size, fisher_examples
        from transformers import AutoConfig

        self.base = load_hf_dir(self.zoo_dir / self.manifest.base)
        self.model = new_model(AutoConfig.from_pretrained(self.zoo_dir / self.manifest.base), 0)
        self.lora_scale = float(self.manifest.lora["lora_alpha"]) / float(self.manifest.lora["r"])
        n, seed = self.manifest.eval_sizes[split], self.manifest.seed
        # at_most: a task with fewer distinct inputs in the split gives them all (count)
        self._data = {
            t: batch(examples(t, split, n=n, seed=seed, at_most=True)) for t in self.tasks
        }

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> LMTasksEvaluator:
        if "zoo_dir" not in config:
            raise KeyError(f"lm_tasks evaluator config needs 'zoo_dir'; got keys {sorted(config)}")
        return cls(config["zoo_dir"], **{k: v for k, v in config.items() if k != "zoo_dir"})

    def full_weights(self, state_dict: Mapping[str, torch.Tensor]) -> StateDict:
        """The state as full weights (a merged adapter is applied to the zoo's base)."""
        if any(".lora_A." in k for k in state_dict):
            return apply_lora(state_dict, self.base, self.lora_scale)
        return {k: v.detach().float() for k, v in state_dict.items() if k != "lm_head.weight"}

    def per_example(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per task, 1.0/0.0 per held-out prompt (for bootstrap intervals)."""
        model = load_weights(self.model, self.full_weights(state_dict))
        return {t: exact_match(model, data) for t, data in self._data.items()}

    def evaluate(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, float]:
        """``accuracy/<task>``, ``accuracy/avg``, ``normalized_accuracy/<task>`` and ``/avg``."""
        metrics: dict[str, float] = {}
        for task, hits in self.per_example(state_dict).items():
            metrics[f"accuracy/{task}"] = float(hits.mean())
            reference = self.manifest.tasks[task].accuracy[f"finetune/{self.split}"]
            floor = 1.0 / len(hits)  # a fine-tune that solves nothing counts as one prompt
            metrics[f"normalized_accuracy/{task}"] = metrics[f"accuracy/{task}"] / max(
                reference, floor
            )
        for kind in ("accuracy", "normalized_accuracy"):
            values = [metrics[f"{kind}/{t}"] for t in self.tasks if f"{kind}/{t}" in metrics]
            if values:
                metrics[f"{kind}/avg"] = sum(values) / len(values)
        return metrics

    def objective(self) -> LMObjective:
        """Answer losses on ``proxy_size`` validation prompts per task (never the test split)."""
        seed = self.manifest.seed
        proxies = {
            t: batch(examples(t, "validation", n=self.proxy_size, seed=seed + 7))
            for t in self.tasks
        }
        return LMObjective(self.model, proxies)

    def unlabeled_objective(self) -> LMEntropy:
        """Prediction entropy on ``proxy_size`` unlabeled validation prompts per task
        (adamerging); the prompts are drawn as ``objective()``'s, answers dropped."""
        seed = self.manifest.seed
        prompts = {
            t: prompt_batch(
                [p for p, _ in examples(t, "validation", n=self.proxy_size, seed=seed + 7)]
            )
            for t in self.tasks
        }
        return LMEntropy(self.model, prompts)

    def gram_probe(self) -> Any:
        """Layer-input Grams of given parameters on each task's train prompts (regmean_plusplus)."""
        from bench.lmzoo.grams import LMGramProbe

        return LMGramProbe(self.model, self.manifest.seed)

    def fisher(
        self, state_dict: Mapping[str, torch.Tensor], *, task: str | None = None
    ) -> StateDict:
        """Empirical diagonal Fisher on train prompts of ``task`` (default: mean over tasks)."""
        model = load_weights(self.model, self.full_weights(state_dict))
        tasks = [task] if task is not None else self.tasks
        total: StateDict = {}
        for name in tasks:
            data = batch(
                examples(name, "train", n=self.fisher_examples, seed=self.manifest.seed + 1)
            )
            for key, value in diagonal_fisher(model, data).items():
                total[key] = total.get(key, 0) + value / len(tasks)
        return total
