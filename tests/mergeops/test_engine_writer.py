"""Shards written in place from a declared layout: same bytes as the buffered writer, errors
for tensors outside the layout, nothing left after a failure, and memory that does not grow
with the shard size."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import mergeops
from mergeops import engine
from mergeops.io.streamed import TensorSpec
from mergeops.io.writer import SAFETENSORS_DTYPES, OutputError, ShardedWriter, write_safetensors


def _tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    out: dict[str, torch.Tensor] = {}
    for i, dtype in enumerate(SAFETENSORS_DTYPES):
        values = torch.randn(7, 3 + i, generator=gen) * 30
        if dtype == torch.bool:
            out[f"b{i}.{dtype}"] = values > 0
        elif dtype.is_complex:
            out[f"b{i}.{dtype}"] = torch.complex(values, values).to(dtype)
        else:
            out[f"b{i}.{dtype}"] = values.to(dtype)
    out["big"] = torch.randn(64, 64, generator=gen)  # larger than the shard: a shard of its own
    out["empty"] = torch.zeros(0, 5, dtype=torch.bfloat16)
    out["Transposed"] = torch.arange(12.0).reshape(3, 4).t()
    return out


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}


def _write(
    folder: Path, tensors: dict[str, torch.Tensor], order: list[str], declared: bool
) -> None:
    layout = [TensorSpec(k, tuple(tensors[k].shape), tensors[k].dtype) for k in tensors]
    with ShardedWriter(
        folder, max_shard_size=600, metadata={"m": "1"}, layout=layout if declared else None
    ) as writer:
        for name in order:
            writer.add(name, tensors[name])


@pytest.mark.parametrize("shuffled", [False, True])
def test_declared_layout_gives_the_buffered_bytes(tmp_path: Path, shuffled: bool) -> None:
    tensors = _tensors()
    names = list(tensors)
    _write(tmp_path / "old", tensors, names, declared=False)
    order = names[::-1] if shuffled else names  # arrival order does not change the files
    _write(tmp_path / "new", tensors, order, declared=True)
    old, new = _digests(tmp_path / "old"), _digests(tmp_path / "new")
    assert len(old) > 4 and old == new
    index = json.loads((tmp_path / "new" / "model.safetensors.index.json").read_text())
    for name, shard in index["weight_map"].items():
        with safe_open(str(tmp_path / "new" / shard), framework="pt") as handle:
            loaded = handle.get_tensor(name)
        expected = tensors[name]
        assert loaded.dtype == expected.dtype and loaded.shape == expected.shape
        raw = loaded.contiguous().reshape(-1).view(torch.uint8)
        assert torch.equal(raw, expected.contiguous().reshape(-1).view(torch.uint8))


def test_layout_mismatches_are_refused_and_cleaned_up(tmp_path: Path) -> None:
    layout = [TensorSpec("a", (2, 2), torch.float32), TensorSpec("b", (3,), torch.bfloat16)]
    writer = ShardedWriter(tmp_path, max_shard_size=1000, layout=layout)
    with pytest.raises(OutputError, match="'c' is not in the declared layout"):
        writer.add("c", torch.zeros(2, 2))
    with pytest.raises(OutputError, match=r"'a' is F16 \(2, 2\).*declared F32 \(2, 2\)"):
        writer.add("a", torch.zeros(2, 2, dtype=torch.float16))
    writer.add("a", torch.zeros(2, 2))
    with pytest.raises(OutputError, match="'a' written twice"):
        writer.add("a", torch.zeros(2, 2))
    with pytest.raises(OutputError, match=r"1 declared tensor.*never written.*'b'"):
        writer.close()
    assert (tmp_path / "shard-1.tmp").exists()
    writer.discard()
    assert list(tmp_path.iterdir()) == []


def _model(folder: Path, seed: int, tensors: int, rows: int) -> None:
    folder.mkdir()
    gen = torch.Generator().manual_seed(seed)
    state = {f"layer.{i}.weight": torch.randn(rows, 1024, generator=gen) for i in range(tensors)}
    state["layer.0.bias"] = torch.randn(rows, generator=gen).to(torch.bfloat16)
    state["steps"] = torch.arange(4)
    write_safetensors(folder / "model.safetensors", state)


@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
def test_engine_output_bytes_unchanged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    for i, name in enumerate(("base", "a", "b")):
        _model(tmp_path / name, i, tensors=5, rows=64)
    kwargs = {
        "base": tmp_path / "base",
        "params": {"density": 0.5} if method == "ties" else {},
        "max_shard_size": 300_000,
        "dtype": "bfloat16",
        "progress": False,
    }
    models = [tmp_path / "a", tmp_path / "b"]
    new = mergeops.merge_files(method, models, out_dir=tmp_path / "new", **kwargs)
    monkeypatch.setattr(engine, "output_layout", lambda plan: None)
    old = mergeops.merge_files(method, models, out_dir=tmp_path / "old", **kwargs)
    assert len(new.files) == len(old.files) == 3
    assert _digests(tmp_path / "new") == _digests(tmp_path / "old")
    assert new.bytes_written == old.bytes_written and new.tensor_count == old.tensor_count


_RSS_SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    import mergeops
    from mergeops import engine
    if sys.argv[4] == "buffered":
        engine.output_layout = lambda plan: None
    base, model, out = sys.argv[1:4]
    warm = {"x": torch.ones(3)}  # imports and thread pools before the baseline
    mergeops.merge_files("linear", [warm, warm], out_dir=out + "-warm", progress=False)
    def status(field):  # kB
        return int(open("/proc/self/status").read().split(field + ":")[1].split()[0])
    open("/proc/self/clear_refs", "w").write("5")  # restart the peak (VmHWM) from here
    before = status("VmRSS")
    mergeops.merge_files("linear", [base, model], out_dir=out, max_shard_size="10GB",
                         progress=False, prefetch_bytes=8 << 20)
    after = status("VmHWM")
    print((after - before) * 1024)
    """
)


# glibc raises its mmap threshold after freeing large blocks and then keeps freed tensors in
# its heaps (tens of MB of retained, not live, memory); a fixed threshold measures what is live.
_FIXED_MMAP_THRESHOLD = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}


def _rss_growth(tmp_path: Path, mode: str) -> int:
    run = subprocess.run(
        [sys.executable, "-c", _RSS_SCRIPT, str(tmp_path / "m0"), str(tmp_path / "m1"),
         str(tmp_path / f"out-{mode}"), mode],
        capture_output=True, text=True, check=True, timeout=120,
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", **_FIXED_MMAP_THRESHOLD},
    )  # fmt: skip
    return int(run.stdout.strip().splitlines()[-1])


def test_peak_rss_does_not_grow_with_the_shard_size(tmp_path: Path) -> None:
    """A 96 MiB output in one 10 GB shard: only the buffered writer holds the whole shard
    (the rest of the growth is the merge's own working set, the same in both runs)."""
    _model(tmp_path / "m0", 0, tensors=24, rows=1024)  # 24 x 4 MiB float32 tensors
    _model(tmp_path / "m1", 1, tensors=24, rows=1024)
    output = 24 * 1024 * 1024 * 4
    streamed = _rss_growth(tmp_path, "streamed")
    buffered = _rss_growth(tmp_path, "buffered")
    assert buffered - streamed > 0.7 * output, (streamed, buffered)
    assert streamed < 0.35 * output, (streamed, buffered)
