"""What ``python -m bench.merge_quality`` runs: its options, its config, and what differs
between the digits zoo (``bench.zoo``) and the language-model zoo (``bench.lmzoo``)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from bench.zoo import DEFAULT_TASKS, load_manifest
from bench.zoo.loaded import Row
from bench.zoo.quality import run_quality

SECTIONS = ("multitask", "trajectory", "continual")


class BenchConfig(BaseModel):
    """What to run: where, on which zoo, which methods and sections."""

    model_config = ConfigDict(frozen=True)

    zoo: str = "digits"  # or "lm" (bench.lmzoo)
    seed: int = 0  # the LM zoo's seed (the digits zoo is seed 0)
    lm_config: dict[str, Any] = {}  # LMTrainConfig overrides (quick runs)
    home: Path = Path(".ckreg/demo")
    url: str | None = None  # an already running registry instead of the embedded one
    token: str | None = None
    tasks: tuple[str, ...] = tuple(DEFAULT_TASKS)
    irrelevant: int = 8
    finetune_epochs: int | None = None
    methods: tuple[str, ...] | None = None  # multitask subset; None = every method
    sections: tuple[str, ...] = SECTIONS
    timeout_s: float = 600.0
    reset: bool = False
    mlflow: bool = True
    serve: bool = False  # keep the embedded registry up after the table, until Ctrl-C

    @property
    def zoo_dir(self) -> Path:
        # Where the registry's ``digits`` evaluator (DigitsEvaluator()) looks under its home.
        return (self.home / "zoo" / "digits-seed0").resolve()


@dataclass(frozen=True)
class ZooKind:
    """What differs between the digits and the LM zoo for this job."""

    load_manifest: Callable[[Path], Any]
    run_quality: Callable[..., list[Row]]
    evaluator: Callable[..., Any]
    evaluator_name: str
    cli: int  # how many task fine-tunes (and adapters) to register with `ckreg register`
    adapter_merges: tuple[tuple[str, str, str], ...]
    sections: tuple[str, ...]


def zoo_kind(name: str) -> ZooKind:
    """The digits zoo (``bench.zoo``) or the LM zoo (``bench.lmzoo``)."""
    if name == "digits":
        from bench.zoo.evaluator import DigitsEvaluator

        return ZooKind(load_manifest, run_quality, DigitsEvaluator, "digits", 0, (), SECTIONS)
    if name == "lm":
        from bench.lmzoo.evaluator import LMTasksEvaluator
        from bench.lmzoo.manifest import load_manifest as load_lm_manifest
        from bench.lmzoo.quality import ADAPTER_MERGES, run_lm_quality
        from bench.lmzoo.quality import SECTIONS as LM_SECTIONS

        return ZooKind(
            load_lm_manifest, run_lm_quality, LMTasksEvaluator, "lm_tasks", 2,
            ADAPTER_MERGES, LM_SECTIONS,
        )  # fmt: skip
    raise ValueError(f"unknown zoo {name!r}; choose digits or lm")


def parse_args(
    argv: Sequence[str] | None, *, description: str | None = None
) -> tuple[BenchConfig, Path | None]:
    """The job's options; ``--json`` names a file for the rows (or None)."""
    parser = argparse.ArgumentParser(prog="python -m bench.merge_quality", description=description)
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--embedded", action="store_true", help="start `ckreg serve` (default)")
    where.add_argument("--url", help="use a running registry instead (with --token)")
    parser.add_argument("--token", help="write token for --url")
    parser.add_argument(
        "--home",
        type=Path,
        default=None,
        help="registry home for --embedded (default .ckreg/demo, .ckreg/lm for --zoo lm); "
        "the zoo lives in <home>/zoo",
    )
    parser.add_argument("--zoo", choices=("digits", "lm"), default="digits", help="which zoo")
    parser.add_argument("--seed", type=int, default=0, help="LM zoo seed (built once per seed)")
    parser.add_argument(
        "--lm-config",
        default="{}",
        help="LM zoo LMTrainConfig overrides, JSON (e.g. '{\"pretrain_steps\": 200}')",
    )
    parser.add_argument(
        "--tasks", default=None, help="zoo tasks (default: the zoo's; LM: copy,reverse,...)"
    )
    parser.add_argument("--irrelevant", type=int, default=8, help="irrelevant models for fw")
    parser.add_argument("--finetune-epochs", type=int, default=None, help="zoo build option")
    parser.add_argument("--methods", default="", help="multitask methods subset (comma list)")
    parser.add_argument("--sections", default=None, help="table sections (default: all)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per wait")
    parser.add_argument("--reset", action="store_true", help="empty the registry home first")
    parser.add_argument("--serve", action="store_true", help="keep the registry up afterwards")
    parser.add_argument("--no-mlflow", action="store_true", help="skip the MLflow table run")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    args = parser.parse_args(argv)
    if args.tasks is None:
        from bench.lmzoo.tasks import DEFAULT_TASKS as LM_TASKS

        args.tasks = ",".join(LM_TASKS if args.zoo == "lm" else DEFAULT_TASKS)
    sections = args.sections
    if sections is None:
        sections = ",".join(zoo_kind(args.zoo).sections)
    config = BenchConfig(
        zoo=args.zoo,
        seed=args.seed,
        lm_config=json.loads(args.lm_config),
        home=args.home or Path(".ckreg/lm" if args.zoo == "lm" else ".ckreg/demo"),
        url=args.url,
        token=args.token,
        tasks=tuple(t for t in args.tasks.split(",") if t),
        irrelevant=args.irrelevant,
        finetune_epochs=args.finetune_epochs,
        methods=tuple(m for m in args.methods.split(",") if m) or None,
        sections=tuple(s for s in sections.split(",") if s),
        timeout_s=args.timeout,
        reset=args.reset,
        mlflow=not args.no_mlflow,
        serve=args.serve,
    )
    return config, args.json
