"""torch's vector math library initialised once, on one thread, before any merge uses it.

The CPU wheel (torch 2.13, MKL 2024.2) computes exp, log, sqrt, pow... of large float tensors
with MKL's vector math (VML), in chunks on several threads. The first such call in a process
can race MKL's lazy initialisation: one thread's chunk then comes out of a low-accuracy variant
(for sqrt exactly x·rsqrtps(x): about 12 correct bits). Measured here: a fresh interpreter's
first ``exp`` of a 96x128 float32 tensor on 2 threads had half its entries off by up to 2e-4
(relative) in 7 of 30 runs; later calls were exact. A merge is usually a fresh process and
methods apply these functions to whole tensors (OTA's √v, Fisher weights, slerp's angles), so
its result could change from one run to the next. One small call first, below torch's parallel
grain (it runs on the calling thread alone), initialises the library: 0 of 30 runs were off.
"""

from __future__ import annotations

import torch


def initialise() -> None:
    """One vector-math call on this thread only (8 entries: never split across threads)."""
    torch.ones(8).sqrt()


initialise()
