"""The floor of a streaming merge on this machine: read every input byte once, write one output
of the output's size — no arithmetic — timed on the same files as the merges it is set beside.

    python -m bench.merge_engine --floor [--sizes 100m]

``bench.merge_engine`` measures it in every run (a ``floor`` column and each engine's time as
a multiple of it); ``--floor`` prints it alone. Reads go through ``os.preadv`` into one reused
buffer (what the mergeops readers do, minus the per-tensor bookkeeping), writes through
``os.write`` from one reused buffer into a fresh file that is removed afterwards, with no
``fsync`` (neither engine syncs its output). Both the page-cache state and the dirty-page
write-back are shared with the merges of the same run, so call ``os.sync()`` after generating
inputs and take medians of several runs.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from bench._common import MIB

BLOCK = 16 * MIB


@dataclass(frozen=True)
class Floor:
    """One floor measurement: seconds to read ``read_bytes`` and write ``write_bytes``."""

    read_s: float
    write_s: float
    read_bytes: int
    write_bytes: int

    @property
    def seconds(self) -> float:
        return self.read_s + self.write_s


def input_files(folders: Iterable[Path]) -> list[Path]:
    """The safetensors files of checkpoint folders, in a stable order."""
    return [p for folder in folders for p in sorted(Path(folder).glob("*.safetensors"))]


def read_all(files: list[Path], buffer: bytearray) -> int:
    """Read every byte of ``files`` once into ``buffer`` (reused); returns bytes read."""
    view = memoryview(buffer)
    total = 0
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            offset = 0
            while count := os.preadv(fd, [view], offset):
                offset += count
            total += offset
        finally:
            os.close(fd)
    return total


def write_size(path: Path, size: int, buffer: bytearray) -> None:
    """Write ``size`` bytes into a new file ``path`` (no fsync, like the merges)."""
    view = memoryview(buffer)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        left = size
        while left:
            left -= os.write(fd, view[: min(left, len(view))])
    finally:
        os.close(fd)


def warm_inputs(folders: Iterable[Path]) -> bool:
    """Read every input file once, untimed, so the next measurement starts with the inputs in
    the page cache (this machine's proactive reclaim evicts pages left idle during a long
    run, so a measurement right after one would otherwise read part of them from disk while
    the next one reads them from memory). False, reading nothing, when the inputs take more
    than half the machine's memory: they cannot stay cached, every run reads from disk."""
    files = input_files(folders)
    total = sum(path.stat().st_size for path in files)
    if total > os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2:
        return False
    read_all(files, bytearray(BLOCK))
    return True


def measure_floor(folders: Iterable[Path], out_bytes: int, scratch: Path) -> Floor:
    """Time one read of every input file and one write of ``out_bytes`` into ``scratch``."""
    buffer = bytearray(os.urandom(1024)) * (BLOCK // 1024)
    files = input_files(folders)
    start = time.perf_counter()
    read = read_all(files, buffer)
    middle = time.perf_counter()
    scratch.parent.mkdir(parents=True, exist_ok=True)
    try:
        write_size(scratch, out_bytes, buffer)
        end = time.perf_counter()
    finally:
        scratch.unlink(missing_ok=True)
    return Floor(middle - start, end - middle, read, out_bytes)


def median_floor(floors: list[Floor]) -> Floor:
    """The run with the median total time."""
    ordered = sorted(floors, key=lambda f: f.seconds)
    return ordered[(len(ordered) - 1) // 2]


def format_floor(size: str, floors: list[Floor]) -> str:
    """One line: median floor, its read/write split and GB/s, and every run."""
    med = median_floor(floors)
    moved = med.read_bytes + med.write_bytes
    runs = ", ".join(f"{f.seconds:.2f}" for f in floors)
    return (
        f"floor {size}: {med.seconds:.2f} s median (read {med.read_bytes / MIB:.0f} MiB in "
        f"{med.read_s:.2f} s, write {med.write_bytes / MIB:.0f} MiB in {med.write_s:.2f} s, "
        f"{moved / med.seconds / 1e9:.2f} GB/s); runs: {runs}; "
        f"spread {statistics.pstdev([f.seconds for f in floors]):.2f} s"
    )
