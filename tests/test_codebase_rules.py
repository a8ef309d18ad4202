"""Rules from DESIGN §2 that a linter contract cannot express."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("registry", "flows", "mergeops")


def _sources() -> list[Path]:
    return [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")]


def test_only_the_settings_module_reads_ckreg_environment_variables() -> None:
    pattern = re.compile(r"""(os\.environ|getenv)[^\n]*["']CKREG_""")
    offenders = [
        str(p.relative_to(ROOT))
        for p in _sources()
        if p != ROOT / "registry" / "settings.py" and pattern.search(p.read_text())
    ]
    assert offenders == []


def test_mergeops_reads_no_environment_at_all() -> None:
    offenders = [
        str(p.relative_to(ROOT))
        for p in (ROOT / "mergeops").rglob("*.py")
        if re.search(r"os\.environ|getenv\(", p.read_text())
    ]
    assert offenders == []


def test_nothing_unpickles_user_data() -> None:
    """torch.load only with weights_only=True, and never pickle.load."""
    offenders = []
    for path in _sources():
        text = path.read_text()
        if "pickle.load" in text:
            offenders.append(f"{path.relative_to(ROOT)}: pickle.load")
        for line in text.splitlines():
            if "torch.load(" in line and "weights_only=True" not in line:
                offenders.append(f"{path.relative_to(ROOT)}: {line.strip()}")
    assert offenders == []
