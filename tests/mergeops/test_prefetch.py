"""Read-ahead of merge inputs: bit-identical results for every method, reads of slice k+1
starting before slice k's merge ends (events, not timing), reader errors surfacing unchanged,
a bounded budget, and no reader thread left behind."""

from __future__ import annotations

import math
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

import mergeops
from mergeops import chunking
from mergeops.io import SafetensorsFile, write_safetensors
from mergeops.methods.base import get_method
from mergeops.methods.task_vector.task_arithmetic import TaskArithmetic
from mergeops.prefetch import Prefetcher, Read

SHAPES = {"embed": (96, 128), "mlp": (40, 192), "norm": (128,)}


class Quadratic:
    """fw's objective: distance to a fixed target."""

    def __init__(self, target: dict[str, torch.Tensor]) -> None:
        self.target = target

    def loss(self, params: Any) -> torch.Tensor:
        return sum(((params[k] - t) ** 2).sum() for k, t in self.target.items())  # type: ignore[return-value]


class _Probe:
    """regmean_plusplus's probe: fixed Grams (a data-free stand-in for forward passes)."""

    def linear_weights(self) -> list[str]:
        return ["embed", "mlp"]

    def input_grams(self, params: Any, model_name: str) -> dict[str, torch.Tensor]:
        return {k: torch.eye(params[k].shape[1]) * (1 + len(model_name)) for k in ("embed", "mlp")}


class _Features:
    """pleas / ot_fusion's feature probe: two unchained layers on fixed random inputs."""

    inputs = {"embed": torch.randn(32, 128, generator=torch.Generator().manual_seed(3)),
              "mlp": torch.randn(32, 192, generator=torch.Generator().manual_seed(4))}  # fmt: skip

    def layer_order(self) -> list[Any]:
        from mergeops.sources import NeuronLayer

        return [NeuronLayer(k, k, None, (k,), ()) for k in ("embed", "mlp")]

    def features(self, params: Any, layer: str) -> torch.Tensor:
        return torch.relu(self.layer_inputs(params, layer) @ params[layer].T)

    def layer_inputs(self, params: Any, layer: str) -> torch.Tensor:
        return self.inputs[layer]


def family(seed: int = 5, dtype: torch.dtype = torch.bfloat16) -> list[dict[str, torch.Tensor]]:
    """A base and three fine-tunes (plus an integer buffer passed through)."""
    gen = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(s, generator=gen) for k, s in SHAPES.items()}
    models = [base] + [
        {k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in base.items()}
        for _ in range(3)
    ]
    out = [{k: v.to(dtype) for k, v in m.items()} for m in models]
    for m in out:
        m["ids"] = torch.arange(7)
    return out


def write_family(root: Path, tensors: list[dict[str, torch.Tensor]]) -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, m in enumerate(tensors):
        paths.append(root / ("base.safetensors" if i == 0 else f"ft-{i}.safetensors"))
        write_safetensors(paths[-1], m)
    return paths


def method_cases(root: Path, tensors: list[dict[str, torch.Tensor]]) -> dict[str, dict[str, Any]]:
    """``mergeops.merge_with_extras`` keyword arguments that run every registered method."""
    paths = write_family(root, tensors)
    base, models = paths[0], paths[1:]
    gen = torch.Generator().manual_seed(11)
    side = []
    for i in range(len(models)):
        moments = {k: torch.rand(v.shape, generator=gen) for k, v in tensors[0].items()}
        side.append(root / f"v-{i}.safetensors")
        write_safetensors(side[-1], moments)
    target = {k: v.float() for k, v in tensors[1].items() if v.is_floating_point()}
    grams = []
    for i in range(len(models)):
        matrices = {k: v.float() for k, v in tensors[0].items() if v.dim() == 2}
        x = {k: torch.randn(8, v.shape[1], generator=gen) for k, v in matrices.items()}
        grams.append(root / f"g-{i}.safetensors")
        write_safetensors(grams[-1], {k: xi.T @ xi / 8 for k, xi in x.items()})
    common: dict[str, Any] = {"models": models, "base": base}
    cases: dict[str, dict[str, Any]] = {
        "linear": {"models": models, "weight": [1.0, 0.8, 0.6]},
        "task_arithmetic": {**common, "weight": [1.0, 0.8, 0.6], "lambda": 0.7},
        "ties": {**common, "density": [0.5, 0.3, 1.0]},
        "ties_model": {**common, "density": 0.3, "trim_scope": "model", "_method": "ties"},
        "dare_linear": {**common, "density": 0.6},
        "dare_ties": {**common, "density": 0.6},
        "consensus": {**common, "k": 2},
        "tall_masks": {**common},
        "ffg": {**common, "second_moments": side, "density": 0.4},
        "ota": {**common, "second_moments": side, "normalise": "global"},
        "ota_ffg": {**common, "second_moments": side, "density": 0.4},
        "fisher": {"models": models, "fisher": side},
        "mwa": {"models": models, "metrics": [0.3, 0.5, 0.9]},
        "opcm": {**common, "_state": True},
        "fw": {**common, "objective": Quadratic(target)},
        "breadcrumbs": {**common, "density": 0.5, "gamma": 0.05},
        "breadcrumbs_ties": {**common, "density": 0.5, "tie_break": "mergekit"},
        "della": {**common, "density": 0.5, "epsilon": 0.1},
        "della_linear": {**common, "density": 0.5, "rescale_by": "l1"},
        "sce": {**common, "select_topk": 0.5},
        "ram": {**common, "epsilon": 0.01},
        "ramplus_tl": {**common, "epsilon": 0.01},
        # mergekit's averaging family
        "slerp": {"models": models[:1], "base": base, "t": 0.3},
        "nuslerp": {"models": models[:2], "weight": [0.4, 0.6]},
        "multislerp": {**common, "weight": [1.0, 0.8, 0.6]},
        "karcher": {"models": models},
        "model_stock": {**common},
        "nearswap": {"models": models[:1], "base": base, "t": 0.05},
        "passthrough": {"models": models[:1], "scale": 0.5},
        "arcee_fusion": {"models": models[:1], "base": base},
        # the frontier (issue 19)
        "magmax": {**common},
        "pcb": {**common, "pcb_ratio": 0.2},
        "emr": {**common},
        "iso_c": {**common},
        "iso_cts": {**common},
        "tsv_m": {**common},
        "wudi": {**common, "steps": 3, "lr": 1e-3},
        "doge_ta": {**common, "steps": 3},
        "adamerging": {**common, "objective": Quadratic(target), "steps": 3},
        "regmean": {"models": models, "grams": grams},
        "regmean_plusplus": {"models": models, "objective": _Probe()},
        "pleas": {"models": models, "objective": _Features()},
        "ot_fusion": {"models": models, "objective": _Features(), "solver": "sinkhorn"},
    }
    assert {c.get("_method", n) for n, c in cases.items()} == set(mergeops.available_methods())
    return cases


def run_case(name: str, case: dict[str, Any], state_dir: Path, **options: Any) -> Any:
    """Run one case (a fresh OPCM state per call) and return the ModelResult."""
    kwargs = {k: v for k, v in case.items() if not k.startswith("_")}
    if case.get("_state"):
        state_dir.mkdir(parents=True, exist_ok=True)
        kwargs["state_path"] = state_dir / f"state-{len(list(state_dir.iterdir()))}.safetensors"
    models = kwargs.pop("models")
    return mergeops.merge_with_extras(case.get("_method", name), models, **kwargs, **options)


def assert_bits_equal(a: Any, b: Any) -> None:
    assert a.merged.keys() == b.merged.keys()
    pairs = [(a.merged, b.merged)] + [(a.extras[s], b.extras[s]) for s in a.extras]
    assert a.extras.keys() == b.extras.keys()
    for left, right in pairs:
        for key in left:
            assert left[key].dtype == right[key].dtype, key
            assert torch.equal(left[key].view(torch.uint8), right[key].view(torch.uint8)), key


CASE_NAMES = [
    "linear", "task_arithmetic", "ties", "ties_model", "dare_linear", "dare_ties", "consensus",
    "tall_masks", "ffg", "ota", "ota_ffg", "fisher", "mwa", "opcm", "fw",
    "breadcrumbs", "breadcrumbs_ties", "della", "della_linear", "sce", "ram", "ramplus_tl",
    "slerp", "nuslerp", "multislerp", "karcher", "model_stock", "nearswap", "passthrough",
    "arcee_fusion", "magmax", "pcb", "emr", "iso_c", "iso_cts", "tsv_m", "wudi", "doge_ta",
    "adamerging", "regmean", "regmean_plusplus", "pleas", "ot_fusion",
]  # fmt: skip


@pytest.fixture(scope="module")
def cases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    return method_cases(tmp_path_factory.mktemp("prefetch"), family())


@pytest.mark.parametrize("name", CASE_NAMES)
def test_prefetch_is_bit_identical_for_every_method(
    name: str, cases: dict[str, dict[str, Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(chunking, "CHUNK_BYTES", 4096)  # many slices per large tensor
    off = run_case(name, cases[name], tmp_path, device="cpu", prefetch=False)
    on = run_case(name, cases[name], tmp_path, device="cpu", prefetch=True)
    tight = run_case(name, cases[name], tmp_path, device="cpu", prefetch_bytes=5000)
    assert_bits_equal(off, on)
    assert_bits_equal(off, tight)


class Recording:
    """A row-readable source that logs read starts and can fail or block one read."""

    def __init__(self, path: Path, name: str, log: list[tuple[str, Any]], **hooks: Any) -> None:
        self.inner, self.name, self.log = SafetensorsFile(path, name=name), name, log
        self.fail_at = hooks.get("fail_at")
        self.started = hooks.get("started", {})

    def keys(self) -> list[str]:
        return self.inner.keys()

    def metadata(self, key: str) -> Any:
        return self.inner.metadata(key)

    def get(self, key: str) -> torch.Tensor:
        if self.fail_at == (key, None):
            raise OSError(f"connection reset while reading '{key}' of '{self.name}'")
        return self.inner.get(key)

    def get_rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        self.log.append(("read", (self.name, key, start)))
        self.started.setdefault((key, start), threading.Event()).set()
        if self.fail_at == (key, start):
            raise OSError(f"connection reset at rows {start}:{stop} of '{key}' of '{self.name}'")
        return self.inner.get_rows(key, start, stop)


def _sources(root: Path, log: list[tuple[str, Any]], **hooks: Any) -> tuple[Any, list[Any]]:
    paths = write_family(root, family())
    wrapped = [Recording(p, p.stem, log, **hooks) for p in paths]
    return wrapped[0], wrapped[1:]


def test_next_slice_is_read_while_the_current_one_is_merged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(chunking, "CHUNK_BYTES", 8192)  # embed: 96 rows -> 6 slices of 16
    log: list[tuple[str, Any]] = []
    started: dict[tuple[str, int], threading.Event] = {}
    base, models = _sources(tmp_path, log, started=started)
    seen: list[bool] = []
    original = TaskArithmetic.merge_rows

    def merge_rows(self: Any, inputs: Any, stats: Any, offset: int, ctx: Any) -> torch.Tensor:
        if inputs.name == "embed" and offset // 128 + 16 < 96:
            nxt = started.setdefault(("embed", offset // 128 + 16), threading.Event())
            seen.append(nxt.wait(timeout=30))  # set by a reader thread; False = never read
        return original(self, inputs, stats, offset, ctx)

    monkeypatch.setattr(TaskArithmetic, "merge_rows", merge_rows)
    mergeops.merge("task_arithmetic", models, base=base, device="cpu")
    assert seen == [True] * 5


def test_without_prefetch_reads_follow_the_merge(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(chunking, "CHUNK_BYTES", 8192)
    log: list[tuple[str, Any]] = []
    base, models = _sources(tmp_path, log)
    original = TaskArithmetic.merge_rows

    def merge_rows(self: Any, inputs: Any, stats: Any, offset: int, ctx: Any) -> torch.Tensor:
        log.append(("merge", (inputs.name, offset // 128)))
        return original(self, inputs, stats, offset, ctx)

    monkeypatch.setattr(TaskArithmetic, "merge_rows", merge_rows)
    mergeops.merge("task_arithmetic", models, base=base, device="cpu", prefetch=False)
    merged_at = {e[1][1]: i for i, e in enumerate(log) if e[0] == "merge" and e[1][0] == "embed"}
    reads = [(i, e[1][2]) for i, e in enumerate(log) if e[0] == "read" and e[1][1] == "embed"]
    assert len(merged_at) == 6 and len(reads) == 6 * 4
    assert all(i > merged_at[start - 16] for i, start in reads if start > 0)


def _last_slice_waits(
    monkeypatch: pytest.MonkeyPatch,
    method: str,
    started: dict[Any, threading.Event],
    timeout: float,
) -> list[bool]:
    """Patch ``method``'s ``merge_rows``: before the last slice of the first chunked tensor
    merges, wait up to ``timeout`` s for the other chunked tensor's first rows to be read.
    Returns the list the waits append to (True: read in time)."""
    numel = {key: math.prod(shape) for key, shape in SHAPES.items()}
    cls = type(get_method(method))
    original = cls.merge_rows
    merged: list[str] = []
    seen: list[bool] = []

    def merge_rows(self: Any, inputs: Any, stats: Any, offset: int, ctx: Any) -> torch.Tensor:
        if offset + inputs.models[0].numel() == numel[inputs.name]:  # the tensor's last slice
            other = "mlp" if inputs.name == "embed" else "embed"
            if other not in merged:
                event = started.setdefault((other, 0), threading.Event())
                seen.append(event.wait(timeout=timeout))
            merged.append(inputs.name)
        return original(self, inputs, stats, offset, ctx)

    monkeypatch.setattr(cls, "merge_rows", merge_rows)
    return seen


@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("task_arithmetic", {}),
        ("ties", {"density": 0.5, "tie_break": "position"}),  # a statistics sweep first
        ("multislerp", {"weight": [1.0, 0.8, 0.6]}),
    ],
)
def test_next_tensor_reads_start_while_the_one_before_merges(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str, params: dict[str, Any]
) -> None:
    monkeypatch.setattr(chunking, "CHUNK_BYTES", 8192)  # embed: 6 slices, mlp: 4
    plain = write_family(tmp_path / "plain", family())
    expected = mergeops.merge_with_extras(method, plain[1:], base=plain[0], device="cpu",
                                          prefetch=False, **params)  # fmt: skip
    log: list[tuple[str, Any]] = []
    started: dict[tuple[str, int], threading.Event] = {}
    base, models = _sources(tmp_path / "recorded", log, started=started)
    seen = _last_slice_waits(monkeypatch, method, started, timeout=30)
    got = mergeops.merge_with_extras(method, models, base=base, device="cpu", **params)
    assert seen == [True]
    reads = [entry for kind, entry in log if kind == "read"]
    assert len(reads) == len(set(reads))  # remote-like sources: every row fetched once
    assert_bits_equal(expected, got)


def test_whole_tensor_statistics_are_not_started_early(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under mergekit's tie rule TIES reads each whole τ_t before slicing: starting the next
    tensor's slice reads early would fetch them twice, so they wait for its turn."""
    monkeypatch.setattr(chunking, "CHUNK_BYTES", 8192)
    log: list[tuple[str, Any]] = []
    started: dict[tuple[str, int], threading.Event] = {}
    base, models = _sources(tmp_path, log, started=started)
    seen = _last_slice_waits(monkeypatch, "ties", started, timeout=0.5)
    mergeops.merge("ties", models, base=base, device="cpu", density=0.5, tie_break="mergekit")
    assert seen == [False]
    reads = [entry for kind, entry in log if kind == "read"]
    assert len(reads) == len(set(reads))


def test_only_remote_inputs_are_started_early(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Local files' first slices come from the page cache: nothing is read ahead of a tensor's
    turn for them (the same bytes either way)."""
    monkeypatch.setattr(chunking, "CHUNK_BYTES", 8192)
    primed: list[tuple[str, bool]] = []
    original = chunking.ChunkedMerge.prime

    def prime(self: chunking.ChunkedMerge) -> None:
        original(self)
        primed.append((self.key, self._primed is not None))

    monkeypatch.setattr(chunking.ChunkedMerge, "prime", prime)
    paths = write_family(tmp_path / "local", family())
    local = mergeops.merge("task_arithmetic", paths[1:], base=paths[0], device="cpu")
    assert len(primed) == 1 and not primed[0][1]  # asked for the second tensor, declined
    primed.clear()
    base, models = _sources(tmp_path / "remote", [])
    remote = mergeops.merge("task_arithmetic", models, base=base, device="cpu")
    assert len(primed) == 1 and primed[0][1]
    for key in local:
        assert torch.equal(local[key].view(torch.uint8), remote[key].view(torch.uint8)), key


def _reader_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("mergeops-read")]


@pytest.mark.parametrize("where", [("embed", 32), ("norm", None), ("mlp", 0), ("embed", 80)])
def test_reader_errors_surface_unchanged_and_leave_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: tuple[str, int | None]
) -> None:
    monkeypatch.setattr(chunking, "CHUNK_BYTES", 8192)
    messages = []
    for prefetch in (False, True):
        base, models = _sources(tmp_path / str(prefetch), [])
        models[1].fail_at = where
        out = tmp_path / f"out-{prefetch}"
        with pytest.raises(OSError) as info:
            mergeops.merge_files("task_arithmetic", models, base=base, out_dir=out,
                                 device="cpu", prefetch=prefetch, progress=False)  # fmt: skip
        messages.append(str(info.value))
        assert not out.exists() and not list(tmp_path.glob(".out-*"))
    assert messages[0] == messages[1] and "'ft-2'" in messages[0]
    assert not _reader_threads()


def test_budget_bounds_bytes_in_flight_and_oversized_batches_wait_their_turn() -> None:
    started: list[int] = []

    def fetch(index: int) -> Any:
        def run() -> int:
            started.append(index)
            return index

        return run

    sizes = [40, 40, 40, 200, 40]
    batches = [[Read(size, fetch(i))] for i, size in enumerate(sizes)]
    with Prefetcher(max_bytes=100, workers=2) as prefetcher:
        got = []
        for i, pending in enumerate(prefetcher.stream(batches)):
            assert prefetcher.in_flight <= 100 or sizes[i] > 100
            if i == 2:
                assert 3 not in started  # 200 bytes never fit: read only when its turn comes
            got.append(pending[0].result())
    assert got == [0, 1, 2, 3, 4]
    assert prefetcher.peak_in_flight <= max(100, 200 + 40)
    assert not _reader_threads()


def test_abandoned_stream_releases_budget_and_close_joins() -> None:
    gate = threading.Event()

    def slow() -> int:
        gate.wait(timeout=30)
        return 1

    prefetcher = Prefetcher(max_bytes=1000, workers=2)
    stream = prefetcher.stream([[Read(10, slow)] for _ in range(6)])
    first = next(stream)
    gate.set()
    assert first[0].result() == 1
    stream.close()
    assert prefetcher.in_flight == 0
    prefetcher.close()
    assert not _reader_threads()
