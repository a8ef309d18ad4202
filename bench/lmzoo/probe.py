"""Which tasks a zoo config's fine-tunes improve: ``python -m bench.lmzoo.probe --seeds 0,1,2``.

For each seed, the pretrained base (from ``--root``/bases, pretrained and kept there when
missing, as ``ensure_lm_zoo`` does) is fine-tuned on each task with the config's fine-tune
settings; prints the base's and the fine-tune's validation accuracy per task. A zoo whose
fine-tunes behave (issue 19, item 5) takes tasks where the fine-tune is clearly better than
the base: a task the base already solves gives a task vector that carries nothing, one the
fine-tune cannot learn in its few gentle steps gives noise.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from bench.lmzoo.build import pretrained_base, task_accuracy
from bench.lmzoo.tasks import TASKS
from bench.lmzoo.train import LMTrainConfig, finetune
from bench.zoo.build import deterministic_torch


def probe(seed: int, tasks: Sequence[str], config: LMTrainConfig, cache: Path) -> dict:
    """``{task: (base accuracy, fine-tune accuracy, fine-tune's average over all tasks)}`` on
    validation for one seed; the last against the base's average over the same tasks shows
    how much a fine-tune forgets of the other tasks."""
    cache.mkdir(parents=True, exist_ok=True)
    out = {}
    with deterministic_torch(1):
        base = pretrained_base(seed, list(TASKS), config, cache)
        base_acc = {t: task_accuracy(base, t, "validation", seed) for t in tasks}
        for task in tasks:
            tuned = finetune(base, task, seed=seed, config=config).model
            every = [task_accuracy(tuned, t, "validation", seed) for t in tasks]
            out[task] = (base_acc[task], every[list(tasks).index(task)], sum(every) / len(every))
            print(f"  seed {seed} {task:<9} base {out[task][0]:.2f} fine-tune {out[task][1]:.2f}"
                  f"  all tasks {out[task][2]:.3f}", flush=True)  # fmt: skip
    base_avg = sum(base_acc.values()) / len(base_acc)
    tuned_avg = sum(v[2] for v in out.values()) / len(out)
    print(f"  seed {seed}: base all-task average {base_avg:.3f}, fine-tunes' {tuned_avg:.3f}"
          f" ({tuned_avg - base_avg:+.3f})", flush=True)  # fmt: skip
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.lmzoo.probe", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--root", type=Path, default=Path("bench/out/lmzoo-claims"),
                        help="zoo root whose bases/ caches pretrained bases")  # fmt: skip
    parser.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    parser.add_argument("--tasks", default=",".join(TASKS), help="comma-separated tasks")
    parser.add_argument("--config", default="{}", help="JSON LMTrainConfig overrides")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    config = LMTrainConfig.model_validate(LMTrainConfig().model_dump() | json.loads(args.config))
    started = time.perf_counter()
    tasks = [t for t in args.tasks.split(",") if t]
    for seed in (int(s) for s in args.seeds.split(",")):
        probe(seed, tasks, config, args.root / "bases")
    print(f"probed in {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
