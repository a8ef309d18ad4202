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

import json
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from bench.quality_config import BenchConfig, parse_args, zoo_kind
from bench.quality_eval import OutputScorer
from bench.quality_registry import Registry, reset_home, start_embedded
from bench.quality_report import claims_section, log_to_mlflow, parity_lines
from bench.quality_steps import Drive, score_rows
from bench.zoo import TrainConfig, ensure_zoo, load_manifest
from bench.zoo.loaded import Row
from bench.zoo.quality import format_table

LEGEND = (
    "  params: chosen on the VALIDATION split by bench.zoo.quality's grids (in memory), then set",
    "          as the registry policies' params; every merge below was made by the ckreg flows",
    "  task columns, avg, norm_avg (vs each task's own fine-tune): TEST split, scored here on",
    "          merged weights downloaded over REST (GET /checkpoints/{id}/files/model.safetensors)",
    "  val_avg: the flows' evaluator (`digits` / `lm_tasks`, VALIDATION split), stored as registry metrics",
    "  seen_avg: mean over arrivals of the average test accuracy on the tasks seen so far",
)


@dataclass
class BenchResult:
    rows: list[Row]
    memory_rows: list[Row]
    url: str
    tracking_uri: str
    mlflow_run_id: str | None
    merges_logged: tuple[int, int]
    elapsed_s: float


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


def main(argv: Sequence[str] | None = None) -> None:
    config, json_path = parse_args(argv, description=__doc__)
    known = zoo_kind(config.zoo).sections
    unknown = sorted(set(config.sections) - set(known))
    if unknown:
        sys.exit(f"unknown sections {unknown}; choose from {', '.join(known)}")
    run_benchmark(config, lambda result: report(config, result, json_path))


if __name__ == "__main__":
    main()
