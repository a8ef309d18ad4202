"""Fixtures shared by the mergeops tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from mergeops import kernel_settings


@pytest.fixture
def kernel_dir(tmp_path: Path) -> Iterator[Path]:
    """Kernels on, built into a fresh folder; the defaults again afterwards."""
    folder = tmp_path / "kernels"
    kernel_settings.reset()
    kernel_settings.configure(cache_dir=folder)
    yield folder
    kernel_settings.reset()
