"""The merge floor: reads every input byte once, writes the output's size, leaves no file."""

import re
from pathlib import Path

from bench import merge_engine
from bench._synth import SHAPES, write_family
from bench.merge_floor import input_files, measure_floor, median_floor


def test_floor_reads_every_input_byte_and_writes_the_output_size(tmp_path: Path) -> None:
    folders = write_family(tmp_path / "m", shape=SHAPES["tiny"], finetunes=2, shard_size="60KB")
    files = input_files(folders)
    floor = measure_floor(folders, 123_457, tmp_path / "scratch" / "floor.bin")
    assert floor.read_bytes == sum(p.stat().st_size for p in files) and len(files) > 3
    assert floor.write_bytes == 123_457 and floor.seconds > 0
    assert not (tmp_path / "scratch" / "floor.bin").exists()
    runs = [measure_floor(folders, 10, tmp_path / "f.bin") for _ in range(3)]
    assert median_floor(runs) == sorted(runs, key=lambda f: f.seconds)[1]


def test_floor_mode_prints_only_the_floor(tmp_path: Path, capsys) -> None:
    args = ["--sizes", "tiny", "--work", str(tmp_path), "--mergekit", "none"]
    assert merge_engine.main([*args, "--floor", "--repeats", "2"]) == 0
    printed = capsys.readouterr().out
    line = next(x for x in printed.splitlines() if x.startswith("floor tiny:"))
    assert "s median" in line and line.count(",") >= 3
    assert " ckreg " not in printed


def test_rows_carry_the_floor_and_its_multiple(tmp_path: Path, capsys) -> None:
    args = ["--sizes", "tiny", "--work", str(tmp_path), "--mergekit", "none"]
    assert merge_engine.main([*args, "--methods", "linear", "--repeats", "2"]) == 0
    printed = capsys.readouterr().out
    head = next(x for x in printed.splitlines() if "xfloor" in x)
    row = next(x for x in printed.splitlines() if x.strip().startswith("tiny linear"))
    assert re.search(r"\s\d+\.\d\d\s*\d+\.\dx", row), (head, row)  # floor s, multiple
    assert len(list((tmp_path / "tiny").glob("linear-ckreg-*.log"))) == 2


def test_warm_inputs_reads_them_only_when_they_fit_in_half_the_memory(
    tmp_path: Path, monkeypatch
) -> None:
    from bench import merge_floor

    folders = write_family(tmp_path / "m", shape=SHAPES["tiny"], finetunes=1)
    assert merge_floor.warm_inputs(folders)
    real = merge_floor.os.sysconf
    monkeypatch.setattr(merge_floor.os, "sysconf",
                        lambda name: 1 if name == "SC_PHYS_PAGES" else real(name))  # fmt: skip
    assert not merge_floor.warm_inputs(folders)


def test_every_timed_run_starts_settled(tmp_path: Path, monkeypatch, capsys) -> None:
    """The floor and each engine run are preceded by a warm read of the inputs and a sync."""
    events: list[str] = []
    monkeypatch.setattr(merge_engine, "warm_inputs", lambda folders: events.append("warm"))
    monkeypatch.setattr(merge_engine.os, "sync", lambda: events.append("sync"))
    real_floor, real_measure = merge_engine.measure_floor, merge_engine.measure

    def floor(*args, **kwargs):
        events.append("floor")
        return real_floor(*args, **kwargs)

    def measure(*args, **kwargs):
        events.append("run")
        return real_measure(*args, **kwargs)

    monkeypatch.setattr(merge_engine, "measure_floor", floor)
    monkeypatch.setattr(merge_engine, "measure", measure)
    args = ["--sizes", "tiny", "--work", str(tmp_path), "--mergekit", "none"]
    assert merge_engine.main([*args, "--methods", "linear", "--repeats", "2"]) == 0
    timed = [i for i, event in enumerate(events) if event in ("floor", "run")]
    assert len(timed) >= 4
    for i in timed[:4]:  # the repeats' floors and ckreg runs (then the start-up line)
        assert events[i - 2 : i] == ["warm", "sync"], events
