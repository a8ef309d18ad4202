"""What ``bench.merge_engine`` prints: the per-run table, its notes, the markdown summary
(method x size: floor, ckreg, mergekit, ratios, s per GB, peak RSS) with issue 20's goals, and
the peak RSS of ckreg at each output shard size (``--shard-sizes``).

Goals checked (issue 20, CPU): linear and task_arithmetic at most 2x the floor, ties at most 4x;
every method at least 3x faster than mergekit where mergekit ran; ckreg's peak RSS at most 1/4
of mergekit's; time per GB of input and peak RSS flat across sizes (printed as max / min).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bench._common import MIB
from bench.merge_parity import Parity, format_parity

FLOOR_GOALS = {"linear": 2.0, "task_arithmetic": 2.0, "ties": 4.0, "ties_position": 4.0}
"""Goal for ckreg wall / floor, per method (issue 20)."""
SPEEDUP_GOAL = 3.0
RSS_GOAL = 0.25


@dataclass
class Run:
    """One merge subprocess: its wall time and memory."""

    engine: str
    device: str
    wall_s: float
    cpu_s: float
    peak_rss: int
    peak_anon: int
    ok: bool
    log: Path


@dataclass
class Row:
    """One engine's median run of one method at one size, with what it is set against."""

    size: str
    method: str
    run: Run
    moved: int
    memcpy_gbs: tuple[float, float]
    parity: Parity | None = None
    versus: Run | None = None
    prefetch: tuple[float, float] | None = None
    floor: float | None = None
    in_bytes: int = 0
    shard_rss: dict[str, int] = field(default_factory=dict)
    """Peak RSS of ckreg per output shard size (``--shard-sizes``)."""


def format_table(rows: list[Row]) -> str:
    """The results table: one line per engine run."""
    head = (f"{'size':>5} {'method':<16}{'engine':<9}{'dev':<5}{'wall s':>8}{'cpu s':>7}{'peak RSS':>10}"
            f"{'RssAnon':>9}{'GB/s':>7}{'memcpy':>8}{'+alloc':>7}{'%cpy':>6}{'speedup':>8}{'RSS/mk':>7}"
            f"{'floor':>7}{'xfloor':>8}  ckreg vs mergekit output")  # fmt: skip
    lines = [head, "-" * len(head)]
    for r in rows:
        gbs = r.moved / r.run.wall_s / 1e9
        speed = f"{r.versus.wall_s / r.run.wall_s:.2f}x" if r.versus and r.versus.ok else "-"
        ratio = f"{r.run.peak_rss / r.versus.peak_rss:.2f}" if r.versus and r.versus.ok else "-"
        state = "" if r.run.ok else f"  FAILED, see {r.run.log}"
        floor = (
            f"{r.floor:>7.2f} {r.run.wall_s / r.floor:>6.1f}x" if r.floor else f"{'-':>7}{'-':>8}"
        )
        lines.append(
            f"{r.size:>5} {r.method:<16}{r.run.engine:<9}{r.run.device:<5}{r.run.wall_s:>8.1f}{r.run.cpu_s:>7.1f}"
            f"{r.run.peak_rss / MIB:>7.0f}MiB{r.run.peak_anon / MIB:>6.0f}MiB{gbs:>7.2f}"
            f"{r.memcpy_gbs[0]:>8.2f}{r.memcpy_gbs[1]:>7.2f}{100 * gbs / r.memcpy_gbs[0]:>5.1f}%"
            f"{speed:>8}{ratio:>7}{floor}"
            f"  {format_parity(r.parity)}{state}"
        )
    return "\n".join(lines)


def print_notes(rows: list[Row], repeats: str, h2d: float | None) -> None:
    """What the table's columns mean, prefetch and per-size RSS lines, the CUDA line."""
    print("GB/s = (input + output safetensors bytes) / wall; memcpy = torch copy_ in RAM "
          "(read + written), +alloc = the same into fresh memory (clone); cpu s = user + sys; speedup and RSS/mk: ckreg vs mergekit; rel = max|a-b| / max|b| "
          "per tensor; off-ties: ties max diff away from threshold ties")  # fmt: skip
    print(f"floor = read every input file once + write one output of the output's size "
          f"(bench.merge_floor), median of {repeats}; xfloor = wall / floor; "
          "wall, RSS: median run of the repeats, ckreg/mergekit order alternating")  # fmt: skip
    print(f"load average after: {os.getloadavg()}")
    for r in rows:
        if r.prefetch is not None:
            off, on = r.prefetch
            print(f"prefetch {r.size} {r.method}: merge {off:.2f} s off, {on:.2f} s on "
                  f"({off / on:.2f}x), in-process, CPU")  # fmt: skip
    cpu = _ckreg_rows(rows)
    by_size = {r.size: max(x.run.peak_rss for x in cpu if x.size == r.size) for r in cpu}
    if len(by_size) > 1:
        print("ckreg peak RSS by size: "
              + ", ".join(f"{s} {v / MIB:.0f}MiB" for s, v in by_size.items()))  # fmt: skip
    if h2d is not None:
        print(f"CUDA: pinned host-to-device {h2d:.1f} GB/s; ckreg cuda rows / H2D: "
              + ", ".join(f"{r.size} {r.method} {r.moved / r.run.wall_s / 1e9 / h2d:.2f}"
                          for r in rows if r.run.device == "cuda"))  # fmt: skip
    elif not torch.cuda.is_available():
        print("CUDA: not available on this machine")


def _ckreg_rows(rows: list[Row]) -> list[Row]:
    return [r for r in rows if r.run.engine == "ckreg" and r.run.device == "cpu"]


def _num(value: float | None, digits: int = 2, suffix: str = "") -> str:
    return "-" if value is None else f"{value:.{digits}f}{suffix}"


def _mk(r: Row) -> Run | None:
    return r.versus if r.versus is not None and r.versus.ok else None


def format_summary(rows: list[Row], startup_s: float = 0.0) -> str:
    """Markdown: one line per method and size (methods in run order, then sizes).
    ``startup_s``: the process start-up measured beside, for the "(ckreg - start-up)/floor"
    column (the floor is timed in-process, ckreg as a process)."""
    cpu = sorted(_ckreg_rows(rows), key=lambda r: _order(rows, r))
    lines = [
        "| method | size | floor s | ckreg s | mergekit s | ckreg/floor | (ckreg - start-up)/floor "
        "| mergekit/ckreg | ckreg s/GB in | RSS ckreg MiB | RSS mergekit MiB | RSS ckreg/mergekit |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in cpu:
        mk, ok = _mk(r), r.run.ok
        wall = r.run.wall_s if ok else None
        net = (wall - startup_s) / r.floor if wall and r.floor else None
        lines.append(
            f"| {r.method} | {r.size} | {_num(r.floor)} | {_num(wall, 1) if ok else 'FAILED'} "
            f"| {_num(mk.wall_s, 1) if mk else '-'} "
            f"| {_num(wall / r.floor if wall and r.floor else None, 2, 'x')} "
            f"| {_num(net, 2, 'x')} "
            f"| {_num(mk.wall_s / wall if mk and wall else None, 2, 'x')} "
            f"| {_num(wall / (r.in_bytes / 1e9) if wall and r.in_bytes else None)} "
            f"| {r.run.peak_rss / MIB:.0f} | {f'{mk.peak_rss / MIB:.0f}' if mk else '-'} "
            f"| {_num(r.run.peak_rss / mk.peak_rss if mk else None)} |"
        )
    return "\n".join(lines)


def _order(rows: list[Row], row: Row) -> tuple[int, int]:
    methods = list(dict.fromkeys(r.method for r in rows))
    sizes = list(dict.fromkeys(r.size for r in rows))
    return methods.index(row.method), sizes.index(row.size)


def format_goals(rows: list[Row]) -> list[str]:
    """One line per method: each goal, its value at every size, met or not."""
    lines = []
    cpu = _ckreg_rows(rows)
    for method in dict.fromkeys(r.method for r in cpu):
        mine = [r for r in cpu if r.method == method and r.run.ok]
        if not mine:
            lines.append(f"{method}: every ckreg run FAILED")
            continue
        parts = []
        if method in FLOOR_GOALS and all(r.floor for r in mine):
            values = {r.size: r.run.wall_s / (r.floor or 1) for r in mine}
            parts.append(_goal("ckreg/floor", values, FLOOR_GOALS[method], at_most=True))
        versus = {r.size: r for r in mine if _mk(r)}
        if versus:
            speed = {s: (_mk(r) or r.run).wall_s / r.run.wall_s for s, r in versus.items()}
            rss = {s: r.run.peak_rss / (_mk(r) or r.run).peak_rss for s, r in versus.items()}
            parts.append(_goal("mergekit/ckreg", speed, SPEEDUP_GOAL, at_most=False))
            parts.append(_goal("RSS ckreg/mergekit", rss, RSS_GOAL, at_most=True))
        if len(mine) > 1:
            per_gb = [r.run.wall_s / (r.in_bytes / 1e9) for r in mine if r.in_bytes]
            peaks = [r.run.peak_rss for r in mine]
            if per_gb:
                parts.append(f"s/GB max/min across sizes {max(per_gb) / min(per_gb):.2f}")
            parts.append(f"peak RSS max/min across sizes {max(peaks) / min(peaks):.2f}")
        lines.append(f"{method}: " + "; ".join(parts))
    return lines


def _goal(name: str, values: dict[str, float], goal: float, *, at_most: bool) -> str:
    met = all(v <= goal if at_most else v >= goal for v in values.values())
    shown = ", ".join(f"{size} {value:.2f}" for size, value in values.items())
    return (
        f"{name} {shown} (goal {'<=' if at_most else '>='} {goal:g}: {'met' if met else 'NOT met'})"
    )


def format_shard_rss(rows: list[Row]) -> str:
    """Markdown: ckreg's peak RSS per output shard size, per method and size."""
    cpu = [r for r in _ckreg_rows(rows) if len(r.shard_rss) > 1]
    if not cpu:
        return ""
    shards = list(dict.fromkeys(s for r in cpu for s in r.shard_rss))
    lines = [
        "| method | size | " + " | ".join(f"RSS MiB, shards {s}" for s in shards) + " | max/min |",
        "|---|---|" + "---|" * (len(shards) + 1),
    ]
    for r in sorted(cpu, key=lambda r: _order(rows, r)):
        values = [r.shard_rss.get(s) for s in shards]
        seen = [v for v in values if v]
        cells = " | ".join(f"{v / MIB:.0f}" if v else "FAILED" for v in values)
        spread = f"{max(seen) / min(seen):.2f}" if len(seen) == len(values) else "-"
        lines.append(f"| {r.method} | {r.size} | {cells} | {spread} |")
    return "\n".join(lines)


def print_summary(rows: list[Row], startup_s: float) -> None:
    """The markdown summary, the goals and the shard-size RSS table (when measured)."""
    print("\n## Summary (median runs; s/GB in = ckreg wall per GB of input files)\n")
    print(f"ckreg wall includes process start-up: {startup_s:.2f} s for "
          "`python -c 'import gc, torch, mergeops; gc.freeze()'` here (the floor has none)\n")  # fmt: skip
    print(format_summary(rows, startup_s))
    print("\nGoals (issue 20):")
    for line in format_goals(rows):
        print(f"- {line}")
    shard = format_shard_rss(rows)
    if shard:
        print("\n## ckreg peak RSS by output shard size (--shard-sizes; one run each but the "
              "main shard size's, which is the median run)\n")  # fmt: skip
        print(shard)
