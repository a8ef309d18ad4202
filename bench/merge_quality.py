"""The main job: ``python -m bench.merge_quality --embedded`` (``make demo``).

Starts a registry (``ckreg serve`` with in-process flows) under ``--home``, builds the digits
zoo, chooses every method's hyperparameters on the VALIDATION split (``bench.zoo.quality``'s
grids, in memory), declares merge policies with those settings, registers the zoo over REST —
the ``on_register`` policies merge as the task fine-tunes arrive one at a time, the manual ones
are started with ``POST /policies/{id}/run`` — then scores every merged checkpoint on the TEST
split and prints one table, the papers' claims against it, and where to browse the results.
The table and a PNG of it also go to MLflow (experiment ``ckreg-merge-quality``).

``--zoo lm`` runs the same job on the language-model zoo (``bench.lmzoo``: Hugging Face Llama
directories, one of them sharded, and PEFT LoRA adapters, built per ``--seed`` and ``--tasks``),
registered with ``ckreg register`` and scored by the ``lm_tasks`` evaluator.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict

from bench.quality_eval import OutputScorer
from bench.quality_registry import Registry, reset_home, start_embedded
from bench.quality_report import claims_section, log_to_mlflow, parity_lines
from bench.quality_steps import Drive, score_rows
from bench.zoo import DEFAULT_TASKS, TrainConfig, ensure_zoo, load_manifest
from bench.zoo.loaded import Row
from bench.zoo.quality import format_table, run_quality

SECTIONS = ("multitask", "trajectory", "continual")
LEGEND = (
    "  params: chosen on the VALIDATION split by bench.zoo.quality's grids (in memory), then set",
    "          as the registry policies' params; every merge below was made by the ckreg flows",
    "  task columns, avg, norm_avg (vs each task's own fine-tune): TEST split, scored here on",
    "          merged weights downloaded over REST (GET /checkpoints/{id}/files/model.safetensors)",
    "  val_avg: the flows' evaluator (`digits` / `lm_tasks`, VALIDATION split), stored as registry metrics",
    "  seen_avg: mean over arrivals of the average test accuracy on the tasks seen so far",
)


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


@dataclass
class BenchResult:
    rows: list[Row]
    memory_rows: list[Row]
    url: str
    tracking_uri: str
    mlflow_run_id: str | None
    merges_logged: tuple[int, int]
    elapsed_s: float


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


def _stamp(started: float, text: str) -> None:
    cpu = time.process_time()  # this process's CPU seconds: wall time is inflated on a loaded host
    print(f"[{time.perf_counter() - started:6.1f}s, cpu {cpu:6.1f}s] {text}", flush=True)


def prepare_zoo(config: BenchConfig) -> Path:
    """Build (or reuse) the zoo under the home; a reused zoo must hold the requested tasks."""
    if config.zoo == "lm":
        from bench.lmzoo.build import ensure_lm_zoo
        from bench.lmzoo.train import LMTrainConfig

        root = (config.home / "zoo").resolve()
        lm = LMTrainConfig(**config.lm_config)
        return ensure_lm_zoo(root, seed=config.seed, tasks=config.tasks, config=lm)
    options: dict[str, Any] = {"tasks": list(config.tasks), "irrelevant": config.irrelevant}
    if config.finetune_epochs is not None:
        options["config"] = TrainConfig(finetune_epochs=config.finetune_epochs)
    zoo_dir = ensure_zoo(config.zoo_dir, seed=0, **options)
    manifest = load_manifest(zoo_dir)
    if manifest.task_names != list(config.tasks) or len(manifest.irrelevant) != config.irrelevant:
        raise ValueError(
            f"the zoo at {str(zoo_dir)!r} holds tasks {manifest.task_names} and "
            f"{len(manifest.irrelevant)} irrelevant models, not {list(config.tasks)} and "
            f"{config.irrelevant}; use another --home or delete that zoo"
        )
    return zoo_dir


def chosen_params(memory_rows: Sequence[Row]) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Validation-chosen params per multitask/continual row, and mwa's params."""
    skip = {"pretrained", "continual_average", "continual_task_arithmetic"}
    # ``seed`` (dare) is an engine option, not a method param; the flows merge with seed 0,
    # the value the grids use, so it is left out of the policies.
    chosen = {
        r.method: {k: v for k, v in r.params.items() if not (k == "seed" and v == 0)}
        for r in memory_rows
        if r.section in ("multitask", "continual", "adapters") and r.method not in skip
    }
    if any(r.method == "continual_average" for r in memory_rows):
        chosen.setdefault("linear", {})  # its on_register runs are the continual average
    mwa = next((r.params for r in memory_rows if r.method == "mwa(loss)"), {"p": 1.0})
    return chosen, {"p": mwa["p"], "metric_mode": "lower"}


@contextmanager
def registry_for(
    config: BenchConfig, zoo_dir: Path | None = None
) -> Iterator[tuple[Registry, str, str]]:
    """(client, url, MLflow tracking URI): the embedded registry, or the one at ``--url``."""
    from registry.settings import Settings

    tracking_uri = Settings(home=config.home.resolve()).mlflow_tracking_uri
    if config.url is not None:
        registry = Registry(config.url, config.token)
        try:
            yield registry, config.url, tracking_uri
        finally:
            registry.close()
        return
    if config.reset:
        reset_home(config.home.resolve())
    env = {"CKREG_ZOO_DIR": str(zoo_dir)} if config.zoo == "lm" and zoo_dir else None
    embedded = start_embedded(config.home, timeout=config.timeout_s, extra_env=env)
    print(f"registry: {embedded.url} (ckreg serve, embedded flows; log {embedded.log_path})")
    registry = Registry(embedded.url, embedded.token)
    try:
        yield registry, embedded.url, tracking_uri
    finally:
        registry.close()
        print(f"registry server CPU time: {_cpu_seconds(embedded.server.pid):.0f} s")
        embedded.stop()


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and its children so far (0 when it is gone)."""
    import psutil

    try:
        process = psutil.Process(pid)
        tree = [process, *process.children(recursive=True)]
        return sum(sum(p.cpu_times()[:2]) for p in tree)
    except psutil.Error:
        return 0.0


def run_benchmark(config: BenchConfig, finish: Callable[[BenchResult], None]) -> BenchResult:
    """Everything the main job does, end to end; ``finish(result)`` runs (reports) while the
    registry is still up. Returns the rows and where they went."""
    started = time.perf_counter()
    torch.set_num_threads(1)  # fastest on a shared 2-core machine; the models are tiny
    zoo_dir = prepare_zoo(config)
    zoo = zoo_kind(config.zoo)
    manifest = zoo.load_manifest(zoo_dir)
    _stamp(started, f"zoo ready at {zoo_dir} ({len(manifest.tasks)} tasks)")
    memory_rows = zoo.run_quality(
        zoo_dir,
        methods=config.methods,
        sections=config.sections,
        log=lambda line: print(f"    chose {line}"),
    )
    chosen, mwa_params = chosen_params(memory_rows)
    _stamp(started, "hyperparameters chosen on validation (in memory, bench.zoo.quality grids)")
    with registry_for(config, zoo_dir) as (registry, url, tracking_uri):
        drive = Drive(
            registry,
            zoo_dir,
            manifest,
            config.timeout_s,
            lambda s: _stamp(started, s),
            evaluator=zoo.evaluator_name,
            cli=zoo.cli,
            adapter_merges=zoo.adapter_merges,
        )
        plans = drive.run(chosen, mwa_params, trajectories="trajectory" in config.sections)
        scorer = OutputScorer(registry, zoo_dir, manifest.task_names, zoo.evaluator)
        try:
            rows = score_rows(scorer, drive, plans, memory_rows, mwa_params)
        finally:
            scorer.close()
        _stamp(started, "merged checkpoints scored on the test split")
        ids = {p.id for p in plans if p.id is not None}
        logged = registry.wait_tracked(ids, quiet_s=30.0)
        result = BenchResult(
            rows, memory_rows, url, tracking_uri, None, logged, time.perf_counter() - started
        )
        finish(result)
        if config.serve:
            _serve_until_interrupted(url)
    return result


def _serve_until_interrupted(url: str) -> None:
    print(f"\nregistry still serving at {url} (API docs {url}/api/v1/docs); Ctrl-C stops it")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping the registry")


def report(config: BenchConfig, result: BenchResult, json_path: Path | None) -> None:
    """Print the table, claims and where to browse; log to MLflow; write JSON."""
    table = format_table(result.rows)
    print("\nckreg merge quality: test accuracy per task (hyperparameters chosen on validation)")
    print("\n".join(LEGEND))
    print(table)
    for line in parity_lines(result.rows, result.memory_rows):
        print(line)
    print(
        "\nPapers' claims vs this run (test accuracy; |Δ| < 0.005 is a tie, "
        "'keeps' holds within 0.01):"
    )
    print("\n".join(claims_section(result.rows, _n_irrelevant(config))) or "  (no claim rows)")
    if config.mlflow:
        out_dir = config.home.resolve() / "results"
        out_dir.mkdir(parents=True, exist_ok=True)
        params = {"url": result.url, "tasks": ",".join(config.tasks), "selection": "validation"}
        result.mlflow_run_id = log_to_mlflow(
            tracking_uri=result.tracking_uri,
            rows=result.rows,
            table=table,
            params=params,
            out_dir=out_dir,
        )
    _print_browse(config, result)
    if json_path is not None:
        payload = {
            "rows": [asdict(r) for r in result.rows],
            "memory_rows": [asdict(r) for r in result.memory_rows],
            "url": result.url,
            "mlflow_run_id": result.mlflow_run_id,
            "merges_logged": list(result.merges_logged),
            "elapsed_s": result.elapsed_s,
        }
        json_path.write_text(json.dumps(payload, indent=2))


def _n_irrelevant(config: BenchConfig) -> int:
    if config.zoo == "lm":
        from bench.lmzoo.train import LMTrainConfig

        return LMTrainConfig(**config.lm_config).irrelevant
    return config.irrelevant


def _print_browse(config: BenchConfig, result: BenchResult) -> None:
    home = config.home.resolve()
    logged, total = result.merges_logged
    print("\nBrowse the results:")
    if config.url is None and not config.serve:
        print(f"  registry ran at {result.url} for this job (API docs {result.url}/api/v1/docs);")
        print(
            f"  serve it again: CKREG_HOME={home} .venv/bin/ckreg serve   "
            "# then http://127.0.0.1:8321/api/v1/docs"
        )
    else:
        print(f"  registry: {result.url}   API docs: {result.url}/api/v1/docs")
    print(f"  MLflow UI: .venv/bin/mlflow ui --backend-store-uri {result.tracking_uri}")
    print(
        f"    experiment 'ckreg': the flows' merge runs ({logged}/{total} of this job's merges "
        "logged, with lineage and model cards)"
    )
    if logged < total:
        print(f"    not yet logged: CKREG_HOME={home} .venv/bin/ckreg mlflow sync --retry-failed")
    if result.mlflow_run_id:
        print(
            f"    experiment 'ckreg-merge-quality': this table + PNG (run {result.mlflow_run_id})"
        )
    print(f"took {result.elapsed_s:.0f} s")


def parse_args(argv: Sequence[str] | None) -> tuple[BenchConfig, Path | None]:
    parser = argparse.ArgumentParser(prog="python -m bench.merge_quality", description=__doc__)
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


def main(argv: Sequence[str] | None = None) -> None:
    config, json_path = parse_args(argv)
    known = zoo_kind(config.zoo).sections
    unknown = sorted(set(config.sections) - set(known))
    if unknown:
        sys.exit(f"unknown sections {unknown}; choose from {', '.join(known)}")
    run_benchmark(config, lambda result: report(config, result, json_path))


if __name__ == "__main__":
    main()
