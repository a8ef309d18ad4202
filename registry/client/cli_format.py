"""Plain-text rendering for the ``ckreg`` client commands: tables and lineage trees."""

from __future__ import annotations

from typing import Any


def format_table(rows: list[dict[str, Any]], columns: tuple[str, ...]) -> str:
    """Left-aligned plain-text table of ``columns`` (lists joined by commas, None shown as '-')."""

    def cell(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, list):
            return ",".join(map(str, value)) or "-"
        return str(value)

    cells = [[cell(row.get(column)) for column in columns] for row in rows]
    widths = [
        max([len(column)] + [len(line[i]) for line in cells]) for i, column in enumerate(columns)
    ]
    lines = [[column.upper() for column in columns], *cells]
    return "\n".join(
        "  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)).rstrip() for line in lines
    )


def lineage_tree(graph: dict[str, Any], labels: dict[int, str] | None = None) -> list[str]:
    """Indented tree: the checkpoint, its ancestors (parents first) and its descendants; nodes
    are shown as ``labels[id]`` when given, else as bare ids."""
    root = int(graph["checkpoint_id"])
    names = labels or {}
    lines = [f"checkpoint {names.get(root, root)}"]
    for title, edges, near, far in (
        ("ancestors", graph.get("ancestors", []), "child_id", "parent_id"),
        ("descendants", graph.get("descendants", []), "parent_id", "child_id"),
    ):
        if edges:
            lines.append(f"  {title}:")
            lines += _walk(edges, root, (near, far), names, indent=2)
    return lines


def _walk(
    edges: list[dict[str, Any]],
    node: int,
    ends: tuple[str, str],
    names: dict[int, str],
    *,
    indent: int,
) -> list[str]:
    """Depth-first lines from ``node`` following edges whose ``near`` end is the current node."""
    near, far = ends
    lines = []
    for edge in sorted((e for e in edges if e[near] == node), key=lambda e: e[far]):
        lines.append(f"{'  ' * indent}└─ {names.get(edge[far], edge[far])} ({edge['role']})")
        if indent < 64:  # a cycle in bad data must not recurse forever
            lines += _walk(edges, edge[far], ends, names, indent=indent + 1)
    return lines
