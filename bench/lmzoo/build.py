"""Build the LM zoo: ``python -m bench.lmzoo.build --out DIR [--seed N] [--tasks a,b]``.

Layout under ``DIR`` (every model folder is written by ``save_pretrained``: ``config.json``,
``generation_config.json``, safetensors weights; the second task's fine-tune is SHARDED)::

    base/                               pretrained on an even mix of every task (config.pretrain_mix)
    tasks/<task>/model/                 full fine-tune
    tasks/<task>/second_moment.safetensors   Adam exp_avg_sq (registry.client.capture)
    tasks/<task>/fisher.safetensors     empirical diagonal Fisher on train prompts
    tasks/<task>/gram.safetensors       layer-input Grams XᵀX/n on train prompts (regmean)
    adapters/<task>/                    PEFT LoRA adapter (adapter_config.json + weights)
    trajectories/<task>/step-<n>/       checkpoints along the fine-tune (mwa)
    irrelevant/<i>/model/               fine-tunes on shuffled answers (fw's distractors)
    manifest.json

``ensure_lm_zoo`` builds once per (seed, tasks, config) key and reuses the folder after.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file

from bench.lmzoo.grams import save_task_grams
from bench.lmzoo.manifest import (
    MANIFEST_NAME,
    LMIrrelevantEntry,
    LMTaskEntry,
    LMTrajectoryEntry,
    LMZooManifest,
    write_manifest,
)
from bench.lmzoo.model import batch, exact_match, lm_config, load_weights, new_model
from bench.lmzoo.tasks import DEFAULT_TASKS, examples, get_task
from bench.lmzoo.train import (
    LMTrainConfig,
    diagonal_fisher,
    digest_fields,
    finetune,
    pretrain,
    pretrain_mix,
    train_lora,
)
from bench.zoo.build import deterministic_torch
from bench.zoo.manifest import save_tensors
from registry.client.capture import capture_second_moments

#: Prompts per task and split of the zoos built before ``LMTrainConfig.test_size``.
EVAL_SIZES = {"validation": 64, "test": 112}


def eval_sizes(config: LMTrainConfig) -> dict[str, int]:
    """Validation and test prompts per task (a task with fewer distinct inputs gives all)."""
    return {"validation": EVAL_SIZES["validation"], "test": config.test_size}


def zoo_key(seed: int, tasks: Sequence[str], config: LMTrainConfig) -> str:
    """Folder name of a build: seed, tasks and a digest of the training config."""
    blob = json.dumps([list(tasks), digest_fields(config), eval_sizes(config)], sort_keys=True)
    return f"lm-seed{seed}-{len(tasks)}t-{hashlib.sha256(blob.encode()).hexdigest()[:10]}"


def base_key(seed: int, mix: Sequence[str], config: LMTrainConfig) -> str:
    """Cache name of a pretrained base: seed, pretraining mix and the fields pretraining reads
    (zoos of one seed with ``pretrain_mix="all"`` share it whatever their task lists)."""
    fields = ("hidden", "layers", "heads", "pool", "batch_size", "pretrain_steps", "pretrain_lr")
    blob = json.dumps([sorted(mix), {f: getattr(config, f) for f in fields}], sort_keys=True)
    return f"base-seed{seed}-{hashlib.sha256(blob.encode()).hexdigest()[:10]}"


def pretrained_base(
    seed: int, mix: Sequence[str], config: LMTrainConfig, cache: Path | None
) -> torch.nn.Module:
    """The base pretrained on ``mix``, from ``cache`` when it holds one (saved there after)."""
    arch = lm_config(hidden=config.hidden, layers=config.layers, heads=config.heads)
    model = new_model(arch, seed)
    folder = cache / base_key(seed, mix, config) if cache is not None else None
    if folder is not None and (folder / "config.json").is_file():
        return load_weights(model, load_file(str(folder / "model.safetensors")))
    base = pretrain(model, mix, seed=seed, config=config)
    if folder is not None:
        staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=cache))
        base.save_pretrained(staging)
        try:
            staging.rename(folder)
        except OSError:  # another build saved it first
            shutil.rmtree(staging)
    return base


def task_accuracy(
    model: torch.nn.Module, task: str, split: str, seed: int, n: int | None = None
) -> float:
    """Exact match on ``n`` prompts of the split (default ``EVAL_SIZES``; capped at the
    task's distinct inputs there, as the evaluator does)."""
    size = n if n is not None else EVAL_SIZES[split]
    data = batch(examples(task, split, n=size, seed=seed, at_most=True))
    return round(float(exact_match(model, data).mean()), 6)


def _accuracies(
    model: torch.nn.Module, task: str, seed: int, label: str, sizes: dict[str, int]
) -> dict[str, float]:
    return {f"{label}/{s}": task_accuracy(model, task, s, seed, n) for s, n in sizes.items()}


def _save_state(state: dict[str, torch.Tensor], folder: Path, scratch: torch.nn.Module) -> None:
    load_weights(scratch, state).save_pretrained(folder)


def _build_task(
    out: Path,
    task: str,
    base: torch.nn.Module,
    *,
    seed: int,
    config: LMTrainConfig,
    shard: bool,
    mix: Sequence[str],
) -> LMTaskEntry:
    run = finetune(base, task, seed=seed, config=config, mix=mix)
    model_dir = f"tasks/{task}/model"
    run.model.save_pretrained(
        out / model_dir, **({"max_shard_size": config.shard_size} if shard else {})
    )
    moments = f"tasks/{task}/second_moment.safetensors"
    capture_second_moments(run.model, run.optimizer, out / moments)
    fisher_data = batch(examples(task, "train", n=config.fisher_examples, seed=seed + 1))
    fisher = f"tasks/{task}/fisher.safetensors"
    save_tensors(out / fisher, diagonal_fisher(run.model, fisher_data))
    gram = f"tasks/{task}/gram.safetensors"
    save_task_grams(run.model, task, out / gram, seed=seed)
    scratch = new_model(run.model.config, 0)
    trajectory = []
    for step, loss, state in run.trajectory:
        folder = f"trajectories/{task}/step-{step}"
        _save_state(state, out / folder, scratch)
        trajectory.append(LMTrajectoryEntry(step=step, loss=round(loss, 6), model=folder))
    adapter = train_lora(base, task, seed=seed, config=config)
    adapter_dir = f"adapters/{task}"
    adapter.save_pretrained(out / adapter_dir)
    sizes = eval_sizes(config)
    accuracy = (
        _accuracies(run.model, task, seed, "finetune", sizes)
        | _accuracies(adapter, task, seed, "adapter", sizes)
        | _accuracies(base, task, seed, "base", sizes)
    )
    return LMTaskEntry(
        name=task,
        model=model_dir,
        sharded=shard,
        adapter=adapter_dir,
        second_moment=moments,
        fisher=fisher,
        trajectory=trajectory,
        gram=gram,
        accuracy=accuracy,
    )


def _build_irrelevant(
    out: Path,
    index: int,
    task: str,
    base: torch.nn.Module,
    *,
    seed: int,
    config: LMTrainConfig,
    mix: Sequence[str],
) -> LMIrrelevantEntry:
    run = finetune(
        base, task, seed=seed + 100 + index, config=config, shuffle_answers=True, mix=mix
    )
    model_dir = f"irrelevant/{index}/model"
    run.model.save_pretrained(out / model_dir)
    moments = f"irrelevant/{index}/second_moment.safetensors"
    capture_second_moments(run.model, run.optimizer, out / moments)
    return LMIrrelevantEntry(index=index, model=model_dir, second_moment=moments)


def build_lm_zoo(
    out: Path,
    *,
    seed: int = 0,
    tasks: Sequence[str] = DEFAULT_TASKS,
    config: LMTrainConfig | None = None,
    log: Callable[[str], None] = print,
    base_cache: Path | None = None,
) -> LMZooManifest:
    """Pretrain, fine-tune and adapt every task, save everything; returns the manifest.

    ``base_cache``: a folder keeping pretrained bases (``base_key``) across builds."""
    config = config or LMTrainConfig()
    for task in tasks:
        get_task(task)  # a bad name fails before any training
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with deterministic_torch(1):
        mix = pretrain_mix(tasks, config)
        if base_cache is not None:
            base_cache.mkdir(parents=True, exist_ok=True)
        base = pretrained_base(seed, mix, config, base_cache)
        base.save_pretrained(out / "base")
        log(f"  pretrained base in {time.perf_counter() - started:.0f}s")
        entries = {}
        for i, task in enumerate(tasks):
            entries[task] = _build_task(
                out, task, base, seed=seed, config=config, shard=(i == min(1, len(tasks) - 1)),
                mix=mix,
            )  # fmt: skip
            acc = entries[task].accuracy
            log(
                f"  {task:<9} base {acc['base/validation']:.2f} finetune "
                f"{acc['finetune/validation']:.2f} lora {acc['adapter/validation']:.2f} (val) "
                f"[{time.perf_counter() - started:.0f}s]"
            )
        distractors = [
            _build_irrelevant(
                out, i, tasks[i % len(tasks)], base, seed=seed, config=config, mix=mix
            )
            for i in range(config.irrelevant)
        ]
        sizes = eval_sizes(config)
        base_accuracy = {
            f"{t}/{s}": task_accuracy(base, t, s, seed, n) for t in tasks for s, n in sizes.items()
        }
    manifest = LMZooManifest(
        seed=seed,
        config=config.model_dump(),
        eval_sizes=sizes,
        lora={"r": config.lora_rank, "lora_alpha": 2 * config.lora_rank},
        base="base",
        base_accuracy=base_accuracy,
        tasks=entries,
        irrelevant=distractors,
    )
    write_manifest(out, manifest)
    return manifest


def ensure_lm_zoo(
    root: Path,
    *,
    seed: int = 0,
    tasks: Sequence[str] = DEFAULT_TASKS,
    config: LMTrainConfig | None = None,
) -> Path:
    """The zoo for (seed, tasks, config) under ``root``, built atomically if missing."""
    config = config or LMTrainConfig()
    path = Path(root) / zoo_key(seed, tasks, config)
    if (path / MANIFEST_NAME).is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        build_lm_zoo(staging, seed=seed, tasks=tasks, config=config, base_cache=root / "bases")
        try:
            staging.rename(path)
        except OSError:
            if not (path / MANIFEST_NAME).is_file():
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return path


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.lmzoo.build", description=__doc__)
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    parser.add_argument("--tasks", default=",".join(DEFAULT_TASKS), help="comma-separated tasks")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    build_lm_zoo(args.out, seed=args.seed, tasks=[t for t in args.tasks.split(",") if t])
    print(f"built LM zoo in {args.out} in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
