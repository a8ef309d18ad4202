"""How flow tasks retry: reading and writing the store may pass on a second try; the registry's
refusals (bad input, a missing row, a run's lease lost to another worker) fail the same way
again, so the task fails at once with them instead of after every retry."""

from __future__ import annotations

from typing import Any

from prefect.cache_policies import NO_CACHE

from registry.errors import IntegrityMismatch, RegistryError

IO_RETRIES = 2


def worth_retrying(_task: Any, _run: Any, state: Any) -> bool:
    """A task retry condition: anything but a ``RegistryError`` (bytes that failed their hash
    are read again: a second read may be whole)."""
    try:
        state.result()
    except IntegrityMismatch:
        return True
    except RegistryError:
        return False
    except BaseException:
        return True
    return True


#: Options of a task that does I/O: retried twice a second apart, unless the registry refused.
IO_TASK: dict[str, Any] = {
    "retries": IO_RETRIES,
    "retry_delay_seconds": 1,
    "retry_condition_fn": worth_retrying,
    "cache_policy": NO_CACHE,
    "persist_result": False,
}
