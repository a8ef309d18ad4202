"""mergekit's six example configs: ckreg's output equals mergekit's (float32 and bfloat16)."""

from __future__ import annotations

import pytest

from mergeops import available_methods
from tests.mergeops.mergekit.examples import EXAMPLES
from tests.mergeops.mergekit.harness import assert_close, run_ckreg, run_mergekit


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("example", sorted(EXAMPLES))
def test_example_matches_mergekit(zoo, tmp_path, example, dtype):
    config = EXAMPLES[example](zoo, dtype)
    if config["merge_method"] not in available_methods():
        pytest.skip(f"method '{config['merge_method']}' is not registered")
    theirs = run_mergekit(config, tmp_path / "mergekit")
    ours = run_ckreg(config, tmp_path / "ckreg")
    assert_close(ours, theirs, dtype)
