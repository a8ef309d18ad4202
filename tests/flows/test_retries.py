"""Flow tasks retry I/O errors, not the registry's refusals (which fail the same way again)."""

from __future__ import annotations

import pytest
from prefect import flow, task

from flows.retries import IO_TASK
from registry.errors import IntegrityMismatch, InvalidInput, NotFound
from registry.services.leases import LeaseLost


def _attempts(error: BaseException) -> int:
    calls = 0

    @task(**{**IO_TASK, "retry_delay_seconds": 0})
    def flaky() -> None:
        nonlocal calls
        calls += 1
        raise error

    @flow
    def run() -> None:
        flaky()

    with pytest.raises(type(error)):
        run()
    return calls


@pytest.mark.parametrize("error", [InvalidInput("nan score"), NotFound("gone"), LeaseLost("lost")])
def test_registry_refusals_fail_at_once(prefect_harness: None, error: Exception) -> None:
    assert _attempts(error) == 1


@pytest.mark.parametrize(
    "error", [OSError("connection reset"), IntegrityMismatch("sha256 differs"), TimeoutError()]
)
def test_io_errors_are_retried(prefect_harness: None, error: Exception) -> None:
    assert _attempts(error) == 1 + IO_TASK["retries"]
