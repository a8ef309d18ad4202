"""The merge-quality benchmark's run against the registry, and the rows scored from it.

``Drive.run`` registers the base, declares the policies, lets the task fine-tunes arrive one at
a time (waiting for the automatic merges each arrival triggers), registers the irrelevant
models and the training trajectories, starts the manual policies and waits for every run.
``score_rows`` turns the policies' merged checkpoints into table rows.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from bench import quality_plan as plan
from bench.quality_eval import OutputScorer
from bench.quality_registry import TERMINAL, Registry, all_finished
from bench.zoo.loaded import Row
from bench.zoo.manifest import ZooManifest, load_tensors


class Drive:
    """One benchmark run against a registry; checkpoint ids and policies land on it."""

    def __init__(
        self,
        registry: Registry,
        zoo_dir: Path,
        manifest: ZooManifest,
        timeout_s: float,
        log: Callable[[str], None],
        *,
        evaluator: str = plan.EVALUATOR,
        cli: int = 0,
        adapter_merges: Sequence[tuple[str, str, str]] = (),
    ) -> None:
        """``evaluator``: the policies' evaluator; ``cli``: how many task fine-tunes and
        adapters to register with ``ckreg register``; ``adapter_merges``: (row, method, lora mode) policies
        over the zoo's LoRA adapters (the LM zoo)."""
        self.evaluator, self.cli, self.adapter_merges = evaluator, cli, tuple(adapter_merges)
        self.registry = registry
        self.zoo_dir = zoo_dir
        self.manifest = manifest
        self.timeout_s = timeout_s
        self.log = log
        self.label = f"mq-{time.strftime('%Y%m%d-%H%M%S')}"
        self.ids: plan.Registered | None = None
        self.plans: list[plan.PolicyPlan] = []

    def run(
        self,
        chosen: Mapping[str, Mapping[str, Any]],
        mwa_params: Mapping[str, Any],
        *,
        trajectories: bool,
    ) -> list[plan.PolicyPlan]:
        """Register, merge (automatically and by policy run) and wait; returns the policies."""
        reg, zoo, manifest = self.registry, self.zoo_dir, self.manifest
        self.ids = ids = plan.Registered(base=plan.register_base(reg, zoo, manifest, self.label))
        self.plans = plan.multitask_policies(
            label=self.label,
            base_id=ids.base,
            chosen=chosen,
            n_irrelevant=len(manifest.irrelevant),
            evaluator=self.evaluator,
        )
        self.plans += plan.adapter_policies(
            label=self.label,
            base_id=ids.base,
            chosen=chosen,
            merges=self.adapter_merges,
            evaluator=self.evaluator,
        )
        if trajectories:
            self.plans += plan.trajectory_policies(
                label=self.label, manifest=manifest, mwa_params=mwa_params, evaluator=self.evaluator
            )
        plan.create_policies(reg, self.plans)
        auto = [p.body["name"] for p in self.plans if p.on_register]
        self.log(f"base {ids.base} registered; {len(self.plans)} policies, on_register: {auto}")
        plan.register_tasks(
            reg, zoo, manifest, ids, label=self.label, after_each=self._await_auto, cli=self.cli
        )
        self.log(f"{len(ids.tasks)} task fine-tunes registered; automatic merges done")
        if any(p.key.startswith("lora_") for p in self.plans):
            plan.register_adapters(reg, zoo, manifest, ids, label=self.label, cli=self.cli)
            self.log(f"{len(ids.adapters)} LoRA adapters registered (kind adapter)")
        if any("irrelevant" in p.key for p in self.plans):
            plan.register_irrelevant(reg, zoo, manifest, ids, label=self.label)
        if trajectories:
            plan.register_trajectories(reg, zoo, manifest, ids, label=self.label)
        self._run_manual()
        return self.plans

    def _await_auto(self, task: str, checkpoint_id: int) -> None:
        """Wait for every on_register merge the arrival of ``checkpoint_id`` triggers."""
        assert self.ids is not None
        arrived = len(self.ids.tasks)
        expected = {
            p.id
            for p in self.plans
            if p.on_register and arrived >= (1 if p.body["method"] == "opcm" else 2)
        }

        def covered(runs: list[dict[str, Any]]) -> bool:
            finished = {
                r["policy_id"]
                for r in runs
                if r["status"] in TERMINAL
                and checkpoint_id in [i["checkpoint_id"] for i in r["inputs"]]
            }
            return expected <= finished

        self.registry.wait_runs(
            covered,
            policy_ids={p for p in expected if p is not None},
            timeout=self.timeout_s,
            what=f"automatic merges after '{task}' arrived",
        )

    def _run_manual(self) -> None:
        manual = [p for p in self.plans if not p.on_register]
        for policy in tqdm(manual, desc="start manual policies", unit="policy"):
            assert policy.id is not None
            if self.registry.run_policy(policy.id) is None:
                raise RuntimeError(f"policy '{policy.body['name']}' selected too few checkpoints")
        self.log(f"{len(manual)} manual policies started (POST /policies/{{id}}/run); waiting")
        ids = {p.id for p in self.plans if p.id is not None}
        runs = self.registry.wait_runs(
            all_finished, policy_ids=ids, timeout=self.timeout_s, what="policy merges"
        )
        self.log(f"all {len(runs)} merge runs succeeded")


def _outputs(registry: Registry, plans: Sequence[plan.PolicyPlan]) -> dict[str, list[int]]:
    """Per policy key, the output checkpoints of its succeeded runs in run order."""
    by_policy: dict[int, list[int]] = {}
    for run in registry.merge_runs():
        if run["status"] == "succeeded" and run["policy_id"] is not None:
            by_policy.setdefault(run["policy_id"], []).append(run["output_checkpoint_id"])
    return {p.key: by_policy.get(p.id or -1, []) for p in plans}


def score_rows(
    scorer: OutputScorer,
    drive: Drive,
    plans: Sequence[plan.PolicyPlan],
    memory_rows: Sequence[Row],
    mwa_params: Mapping[str, Any],
) -> list[Row]:
    """The table: reference rows (unmerged models, from the in-memory run), then every merge."""
    outputs = _outputs(drive.registry, plans)
    tasks = drive.manifest.task_names
    rows = [r for r in memory_rows if r.section == "individual" or r.method == "pretrained"]
    for policy in plans:
        if policy.key in ("opcm",) or ":" in policy.key:
            continue
        final = outputs[policy.key][-1]
        params = policy.body["params"]
        rows.append(
            Row(
                "adapters" if policy.key.startswith("lora_") else "multitask",
                policy.key,
                params,
                scorer.validation(final),
                scorer.test_metrics(final),
            )
        )
    if any(":" in key for key in outputs):
        shown = {"p": mwa_params["p"], "metric": "train_loss"}
        mwa = {t: outputs[f"mwa:{t}"][-1] for t in tasks}
        rows.append(scorer.per_task_rows("trajectory", "mwa(loss)", mwa, shown))
        uniform = {t: outputs[f"uniform:{t}"][-1] for t in tasks}
        rows.append(scorer.per_task_rows("trajectory", "uniform_average", uniform, {}))
        rows += [r for r in memory_rows if r.method == "last_checkpoint"]
    if "opcm" in outputs:
        rows += _continual_rows(scorer, drive, outputs, plans, tasks)
    return rows


def _continual_rows(
    scorer: OutputScorer,
    drive: Drive,
    outputs: Mapping[str, list[int]],
    plans: Sequence[plan.PolicyPlan],
    tasks: Sequence[str],
) -> list[Row]:
    opcm_steps: list[int | dict[str, Any]] = list(outputs["opcm"])
    if len(opcm_steps) != len(tasks):
        raise RuntimeError(f"opcm folded {len(opcm_steps)} times for {len(tasks)} arrivals")
    opcm_params = next(p.body["params"] for p in plans if p.key == "opcm")
    first = load_tensors(drive.zoo_dir, drive.manifest.tasks[tasks[0]].model)
    average_steps: list[Any] = [first, *outputs["linear"]]  # the average of one model is itself
    return [
        scorer.continual_row("opcm", opcm_steps, tasks, opcm_params),
        scorer.continual_row("continual_average", average_steps, tasks, {}),
    ]
