"""Shared helpers for the registry benchmarks: server subprocesses, RSS sampling, tables.

The benchmarks start real servers (``moto_server`` for S3, uvicorn for the registry) as
separate processes on loopback ports, so the figures include HTTP and process boundaries.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any

# Throwaway credentials for the local S3 endpoint (moto accepts any).
S3_ENV = {
    "AWS_ACCESS_KEY_ID": "bench",
    "AWS_SECRET_ACCESS_KEY": "bench",
    "AWS_DEFAULT_REGION": "us-east-1",
}
MIB = 1024 * 1024


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, *, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    """Block until ``port`` accepts connections; fail if ``proc`` exits first or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"{proc.args!r} exited with {proc.returncode} before port {port} opened"
            )
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"port {port} did not open within {timeout}s for {proc.args!r}")


@dataclass
class ServerProcess:
    """A server subprocess listening on ``url``; ``stop()`` terminates it (kill after 10 s)."""

    url: str
    proc: subprocess.Popen[bytes]
    log: IO[bytes] | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.log is not None:
            self.log.close()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def start_server(
    command: Sequence[str], *, port: int, log_path: Path, env: Mapping[str, str] | None = None
) -> ServerProcess:
    """Start ``command`` (which must listen on ``port``) and wait until it accepts connections."""
    log = log_path.open("wb")
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.Popen(list(command), stdout=log, stderr=subprocess.STDOUT, env=full_env)
    server = ServerProcess(url=f"http://127.0.0.1:{port}", proc=proc, log=log)
    try:
        wait_for_port(port, proc=proc)
    except BaseException:
        server.stop()
        raise
    return server


def start_moto(workdir: Path) -> ServerProcess:
    """``moto_server`` on a free loopback port: a real S3 endpoint over HTTP (with the
    thread-safety fixes of ``bench.moto_server``)."""
    if not moto_server_installed():
        raise RuntimeError("moto_server not found; install moto[server]")
    port = free_port()
    return start_server(moto_command(port), port=port, log_path=workdir / "moto.log")


def moto_server_installed() -> bool:
    """True when moto's server (``moto[server]``: moto, flask, werkzeug) can be imported."""
    return all(importlib.util.find_spec(name) for name in ("moto", "flask", "werkzeug"))


def moto_command(port: int) -> list[str]:
    """The command line of a ``bench.moto_server`` on ``127.0.0.1:port``."""
    return [sys.executable, "-m", "bench.moto_server", "-H", "127.0.0.1", "-p", str(port)]


def start_registry(workdir: Path, env: Mapping[str, str]) -> ServerProcess:
    """The registry under uvicorn in its own process; ``env`` carries its ``CKREG_*`` settings.

    The database must already be upgraded (``registry.db.upgrade_database``).
    """
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "uvicorn",
        "--factory",
        "bench._common:registry_app",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "warning",
        "--no-access-log",
    ]
    repo_root = str(Path(__file__).resolve().parent.parent)
    pythonpath = os.pathsep.join(p for p in (repo_root, os.environ.get("PYTHONPATH")) if p)
    return start_server(
        command,
        port=port,
        log_path=workdir / "registry.log",
        env={**env, "PYTHONPATH": pythonpath},
    )


def registry_app() -> Any:
    """uvicorn ``--factory`` entry point: the registry app built from ``CKREG_*`` settings."""
    from registry.api.app import create_app
    from registry.settings import get_settings

    return create_app(get_settings())


def create_token(database_url: str, *, scopes: Sequence[str] = ("write",)) -> str:
    """A plaintext bearer token with ``scopes``, created straight in the (upgraded) database."""
    from registry.db import make_engine, session_scope
    from registry.services import create_token as create_token_row

    engine = make_engine(database_url)
    try:
        with session_scope(engine) as session:
            _, plaintext = create_token_row(session=session, name="bench", scopes=list(scopes))
    finally:
        engine.dispose()
    return plaintext


# --- memory -----------------------------------------------------------------------------------


def rss_bytes(pid: int) -> int:
    """Resident set size of ``pid`` from ``/proc/<pid>/status`` (``VmRSS``), in bytes."""
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS line in /proc/{pid}/status")


@dataclass
class RssSampler:
    """Samples a process's RSS every ``interval`` seconds in a thread while the block runs.

    ``baseline`` is the RSS on entry; ``peak`` the largest sample; ``growth`` their difference.
    """

    pid: int
    interval: float = 0.05
    baseline: int = 0
    peak: int = 0
    samples: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def _sample(self) -> None:
        try:
            value = rss_bytes(self.pid)
        except (OSError, RuntimeError):
            return  # the process ended; keep what was seen
        self.peak = max(self.peak, value)
        self.samples += 1

    @property
    def growth(self) -> int:
        return max(0, self.peak - self.baseline)

    def __enter__(self) -> RssSampler:
        self.baseline = self.peak = rss_bytes(self.pid)
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=f"rss-{self.pid}", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()


# --- reporting --------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) of ``values`` by linear interpolation."""
    if not values:
        raise ValueError("percentile of an empty sequence")
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def latency_summary(seconds: Sequence[float]) -> dict[str, float]:
    """p50 / p95 / max / mean of request latencies, in milliseconds."""
    millis = [s * 1000 for s in seconds]
    return {
        "p50": percentile(millis, 50),
        "p95": percentile(millis, 95),
        "max": max(millis),
        "mean": statistics.fmean(millis),
    }


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain-text table with columns aligned (numbers right, text left)."""
    cells = [[_cell(value) for value in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
    numeric = [all(_is_number(row[i]) for row in rows) and bool(rows) for i in range(len(headers))]

    def line(values: Sequence[str]) -> str:
        parts = [
            v.rjust(w) if num else v.ljust(w)
            for v, w, num in zip(values, widths, numeric, strict=True)
        ]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(list(headers)), rule, *(line(row) for row in cells)])


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """Print ``title`` and the aligned table below it."""
    print(f"\n{title}\n{format_table(headers, rows)}", flush=True)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.2f}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def load_average() -> str:
    """The 1/5/15-minute load averages and CPU count, for the record next to timings."""
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} CPUs"
