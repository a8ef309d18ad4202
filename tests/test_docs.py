"""The docs: the mkdocs site builds with strict link checking, the README's links and commands
point at things that exist, and the reference moved out of the README kept its figures."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

from tests.services import require

REPO = Path(__file__).resolve().parents[1]
MKDOCS = Path(sys.executable).parent / "mkdocs"

# Figures and commands of the README before it was shortened: each must live on in docs/.
MOVED = [
    "15.6 s, 837 MiB peak RSS",  # merge engine vs mergekit
    "137 MiB/s, server RSS +87 MB",  # upload through the API
    "zipnn 1.51x / 2.00x / 59.3x smaller",  # compressed storage
    "OPCM (continual) 0.694",  # digits zoo quality
    "OTA 0.541 (0.686)",  # LM zoo quality
    "0.013 ± 0.008 (seed 1)",  # LM zoo noise
    "python -m bench.merge_from_s3 --sizes 270m,100m",
    "ckreg family compress --base 1 --task-vectors 2,3,4,5 --evaluator digits",
    "ckreg gc --delete",
    "CKREG_UPLOAD_IDLE_TIMEOUT_S",
    "| `CKREG_STORE_COMPRESSION` |",
    "`POST /admin/gc` (admin scope",
    "FOR UPDATE SKIP LOCKED",
    "capture_second_moments(model, optimizer, path)",
]


def _nav_pages(nav: list[object]) -> list[str]:
    pages: list[str] = []
    for item in nav:
        value = next(iter(item.values())) if isinstance(item, dict) else item
        if isinstance(value, list):
            pages += _nav_pages(value)
        else:
            pages.append(str(value))
    return pages


def test_site_builds_strictly_with_every_nav_page(tmp_path: Path) -> None:
    if not MKDOCS.exists():
        require("mkdocs", "not installed (pip install -c constraints.txt -e '.[dev]')")
    config = yaml.safe_load((REPO / "mkdocs.yml").read_text())
    assert config["strict"] is True
    pages = _nav_pages(config["nav"])
    missing = [p for p in pages if not (REPO / "docs" / p).is_file()]
    assert missing == []
    site = tmp_path / "site"
    built = subprocess.run(
        [str(MKDOCS), "build", "--strict", "--quiet", "-d", str(site)],
        cwd=REPO,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    for page in pages:
        name = page.removesuffix(".md")
        html = site / ("index.html" if name == "index" else f"{name}/index.html")
        assert html.is_file(), page


def test_reference_moved_out_of_the_readme_is_in_the_docs() -> None:
    docs = "\n".join(p.read_text() for p in sorted((REPO / "docs").glob("*.md")))
    assert [text for text in MOVED if text not in docs] == []


def test_readme_links_and_commands_exist() -> None:
    readme = (REPO / "README.md").read_text()
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", readme)
    assert links, "the README links its docs pages"
    assert [link for link in links if not (REPO / link).exists()] == []
    makefile = (REPO / "Makefile").read_text()
    targets = set(re.findall(r"^([a-z-]+):", makefile, flags=re.M))
    assert {"demo", "test", "demo-lm", "ui", "install"} <= targets
    for target in re.findall(r"\bmake ([a-z-]+)", readme):
        assert target in targets, target
    # The API docs live under /api/v1 (/docs only redirects there).
    assert "/api/v1/docs" in readme
    assert re.search(r"<port>/docs\b|:8321/docs\b", readme) is None
