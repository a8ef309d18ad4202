"""mergekit's six example configs: ckreg's output equals mergekit's (float32, bfloat16, and
float16 compute from float32 checkpoints as the examples' ``dtype: float16`` does)."""

from __future__ import annotations

import pytest
import torch

from mergeops import available_methods
from tests.mergeops.mergekit.examples import EXAMPLES
from tests.mergeops.mergekit.harness import assert_close, run_ckreg, run_mergekit


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("example", sorted(EXAMPLES))
def test_example_matches_mergekit(zoo, tmp_path, example, dtype):
    config = EXAMPLES[example](zoo, "float32" if dtype == "float16" else dtype)
    config["dtype"] = dtype
    assert config["merge_method"] in available_methods()
    theirs = run_mergekit(config, tmp_path / "mergekit")
    ours = run_ckreg(config, tmp_path / "ckreg")
    assert_close(ours, theirs, getattr(torch, dtype))
