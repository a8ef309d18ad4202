"""Keep Python's garbage collector off the objects that were alive before a merge started.

A merge allocates many short-lived Python objects (slice reads, futures, an S3 client's
per-request objects), so the collector runs often; each full collection walks every tracked
object in the process, and after ``import torch`` (plus boto3 and SQLAlchemy in the registry)
there are some 200,000-300,000 of them, none of which the merge creates or frees. Measured on a
100M task_arithmetic streamed from S3: 0.25 s of full collections in a 2.2 s merge.

``heap_frozen()`` moves those objects to the collector's permanent generation for the merge
(``gc.freeze()``) and back afterwards (``gc.unfreeze()``): objects created during the merge are
collected as before; cyclic garbage among the older objects waits until the merge ends.
Nested and concurrent merges share one freeze (the last to finish unfreezes). A process that
froze objects itself before the merge (``gc.get_freeze_count()`` > 0) is left as it is.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_lock = threading.Lock()
_holders = 0


@contextmanager
def heap_frozen() -> Iterator[None]:
    """Objects alive on entry are skipped by the garbage collector until the outermost exit."""
    global _holders
    with _lock:
        mine = _holders > 0 or gc.get_freeze_count() == 0
        if mine:
            if _holders == 0:
                gc.freeze()
            _holders += 1
    try:
        yield
    finally:
        if mine:
            with _lock:
                _holders -= 1
                if _holders == 0:
                    gc.unfreeze()
