"""``ckreg merges create --config merge.yml`` against a live registry: the run is created from the
YAML (checkpoint names resolved), asked again it is the existing run, a bad key is an error
naming it (exit code != 0)."""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import save_file
from typer.testing import CliRunner

from flows.cli import app
from registry.client.api import Client
from tests.registry.conftest import LiveRegistry
from tests.registry.registry_fixtures import tiny_state

runner = CliRunner()
CONFIG = """
merge_method: linear
models:
  - model: ckreg/kit-a
    parameters: {weight: 0.3}
  - model: ckreg/kit-b
    parameters: {weight: 0.7}
"""


def test_merges_create_from_a_yaml(live_registry: LiveRegistry, tmp_path: Path) -> None:
    ids = []
    with Client(live_registry.url, token=live_registry.token) as client:
        for seed, name in ((1, "kit-a"), (2, "kit-b")):
            path = tmp_path / f"{name}.safetensors"
            save_file(tiny_state(seed=seed), str(path))
            ids.append(client.register(path, kind="base", name=name, progress=False)["id"])
    config = tmp_path / "merge.yml"
    config.write_text(CONFIG)
    auth = ["--url", live_registry.url, "--token", live_registry.token]
    created = runner.invoke(app, ["merges", "create", "--config", str(config), *auth])
    assert created.exit_code == 0, created.output
    assert f"(linear, ad hoc, inputs {ids[0]},{ids[1]}): queued" in created.output
    again = runner.invoke(app, ["merges", "create", "--config", str(config), *auth])
    assert again.exit_code == 0 and "(existing run)" in again.output, again.output
    config.write_text(CONFIG.replace("weight: 0.3", "wieght: 0.3"))
    bad = runner.invoke(app, ["merges", "create", "--config", str(config), *auth])
    assert bad.exit_code != 0
    assert "models[0].parameters.wieght" in bad.output + str(bad.exception)


def test_policy_create_with_a_mergekit_template(
    live_registry: LiveRegistry, tmp_path: Path
) -> None:
    template = tmp_path / "template.yml"
    template.write_text("merge_method: linear\nparameters: {weight: 0.5}\n")
    auth = ["--url", live_registry.url, "--token", live_registry.token]
    args = ["policy", "create", "--name", "kit-policy", "--mergekit", str(template)]
    created = runner.invoke(app, [*args, "--trigger", "manual", *auth])
    assert created.exit_code == 0, created.output
    with Client(live_registry.url, token=live_registry.token) as client:
        policy = next(p for p in client.policies() if p["name"] == "kit-policy")
    assert policy["method"] == "linear" and policy["mergekit"] == template.read_text()
    template.write_text("merge_method: linear\nparameters: {wait: 0.5}\n")
    bad = runner.invoke(app, [*args[:3], "kit-2", "--mergekit", str(template), *auth])
    assert bad.exit_code != 0 and "parameters.wait" in bad.output, bad.output
