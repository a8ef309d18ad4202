"""CLI pieces that need no server: help texts, metric parsing, table and lineage rendering."""

from __future__ import annotations

import pytest
import typer
from typer.testing import CliRunner

from registry.client.cli import format_table, lineage_tree, parse_metrics, registry_app

runner = CliRunner()


@pytest.mark.parametrize("command", ["register", "ls", "show", "lineage", "download"])
def test_every_command_has_help_with_example(command: str) -> None:
    result = runner.invoke(registry_app, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Example" in result.output
    assert "--url" in result.output


def test_parse_metrics() -> None:
    assert parse_metrics(["loss=0.42", "acc = 1e-1"]) == {"loss": 0.42, "acc": 0.1}
    with pytest.raises(typer.BadParameter, match="'loss' is not NAME=VALUE"):
        parse_metrics(["loss"])
    with pytest.raises(typer.BadParameter, match="value 'high' of metric 'acc' is not a number"):
        parse_metrics(["acc=high"])
    with pytest.raises(typer.BadParameter, match="not NAME=VALUE"):
        parse_metrics(["=3"])


def test_bad_metric_exits_with_usage_error_before_any_request(tmp_path: object) -> None:
    result = runner.invoke(
        registry_app,
        ["register", "x.safetensors", "--metric", "acc=high", "--url", "http://127.0.0.1:9"],
    )
    assert result.exit_code == 2
    assert "is not a number" in result.output


def test_format_table() -> None:
    table = format_table(
        [{"id": 1, "name": "a", "tags": ["x", "y"], "task": None}], ("id", "name", "tags", "task")
    )
    assert table.splitlines() == ["ID  NAME  TAGS  TASK", "1   a     x,y   -"]


def test_lineage_tree() -> None:
    graph = {
        "checkpoint_id": 5,
        "ancestors": [
            {"parent_id": 3, "child_id": 5, "role": "input", "depth": 1},
            {"parent_id": 4, "child_id": 5, "role": "input", "depth": 1},
            {"parent_id": 1, "child_id": 3, "role": "base", "depth": 2},
        ],
        "descendants": [{"parent_id": 5, "child_id": 9, "role": "input", "depth": 1}],
    }
    assert lineage_tree(graph) == [
        "checkpoint 5",
        "  ancestors:",
        "    └─ 3 (input)",
        "      └─ 1 (base)",
        "    └─ 4 (input)",
        "  descendants:",
        "    └─ 9 (input)",
    ]
