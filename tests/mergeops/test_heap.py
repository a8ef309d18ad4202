"""The garbage collector skips the objects alive before a merge while it runs (mergeops.heap)."""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator

import pytest
import torch

import mergeops
from mergeops.heap import heap_frozen
from mergeops.sources import TensorMeta


@pytest.fixture(autouse=True)
def _no_freeze_before() -> Iterator[None]:
    gc.unfreeze()  # whatever an earlier test left
    yield
    gc.unfreeze()


class Recording:
    """A model whose reads record how many objects the collector had frozen at the time."""

    def __init__(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        self.name, self.tensors, self.frozen = name, tensors, []

    def keys(self) -> list[str]:
        return list(self.tensors)

    def metadata(self, key: str) -> TensorMeta:
        return TensorMeta(self.tensors[key].dtype, tuple(self.tensors[key].shape))

    def get(self, key: str) -> torch.Tensor:
        self.frozen.append(gc.get_freeze_count())
        return self.tensors[key]


def test_a_merge_freezes_the_older_objects_and_unfreezes_them_after() -> None:
    models = [Recording(f"m{i}", {"w": torch.full((4, 4), float(i))}) for i in range(2)]
    merged = mergeops.merge("linear", models, device="cpu", prefetch=False)
    assert torch.equal(merged["w"], torch.full((4, 4), 0.5))
    assert all(count > 1000 for m in models for count in m.frozen), [m.frozen for m in models]
    assert gc.get_freeze_count() == 0


def test_a_process_that_froze_objects_itself_keeps_them_frozen() -> None:
    gc.freeze()  # (frozen objects freed by their last reference leave the count: compare > 0)
    with heap_frozen():
        assert gc.get_freeze_count() > 0
    assert gc.get_freeze_count() > 0  # not unfrozen by the merge


def test_nested_and_concurrent_merges_share_one_freeze() -> None:
    inside, release = threading.Event(), threading.Event()

    def other_merge() -> None:
        with heap_frozen():
            inside.set()
            release.wait(5)

    with heap_frozen():
        assert gc.get_freeze_count() > 0
        thread = threading.Thread(target=other_merge)
        thread.start()
        assert inside.wait(5)
        with heap_frozen():
            assert gc.get_freeze_count() > 0
        assert gc.get_freeze_count() > 0
    assert gc.get_freeze_count() > 0  # the other merge still runs
    release.set()
    thread.join(5)
    assert gc.get_freeze_count() == 0
