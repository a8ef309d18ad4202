"""The CUDA backend of ``mergeops.pipeline``: two copy streams beside the compute stream,
CUDA events, page-locked host buffers and device buffers (allocated once per merge pass).

The compute stream is the device's current stream, so work the engine issues outside the
pipeline (TIES' whole-tensor cuts, host jobs) is ordered with the pipelined merges.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


class CudaBackend:
    """Streams ``h2d`` / ``compute`` / ``d2h`` on one CUDA device."""

    def __init__(self, device: torch.device) -> None:
        if device.type != "cuda":
            raise ValueError(f"CudaBackend needs a CUDA device, got '{device}'")
        self.device = device
        self._streams = {
            "h2d": torch.cuda.Stream(device),
            "compute": torch.cuda.current_stream(device),
            "d2h": torch.cuda.Stream(device),
        }

    def stream(self, role: str) -> Any:
        """The stream for ``role`` (h2d, compute or d2h)."""
        return self._streams[role]

    def run(self, stream: Any, work: Callable[[], None]) -> None:
        """Issue ``work``'s kernels and copies on ``stream``."""
        with torch.cuda.stream(stream):
            work()

    def record(self, stream: Any) -> Any:
        """An event marking everything issued on ``stream`` so far."""
        event = torch.cuda.Event()
        event.record(stream)
        return event

    def wait(self, stream: Any, event: Any) -> None:
        """Make ``stream`` wait for ``event`` (no host block)."""
        stream.wait_event(event)

    def host_wait(self, event: Any) -> None:
        """Block the host until ``event`` has happened."""
        event.synchronize()

    def pinned(self, nbytes: int) -> torch.Tensor:
        """A page-locked host byte buffer (so copies from/to it are truly asynchronous)."""
        return torch.empty(max(1, nbytes), dtype=torch.uint8, pin_memory=True)

    def device_buffer(self, nbytes: int) -> torch.Tensor:
        """A device byte buffer."""
        return torch.empty(max(1, nbytes), dtype=torch.uint8, device=self.device)

    def drain(self) -> None:
        """Wait for all streams (before buffers are freed or an error propagates)."""
        torch.cuda.synchronize(self.device)
