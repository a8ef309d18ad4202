"""Session fixtures for mergekit parity tests: the tiny Llama zoo (see ``harness.py``)."""

from __future__ import annotations

import pytest

from tests.mergeops.mergekit.harness import Zoo, build_zoo


@pytest.fixture(scope="session")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Zoo:
    """base, ft1, ft2, ft3 as HF folders in float32 and bfloat16 (built once per session)."""
    return build_zoo(tmp_path_factory.mktemp("mergekit-zoo"))
