"""Parity with real mergekit outputs committed in data/mergekit (see data/README.md)."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mergeops import merge_files
from mergeops.config import load_config, to_merge_kwargs
from mergeops.io import ShardedCheckpoint

DATA = Path(__file__).parent / "data" / "mergekit"


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "ties"])
def test_matches_mergekit_within_1e6(method, tmp_path):
    kwargs = to_merge_kwargs(load_config(DATA / f"{method}.yml"), DATA)
    kwargs["device"] = "cpu"
    merge_files(out_dir=tmp_path / "out", progress=False, **kwargs)
    ours = ShardedCheckpoint(tmp_path / "out")
    expected = load_file(DATA / "expected" / f"{method}.safetensors")
    assert set(ours.keys()) == set(expected)
    for key, tensor in expected.items():
        got = ours.get(key)
        assert got.dtype == tensor.dtype == torch.float32
        assert torch.allclose(got, tensor, rtol=0, atol=1e-6), key
