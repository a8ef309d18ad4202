"""Read-ahead windows in isolation: a failed fetch reaches every waiter and is not cached."""

from __future__ import annotations

import threading

import pytest
import torch

from registry.storage.read_ahead import ReadAhead


def test_a_failed_window_fetch_fails_its_waiters_and_is_retried() -> None:
    data = torch.arange(64 * 4, dtype=torch.float32).reshape(64, 4)
    calls: list[tuple[int, int]] = []
    release = threading.Event()

    def fetch(key: str, start: int, stop: int) -> torch.Tensor:
        calls.append((start, stop))
        if len(calls) == 1:
            release.wait(5)
            raise OSError("connection reset")
        return data[start:stop].clone()

    ahead = ReadAhead(fetch, window_bytes=16 * 16)  # 16 rows of 16 bytes
    errors: list[BaseException] = []

    def read(start: int) -> None:
        try:
            ahead.rows("w", start, start + 4, 64, 16)
        except OSError as exc:
            errors.append(exc)

    owner = threading.Thread(target=read, args=(0,))
    owner.start()
    while not calls:
        threading.Event().wait(0.01)
    waiter = threading.Thread(target=read, args=(4,))
    waiter.start()
    threading.Event().wait(0.05)
    release.set()
    owner.join(5)
    waiter.join(5)
    assert len(errors) == 2 and all("connection reset" in str(e) for e in errors)
    assert torch.equal(ahead.rows("w", 4, 8, 64, 16), data[4:8])  # a new window, fetched again
    assert calls[-1] == (4, 20)


def test_windows_are_bounded_and_ranges_clamped() -> None:
    data = torch.arange(100, dtype=torch.float32).reshape(100, 1)
    fetched: list[tuple[int, int]] = []

    def fetch(key: str, start: int, stop: int) -> torch.Tensor:
        fetched.append((start, stop))
        return data[start:stop].clone()

    ahead = ReadAhead(fetch, window_bytes=40, max_windows=1)  # 10 rows of 4 bytes
    assert torch.equal(ahead.rows("a", 95, 98, 100, 4), data[95:98])
    assert fetched == [(95, 100)]  # 3-row reads: a window of 9 rows, clamped to the tensor
    assert torch.equal(ahead.rows("b", 0, 3, 100, 4), data[0:3])  # evicts a's window
    assert torch.equal(ahead.rows("a", 98, 100, 100, 4), data[98:100])
    assert fetched[-1] == (98, 100)
    with pytest.raises(ValueError, match="window_bytes"):
        ReadAhead(fetch, window_bytes=0)
