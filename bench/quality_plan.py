"""What the merge-quality benchmark asks of the registry: policies, and the zoo registered over REST.

Policies are declared before the task fine-tunes land, so the ``on_register`` ones (linear,
task_arithmetic, ties and the continual opcm fold) merge as checkpoints arrive; the rest are
``manual`` policies started with ``POST /policies/{id}/run``. Every policy evaluates its merges
with the ``digits`` evaluator (validation split). Checkpoint tags keep the selectors apart:
``zoo-task`` (the task fine-tunes), ``pool`` (task fine-tunes + irrelevant models, for fw),
``trajectory`` (one training run per task, for mwa); the LM zoo adds ``zoo-adapter`` (its LoRA
adapters, merged as full weights when the policy names the base, as adapters when it does not).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from bench.quality_registry import Registry, cli_register
from bench.zoo.manifest import ZooManifest

ON_REGISTER = ("linear", "task_arithmetic", "ties")
MANUAL = ("dare_ties", "fisher", "consensus", "ota", "ota_ffg", "fw")
POOL = ("task_arithmetic", "fw")
EVALUATOR = "digits"


@dataclass
class PolicyPlan:
    """One policy the benchmark creates: its body for ``POST /policies`` and its table row."""

    key: str  # the table's method label (``ties``, ``fw+8irrelevant``, ``mwa:rot90``, ...)
    body: dict[str, Any]
    id: int | None = None

    @property
    def on_register(self) -> bool:
        return self.body["trigger"] == "on_register"


@dataclass
class Registered:
    """Ids of the zoo's checkpoints in the registry."""

    base: int
    tasks: dict[str, int] = field(default_factory=dict)
    irrelevant: list[int] = field(default_factory=list)
    trajectories: dict[str, list[int]] = field(default_factory=dict)
    adapters: dict[str, int] = field(default_factory=dict)


def _policy(
    label: str,
    key: str,
    method: str,
    params: Mapping[str, Any],
    selector: dict[str, Any],
    trigger: str = "manual",
    evaluator: str = EVALUATOR,
) -> PolicyPlan:
    body = {
        # MLflow refuses ':' in model names, and merged checkpoints are named after the policy.
        "name": f"{label}-{key.replace(':', '-')}",
        "method": method,
        "params": dict(params),
        "selector": selector,
        "trigger": trigger,
        "evaluator": evaluator,
    }
    return PolicyPlan(key=key, body=body)


def multitask_policies(
    *,
    label: str,
    base_id: int,
    chosen: Mapping[str, Mapping[str, Any]],
    n_irrelevant: int,
    evaluator: str = EVALUATOR,
) -> list[PolicyPlan]:
    """Policies for the multitask rows and the continual opcm fold, with validation-chosen params.

    ``chosen`` maps a row label of ``bench.zoo.quality`` (``ties``, ``fw+8irrelevant``, ``opcm``)
    to its params; methods missing from it are skipped.
    """
    tasks = {"base_id": base_id, "tags": ["zoo-task"]}
    plans = [
        _policy(
            label,
            m,
            m,
            chosen[m],
            tasks,
            "on_register" if m in ON_REGISTER else "manual",
            evaluator,
        )
        for m in (*ON_REGISTER, *MANUAL)
        if m in chosen
    ]
    for method in POOL:
        key = f"{method}+{n_irrelevant}irrelevant"
        if key in chosen:
            pool = {"base_id": base_id, "tags": ["pool"]}
            plans.append(_policy(label, key, method, chosen[key], pool, evaluator=evaluator))
    if "opcm" in chosen:
        fold = tasks | {"window": "all_since_last_fold"}
        plans.append(_policy(label, "opcm", "opcm", chosen["opcm"], fold, "on_register", evaluator))
    return plans


def adapter_policies(
    *,
    label: str,
    base_id: int,
    chosen: Mapping[str, Mapping[str, Any]],
    merges: Iterable[tuple[str, str, str]],
    evaluator: str = EVALUATOR,
) -> list[PolicyPlan]:
    """Manual policies over the ``zoo-adapter`` checkpoints: ``merges`` are (row label, method,
    lora mode); a ``full`` merge names the base (the flows merge base + B·A), a ``factors``
    one does not (the flows merge the adapters' factors into an adapter)."""
    plans = []
    for key, method, mode in merges:
        if key in chosen:
            selector: dict[str, Any] = {"tags": ["zoo-adapter"]}
            if mode == "full":
                selector["base_id"] = base_id
            plans.append(_policy(label, key, method, chosen[key], selector, evaluator=evaluator))
    return plans


def trajectory_policies(
    *,
    label: str,
    manifest: ZooManifest,
    mwa_params: Mapping[str, Any],
    evaluator: str = EVALUATOR,
) -> list[PolicyPlan]:
    """Per task: mwa (loss-weighted) and the uniform average over its training run's checkpoints."""
    plans = []
    for task, entry in manifest.tasks.items():
        selector = {
            "run": f"{label}-{task}",
            "tags": ["trajectory"],
            "window": "last_k_of_run",
            "k": len(entry.trajectory),
        }
        plans.append(
            _policy(label, f"mwa:{task}", "mwa", mwa_params, selector, evaluator=evaluator)
        )
        plans.append(_policy(label, f"uniform:{task}", "linear", {}, selector, evaluator=evaluator))
    return plans


def create_policies(registry: Registry, plans: Iterable[PolicyPlan]) -> None:
    """``POST /policies`` for each plan, recording its id."""
    for plan in plans:
        plan.id = int(registry.create_policy(**plan.body)["id"])


def register_base(registry: Registry, zoo_dir: Path, manifest: ZooManifest, label: str) -> int:
    """The pretrained backbone as a ``base`` checkpoint; returns its id."""
    checkpoint = registry.register(
        zoo_dir / manifest.base, name=f"{label}-base", kind="base", tags=["zoo"], progress=False
    )
    return int(checkpoint["id"])


def register_tasks(
    registry: Registry,
    zoo_dir: Path,
    manifest: ZooManifest,
    ids: Registered,
    *,
    label: str,
    after_each: Callable[[str, int], None],
    cli: int = 0,
) -> None:
    """Task fine-tunes one at a time (weights, second moment, Fisher); ``after_each(task, id)``
    waits for the automatic merges the arrival triggers. The first ``cli`` are registered with
    the ``ckreg register`` command, as a user would; the rest with the Python client it wraps
    (the same requests, without a process start per checkpoint)."""
    for i, (task, entry) in enumerate(
        tqdm(manifest.tasks.items(), desc="register tasks", unit="ckpt")
    ):
        options: dict[str, Any] = {
            "name": f"{label}-{task}",
            "base_id": ids.base,
            "task": task,
            "tags": ["zoo", "zoo-task", "pool"],
            "second_moment": zoo_dir / entry.second_moment,
        }
        if i < cli:
            checkpoint_id = cli_register(registry, zoo_dir / entry.model, **options)
        else:
            checkpoint_id = int(
                registry.register(zoo_dir / entry.model, progress=False, **options)["id"]
            )
        registry.upload_artifact(checkpoint_id, zoo_dir / entry.fisher, "fisher", progress=False)
        ids.tasks[task] = checkpoint_id
        after_each(task, checkpoint_id)


def register_adapters(
    registry: Registry,
    zoo_dir: Path,
    manifest: Any,
    ids: Registered,
    *,
    label: str,
    cli: int = 0,
) -> None:
    """Each task's PEFT LoRA directory as an ``adapter`` checkpoint of the base (the first
    ``cli`` with ``ckreg register``)."""
    for i, (task, entry) in enumerate(
        tqdm(manifest.tasks.items(), desc="register adapters", unit="ckpt")
    ):
        options: dict[str, Any] = {
            "name": f"{label}-lora-{task}",
            "base_id": ids.base,
            "task": task,
            "tags": ["zoo", "zoo-adapter"],
        }
        if i < cli:
            checkpoint_id = cli_register(registry, zoo_dir / entry.adapter, **options)
        else:
            checkpoint_id = int(
                registry.register(zoo_dir / entry.adapter, progress=False, **options)["id"]
            )
        ids.adapters[task] = checkpoint_id


def register_irrelevant(
    registry: Registry, zoo_dir: Path, manifest: ZooManifest, ids: Registered, *, label: str
) -> None:
    """Shuffled-label fine-tunes (each its own nonsense task) for fw's pool."""
    for entry in tqdm(manifest.irrelevant, desc="register irrelevant", unit="ckpt"):
        checkpoint = registry.register(
            zoo_dir / entry.model,
            name=f"{label}-shuffled-{entry.index}",
            base_id=ids.base,
            task=f"shuffled-{entry.index}",
            tags=["zoo", "irrelevant", "pool"],
            second_moment=zoo_dir / entry.second_moment,
            progress=False,
        )
        ids.irrelevant.append(int(checkpoint["id"]))


def register_trajectories(
    registry: Registry, zoo_dir: Path, manifest: ZooManifest, ids: Registered, *, label: str
) -> None:
    """Each task's saved fine-tuning checkpoints as run ``<label>-<task>`` with step and loss.

    They carry the step's head (``heads.<task>.*``) besides the backbone, so they name no base
    (the registry checks every tensor against a declared base).
    """
    points = [(t, p) for t, e in manifest.tasks.items() for p in e.trajectory]
    for task, point in tqdm(points, desc="register trajectories", unit="ckpt"):
        checkpoint = registry.register(
            zoo_dir / point.model,
            name=f"{label}-{task}-step{point.step}",
            task=task,
            run=f"{label}-{task}",
            step=point.step,
            tags=["zoo", "trajectory"],
            metrics={"loss": point.loss},
            progress=False,
        )
        ids.trajectories.setdefault(task, []).append(int(checkpoint["id"]))
