"""CPU seconds per process group from ``/proc``, for "where did the CPU go" next to timings.

A ``CpuMeter`` snapshots user+system CPU time of named groups of processes (a process and all
its descendants, or the processes whose command line holds a text) and the whole machine's busy time,
then reports, per group, the CPU seconds spent between ``start()`` and ``stop()``. The machine's
busy time minus the groups' gives what other users of the machine took meanwhile.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

TICKS = os.sysconf("SC_CLK_TCK")
# A group is a process id (that process and its descendants) or a text its command line holds.
Group = int | str


def _proc_cpu(pid: int) -> tuple[float, int]:
    """(user+system CPU seconds of ``pid`` itself, its parent pid); (0, -1) once it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0, -1
    fields = raw[raw.rindex(")") + 2 :].split()  # after "pid (comm) "
    return (int(fields[11]) + int(fields[12])) / TICKS, int(fields[1])


def _cmdline(pid: int) -> str:
    try:
        return (
            Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        )
    except OSError:
        return ""


def _all_pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def machine_busy_s() -> float:
    """CPU seconds all cores spent busy since boot (``/proc/stat``: all but idle and iowait)."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]
    return (sum(values[:8]) - idle) / TICKS


@dataclass
class CpuMeter:
    """CPU seconds per group between ``start()`` and ``stop()``; a process counts in the first
    group (in ``groups``' order) that picks it, so a process tree can be listed after its
    children's groups.

    Processes that exit in between lose the CPU time they spent after the first snapshot (the
    kernel folds it into their parent only once reaped); the registry's pooled connections and
    servers live through the run, so this is small.
    """

    groups: dict[str, Group]
    spent: dict[str, float] = field(default_factory=dict)
    machine_s: float = 0.0
    _before: dict[str, dict[int, float]] = field(default_factory=dict)
    _machine_before: float = 0.0

    def _snapshot(self) -> dict[str, dict[int, float]]:
        cpu: dict[int, float] = {}
        parents: dict[int, int] = {}
        for pid in _all_pids():
            seconds, parent = _proc_cpu(pid)
            if parent >= 0:
                cpu[pid], parents[pid] = seconds, parent
        taken: dict[str, dict[int, float]] = {}
        left = set(cpu)  # each process counts in the first group that picks it
        for name, group in self.groups.items():
            if isinstance(group, int):
                members = {pid for pid in left if _descends(pid, group, parents)}
            else:
                members = {pid for pid in left if group in _cmdline(pid)}
            left -= members
            taken[name] = {pid: cpu[pid] for pid in members}
        return taken

    def start(self) -> CpuMeter:
        self._before = self._snapshot()
        self._machine_before = machine_busy_s()
        return self

    def stop(self) -> dict[str, float]:
        after = self._snapshot()
        self.machine_s = machine_busy_s() - self._machine_before
        for name, now in after.items():
            before = self._before.get(name, {})
            self.spent[name] = sum(now[pid] - before.get(pid, 0.0) for pid in now)
        return self.spent


def _descends(pid: int, root: int, parents: dict[int, int]) -> bool:
    seen = 0
    while pid > 1 and seen < 64:
        if pid == root:
            return True
        pid = parents.get(pid, 0)
        seen += 1
    return pid == root
