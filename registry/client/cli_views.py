"""What ``ckreg show`` and ``ckreg lineage`` print: a checkpoint with its files, metrics,
artifacts and merge runs; a lineage tree whose nodes carry name, kind, task, method and scores."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from registry.client.cli_merges import run_line

if TYPE_CHECKING:
    from registry.client.api import Client

SHOW_ORDER = ("id", "name", "kind", "status", "base_id", "task", "run", "step", "tags")
FILE_COLUMNS = ("name", "size", "stored_size", "codec", "role", "sha256")  # stored: at rest
METRIC_COLUMNS = ("name", "value", "step", "source", "dataset", "split")
ARTIFACT_COLUMNS = ("id", "role", "name", "size", "tensors", "sha256")
SCORES_SHOWN = 3


def checkpoint_details(client: Client, checkpoint_id: int) -> dict[str, Any]:
    """The checkpoint with ``metrics``, ``artifacts`` and ``merge_runs`` (runs taking it) added."""
    checkpoint = client.get_checkpoint(checkpoint_id)
    runs = client.list_merge_runs(input_checkpoint_id=checkpoint_id, limit=1000)["items"]
    return checkpoint | {
        "metrics": client.metrics(checkpoint_id),
        "artifacts": client.artifacts(checkpoint_id),
        "merge_runs": runs,
    }


def show_lines(details: dict[str, Any], table: Any) -> list[str]:
    """``ckreg show`` text: fields, then files, metrics, artifacts and merge runs sections;
    ``table(rows, columns)`` renders a table."""
    sections = ("files", "metrics", "artifacts", "merge_runs")
    keys = [k for k in SHOW_ORDER if k in details]
    keys += [k for k in details if k not in SHOW_ORDER and k not in sections]
    lines = [f"{key:>12}: {details[key]}" for key in keys]
    produced = (details.get("metadata") or {}).get("merge_run_id")
    if produced is not None:
        lines.append(f"{'made by':>12}: merge run {produced} ({details['metadata'].get('method')})")
    for title, columns in (
        ("files", FILE_COLUMNS),
        ("metrics", METRIC_COLUMNS),
        ("artifacts", ARTIFACT_COLUMNS),
    ):
        rows = details.get(title) or []
        lines.append(f"{title:>12}:" + ("" if rows else " -"))
        if rows:
            lines.append(table(rows, columns))
    runs = details.get("merge_runs") or []
    lines.append(f"{'merged into':>12}:" + ("" if runs else " -"))
    lines += [f"  {run_line(run)}" for run in runs]
    return lines


def node_labels(client: Client, graph: dict[str, Any]) -> dict[int, str]:
    """``id -> "12 'ft-math' [finetune, task math] loss=0.42"`` for every node of the graph;
    merged nodes name their method and run, and show evaluation scores first."""
    ids = {int(graph["checkpoint_id"])}
    for edge in graph.get("ancestors", []) + graph.get("descendants", []):
        ids |= {int(edge["parent_id"]), int(edge["child_id"])}
    return {node: _label(client, node) for node in sorted(ids)}


def _label(client: Client, checkpoint_id: int) -> str:
    from registry.client.api import ClientError

    try:
        checkpoint = client.get_checkpoint(checkpoint_id)
        metrics = client.metrics(checkpoint_id)
    except ClientError as exc:
        return f"{checkpoint_id} (unreadable: HTTP {exc.status})"
    facts = [str(checkpoint.get("kind"))]
    if checkpoint.get("task"):
        facts.append(f"task {checkpoint['task']}")
    metadata = checkpoint.get("metadata") or {}
    if metadata.get("method"):
        facts.append(f"{metadata['method']} by merge run {metadata.get('merge_run_id')}")
    label = f"{checkpoint_id} '{checkpoint.get('name')}' [{', '.join(facts)}]"
    scores = _scores(metrics)
    return f"{label} {scores}" if scores else label


def _scores(metrics: list[dict[str, Any]]) -> str:
    """Newest value per metric name, evaluation scores first, at most ``SCORES_SHOWN``."""
    newest: dict[str, dict[str, Any]] = {}
    for metric in sorted(metrics, key=lambda m: m.get("id", 0)):
        newest[metric["name"]] = metric
    ordered = sorted(newest.values(), key=lambda m: (m.get("source") != "evaluation", m["name"]))
    return " ".join(f"{m['name']}={m['value']:.4g}" for m in ordered[:SCORES_SHOWN])
