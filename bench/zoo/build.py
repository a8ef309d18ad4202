"""Build the merge-quality zoo: ``python -m bench.zoo.build --out DIR``.

Layout under ``DIR``::

    base/model.safetensors, base/head.safetensors      pretrained backbone (+ its digit head)
    tasks/<task>/model.safetensors                     fine-tuned backbone
    tasks/<task>/second_moment.safetensors             Adam exp_avg_sq (ota / ffg)
    tasks/<task>/fisher.safetensors                    true diagonal Fisher (fisher)
    heads/<task>.safetensors                           the task's fine-tuned head (never merged)
    trajectories/<task>/step-<n>/model.safetensors     fine-tuning checkpoints (mwa): backbone
                                                       + that step's head as heads.<task>.*
    irrelevant/<i>/model.safetensors                   shuffled-label fine-tunes (fw)
    manifest.json                                      index, losses, steps, accuracies

The same seed and thread count give byte-identical files. One thread is the default: on a
shared 2-core machine it is also the fastest (the full zoo builds in about 25 s).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from bench.zoo.data import (
    DEFAULT_TASKS,
    PRETRAIN_TASK,
    get_task,
    shuffled_label_data,
    split_indices,
    task_data,
)
from bench.zoo.manifest import (
    MANIFEST_NAME,
    IrrelevantEntry,
    TaskEntry,
    TrajectoryEntry,
    ZooManifest,
    save_tensors,
    write_manifest,
)
from bench.zoo.model import Params, accuracy, head_tensors
from bench.zoo.train import TrainConfig, diagonal_fisher, finetune, pretrain

DEFAULT_IRRELEVANT = 8


@contextmanager
def deterministic_torch(threads: int = 1) -> Iterator[None]:
    """Deterministic algorithms and a fixed thread count, restored on exit."""
    previous = (torch.are_deterministic_algorithms_enabled(), torch.get_num_threads())
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0])
        torch.set_num_threads(previous[1])


def _generator(seed: int, label: str) -> torch.Generator:
    """A generator per (seed, model) so each model is independent of what else is built."""
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(label.encode()))


def _accuracies(backbone: Params, head: Params, name: str, seed: int) -> dict[str, float]:
    out = {}
    for split in ("validation", "test"):
        data = task_data(name, split, seed=seed)
        out[split] = round(accuracy(backbone, head, data.x, data.y), 6)
    return out


def _build_task(
    out_dir: Path, name: str, base: Params, *, seed: int, config: TrainConfig
) -> TaskEntry:
    task = get_task(name)
    train = task_data(task, "train", seed=seed)
    generator = _generator(seed, f"task:{name}")
    result = finetune(base, train, n_classes=task.n_classes, config=config, generator=generator)
    head = result.head
    fisher_x = train.x[torch.randperm(len(train.y), generator=generator)[: config.fisher_examples]]
    fisher = diagonal_fisher(result.backbone, head, fisher_x, chunk=config.fisher_chunk)
    files = {
        "model": f"tasks/{name}/model.safetensors",
        "head": f"heads/{name}.safetensors",
        "second_moment": f"tasks/{name}/second_moment.safetensors",
        "fisher": f"tasks/{name}/fisher.safetensors",
    }
    save_tensors(out_dir / files["model"], result.backbone)
    save_tensors(out_dir / files["head"], head)
    save_tensors(out_dir / files["second_moment"], result.second_moment)
    save_tensors(out_dir / files["fisher"], fisher)
    trajectory = []
    for point in result.trajectory:
        path = f"trajectories/{name}/step-{point.step}/model.safetensors"
        save_tensors(out_dir / path, point.backbone | head_tensors(name, point.head))
        trajectory.append(TrajectoryEntry(step=point.step, loss=round(point.loss, 6), model=path))
    tuned = _accuracies(result.backbone, head, name, seed)
    reference = _accuracies(base, head, name, seed)
    return TaskEntry(
        name=name,
        n_classes=task.n_classes,
        steps=result.steps,
        trajectory=trajectory,
        accuracy={f"finetune/{k}": v for k, v in tuned.items()}
        | {f"base/{k}": v for k, v in reference.items()},
        **files,
    )


def _build_irrelevant(
    out_dir: Path, index: int, base: Params, *, seed: int, config: TrainConfig
) -> IrrelevantEntry:
    train = shuffled_label_data("train", seed=seed, index=index)
    generator = _generator(seed, f"irrelevant:{index}")
    result = finetune(base, train, n_classes=10, config=config, generator=generator)
    model = f"irrelevant/{index}/model.safetensors"
    second_moment = f"irrelevant/{index}/second_moment.safetensors"
    save_tensors(out_dir / model, result.backbone)
    save_tensors(out_dir / second_moment, result.second_moment)
    return IrrelevantEntry(index=index, model=model, second_moment=second_moment)


def build_zoo(
    out_dir: Path,
    *,
    seed: int = 0,
    tasks: Sequence[str] = DEFAULT_TASKS,
    irrelevant: int = DEFAULT_IRRELEVANT,
    config: TrainConfig | None = None,
    threads: int = 1,
) -> ZooManifest:
    """Pretrain, fine-tune every task and the irrelevant models; returns the written manifest."""
    config = config or TrainConfig()
    for name in tasks:
        get_task(name)  # fail on a bad task name before any training
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with deterministic_torch(threads):
        plain = task_data(PRETRAIN_TASK, "train", seed=seed)
        base, base_head = pretrain(
            plain, n_classes=10, config=config, generator=_generator(seed, "base")
        )
        save_tensors(out_dir / "base/model.safetensors", base)
        save_tensors(out_dir / "base/head.safetensors", base_head)
        entries = {
            name: _build_task(out_dir, name, base, seed=seed, config=config) for name in tasks
        }
        distractors = [
            _build_irrelevant(out_dir, i, base, seed=seed, config=config) for i in range(irrelevant)
        ]
        base_accuracy = _accuracies(base, base_head, PRETRAIN_TASK.name, seed)
    manifest = ZooManifest(
        seed=seed,
        splits={split: len(idx) for split, idx in split_indices(seed).items()},
        config=config.model_dump(),
        backbone_keys=list(base),
        base="base/model.safetensors",
        base_head="base/head.safetensors",
        base_accuracy=base_accuracy,
        tasks=entries,
        irrelevant=distractors,
    )
    write_manifest(out_dir, manifest)
    return manifest


def ensure_zoo(path: Path, *, seed: int = 0, **build_options: Any) -> Path:
    """A zoo at ``path``, built by ``build_zoo`` (atomically, via a sibling temp folder) if
    missing; ``build_options`` go to ``build_zoo``. Returns ``path``."""
    path = Path(path)
    if (path / MANIFEST_NAME).is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        build_zoo(staging, seed=seed, **build_options)
        try:
            staging.rename(path)
        except OSError:
            if not (path / MANIFEST_NAME).is_file():  # not a concurrent builder's zoo
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return path


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.zoo.build", description="Build the digits merge-quality zoo."
    )
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    parser.add_argument(
        "--tasks",
        default=",".join(DEFAULT_TASKS),
        help=f"comma-separated task names (default {','.join(DEFAULT_TASKS)})",
    )
    parser.add_argument(
        "--irrelevant", type=int, default=DEFAULT_IRRELEVANT, help="shuffled-label models"
    )
    parser.add_argument("--finetune-epochs", type=int, default=TrainConfig().finetune_epochs)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1; files are byte-identical for equal thread counts)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = _parse_args(argv)
    started = time.perf_counter()
    manifest = build_zoo(
        args.out,
        seed=args.seed,
        tasks=[t for t in args.tasks.split(",") if t],
        irrelevant=args.irrelevant,
        config=TrainConfig(finetune_epochs=args.finetune_epochs),
        threads=args.threads,
    )
    elapsed = time.perf_counter() - started
    print(f"built zoo in {args.out} in {elapsed:.1f} s (seed {manifest.seed})")
    print(f"base digit accuracy: {manifest.base_accuracy}")
    for name, entry in manifest.tasks.items():
        acc = entry.accuracy
        print(
            f"  {name:<12} base+head val {acc['base/validation']:.3f}  "
            f"finetune val {acc['finetune/validation']:.3f} test {acc['finetune/test']:.3f}"
        )


if __name__ == "__main__":
    main()
