"""The MLflow UI shows a merge: headless Chromium opens the experiment and the run page.

Needs Debian's ``chromium`` (``apt-get install chromium``) and Playwright's Python driver; the
browser is launched from ``/usr/bin/chromium``, so no Playwright browser download is needed.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from flows.tracking import Tracker, experiment_ui_url
from tests.services import require

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
]

# Generous: the UI bundle is large and CI machines are shared.
_TIMEOUT_MS = 120_000


def _chromium() -> str:
    found = str(CHROMIUM) if CHROMIUM.exists() else shutil.which("chromium")
    if found is None:
        require("chromium", "install Debian's chromium package (apt-get install -y chromium)")
    return str(found)


def test_run_page_shows_input_models_and_metric(
    mlflow_server, mlflow_experiment_name, tmp_path: Path, make_merge_record
) -> None:
    executable = _chromium()
    sync_api = pytest.importorskip("playwright.sync_api")
    tracker = Tracker(
        mlflow_server.url, outbox_dir=tmp_path / "outbox", experiment_name=mlflow_experiment_name
    )
    record = make_merge_record(accuracy=0.8765)
    run_id = tracker.log_merge(record)
    assert run_id is not None
    experiment_id = tracker.writer.experiment_id()

    expected = ["tiny-math", "tiny-code", "tiny-base", "tiny-merged", "accuracy", "0.8765"]
    shot = tmp_path / "mlflow-run-page.png"
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_FLAGS)
        try:
            # Tall viewport: the run page scrolls inside its own pane, not the document.
            page = browser.new_page(viewport={"width": 1400, "height": 2600})
            page.set_default_timeout(_TIMEOUT_MS)
            page.goto(
                f"{mlflow_server.url}/#/experiments/{experiment_id}/runs/{run_id}",
                wait_until="domcontentloaded",
            )
            page.get_by_text("Logged models").first.wait_for()
            page.wait_for_function(
                "words => words.every(w => document.body.innerText.includes(w))",
                arg=expected,
            )
            # The run's description names the models too: wait for the models table itself.
            page.wait_for_function(
                """names => {
                    const text = document.body.innerText;
                    const table = text.split("Logged models").slice(1).join(" ");
                    return !text.includes("Models loading") && names.every(n => table.includes(n));
                }""",
                arg=["tiny-math", "tiny-code", "tiny-base", "tiny-merged"],
            )
            text = page.inner_text("body")
            page.screenshot(path=str(shot))
        finally:
            browser.close()

    logged_models = text.split("Logged models", 1)[1]
    for name in ("tiny-math", "tiny-code", "tiny-base", "tiny-merged"):
        assert name in logged_models
    metrics = text.split("Metrics", 1)[1]
    assert "accuracy" in metrics and "0.8765" in metrics
    assert shot.stat().st_size > 10_000


def test_experiment_opens_on_runs_and_models_with_the_merged_model(
    mlflow_server, mlflow_experiment_name, tmp_path: Path, make_merge_record
) -> None:
    """What a reviewer gets from ckreg's experiment link: runs and models, not GenAI traces."""
    executable = _chromium()
    sync_api = pytest.importorskip("playwright.sync_api")
    tracker = Tracker(
        mlflow_server.url, outbox_dir=tmp_path / "outbox", experiment_name=mlflow_experiment_name
    )
    record = make_merge_record(accuracy=0.8765)
    assert tracker.log_merge(record) is not None
    url = experiment_ui_url(mlflow_server.url, tracker.writer.experiment_id())
    run_name = f"merge-{record.run_id}-{record.output.name}"
    shots = {view: tmp_path / f"mlflow-experiment-{view}.png"
             for view in ("runs", "models", "model", "lineage")}  # fmt: skip
    texts: dict[str, str] = {}
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1900, "height": 1000})
            page.set_default_timeout(_TIMEOUT_MS)
            page.goto(url, wait_until="domcontentloaded")
            page.get_by_text(run_name).first.wait_for()
            texts["runs"] = page.inner_text("body")
            page.screenshot(path=str(shots["runs"]))
            page.get_by_role("link", name="Models", exact=True).first.click()
            page.wait_for_function(
                "words => words.every(w => document.body.innerText.includes(w))",
                arg=["Source run", record.output.name, "tiny-base", run_name],
            )
            texts["models"] = page.inner_text("body")
            page.screenshot(path=str(shots["models"]))
            # The merged model's page: its metrics and description, then its lineage picture.
            page.get_by_role("link", name=record.output.name, exact=True).first.click()
            page.wait_for_function(
                "words => words.every(w => document.body.innerText.includes(w))",
                arg=["0.8765", "merge of 2 checkpoints", run_name],
            )
            texts["model"] = page.inner_text("body")
            page.screenshot(path=str(shots["model"]))
            page.get_by_text("Artifacts", exact=True).first.click()
            page.get_by_text("lineage.png").first.click()
            page.locator("img[src*='lineage.png'], img[src^='blob:']").first.wait_for()
            texts["lineage"] = page.inner_text("body")
            page.screenshot(path=str(shots["lineage"]))
        finally:
            browser.close()

    runs = texts["runs"]
    assert "Runs" in runs and "Models" in runs  # the model-training navigation
    assert "Training runs" not in runs and "No data available" not in runs  # not GenAI's
    assert run_name in runs and "1 matching run" in runs
    models = texts["models"]
    for name in (record.output.name, "tiny-math", "tiny-code", "tiny-base"):
        assert name in models
    assert run_name in models  # the merged model's source run
    model = texts["model"]
    assert "accuracy" in model and "0.8765" in model and run_name in model
    assert "No description" not in model and "merge of 2 checkpoints" in model
    assert {"evaluation.json", "lineage.png", "model_card.md"} <= set(texts["lineage"].split())
    assert all(shot.stat().st_size > 10_000 for shot in shots.values())
