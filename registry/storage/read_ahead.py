"""Read-ahead windows over one stored file: one range request serves many reads.

A streamed merge reads a safetensors file from an object store tensor after tensor, each large
tensor slice after slice (about 1 MiB of bf16 each), several reads ahead on parallel threads.
Each request costs a round trip and the server's per-request work, so small ranges are slow:
on moto, GETting 1 GB took 0.46-0.64 s in 32 MiB ranges, 0.67-0.77 s in 8 MiB ranges and
1.25 s in 4 MiB ranges (``bench.merge_from_s3``'s machine). Most tensors of a model are smaller
than a window (a 1B Llama's attention projections are 2 MiB of bf16, its norms 2 KiB).

``ReadAhead`` serves byte ranges of one file from windows of ``window_bytes`` laid over the
file's bytes, whatever tensor they belong to: a read not covered by an open window opens one
at its first byte (ending where the next open window begins, or at the file's end); a read that
runs past a window's end takes the rest from the next window, which starts right there. Reads in
file order therefore tile the file with back-to-back windows, and the neighbouring small tensors
(and the first slices of the next large one) come with the window already fetched. Reads inside
a window still in flight on another thread wait for it. A window is dropped once every byte of
it was handed out, or when more than ``max_windows`` are open (oldest first), so memory stays at
a few windows per file. An uncovered run of at least ``window_bytes`` (a whole large tensor) is
fetched directly, as exactly its bytes; the parts of it that open windows already hold are
copied from them, and later windows stop where it begins, so its bytes are fetched once. Small
reads that open no window (``open_windows=False``) are fetched as exactly their bytes too.
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

DEFAULT_WINDOW_BYTES = 8 * 1024 * 1024
"""Bytes per read-ahead window (see the module docstring for the per-request costs)."""
DEFAULT_MAX_WINDOWS = 3
"""Open windows per file: the one being consumed, the next, and one straggler."""
_DIRECT_MEMORY = 64
"""Recent ranges fetched directly. A later window ends where a large one (a whole tensor of at
least a window) begins, so its bytes are not fetched again; a small one (the engine reads small
whole tensors, such as norms, a few tensors ahead of the slices around them) comes again with
the window around it and counts as handed out already, so the window still closes."""

Fetch = Callable[[int, int], torch.Tensor]
"""fetch(first, last) -> bytes ``[first, last)`` of the file as a 1-D uint8 tensor."""


@dataclass
class _Window:
    wid: int
    start: int
    stop: int
    data: Future[torch.Tensor] = field(default_factory=Future)
    handed_out: int = 0


class ReadAhead:
    """Serves byte ranges of one file (``size`` bytes) from shared read-ahead windows
    (thread-safe)."""

    def __init__(
        self,
        fetch: Fetch,
        size: int,
        *,
        window_bytes: int = DEFAULT_WINDOW_BYTES,
        max_windows: int = DEFAULT_MAX_WINDOWS,
    ) -> None:
        if window_bytes <= 0 or max_windows < 1:
            raise ValueError("read-ahead needs window_bytes > 0 and max_windows >= 1")
        self._fetch = fetch
        self.size = size
        self.window_bytes, self.max_windows = window_bytes, max_windows
        self._windows: OrderedDict[int, _Window] = OrderedDict()
        self._lock = threading.Lock()
        self._next_id = 0
        self._direct: deque[tuple[int, int]] = deque(maxlen=_DIRECT_MEMORY)

    def read(self, first: int, last: int, *, open_windows: bool = True) -> torch.Tensor:
        """Bytes ``[first, last)`` of the file (within it) as a new 1-D uint8 tensor; with
        ``open_windows`` False, only what open windows hold comes from them, the rest is
        fetched as exactly its bytes."""
        if not 0 <= first <= last <= self.size:
            raise ValueError(f"range [{first}, {last}) is outside the file's {self.size} bytes")
        out = torch.empty(last - first, dtype=torch.uint8)
        pos = first
        while pos < last:
            window, owner, stop = self._piece(pos, last, open_windows)
            if window is None:  # a long uncovered run: exactly its bytes, no window
                if pos == first and stop == last:
                    return self._fetch(pos, stop)  # the whole read: no copy
                out[pos - first : stop - first] = self._fetch(pos, stop)
                pos = stop
                continue
            if owner:
                self._fill(window)
            stop = min(last, window.stop)
            data = window.data.result()
            out[pos - first : stop - first] = data[pos - window.start : stop - window.start]
            self._handed_out(window, stop - pos)
            pos = stop
        return out

    def _piece(self, pos: int, last: int, open_windows: bool) -> tuple[_Window | None, bool, int]:
        """What serves the byte at ``pos``: an open window (owner False), a new window starting
        there (owner True: the caller fetches it), or None with the end of an uncovered run of
        at least ``window_bytes`` to fetch directly."""
        with self._lock:
            following = self.size
            for window in self._windows.values():
                if window.start <= pos < window.stop:
                    return window, False, 0
                if pos < window.start < following:
                    following = window.start
            for first, last_ in self._direct:  # a large tensor already read: not again
                if pos < first < following and last_ - first >= self.window_bytes:
                    following = first
            run_end = min(last, following)
            if run_end - pos >= self.window_bytes or not open_windows:
                self._direct.append((pos, run_end))
                return None, False, run_end
            return self._open(pos, min(following, pos + self.window_bytes)), True, 0

    def _open(self, start: int, stop: int) -> _Window:
        """A new window (under the lock); the oldest beyond ``max_windows`` is dropped."""
        window = _Window(self._next_id, start, stop)
        for first, last in self._direct:  # served already: the window will not hand them out
            if last - first < self.window_bytes:
                window.handed_out += max(0, min(last, stop) - max(first, start))
        self._windows[window.wid] = window
        self._next_id += 1
        while len(self._windows) > self.max_windows:
            self._windows.popitem(last=False)
        return window

    def _fill(self, window: _Window) -> None:
        try:
            window.data.set_result(self._fetch(window.start, window.stop))
        except BaseException as exc:
            window.data.set_exception(exc)
            with self._lock:
                self._windows.pop(window.wid, None)
            raise

    def _handed_out(self, window: _Window, nbytes: int) -> None:
        with self._lock:
            window.handed_out += nbytes
            if window.handed_out >= window.stop - window.start:
                self._windows.pop(window.wid, None)
