"""The device pipeline's ordering logic, on the CPU, through a fake backend that defers the
work of each stream and runs it in adversarial orders (lazily, or copies as early as their
waits allow). A missing wait or a reused buffer would then copy or merge the wrong bytes, so
the results are compared bit for bit with the plain CPU merge."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import mergeops
from mergeops import chunking, engine, pipeline
from mergeops.methods.base import MergeError
from tests.mergeops.test_prefetch import assert_bits_equal, family, write_family

STREAMS = ("h2d", "compute", "d2h")


class FakeEvent:
    def __init__(self, stream: FakeStream) -> None:
        self.stream, self.done = stream, False


class FakeStream:
    def __init__(self, name: str) -> None:
        self.name = name
        self.queue: deque[tuple[str, Any]] = deque()


class FakeBackend:
    """Streams as queues run only when forced (host waits) or, for ``eager`` streams, as soon
    as their waits are met. ``skip`` drops the waits of one stream (or the host's: "host")."""

    def __init__(self, eager: tuple[str, ...] = (), skip: str | None = None) -> None:
        self.streams = {name: FakeStream(name) for name in STREAMS}
        self.eager, self.skip = eager, skip
        self.buffers = 0

    def stream(self, role: str) -> FakeStream:
        return self.streams[role]

    def run(self, stream: FakeStream, work: Callable[[], None]) -> None:
        stream.queue.append(("work", work))
        self._advance()

    def record(self, stream: FakeStream) -> FakeEvent:
        event = FakeEvent(stream)
        stream.queue.append(("record", event))
        self._advance()
        return event

    def wait(self, stream: FakeStream, event: FakeEvent) -> None:
        if self.skip != stream.name:
            stream.queue.append(("wait", event))
        self._advance()

    def host_wait(self, event: FakeEvent) -> None:
        if self.skip != "host":
            self._complete(event)

    def pinned(self, nbytes: int) -> torch.Tensor:
        self.buffers += 1
        return torch.full((max(1, nbytes),), 0xAB, dtype=torch.uint8)

    def device_buffer(self, nbytes: int) -> torch.Tensor:
        self.buffers += 1
        return torch.full((max(1, nbytes),), 0xCD, dtype=torch.uint8)

    def drain(self) -> None:
        while any(s.queue for s in self.streams.values()):
            for stream in self.streams.values():
                while stream.queue:
                    self._step(stream, force=True)

    def _step(self, stream: FakeStream, *, force: bool) -> bool:
        kind, item = stream.queue[0]
        if kind == "wait" and not item.done:
            if not force:
                return False
            self._complete(item)
            return True
        stream.queue.popleft()
        if kind == "work":
            item()
        elif kind == "record":
            item.done = True
        return True

    def _complete(self, event: FakeEvent) -> None:
        while not event.done:
            self._step(event.stream, force=True)

    def _advance(self) -> None:
        progress = True
        while progress:
            progress = False
            for name in self.eager:
                stream = self.streams[name]
                while stream.queue and self._step(stream, force=False):
                    progress = True


CASES: list[tuple[str, dict[str, Any]]] = [
    ("linear", {"weight": [1.0, 0.8, 0.6]}),
    ("task_arithmetic", {"weight": [1.0, 0.8, 0.6], "lambda": 0.7}),
    ("ties", {"density": [0.5, 0.3, 1.0]}),
    ("ties", {"density": 0.3, "trim_scope": "model"}),
    ("dare_linear", {"density": 0.6}),
    ("dare_ties", {"density": 0.6}),
]
MODES = [(), ("h2d", "d2h"), ("compute",), STREAMS]


def _run(
    monkeypatch: pytest.MonkeyPatch, backend: FakeBackend | None, method: str, **kw: Any
) -> Any:
    if backend is not None:
        monkeypatch.setattr(engine, "pipeline_backend", lambda plan: backend)
    monkeypatch.setattr(pipeline, "SLICE_BYTES", 4096)  # embed (96, 128): 12 slices of 8 rows
    tensors = family()
    base = tensors[0] if method != "linear" else None
    return mergeops.merge_with_extras(method, tensors[1:], base=base, device="cpu", **kw)


@pytest.mark.parametrize(("method", "params"), CASES)
@pytest.mark.parametrize("eager", MODES)
@pytest.mark.parametrize(("dtype", "slots", "prefetch"), [(None, 2, True), ("float32", 3, False)])
def test_pipeline_matches_the_cpu_merge_bit_for_bit(
    monkeypatch: pytest.MonkeyPatch,
    method: str,
    params: dict[str, Any],
    eager: tuple[str, ...],
    dtype: str | None,
    slots: int,
    prefetch: bool,
) -> None:
    expected = _run(monkeypatch, None, method, dtype=dtype, **params)
    backend = FakeBackend(eager)
    monkeypatch.setattr(pipeline, "SLOTS", slots)
    got = _run(monkeypatch, backend, method, dtype=dtype, prefetch=prefetch, **params)
    assert_bits_equal(expected, got)
    assert list(got.merged) == ["embed", "mlp", "norm", "ids"]
    inputs = 3 + (method != "linear")  # models and base, each pinned + device, per slot:
    assert backend.buffers == slots * (inputs * 2 + 4)  # allocated once, reused by 21 slices


def test_reader_errors_surface_unchanged_through_the_pipeline(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from tests.mergeops.test_prefetch import _sources

    monkeypatch.setattr(pipeline, "SLICE_BYTES", 8192)  # 16 rows per slice, as on the CPU path:
    monkeypatch.setattr(chunking, "CHUNK_BYTES", 8192)
    messages = []
    for fake in (False, True):
        if fake:
            monkeypatch.setattr(engine, "pipeline_backend", lambda plan: FakeBackend(STREAMS))
        base, models = _sources(tmp_path / str(fake), [])
        models[2].fail_at = ("embed", 32)
        with pytest.raises(OSError) as info:
            mergeops.merge("task_arithmetic", models, base=base, device="cpu")
        messages.append(str(info.value))
    assert messages[0] == messages[1] and "rows 32:48 of 'embed' of 'ft-3'" in messages[0]


@pytest.mark.parametrize(
    ("eager", "skip"), [(("h2d",), "h2d"), ((), "host"), (("compute",), "compute")]
)
def test_the_fake_catches_a_missing_wait(
    monkeypatch: pytest.MonkeyPatch, eager: tuple[str, ...], skip: str
) -> None:
    expected = _run(monkeypatch, None, "task_arithmetic")
    try:
        got = _run(monkeypatch, FakeBackend(eager, skip=skip), "task_arithmetic")
    except MergeError as exc:  # garbage counts read before the download happened
        assert "NaN or Inf" in str(exc)
        return
    assert not torch.equal(expected.merged["embed"], got.merged["embed"])


def test_issue_order_overlaps_copies_with_compute(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[pipeline.SlicePipeline] = []
    original = pipeline.SlicePipeline.run

    def run(self: pipeline.SlicePipeline) -> None:
        seen.append(self)
        original(self)

    monkeypatch.setattr(pipeline.SlicePipeline, "run", run)
    _run(monkeypatch, FakeBackend(), "task_arithmetic")
    issued = seen[0].issued
    at = {step: i for i, step in enumerate(issued)}
    slices = [j for j, job in enumerate(seen[0].jobs) if job.host is None]
    assert len(slices) == 12 + 8 + 1  # embed 12 of 8 rows, mlp (40 x 192) 8 of 5 rows, norm 1
    for j in slices:
        assert at[("upload", j)] < at[("compute", j)] < at[("download", j)] < at[("finish", j)]
        if j + 1 in slices:  # the next upload is issued before this slice's compute
            assert at[("upload", j + 1)] < at[("compute", j)]
        if j - 1 in slices:  # the previous download is issued before this compute
            assert at[("download", j - 1)] < at[("compute", j)]
    finishes = [j for kind, j in issued if kind == "finish"]
    assert finishes == sorted(finishes) == list(range(len(seen[0].jobs)))


def test_non_finite_output_and_input_are_caught_on_the_device(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    with pytest.raises(MergeError, match=r"merged tensor 'embed'.*model 'model_1' has weight inf"):
        _run(monkeypatch, FakeBackend(STREAMS), "task_arithmetic", weight=[1.0, float("inf"), 1.0])
    tensors = family()
    tensors[2]["mlp"][39, 5] = float("nan")
    paths = write_family(tmp_path / "in", tensors)
    out = tmp_path / "out"
    monkeypatch.setattr(engine, "pipeline_backend", lambda plan: FakeBackend(STREAMS))
    with pytest.raises(MergeError, match="tensor 'mlp' of model 'ft-2' contains NaN or Inf"):
        mergeops.merge_files("ties", paths[1:], base=paths[0], out_dir=out, device="cpu",
                             progress=False)  # fmt: skip
    assert not out.exists() and not list(tmp_path.glob(".out.partial-*"))


def test_pipeline_needs_two_slots() -> None:
    from mergeops.plan import PlanRequest, build_plan
    from mergeops.prefetch import Prefetcher

    plan = build_plan(PlanRequest("linear", family()[1:], device="cpu"))
    with pytest.raises(ValueError, match="at least 2 buffer slots"):
        pipeline.SlicePipeline(plan, FakeBackend(), Prefetcher(), host_job=lambda k: lambda: None,
                               sink=lambda k, t: None, slots=1)  # fmt: skip
