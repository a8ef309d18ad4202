"""``lm_eval``: score a merged causal LM with EleutherAI's lm-evaluation-harness, offline.

https://github.com/EleutherAI/lm-evaluation-harness (``pip install -c constraints.txt
'.[lmeval]'``). Evaluators are chosen by name only (``--evaluator lm_eval``), so this one reads
its settings from a server-side file, ``$CKREG_HOME/evaluators/lm_eval.yaml``
(:class:`LMEvalConfig`): the HF folder giving the architecture and tokenizer (``model_dir``),
the folder of task YAMLs (``include_path``, each with a local ``dataset_path: json`` +
``data_files``), the task names and limits. Only those local tasks are indexed (lm_eval's own
catalogue is not) and the Hugging Face hub is switched off (``HF_HUB_OFFLINE=1``).

Metrics are ``lm_eval/<task>/<metric>`` (``/<filter>`` appended unless it is ``none``) plus
``lm_eval/avg``, the mean of each task's first metric, which ranks merged versions.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

CONFIG_NAME = "evaluators/lm_eval.yaml"
PREFIX = "lm_eval"


class LMEvalConfig(BaseModel):
    """What ``lm_eval`` runs: local tasks on weights shaped like ``model_dir``'s config."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model_dir: Path = Field(description="HF folder with config.json and the tokenizer files")
    include_path: Path = Field(description="folder of lm_eval task YAMLs (local data only)")
    tasks: list[str] = Field(min_length=1)
    limit: int | None = Field(default=None, gt=0, description="examples per task (all if unset)")
    num_fewshot: int | None = Field(default=None, ge=0)
    batch_size: int = Field(default=8, gt=0)
    seed: int = 0

    @field_validator("model_dir", "include_path")
    @classmethod
    def _existing_folder(cls, value: Path) -> Path:
        if not value.is_dir():
            raise ValueError(f"{str(value)!r} is not a folder")
        return value


def config_path() -> Path:
    """Where the flows' evaluator reads its settings: ``<CKREG_HOME>/evaluators/lm_eval.yaml``."""
    from flows.runtime import current_runtime

    return current_runtime().settings.home.resolve() / CONFIG_NAME


def load_config(path: Path) -> LMEvalConfig:
    """The config at ``path``; relative folders in it are taken relative to the file."""
    if not path.is_file():
        raise FileNotFoundError(
            f"the lm_eval evaluator needs its settings in {str(path)!r} "
            "(model_dir, include_path, tasks; see docs/lm-eval.md)"
        )
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{str(path)!r} must hold a mapping, got {type(raw).__name__}")
    for key in ("model_dir", "include_path"):
        if key in raw and not Path(str(raw[key])).is_absolute():
            raw[key] = path.parent / str(raw[key])
    return LMEvalConfig.model_validate(raw)


class LMEvalEvaluator:
    """The ``lm_eval`` evaluator: lm-evaluation-harness tasks on a merged state dict."""

    name = "lm_eval"
    primary_metric = f"{PREFIX}/avg"
    higher_is_better = True

    def __init__(self, config: LMEvalConfig | None = None) -> None:
        # Without a config (entry-point loading) it is read at each evaluation, so a new file
        # takes effect without restarting the worker.
        self._config = config

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> LMEvalEvaluator:
        return cls(LMEvalConfig.model_validate(dict(config)))

    @property
    def config(self) -> LMEvalConfig:
        return self._config if self._config is not None else load_config(config_path())

    def evaluate(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, float]:
        """``lm_eval/<task>/<metric>`` for every task and metric, and ``lm_eval/avg``."""
        config = self.config
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        model, tokenizer = build_model(config.model_dir, state_dict)
        results = run_tasks(config, model, tokenizer)
        return flatten_results(results, config.tasks)

    def objective(self) -> Any:
        raise NotImplementedError(
            "the lm_eval evaluator scores models only; methods that need an objective (fw) "
            "need an evaluator that provides one (e.g. lm_tasks)"
        )

    def fisher(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError(
            "the lm_eval evaluator has no Fisher estimate; register second moments or Fisher "
            "artifacts with the fine-tunes, or use an evaluator that estimates it"
        )


def build_model(model_dir: Path, state_dict: Mapping[str, torch.Tensor]) -> tuple[Any, Any]:
    """A causal LM of ``model_dir``'s architecture holding ``state_dict``, and its tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if any(".lora_A." in key for key in state_dict):
        raise ValueError(
            "the lm_eval evaluator scores full weights; this state holds LoRA factors "
            "(merge adapters with a base to score them)"
        )
    config = AutoConfig.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_config(config).float().eval()
    missing, unexpected = model.load_state_dict(
        {k: v.float() for k, v in state_dict.items()}, strict=False
    )
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise ValueError(
            f"weights do not fit the architecture of {str(model_dir)!r}: "
            f"missing {sorted(set(missing) - tied)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    if tied:
        model.tie_weights()
    return model, AutoTokenizer.from_pretrained(model_dir)


def run_tasks(config: LMEvalConfig, model: Any, tokenizer: Any) -> dict[str, dict[str, Any]]:
    """lm_eval's ``results`` per task for ``config.tasks`` found under ``config.include_path``."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(config.include_path), include_defaults=False)
    unknown = [t for t in config.tasks if t not in manager.all_tasks]
    if unknown:
        raise KeyError(
            f"lm_eval tasks {unknown} not found under {str(config.include_path)!r}; "
            f"available: {', '.join(sorted(manager.all_tasks)) or '(none)'}"
        )
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=config.batch_size, device="cpu")
    output = lm_eval.simple_evaluate(
        model=lm,
        tasks=list(config.tasks),
        task_manager=manager,
        num_fewshot=config.num_fewshot,
        limit=config.limit,
        log_samples=False,
        bootstrap_iters=0,  # no stderr: the registry keeps point values
        random_seed=config.seed,
        numpy_random_seed=config.seed,
        torch_random_seed=config.seed,
        fewshot_random_seed=config.seed,
    )
    if output is None:
        raise RuntimeError("lm_eval returned no results")
    return dict(output["results"])


def flatten_results(results: Mapping[str, Mapping[str, Any]], tasks: list[str]) -> dict[str, float]:
    """``{"copy": {"acc,none": 0.5, ...}}`` -> ``{"lm_eval/copy/acc": 0.5, ...}`` + ``/avg``."""
    metrics: dict[str, float] = {}
    firsts: list[float] = []
    for task in tasks:
        found = False
        for key, value in results.get(task, {}).items():
            if "," not in key or "_stderr" in key or not isinstance(value, int | float):
                continue
            metric, _, filter_name = key.partition(",")
            name = f"{PREFIX}/{task}/{metric}" + (
                "" if filter_name == "none" else f"/{filter_name}"
            )
            metrics[name] = float(value)
            if not found:
                firsts.append(float(value))
                found = True
        if not found:
            raise KeyError(
                f"lm_eval gave no metric for task {task!r}: {dict(results.get(task, {}))}"
            )
    metrics[f"{PREFIX}/avg"] = sum(firsts) / len(firsts)
    return metrics
