"""Read-ahead windows in isolation: what is fetched, when windows close, and failed fetches."""

from __future__ import annotations

import threading

import pytest
import torch

from registry.storage.read_ahead import ReadAhead

FILE = torch.arange(1000, dtype=torch.int32).to(torch.uint8)  # byte i == i % 256


class Fetches:
    """A file's bytes, recording every fetch."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    def __call__(self, first: int, last: int) -> torch.Tensor:
        self.calls.append((first, last))
        return FILE[first:last].clone()


def test_reads_in_file_order_tile_it_with_back_to_back_windows() -> None:
    fetch = Fetches()
    ahead = ReadAhead(fetch, len(FILE), window_bytes=100)
    for first in range(0, 990, 30):  # 30-byte reads: most windows end inside a read
        assert torch.equal(ahead.read(first, first + 30), FILE[first : first + 30])
    assert fetch.calls == [(s, min(s + 100, 1000)) for s in range(0, 1000, 100)]
    assert len(ahead._windows) == 1  # only the last, not yet read to its end


def test_small_reads_without_windows_still_let_the_window_around_them_close() -> None:
    fetch = Fetches()
    ahead = ReadAhead(fetch, len(FILE), window_bytes=100, max_windows=8)
    assert torch.equal(ahead.read(150, 155, open_windows=False), FILE[150:155])  # a norm, early
    assert fetch.calls == [(150, 155)]
    for first in [*range(100, 150, 10), *range(160, 200, 10)]:
        ahead.read(first, first + 10)
    ahead.read(155, 160)
    assert fetch.calls[1:] == [(100, 200)]  # the window brings 150:155 again
    assert ahead._windows == {}  # ... and counts them as handed out: it closed


def test_a_large_read_is_fetched_exactly_and_later_windows_stop_before_it() -> None:
    fetch = Fetches()
    ahead = ReadAhead(fetch, len(FILE), window_bytes=100)
    assert torch.equal(ahead.read(300, 600), FILE[300:600])
    assert torch.equal(ahead.read(250, 260), FILE[250:260])
    assert fetch.calls == [(300, 600), (250, 300)]  # not into the bytes read already
    assert torch.equal(ahead.read(280, 320), FILE[280:320])  # the window, then read again:
    assert fetch.calls[2:] == [(300, 400)]  # a read of those bytes opens a window as any other


def test_windows_are_bounded_and_ranges_checked() -> None:
    fetch = Fetches()
    ahead = ReadAhead(fetch, len(FILE), window_bytes=100, max_windows=2)
    for first in (0, 200, 400):  # three windows, each read at its start only
        ahead.read(first, first + 10)
    assert len(ahead._windows) == 2  # the oldest was dropped
    ahead.read(10, 20)
    assert fetch.calls[-1] == (10, 110)  # so its bytes are fetched again
    with pytest.raises(ValueError, match="outside"):
        ahead.read(990, 1001)
    with pytest.raises(ValueError, match="window_bytes"):
        ReadAhead(fetch, 10, window_bytes=0)


def test_a_failed_window_fetch_fails_its_waiters_and_is_retried() -> None:
    calls: list[tuple[int, int]] = []
    release = threading.Event()

    def fetch(first: int, last: int) -> torch.Tensor:
        calls.append((first, last))
        if len(calls) == 1:
            release.wait(5)
            raise OSError("connection reset")
        return FILE[first:last].clone()

    ahead = ReadAhead(fetch, len(FILE), window_bytes=64)
    errors: list[BaseException] = []

    def read(first: int) -> None:
        try:
            ahead.read(first, first + 16)
        except OSError as exc:
            errors.append(exc)

    owner = threading.Thread(target=read, args=(0,))
    owner.start()
    while not calls:
        threading.Event().wait(0.01)
    waiter = threading.Thread(target=read, args=(16,))
    waiter.start()
    threading.Event().wait(0.05)
    release.set()
    owner.join(5)
    waiter.join(5)
    assert len(errors) == 2 and all("connection reset" in str(e) for e in errors)
    assert torch.equal(ahead.read(16, 32), FILE[16:32])  # a new window, fetched again
    assert calls[-1] == (16, 80)
