"""Smoke run of the S3-streaming merge benchmark at tiny size: its own moto_server, a local and
an S3 merge in child processes, byte-identical outputs and plausible fetch counts."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import merge_from_s3


def test_tiny_run_prints_both_sides_and_identical_outputs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--sizes", "tiny", "--methods", "task_arithmetic", "--finetunes", "2"]
    code = merge_from_s3.main([*args, "--work", str(tmp_path)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    row = next(line for line in printed.splitlines() if line.startswith("tiny "))
    cells = row.split()
    assert cells[1] == "task_arithmetic" and cells[-1] == "yes", row
    local_s, s3_s, fetched_ratio, asked_ratio = (float(cells[i]) for i in (2, 3, 10, 11))
    assert local_s > 0 and s3_s > 0
    assert 0.9 <= fetched_ratio <= 1.05 and asked_ratio == pytest.approx(1.0, abs=0.01)
    gets, heads = (int(n) for n in cells[12].split("/"))
    assert gets > 0 and heads == 0  # tensors located by the stored index: no header reads
    assert not (tmp_path / "tiny" / "models").exists()  # cleaned up without --keep


def test_help_and_bad_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        merge_from_s3.main(["--help"])
    assert done.value.code == 0
    assert "--input-shard-size" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        merge_from_s3.main(["--sizes", "huge"])
    assert "unknown size(s) ['huge']" in capsys.readouterr().err
