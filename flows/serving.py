"""``ckreg serve --workers N``: N API processes behind one port, the flows in one process only.

One API process (uvicorn on one event loop) tops out at about one core; ``--workers N`` starts
N of them (uvicorn's process supervisor: they share the listening socket, a worker that dies is
replaced). The parent process serves no HTTP. In embedded mode it runs the ``EmbeddedLauncher``
(Prefect's API subprocess, the flow thread, cron and recovery sweeps) exactly once; the API
processes get a ``RelayLauncher`` that sends each launcher call ("checkpoint 12 is ready",
"merge run 5 was queued") to it as one datagram on a Unix socket in a private directory. In
server mode every API process uses its own ``ServerLauncher`` (Prefect events and deployments).

Stopping: SIGTERM / SIGINT to the parent stops the workers (uvicorn's graceful shutdown) and
then the launcher; ``flows.processes.stop_children_on_exit`` in the parent stops whatever is
left, and its watchdog does the same when the parent is killed with SIGKILL. Each API process
also watches its parent and stops itself when the parent is gone.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any

log = logging.getLogger(__name__)

#: Where an API process finds the parent's launcher socket (unset: use a ServerLauncher).
RELAY_ENV = "CKSERVE_LAUNCHER_SOCKET"
#: The launcher calls an API process may relay (the ``registry.launcher.Launcher`` protocol).
RELAYED = ("checkpoint_ready", "merge_requested", "search_requested")
PARENT_POLL_S = 0.5


class RelayLauncher:
    """An API worker's launcher: each call becomes a datagram ``<method> <id>`` to the parent."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)

    def _send(self, method: str, object_id: int) -> None:
        self._socket.sendto(f"{method} {int(object_id)}".encode(), self.path)

    def checkpoint_ready(self, checkpoint_id: int) -> None:
        self._send("checkpoint_ready", checkpoint_id)

    def merge_requested(self, run_id: int) -> None:
        self._send("merge_requested", run_id)

    def search_requested(self, search_id: int) -> None:
        self._send("search_requested", search_id)


def _dispatch(launcher: Any, message: bytes) -> None:
    method, _, raw_id = message.decode(errors="replace").partition(" ")
    if method not in RELAYED or not raw_id.isdigit():
        log.warning("launcher relay: ignored malformed message %r", message[:100])
        return
    getattr(launcher, method)(int(raw_id))


@contextlib.contextmanager
def launcher_relay(launcher: Any) -> Iterator[str]:
    """Receive relayed launcher calls on a Unix socket (in a 0700 temp dir) and pass them to
    ``launcher`` on a thread; yields the socket's path, closed and removed afterwards."""
    folder = tempfile.mkdtemp(prefix="ckreg-serve-")
    path = os.path.join(folder, "launcher.sock")
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(path)
    receiver.settimeout(0.5)
    stop = threading.Event()

    def receive() -> None:
        while not stop.is_set():
            try:
                message = receiver.recv(256)
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                _dispatch(launcher, message)
            except Exception:  # one bad call must not end the relay
                log.exception("launcher relay: %r failed", message[:100])

    thread = threading.Thread(target=receive, name="ckreg-launcher-relay", daemon=True)
    thread.start()
    try:
        yield path
    finally:
        stop.set()
        thread.join(timeout=2)
        receiver.close()
        with contextlib.suppress(OSError):
            os.unlink(path)
            os.rmdir(folder)


def _watch_parent(parent: int) -> None:
    """Stop this API process (SIGTERM: uvicorn's graceful shutdown) once its parent is gone."""
    while os.getppid() == parent:
        time.sleep(PARENT_POLL_S)
    log.warning("ckreg serve parent %s is gone: stopping API worker %s", parent, os.getpid())
    os.kill(os.getpid(), signal.SIGTERM)


def worker_app() -> Any:
    """The app of one API process (uvicorn ``--factory``): settings from the environment (the
    parent upgraded the database), the parent's launcher through the relay, or a
    ``ServerLauncher`` in server mode."""
    from flows.launchers import ServerLauncher
    from registry.api.app import create_app
    from registry.settings import get_settings

    threading.Thread(
        target=_watch_parent, args=(os.getppid(),), name="ckreg-parent", daemon=True
    ).start()
    relay = os.environ.get(RELAY_ENV)
    launcher = RelayLauncher(relay) if relay else ServerLauncher()
    return create_app(get_settings(), launcher=launcher)


def _check_app() -> None:
    """Build the app once here, so that bad settings (a malformed store URL) stop ``ckreg
    serve`` with their error, as with one process, instead of a crash loop of workers."""
    from registry.api.app import create_app
    from registry.settings import get_settings

    create_app(get_settings()).state.engine.dispose()


def serve_workers(
    *,
    workers: int,
    host: str,
    port: int,
    options: dict[str, Any],
    launcher: Any | None,
) -> None:
    """Run ``workers`` API processes on ``host:port`` until SIGTERM / SIGINT; ``launcher`` (the
    embedded one, else None) gets the workers' launcher calls. uvicorn's supervisor replaces
    the stop handlers of ``flows.processes`` while it runs: they are put back afterwards and
    the stop signal raised again, so the caller unwinds as a single-process server would."""
    import uvicorn
    from uvicorn.config import STARTUP_FAILURE
    from uvicorn.supervisors import Multiprocess

    from flows.processes import STOP_DEADLINE_S, handle_stop_signal

    config = uvicorn.Config(
        "flows.serving:worker_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level="info",
        # The supervisor waits for its workers without a deadline: bound their shutdown.
        timeout_graceful_shutdown=int(STOP_DEADLINE_S),
        **options,
    )
    _check_app()
    received: list[int] = []
    with contextlib.ExitStack() as stack:
        if launcher is not None:
            os.environ[RELAY_ENV] = stack.enter_context(launcher_relay(launcher))
        else:
            os.environ.pop(RELAY_ENV, None)
        sock = config.bind_socket()
        supervisor = Multiprocess(config, sockets=[sock])
        original = supervisor.handle_signals

        def handle_signals() -> None:  # remember which stop signal ended the run
            received.extend(s for s in supervisor.signal_queue if s in _STOPS)
            original()

        supervisor.handle_signals = handle_signals  # type: ignore[method-assign]
        try:
            supervisor.run()
        finally:
            sock.close()
    for stop in _STOPS:
        signal.signal(stop, handle_stop_signal)
    if received:
        signal.raise_signal(received[0])
    if any(process.exitcode == STARTUP_FAILURE for process in supervisor.processes):
        # A worker could not start (bad settings, database down): the supervisor stopped all
        # of them; exit non-zero, as a single-process ``ckreg serve`` does.
        raise SystemExit(STARTUP_FAILURE)


_STOPS = (signal.SIGTERM, signal.SIGINT)
