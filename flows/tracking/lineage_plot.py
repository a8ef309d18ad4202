"""Draw a merged model's ancestor graph as a PNG: checkpoints as boxes, methods on the edges.

Uses matplotlib's object API with the Agg canvas, so no global pyplot state is touched.
"""

from __future__ import annotations

import io
from collections import defaultdict

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.text import Text

from flows.tracking.records import LineageEdge


def layer_nodes(edges: list[LineageEdge]) -> dict[str, int]:
    """Column of each node: the longest path from any root, so parents sit left of children."""
    parents: dict[str, set[str]] = defaultdict(set)
    nodes: list[str] = []
    for edge in edges:
        for name in (edge.parent, edge.child):
            if name not in nodes:
                nodes.append(name)
        parents[edge.child].add(edge.parent)
    layer: dict[str, int] = {}

    def depth(name: str, visiting: frozenset[str]) -> int:
        if name in layer:
            return layer[name]
        if name in visiting:  # a cycle is a data error; break it instead of recursing forever
            return 0
        ups = parents.get(name, set())
        value = 1 + max((depth(p, visiting | {name}) for p in ups), default=-1)
        layer[name] = value
        return value

    for name in nodes:
        depth(name, frozenset())
    return layer


def _positions(layer: dict[str, int]) -> dict[str, tuple[float, float]]:
    columns: dict[int, list[str]] = defaultdict(list)
    for name, col in layer.items():
        columns[col].append(name)
    tallest = max((len(v) for v in columns.values()), default=1)
    pos: dict[str, tuple[float, float]] = {}
    for col, names in columns.items():
        offset = (tallest - len(names)) / 2
        for row, name in enumerate(sorted(names)):
            pos[name] = (col * 3.2, -(row + offset) * 1.3)
    return pos


def render_lineage_png(edges: list[LineageEdge], *, highlight: str | None = None) -> bytes:
    """PNG bytes of the graph; ``highlight`` (the merged model) is drawn in a distinct colour."""
    layer = layer_nodes(edges)
    pos = _positions(layer)
    columns = max(layer.values(), default=0) + 1
    rows = max((sum(1 for c in layer.values() if c == col) for col in range(columns)), default=1)
    # Edges that skip a column arc above the nodes; leave room for them.
    arc_room = 1.2 if any(layer[e.child] - layer[e.parent] > 1 for e in edges) else 0.0
    fig = Figure(figsize=(2.0 + 3.0 * columns, 1.0 + 1.1 * rows + arc_room), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0.0, 0.0, 1.0, 0.92))
    ax.set_axis_off()
    fig.suptitle(f"Lineage of {highlight}" if highlight else "Lineage", fontsize=11)
    xs = [p[0] for p in pos.values()] or [0.0]
    ys = [p[1] for p in pos.values()] or [0.0]
    ax.set_xlim(min(xs) - 1.4, max(xs) + 1.4)
    ax.set_ylim(min(ys) - 0.8, max(ys) + 0.8 + arc_room)
    boxes = _draw_nodes(ax, pos, highlight=highlight)
    for edge in edges:
        span = layer[edge.child] - layer[edge.parent]
        _draw_edge(ax, edge, pos, boxes, bend=0.0 if span <= 1 else -0.3)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def _draw_nodes(
    ax: Axes, pos: dict[str, tuple[float, float]], *, highlight: str | None
) -> dict[str, Text]:
    boxes = {}
    for name, (x, y) in pos.items():
        colour = "#ffd9a0" if name == highlight else "#dde8f7"
        boxes[name] = ax.text(
            x, y, _short(name), ha="center", va="center", fontsize=9, zorder=3,
            bbox={"boxstyle": "round,pad=0.4", "facecolor": colour, "edgecolor": "#333333"},
        )  # fmt: skip
    return boxes


def _draw_edge(
    ax: Axes,
    edge: LineageEdge,
    pos: dict[str, tuple[float, float]],
    boxes: dict[str, Text],
    *,
    bend: float,
) -> None:
    """An arrow parent -> child, bent when it skips a column so it doesn't cross the nodes."""
    start, end = pos[edge.parent], pos[edge.child]
    ax.annotate(
        "",
        xy=end,
        xytext=start,
        zorder=4,  # after the boxes, so patchA/patchB clip to their drawn extent
        arrowprops={
            "arrowstyle": "-|>", "color": "#555555", "lw": 1.2, "shrinkA": 3, "shrinkB": 3,
            "connectionstyle": f"arc3,rad={bend}",
            "patchA": boxes[edge.parent].get_bbox_patch(),
            "patchB": boxes[edge.child].get_bbox_patch(),
        },
    )  # fmt: skip
    if edge.label:
        x, y = _arc_apex(ax, start, end, bend)
        ax.text(
            x, y, edge.label, ha="center", va="center", fontsize=8, color="#1f4e99",
            style="italic", zorder=5,
            bbox={"boxstyle": "round,pad=0.1", "facecolor": "white", "edgecolor": "none"},
        )  # fmt: skip


def _arc_apex(
    ax: Axes, start: tuple[float, float], end: tuple[float, float], bend: float
) -> tuple[float, float]:
    """Midpoint of matplotlib's ``arc3`` curve (a quadratic Bezier built in display space)."""
    (x1, y1), (x2, y2) = ax.transData.transform([start, end])
    cx = (x1 + x2) / 2 + bend * (y2 - y1)
    cy = (y1 + y2) / 2 - bend * (x2 - x1)
    apex = (0.25 * x1 + 0.5 * cx + 0.25 * x2, 0.25 * y1 + 0.5 * cy + 0.25 * y2)
    x, y = ax.transData.inverted().transform(apex)
    return float(x), float(y)


def _short(name: str, limit: int = 22) -> str:
    return name if len(name) <= limit else name[: limit - 1] + "…"
