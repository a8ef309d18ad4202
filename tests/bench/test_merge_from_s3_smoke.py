"""Smoke run of the S3-streaming merge benchmark at tiny size: its own moto_server, a local, an
S3 and a download-then-merge merge in child processes, byte-identical outputs and plausible
fetch counts."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import merge_from_s3
from bench._s3_floor import count_wire, fetch_all


def test_tiny_run_prints_both_sides_and_identical_outputs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--sizes", "tiny", "--methods", "task_arithmetic", "--finetunes", "2"]
    code = merge_from_s3.main([*args, "--work", str(tmp_path), "--repeats", "2"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    row = next(line for line in printed.splitlines() if line.startswith("tiny "))
    cells = row.split()
    assert cells[1] == "task_arithmetic" and cells[-2:] == ["2", "yes"], row
    local_s, s3_s, floor_s, vs_max, bound, vs_bound, dl_merge, vs_dl = (
        float(cells[i]) for i in range(2, 10)
    )
    assert local_s > 0 and s3_s > 0 and floor_s > 0 and dl_merge > 0
    assert vs_max == pytest.approx(s3_s / max(floor_s, local_s), rel=0.05)
    assert bound == pytest.approx(floor_s + local_s, abs=0.011)
    assert vs_bound == pytest.approx(s3_s / bound, rel=0.05)
    assert vs_dl == pytest.approx(s3_s / dl_merge, rel=0.05)
    wire_ratio, asked_ratio = float(cells[16]), float(cells[17])
    assert 0.9 <= wire_ratio <= 1.05 and asked_ratio == pytest.approx(1.0, abs=0.01)
    gets, heads = (int(n) for n in cells[18].split("/"))
    assert gets > 0 and heads == 0  # tensors located by the stored index: no header reads
    floor = next(line for line in printed.splitlines() if line.startswith("S3 floor tiny:"))
    assert "median of" in floor and floor.count(", ") >= 1
    runs = next(line for line in printed.splitlines() if line.startswith("runs tiny"))
    assert "task_arithmetic: local " in runs and "; s3 " in runs and "; download " in runs
    assert len(list((tmp_path / "tiny").glob("task_arithmetic-s3-*.log"))) == 2
    assert len(list((tmp_path / "tiny").glob("task_arithmetic-download-*.log"))) == 2
    assert not list((tmp_path / "tiny").glob("out-*"))  # outputs and downloads removed
    assert not (tmp_path / "tiny" / "models").exists()  # cleaned up without --keep


def test_s3_floor_gets_every_stored_byte_once(s3_endpoint: str, s3_store_url: str) -> None:
    from registry.storage import open_store
    from registry.storage.base import InvalidRangeError

    store = open_store(s3_store_url, endpoint_url=s3_endpoint, aws_access_key_id="testing",
                       aws_secret_access_key="testing")  # fmt: skip
    sizes = {}
    for size in (5 * 1024 + 3, 1024, 1):
        data = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
        sizes[store.put_stream(iter([data])).key] = size
    short = min(sizes, key=sizes.__getitem__)  # the 1-byte object
    wire = count_wire(store)
    seconds = fetch_all(store, sizes, part=1024, workers=3)
    assert seconds > 0
    assert wire["bytes"] == sum(sizes.values())  # every byte, once
    assert wire["GetObject"] == 6 + 1 + 1 and wire["HeadObject"] == 0  # 1 KiB ranges
    with pytest.raises(InvalidRangeError, match="outside object"):  # a wrong size is loud
        fetch_all(store, {short: 2}, part=1024, workers=1)


def test_help_and_bad_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        merge_from_s3.main(["--help"])
    assert done.value.code == 0
    assert "--input-shard-size" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        merge_from_s3.main(["--sizes", "huge"])
    assert "unknown size(s) ['huge']" in capsys.readouterr().err
