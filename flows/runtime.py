"""What a flow run works with: settings, a database engine and the object store.

Flows take only ids as parameters (so Prefect deployments can start them); they reach the
database and store through the process-wide ``Runtime``. The embedded launcher configures it
with the server's settings; a Prefect worker process builds it from ``CKREG_*`` settings.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine
from sqlmodel import Session

from flows.kernel_env import configure_kernels
from registry.db import make_engine, session_scope
from registry.settings import Settings, get_settings
from registry.storage import ObjectStore, open_store


@dataclass
class Runtime:
    """Settings plus the engine and store built from them."""

    settings: Settings
    engine: Engine = field(init=False)
    store: ObjectStore = field(init=False)
    #: Where side work (MLflow logging) runs off the merge path; None runs it inline.
    background: ThreadPoolExecutor | None = None

    def __post_init__(self) -> None:
        configure_kernels()  # flow-run subprocesses do not start through the CLI
        self.engine = make_engine(self.settings.database_url)
        self.store = open_store(
            self.settings.store_url,
            endpoint_url=self.settings.s3_endpoint_url,
            region=self.settings.s3_region,
            part_size=self.settings.s3_part_size,
        )

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A fresh database session (closed afterwards)."""
        with session_scope(self.engine) as session:
            yield session

    def close(self) -> None:
        if self.background is not None:
            self.background.shutdown(wait=True)
        self.engine.dispose()


_lock = threading.Lock()
_current: Runtime | None = None
#: The runtime side work was submitted from, for the background thread running it.
_bound = threading.local()


def configure(settings: Settings) -> Runtime:
    """Make ``settings`` the runtime of this process's flows; returns the new runtime."""
    global _current
    with _lock:
        if _current is not None and _current.settings == settings:
            return _current
        old, _current = _current, Runtime(settings)
        new = _current
    if old is not None:  # closed outside the lock: its background work may ask for a runtime
        old.close()
    return new


def current_runtime() -> Runtime:
    """The runtime of this thread's work: the one it was submitted from (``run_bound``), else
    the configured one, built from the environment's settings on first use."""
    bound: Runtime | None = getattr(_bound, "runtime", None)
    if bound is not None:
        return bound
    with _lock:
        runtime = _current
    return runtime if runtime is not None else configure(get_settings())


def run_bound(runtime: Runtime, work: Callable[..., None], *args: Any) -> None:
    """Run ``work(*args)`` with ``runtime`` as this thread's current runtime (background side
    work keeps the runtime that submitted it, even while that runtime is being closed)."""
    _bound.runtime = runtime
    try:
        work(*args)
    finally:
        _bound.runtime = None


def reset() -> None:
    """Forget the runtime (tests switch settings between cases). Its close waits for its
    background work outside the lock, so that work never blocks on the lock."""
    global _current
    with _lock:
        old, _current = _current, None
    if old is not None:
        old.close()
