"""How ``mergeops.kernels`` builds and uses its fused C kernels (no torch import: the CLI sets
these at start-up from the environment, in ``flows.cli``; library users call ``configure``).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path


@dataclass(frozen=True)
class KernelSettings:
    """``enabled``: use the kernels where they apply (else torch ops, the same results);
    ``cache_dir``: where compiled kernels are kept (default ``~/.cache/ckreg/kernels``);
    ``compiler``: the C compiler's command (default ``cc``, else ``gcc``, on the PATH)."""

    enabled: bool = True
    cache_dir: Path | None = None
    compiler: tuple[str, ...] | None = None


_lock = threading.Lock()
_current = KernelSettings()
_generation = 0


def current() -> tuple[KernelSettings, int]:
    """The settings and a counter that changes whenever they do."""
    with _lock:
        return _current, _generation


def configure(
    *,
    enabled: bool | None = None,
    cache_dir: Path | str | None = None,
    compiler: Sequence[str] | None = None,
) -> KernelSettings:
    """Change the given settings (the others stay); a later merge builds or loads the kernels
    again under them. Returns the new settings."""
    changes: dict[str, object] = {}
    if enabled is not None:
        changes["enabled"] = enabled
    if cache_dir is not None:
        changes["cache_dir"] = Path(cache_dir)
    if compiler is not None:
        changes["compiler"] = tuple(compiler)
    with _lock:
        wanted = replace(_current, **changes)  # type: ignore[arg-type]
    return apply(wanted)


def apply(settings: KernelSettings) -> KernelSettings:
    """Make ``settings`` the current ones; the kernels are loaded again only if they differ
    (a flow runtime applies the environment's settings each time it is built)."""
    global _current, _generation
    with _lock:
        if settings != _current:
            _current = settings
            _generation += 1
        return _current


def reset() -> None:
    """Back to the defaults (tests)."""
    apply(KernelSettings())
