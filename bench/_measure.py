"""Measuring one merge as its own process: wall and CPU seconds and peak RSS from ``wait4``
(through a tiny launcher, so the figure is the merge's and not the benchmark's), peak
RssAnon sampled from /proc, and the input bytes of a checkpoint folder. Used by
``bench.merge_engine``, ``bench.merge_from_s3`` and ``bench.frontier_bench``."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

from bench.merge_report import Run

# ru_maxrss survives execve, so a child exec'd straight from this (large) process would report
# our own peak; a tiny launcher forks the merge from a small process and reports its rusage.
_LAUNCHER = """import os, sys, time
start = time.perf_counter()
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as out:
    cpu = usage.ru_utime + usage.ru_stime
    out.write(f"{usage.ru_maxrss} {time.perf_counter() - start} {cpu}")
sys.exit(os.waitstatus_to_exitcode(status))
"""


def _rss_anon(pid: int) -> int:
    """RssAnon (bytes) of ``pid``'s children, i.e. of the merge under the launcher."""
    total = 0
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        for child in children:
            for line in Path(f"/proc/{child}/status").read_text().splitlines():
                if line.startswith("RssAnon:"):
                    total += int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return total


def measure(cmd: list[str], *, engine: str, device: str, log: Path) -> Run:
    """Run ``cmd`` to completion; peak RSS is that process's own ``ru_maxrss``."""
    peak_anon = [0]
    report = log.with_suffix(".rusage")
    with log.open("w") as sink:
        launcher = [sys.executable, "-S", "-c", _LAUNCHER, str(report), *cmd]
        proc = subprocess.Popen(launcher, stdout=sink, stderr=subprocess.STDOUT)
        done = threading.Event()

        def sample() -> None:
            while not done.wait(0.05):
                peak_anon[0] = max(peak_anon[0], _rss_anon(proc.pid))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        returncode = proc.wait()
        done.set()
        sampler.join()
    maxrss_kib, wall, cpu = (
        report.read_text().split() if report.is_file() else ("0",) + ("nan",) * 2
    )
    return Run(engine, device, float(wall), float(cpu), int(maxrss_kib) * 1024, peak_anon[0],
               returncode == 0, log)  # fmt: skip


def folder_bytes(folder: Path) -> int:
    """Bytes of the safetensors files in ``folder``."""
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))
