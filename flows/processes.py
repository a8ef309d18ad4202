"""Stop every process ``ckreg serve`` / ``ckreg worker`` started when it stops, however it stops.

* SIGTERM raises ``SystemExit`` (as SIGINT raises ``KeyboardInterrupt``), so ``finally`` blocks
  and ``atexit`` handlers run: uvicorn re-raises the signal after its graceful shutdown, and
  Python's default SIGTERM action would end the process on the spot, leaving Prefect's API
  subprocess behind. Unwinding has ``STOP_DEADLINE_S``: clean-up that retries an unreachable
  Prefect API would otherwise hold the process for over a minute; past it the process stops
  its children and exits (a second signal does so at once).
* At exit, every descendant still running gets SIGTERM, then SIGKILL after a grace period.
* For ``kill -9`` (nothing runs in the dying process) a small watchdog process, in its own
  session, holds a pipe from this process: a thread tells it each descendant (pid and start
  time); when the pipe closes — this process died, by any signal — it stops the ones still
  running (the start time guards against a reused pid).

Linux only (``/proc``); elsewhere only the signal handling applies.

The other side, for a flow-run subprocess of ``ckreg worker`` (``watch_parent``): when the
worker dies, the flow must not fail its run on a broken stdout pipe. A thread notices the
parent's death (the process is re-parented), points stdout/stderr at a log file, and sends the
process SIGTERM, so the flow unwinds as an interrupted attempt: its merge run's lease is given
back (``flows.attempts.release_attempt``) and its GPU concurrency slot released.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

log = logging.getLogger(__name__)

PROC = Path("/proc")
POLL_S = 0.5
#: After SIGTERM / SIGINT: seconds to unwind before the process stops its children and exits.
STOP_DEADLINE_S = 5.0
#: Seconds a child gets after SIGTERM before SIGKILL when stopping against the deadline.
KILL_GRACE_S = 1.0

_WATCHDOG = r"""
import os, signal, sys, time
known = {}
for line in sys.stdin:
    pid, _, start = line.strip().partition(" ")
    known[int(pid)] = start
def alive(pid, start):
    try:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[19] == start and fields[0] != "Z"
for sig in (signal.SIGTERM, signal.SIGKILL):
    for pid, start in known.items():
        if alive(pid, start):
            try:
                os.kill(pid, sig)
            except OSError:
                pass
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(alive(p, s) for p, s in known.items()):
        time.sleep(0.1)
"""


def _stat(pid: int) -> list[str] | None:
    """Fields of ``/proc/<pid>/stat`` after the command name (state first), or None."""
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()


def start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (tells a reused pid apart)."""
    fields = _stat(pid)
    return fields[19] if fields else None


def is_running(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z"


def _children(pid: int) -> list[int] | None:
    """Live children of ``pid`` from ``/proc/<pid>/task/*/children`` (a few small reads), or
    None where the kernel does not offer those files."""
    tasks = PROC / str(pid) / "task"
    try:
        files = [task / "children" for task in tasks.iterdir()]
    except OSError:
        return [] if not (PROC / str(pid)).exists() else None
    found: list[int] = []
    for path in files:
        try:
            found.extend(int(child) for child in path.read_text().split())
        except FileNotFoundError:
            if not path.parent.exists():  # a thread that just ended
                continue
            return None
        except OSError:
            continue
    return [child for child in found if is_running(child)]


def _scan_descendants(root: int) -> list[int]:
    """Descendants of ``root`` by reading every ``/proc/<pid>/stat`` (the slow fallback)."""
    parents: dict[int, list[int]] = {}
    for entry in PROC.iterdir():
        if entry.name.isdigit():
            fields = _stat(int(entry.name))
            if fields is not None and fields[0] != "Z":
                parents.setdefault(int(fields[1]), []).append(int(entry.name))
    found: list[int] = []
    frontier = [root]
    while frontier:
        children = parents.get(frontier.pop(), [])
        found.extend(children)
        frontier.extend(children)
    return found


def descendants(pid: int | None = None) -> list[int]:
    """Every live descendant of ``pid`` (default: this process), parents before children.

    Walks the children files of the process tree (a handful of reads, so the orphan guard's
    poll stays cheap); falls back to scanning all of ``/proc`` without them."""
    if not PROC.is_dir():
        return []
    root = os.getpid() if pid is None else pid
    found: list[int] = []
    frontier = [root]
    while frontier:
        children = _children(frontier.pop())
        if children is None:
            return _scan_descendants(root)
        found.extend(children)
        frontier.extend(children)
    return found


def stop_descendants(grace_s: float = 5.0) -> list[int]:
    """SIGTERM every descendant (but the watchdog), SIGKILL those still running after
    ``grace_s``; returns them."""
    spared = {_guard.watchdog_pid} if _guard is not None else set()
    pids = [pid for pid in descendants() if pid not in spared]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            if is_running(pid):
                with contextlib.suppress(OSError):
                    os.kill(pid, sig)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and any(is_running(pid) for pid in pids):
            time.sleep(0.05)
    return pids


class OrphanGuard:
    """The watchdog process and the thread that tells it this process's descendants."""

    def __init__(self, poll_s: float = POLL_S) -> None:
        self.poll_s = poll_s
        self._told: set[tuple[int, str]] = set()
        self._watchdog = subprocess.Popen(
            [sys.executable, "-c", _WATCHDOG],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # not stopped with this process's group: it acts after it
            text=True,
        )
        self._pipe: IO[str] = self._watchdog.stdin  # type: ignore[assignment]
        self.watchdog_pid = self._watchdog.pid
        threading.Thread(target=self._watch, name="ckreg-orphan-guard", daemon=True).start()

    def tell(self) -> None:
        """Send the watchdog the descendants it does not know yet."""
        for pid in descendants():
            started = start_time(pid)
            if pid == self.watchdog_pid or started is None or (pid, started) in self._told:
                continue
            self._pipe.write(f"{pid} {started}\n")
            self._pipe.flush()
            self._told.add((pid, started))

    def _watch(self) -> None:
        while True:
            try:
                self.tell()
            except Exception:  # a vanished pid or a closed pipe at exit: try again next time
                log.debug("orphan guard could not list descendants", exc_info=True)
            time.sleep(self.poll_s)


_guard: OrphanGuard | None = None
_stopping = threading.Event()


def handle_stop_signal(signum: int, frame: Any = None) -> None:
    """SIGTERM / SIGINT: unwind (``SystemExit`` / ``KeyboardInterrupt``), but within
    ``STOP_DEADLINE_S``: a clean-up stuck retrying an unreachable API (Prefect's client backs
    off for over a minute) must not keep the process alive. A second signal stops it at once."""
    if _stopping.is_set():
        _hard_exit(128 + signum, grace_s=KILL_GRACE_S)
    _stopping.set()
    threading.Thread(
        target=_exit_after, args=(STOP_DEADLINE_S, 128 + signum), name="ckreg-stop", daemon=True
    ).start()
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise SystemExit(128 + signum)


def _exit_after(deadline_s: float, code: int) -> None:
    time.sleep(deadline_s)
    log.warning("still stopping after %.0f s: stopping children and exiting now", deadline_s)
    _hard_exit(code, grace_s=KILL_GRACE_S)


def _hard_exit(code: int, grace_s: float) -> None:
    """Stop every descendant (SIGTERM, SIGKILL after ``grace_s``) and end this process now."""
    try:
        stop_descendants(grace_s=grace_s)
    finally:
        os._exit(code)


def stop_children_on_exit(*, watchdog: bool = True) -> None:
    """Make this process stop what it started on SIGTERM, SIGINT, exit and ``kill -9``; after
    SIGTERM or SIGINT it exits within ``STOP_DEADLINE_S`` plus twice ``KILL_GRACE_S``.

    Call once from the main thread of a long-running command (``ckreg serve``, ``ckreg worker``).
    """
    global _guard
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, handle_stop_signal)
    atexit.register(stop_descendants)
    if watchdog and _guard is None and PROC.is_dir():
        _guard = OrphanGuard()


_parent_lost = threading.Event()
_watching: list[int] = []


def parent_lost() -> bool:
    """Whether ``watch_parent`` saw this process's parent die."""
    return _parent_lost.is_set()


def started_by_runner() -> bool:
    """Whether this process is a flow-run subprocess of a Prefect runner (``ckreg worker``),
    which names the flow run in ``PREFECT__FLOW_RUN_ID``; embedded flows run in-process."""
    return bool(os.environ.get("PREFECT__FLOW_RUN_ID"))


def watch_parent(log_path: Path, poll_s: float = POLL_S) -> bool:
    """In a flow-run subprocess: on the parent's death, stdout/stderr go to ``log_path`` and
    the process gets SIGTERM (``parent_lost()`` turns True first). Once per process; returns
    whether a watch started (not when the parent is init already)."""
    parent = os.getppid()
    if _watching or parent <= 1:
        return False
    _watching.append(parent)
    threading.Thread(
        target=_watch_parent, args=(parent, log_path, poll_s), name="ckreg-parent", daemon=True
    ).start()
    return True


def _watch_parent(parent: int, log_path: Path, poll_s: float) -> None:
    while os.getppid() == parent:
        time.sleep(poll_s)
    _parent_lost.set()
    with contextlib.suppress(OSError):
        log_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
    log.warning("parent %s died: stopping this flow run (pid %s)", parent, os.getpid())
    os.kill(os.getpid(), signal.SIGTERM)
