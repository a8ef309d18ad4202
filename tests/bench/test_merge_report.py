"""The merge-engine benchmark's summary: markdown table, issue 20's goals, RSS per output shard
size, and the options that choose engines and repeats per method and size."""

from pathlib import Path

import pytest

from bench import merge_engine
from bench.merge_options import repeats_for, runs_mergekit
from bench.merge_report import Row, Run, format_goals, format_shard_rss, format_summary

MIB = 1024 * 1024


def _run(engine: str, wall: float, rss_mib: int) -> Run:
    return Run(engine, "cpu", wall, wall, rss_mib * MIB, 0, True, Path("x.log"))


def _row(size: str, method: str, wall: float, mk_wall: float | None, rss: int) -> Row:
    row = Row(size, method, _run("ckreg", wall, rss), 0, (1.0, 1.0), floor=2.0, in_bytes=10**9)
    row.versus = _run("mergekit", mk_wall, 4 * rss + 1) if mk_wall else None
    row.shard_rss = {"256MB": rss * MIB, "5GB": (rss + 100) * MIB}
    return row


def test_summary_goals_and_shard_table_from_rows() -> None:
    rows = [
        _row("270m", "ties", 7.0, 30.0, 500),  # 3.5x floor, 4.3x faster
        _row("1b", "ties", 9.0, 20.0, 500),  # 4.5x floor, 2.2x faster
        _row("270m", "linear", 3.0, None, 400),
    ]
    summary = format_summary(rows, startup_s=1.0).splitlines()
    assert summary[0].startswith("| method | size | floor s | ckreg s | mergekit s |")
    assert (
        summary[2]
        == "| ties | 270m | 2.00 | 7.0 | 30.0 | 3.50x | 3.00x | 4.29x | 7.00 | 500 | 2001 | 0.25 |"
    )
    assert summary[4].startswith(
        "| linear | 270m | 2.00 | 3.0 | - | 1.50x | 1.00x | - | 3.00 | 400 | - |"
    )
    goals = format_goals(rows)
    assert "ckreg/floor 270m 3.50, 1b 4.50 (goal <= 4: NOT met)" in goals[0]
    assert "mergekit/ckreg 270m 4.29, 1b 2.22 (goal >= 3: NOT met)" in goals[0]
    assert "RSS ckreg/mergekit 270m 0.25, 1b 0.25 (goal <= 0.25: met)" in goals[0]
    assert "s/GB max/min across sizes 1.29" in goals[0]
    assert goals[1] == "linear: ckreg/floor 270m 1.50 (goal <= 2: met)"
    shard = format_shard_rss(rows).splitlines()
    assert shard[0] == "| method | size | RSS MiB, shards 256MB | RSS MiB, shards 5GB | max/min |"
    assert shard[2] == "| ties | 270m | 500 | 600 | 1.20 |"


def test_tiny_run_prints_summary_goals_and_rss_per_shard_size(tmp_path: Path, capsys) -> None:
    args = ["--sizes", "tiny", "--work", str(tmp_path), "--methods", "linear",
            "--shard-size", "100KB", "--shard-sizes", "100KB,10MB"]  # fmt: skip
    code = merge_engine.main(args)
    printed = capsys.readouterr().out
    assert code == 0, printed
    logs = sorted(p.name for p in (tmp_path / "tiny").glob("*.log"))
    assert logs == ["linear-ckreg-0.log", "linear-ckreg-shard-10MB.log", "linear-mk-0.log"]
    lines = printed.splitlines()
    run_row = next(x for x in lines if x.strip().startswith("tiny linear") and " ckreg " in x)
    assert " abs " in run_row and " rel " in run_row  # outputs compared with mergekit's
    linear = next(x for x in lines if x.startswith("| linear | tiny |"))
    assert all(c.strip() not in ("-", "FAILED") for c in linear.split("|")[3:12]), linear
    assert any(x.startswith("- linear: ckreg/floor tiny ") and "mergekit/ckreg" in x for x in lines)
    shard = next(x for x in lines if x.startswith("| linear | tiny |") and x.count("|") == 6)
    assert all(float(c) > 10 for c in shard.split("|")[3:5]), shard  # MiB, both runs ok
    assert not list(tmp_path.glob("tiny/out-*"))  # outputs removed


def test_engine_and_repeat_overrides_by_method_and_size() -> None:
    args = merge_engine._parse(["--mergekit", "/bin/true", "--ckreg-only", "ties@3b,slerp",
                                "--method-repeats", "ties=2,ties@3b=1", "--repeats", "5"])  # fmt: skip
    assert runs_mergekit(args, "ties", "1b") and not runs_mergekit(args, "ties", "3b")
    assert not runs_mergekit(args, "slerp", "100m") and runs_mergekit(args, "linear", "3b")
    assert [repeats_for(args, "ties", s) for s in ("1b", "3b")] == [2, 1]
    assert repeats_for(args, "linear", "3b") == 5
    alone = merge_engine._parse(["--mergekit", "/bin/true", "--engines", "ckreg"])
    assert not runs_mergekit(alone, "linear", "100m")


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--engines", "mergekit"], "--engines takes ckreg[,mergekit]"),
        (["--method-repeats", "ties=0"], "METHOD[@SIZE]=N with N >= 1"),
        (["--shard-sizes", "5XB"], "bad shard size '5XB'"),
        (["--sizes", "4b"], "unknown size(s) ['4b']"),
    ],
)
def test_bad_options_are_refused(option: list[str], message: str, capsys) -> None:
    with pytest.raises(SystemExit):
        merge_engine.main(option)
    assert message in capsys.readouterr().err


def test_a_size_that_does_not_fit_on_disk_is_refused_before_writing(
    tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("bench.merge_options.free_bytes", lambda path: 10**9)
    assert merge_engine.main(["--sizes", "3b", "--work", str(tmp_path)]) == 2
    assert "3b: needs 42.1 GB free" in capsys.readouterr().err
    assert not (tmp_path / "3b").exists()
