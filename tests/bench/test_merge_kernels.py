"""The kernel A/B bench runs both kernels (weighted sum, task-vector combine) on the same files
and finds identical outputs."""

from pathlib import Path

from bench import merge_kernels


def test_tiny_kernel_ab_outputs_identical(tmp_path: Path, capsys) -> None:
    args = ["--size", "tiny", "--methods", "linear,ties", "--repeats", "1", "--work", str(tmp_path)]
    assert merge_kernels.main(args) == 0
    printed = capsys.readouterr().out
    assert "linear: outputs byte-identical across kernels: True" in printed
    assert "ties: outputs byte-identical across kernels: True" in printed
    assert "stacked   median" in printed and "blocked   median" in printed
    assert not list(tmp_path.glob("out-kernels"))
