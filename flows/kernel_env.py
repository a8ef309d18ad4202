"""The fused CPU kernels' settings from the environment (``mergeops`` reads none itself):

- ``CKREG_FUSED_KERNELS``: ``0``/``false``/``off`` keeps torch ops (default on);
- ``CKREG_KERNEL_DIR``: where compiled kernels are kept (default
  ``$XDG_CACHE_HOME/ckreg/kernels``, ``~/.cache/ckreg/kernels`` without it);
- ``CC``: the C compiler command (default ``cc``, else ``gcc``).

Applied when ``ckreg`` starts and when a flow's runtime is built (flow-run subprocesses).
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Mapping
from pathlib import Path

from mergeops import kernel_settings


def configure_kernels(environ: Mapping[str, str] | None = None) -> kernel_settings.KernelSettings:
    """Set ``mergeops.kernel_settings`` from ``environ`` (default ``os.environ``)."""
    env = os.environ if environ is None else environ
    switch = env.get("CKREG_FUSED_KERNELS", "1").strip().lower()
    folder = env.get("CKREG_KERNEL_DIR")
    if not folder and env.get("XDG_CACHE_HOME"):
        folder = str(Path(env["XDG_CACHE_HOME"]) / "ckreg" / "kernels")
    compiler = shlex.split(env["CC"]) if env.get("CC", "").strip() else None
    return kernel_settings.apply(
        kernel_settings.KernelSettings(
            enabled=switch not in ("0", "false", "no", "off"),
            cache_dir=Path(folder) if folder else None,
            compiler=tuple(compiler) if compiler else None,
        )
    )
