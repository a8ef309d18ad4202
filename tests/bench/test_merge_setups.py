"""The merge-engine benchmark's mergekit rows: one per mergekit method, configs both accept."""

from pathlib import Path

import yaml

from bench.merge_engine import write_config
from bench.merge_setups import MERGEKIT_SETUPS, mergekit_methods
from mergeops.config import parse_config


def test_every_mergekit_method_has_a_setup_both_engines_parse(tmp_path: Path) -> None:
    from mergekit.config import MergeConfiguration
    from mergekit.merge_methods.registry import registered_methods

    assert set(MERGEKIT_SETUPS) == {m.spec.name for m in registered_methods()}
    folders = [tmp_path / f"m{i}" for i in range(5)]
    for method in mergekit_methods():
        data = yaml.safe_load(
            write_config(tmp_path / f"{method}.yml", method, folders, 0.5).read_text()
        )
        MergeConfiguration.model_validate(data)
        parse_config(data)
        assert len(data["models"]) == MERGEKIT_SETUPS[method].models


def test_ckreg_variant_rows_write_their_method_and_params(tmp_path: Path) -> None:
    from bench.merge_setups import CKREG_VARIANTS, setup_of

    folders = [tmp_path / f"m{i}" for i in range(5)]
    for name, (method, extra) in CKREG_VARIANTS.items():
        data = yaml.safe_load(
            write_config(tmp_path / f"{name}.yml", name, folders, 0.5).read_text()
        )
        assert data["merge_method"] == method
        assert extra.items() <= data["parameters"].items()
        per_model = setup_of(name).per_model or {}
        density = 0.5 if per_model.get("density") == -1 else per_model["density"]  # -1: --density
        assert [m["parameters"]["density"] for m in data["models"]] == [density] * 4, name
        parse_config(data)
