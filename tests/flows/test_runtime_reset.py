"""Resetting the flow runtime while its background thread still has side work (MLflow
logging) neither deadlocks nor hands that work another runtime."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from flows import runtime as rt
from registry.settings import Settings


def test_reset_waits_for_background_work_that_asks_for_the_runtime(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path, database_url=f"sqlite:///{tmp_path / 'db.sqlite'}")
    runtime = rt.configure(settings)
    runtime.background = ThreadPoolExecutor(1, thread_name_prefix="test-tracking")
    started, seen = threading.Event(), []

    def side_work() -> None:
        started.set()
        threading.Event().wait(0.3)  # still running when reset() starts closing
        seen.append(rt.current_runtime())  # blocked forever on the lock before the fix

    runtime.background.submit(rt.run_bound, runtime, side_work)
    assert started.wait(5)
    done = threading.Thread(target=rt.reset)
    done.start()
    done.join(timeout=10)
    assert not done.is_alive(), "reset() deadlocked on its own background work"
    assert seen == [runtime]  # the work kept the runtime that submitted it
    assert rt._current is None
