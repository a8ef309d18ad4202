"""The table of ``bench.merge_from_s3``: one row per method and size, medians of the runs."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

from bench._common import MIB
from bench.merge_report import Run


@dataclass
class Merge:
    """One child run (a merge or the S3 floor): the process figures and what it reported."""

    run: Run
    report: dict[str, Any]


def _median(values: list[float]) -> float:
    return statistics.median(values)


def floor_line(size: str, floors: list[Merge], part: int, workers: int) -> str:
    """The S3 floor's median and runs, bytes, GETs and rate."""
    done = [f.report for f in floors if f.report]
    if len(done) < len(floors):
        return f"S3 floor {size}: FAILED, see {next(f.run.log for f in floors if not f.report)}"
    seconds = [r["merge_s"] for r in done]
    moved = done[0]["fetched"]
    return (f"S3 floor {size}: {_median(seconds):.2f} s median of "
            f"{', '.join(f'{x:.2f}' for x in seconds)} ({moved / MIB:.0f} MiB in "
            f"{done[0]['requests']} GETs of <= {part / MIB:g} MiB on "
            f"{workers} threads, {moved / _median(seconds) / 1e6:.0f} MB/s)")  # fmt: skip


def row(
    size: str, method: str, runs: dict[str, list[Merge]], floors: list[Merge], input_bytes: int
) -> list[object]:
    """The table row of one method at one size: medians of every run."""
    every = [*runs["local"], *runs["s3"], *runs["download"], *floors]
    failed = next((m for m in every if not m.report), None)
    if failed is not None:
        return [size, method, f"FAILED, see {failed.run.log}", *["-"] * (len(HEADERS) - 3)]
    local = _median([m.report["merge_s"] for m in runs["local"]])
    remote = _median([m.report["merge_s"] for m in runs["s3"]])
    floor = _median([m.report["merge_s"] for m in floors])
    download = _median([m.report["merge_s"] for m in runs["download"]])
    local_rss = _median([m.run.peak_rss for m in runs["local"]])
    s3_rss = _median([m.run.peak_rss for m in runs["s3"]])
    last = runs["s3"][-1].report
    wire = last["wire"]
    digests = {m.report["digest"] for m in [*runs["local"], *runs["s3"], *runs["download"]]}
    return [
        size, method, local, remote, floor, remote / max(floor, local), floor + local,
        remote / (floor + local), download, remote / download, local / remote,
        f"{local_rss / MIB:.0f}", f"{s3_rss / MIB:.0f}", s3_rss / local_rss,
        f"{input_bytes / MIB:.0f}", f"{wire['bytes'] / MIB:.0f}", wire["bytes"] / input_bytes,
        last["fetched"] / last["engine_bytes"], f"{wire['GetObject']}/{wire['HeadObject']}",
        len(runs["s3"]), "yes" if len(digests) == 1 else "NO",
    ]  # fmt: skip


def runs_line(size: str, method: str, runs: dict[str, list[Merge]]) -> str:
    """Every run's merge seconds and peak RSS, local and S3, in run order."""
    parts = []
    for mode, merges in runs.items():
        seconds = ", ".join(f"{m.report['merge_s']:.2f}" if m.report else "FAILED" for m in merges)
        rss = ", ".join(f"{m.run.peak_rss / MIB:.0f}" for m in merges)
        parts.append(f"{mode} {seconds} s (RSS {rss} MiB)")
    return f"runs {size} {method}: " + "; ".join(parts)


HEADERS = ["size", "method", "local s", "s3 s", "S3 floor s", "s3/max(floor,local)",
           "floor+local s", "s3/(floor+local)", "dl+merge s", "s3/(dl+merge)", "speed local/s3", "local RSS MiB", "s3 RSS MiB",
           "RSS s3/local", "input MiB", "wire MiB", "wire/input", "fetched/asked", "GET/HEAD",
           "runs", "identical"]  # fmt: skip
NOTES = """s3 s, local s: merge wall in the child (interpreter start excluded), median of the runs;
S3 floor: every stored input byte GET once from the same moto (bench._s3_floor), median;
s3/max(floor,local): goal <= 1.20 (reads and merge overlapped); floor+local = S3 floor + local
merge, a lower bound of download-then-merge (the floor writes no file); dl+merge s: measured
download-then-merge in one child (every input file GET in the floor's ranges and written to a
fresh local folder, then the local merge of those folders): goal s3/(dl+merge) < 1;
speed local/s3 = local s / s3 s (the issue's 0.31x / 0.47x figures); RSS = child ru_maxrss,
median (goal s3/local <= 1.30, flat across sizes); wire = GetObject body bytes botocore received
in the last S3 run (goal wire/input <= 1.05, ties included); fetched/asked = bytes the S3
sources read against the bytes the engine asked for; GET/HEAD = requests on the wire;
identical: every local, S3 and download-then-merge output has the same sha256."""
