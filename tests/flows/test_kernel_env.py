"""``ckreg`` reads the fused kernels' settings from the environment (mergeops reads none)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from flows.kernel_env import configure_kernels
from mergeops import kernel_settings


@pytest.fixture(autouse=True)
def _defaults_after() -> Iterator[None]:
    yield
    kernel_settings.reset()


def test_defaults_without_the_variables() -> None:
    assert configure_kernels({}) == kernel_settings.KernelSettings()


def test_the_variables_reach_the_kernel_settings(tmp_path: Path) -> None:
    got = configure_kernels(
        {"CKREG_FUSED_KERNELS": "off", "CKREG_KERNEL_DIR": str(tmp_path), "CC": "ccache gcc"}
    )
    assert got == kernel_settings.KernelSettings(False, tmp_path, ("ccache", "gcc"))
    assert kernel_settings.current()[0] == got


def test_xdg_cache_home_places_the_cache_and_the_switch_defaults_on(tmp_path: Path) -> None:
    got = configure_kernels({"XDG_CACHE_HOME": str(tmp_path), "CKREG_FUSED_KERNELS": "1"})
    assert got.enabled and got.cache_dir == tmp_path / "ckreg" / "kernels"


def test_applying_the_same_environment_again_keeps_the_loaded_kernels() -> None:
    configure_kernels({"CKREG_FUSED_KERNELS": "1"})
    generation = kernel_settings.current()[1]
    configure_kernels({"CKREG_FUSED_KERNELS": "1"})  # each flow runtime build does this
    assert kernel_settings.current()[1] == generation
