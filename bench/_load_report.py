"""Tables of ``bench.registry_load``: latency per operation, the ``/healthz`` reference beside the
mix, CPU per component, the load average around each phase, and whether the goals are met."""

from __future__ import annotations

import argparse
import time
from typing import Any

from bench._common import percentile, print_table
from bench._procstat import CpuMeter

TARGET_RPS, TARGET_READ_P95_MS = 100.0, 250.0
OPERATIONS = ("create", "put", "complete", "list", "show", "download")
READS = ("list", "show", "download")


def wait_until_idle(pid: int, *, below_s: float = 0.1, timeout: float = 240.0) -> float:
    """Block until ``pid`` and its children used under ``below_s`` CPU seconds in each of two
    consecutive 1 s windows (embedded ``ckreg serve`` imports Prefect and starts its API after
    it opened its port); returns the seconds waited."""
    start = time.monotonic()
    quiet = 0
    while quiet < 2 and time.monotonic() - start < timeout:
        meter = CpuMeter({"server": pid}).start()
        time.sleep(1.0)
        quiet = quiet + 1 if meter.stop()["server"] < below_s else 0
    waited = time.monotonic() - start
    if quiet < 2:
        print(f"server still busy after {waited:.0f} s; measuring anyway", flush=True)
    return waited


def _row(name: str, seconds: list[float], errors: int, elapsed: float) -> list[object]:
    ms = [s * 1000 for s in seconds] or [float("nan")]
    rate = (len(seconds) + errors) / elapsed
    return [name, len(seconds), errors, rate, *(percentile(ms, q) for q in (50, 95, 99))]


def _latency_table(runs: dict[str, Any], args: argparse.Namespace) -> None:
    stats, elapsed = runs["mix"][:2]
    ref, ref_elapsed = runs["reference"][:2]
    rows = [
        _row(op, stats.latencies.get(op, []), len(stats.errors.get(op, [])), elapsed)
        for op in OPERATIONS
    ]
    reads = [s for op in READS for s in stats.latencies.get(op, [])]
    read_errors = sum(len(stats.errors.get(op, [])) for op in READS)
    rows.append(_row("all reads", reads, read_errors, elapsed))
    everything = [s for values in stats.latencies.values() for s in values]
    errors = sum(len(v) for v in stats.errors.values())
    rows.append(_row("all (mix)", everything, errors, elapsed))
    healthz = ref.latencies.get("healthz", [])
    rows.append(_row("healthz (reference)", healthz, len(ref.errors["healthz"]), ref_elapsed))
    print_table(
        f"registry load: {args.clients} clients, {args.workers} API process(es), mix "
        f"{elapsed:.1f} s (write share "
        f"{args.write_share}), reference GET /healthz {ref_elapsed:.1f} s",
        ("operation", "ok", "errors", "req/s", "p50 ms", "p95 ms", "p99 ms"),
        rows,
    )


def _cpu_table(runs: dict[str, Any]) -> None:
    rows = []
    names = list(runs["mix"][2])
    for name in [*names, "other processes on the machine"]:
        row: list[object] = [name]
        for phase in ("reference", "mix"):
            stats, elapsed, spent, machine_s = runs[phase][:4]
            seconds = machine_s - sum(spent.values()) if name not in spent else spent[name]
            row += [seconds / elapsed * 100, seconds * 1000 / max(1, stats.requests)]
        rows.append(row)
    print_table(
        "CPU per component (% of one core over the phase; CPU ms per request)",
        ("component", "ref %core", "ref ms/req", "mix %core", "mix ms/req"),
        rows,
    )


def report_run(runs: dict[str, Any], verified: int, args: argparse.Namespace) -> bool:
    """Print the tables and the verdict; True when the run had no errors and no mismatches."""
    _latency_table(runs, args)
    _cpu_table(runs)
    stats, elapsed = runs["mix"][:2]
    ref, ref_elapsed = runs["reference"][:2]
    for phase in ("reference", "mix"):
        print(f"load average during {phase}: before {runs[phase][4]}; after {runs[phase][5]}")
    waited, drained = runs.get("drain", (0.0, 0.0))
    own = runs["mix"][2][next(iter(runs["mix"][2]))]
    print(
        f"after the mix the registry worked {waited:.0f} s more on queued background work "
        f"({drained:.2f} CPU s): with it, {(own + drained) * 1000 / max(1, stats.requests):.2f}"
        " registry CPU ms per request of the mix"
    )
    rps = stats.requests / elapsed
    read_ms = [s * 1000 for op in READS for s in stats.latencies.get(op, [])]
    read_p95 = percentile(read_ms, 95) if read_ms else float("nan")
    errors = sum(len(v) for v in stats.errors.values()) + sum(len(v) for v in ref.errors.values())
    print(
        f"\n{stats.requests} requests, {rps:.1f} requests/s (reference /healthz "
        f"{ref.requests / ref_elapsed:.1f}/s); reads p95 {read_p95:.1f} ms; {errors} errors; "
        f"{verified} checkpoints verified, {len(stats.mismatches)} mismatches"
    )
    for phase_stats in (ref, stats):
        for op, messages in phase_stats.errors.items():
            for message in messages[:3]:
                print(f"  {op} error: {message}")
    met = rps >= TARGET_RPS and read_p95 < TARGET_READ_P95_MS and not errors
    print("goals met" if met and not stats.mismatches else "goals NOT met")
    return not errors and not stats.mismatches
