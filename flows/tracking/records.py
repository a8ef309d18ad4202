"""Plain records the flows hand to the tracker: a checkpoint and a finished merge.

They carry no database objects, so they serialise to JSON for the outbox unchanged.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator


class CheckpointRecord(BaseModel):
    """A ready checkpoint as MLflow sees it: an external model whose weights stay in the store."""

    model_config = ConfigDict(frozen=True)

    id: int
    name: str
    kind: str
    base_id: int | None = None
    task: str | None = None
    run: str | None = None
    step: int | None = None
    store_uri: str = ""
    sha256: str = ""
    metrics: dict[str, float] = Field(default_factory=dict)


class MergeInput(BaseModel):
    """One input of a merge with the weight the method gave it (``None`` when unweighted)."""

    model_config = ConfigDict(frozen=True)

    checkpoint: CheckpointRecord
    weight: float | None = None


class LineageEdge(BaseModel):
    """``parent -> child`` in the ancestor graph, labelled with the merge method or role."""

    model_config = ConfigDict(frozen=True)

    parent: str
    child: str
    label: str = ""


class MergeRecord(BaseModel):
    """A finished merge run: what went in, how, what came out and how it scored."""

    model_config = ConfigDict(frozen=True)

    run_id: int
    method: str
    params: dict[str, object] = Field(default_factory=dict)
    inputs: list[MergeInput]
    base: CheckpointRecord | None = None
    output: CheckpointRecord
    policy_name: str | None = None
    metrics: dict[str, float] = Field(default_factory=dict)
    config_yaml: str = ""
    lineage_edges: list[LineageEdge] = Field(default_factory=list)
    evaluator_metric: str | None = None
    higher_is_better: bool = True
    #: What the method learnt (AdaMerging): the output's ``learnt_coefficients`` metadata.
    learnt_coefficients: dict[str, Any] | None = None

    @field_validator("inputs", mode="before")
    @classmethod
    def _wrap_bare_checkpoints(cls, value: Any) -> Any:
        """Accept a bare ``CheckpointRecord`` or a ``(checkpoint, weight)`` pair per input."""
        if not isinstance(value, list | tuple):
            return value
        wrapped: list[Any] = []
        for item in value:
            if isinstance(item, CheckpointRecord):
                item = {"checkpoint": item}
            elif isinstance(item, tuple | list) and len(item) == 2:
                item = {"checkpoint": item[0], "weight": item[1]}
            wrapped.append(item)
        return wrapped

    @field_validator("lineage_edges", mode="before")
    @classmethod
    def _edges_from_tuples(cls, value: Any) -> Any:
        """Accept ``(parent_name, child_name, label)`` tuples as edges."""
        if not isinstance(value, list | tuple):
            return value
        return [
            {"parent": e[0], "child": e[1], "label": e[2] if len(e) > 2 else ""}
            if isinstance(e, tuple | list)
            else e
            for e in value
        ]

    def all_edges(self) -> list[LineageEdge]:
        """The given ancestor edges plus the direct ones of this merge, without duplicates."""
        direct = [
            LineageEdge(parent=i.checkpoint.name, child=self.output.name, label=self.method)
            for i in self.inputs
        ]
        if self.base is not None:
            direct.append(LineageEdge(parent=self.base.name, child=self.output.name, label="base"))
        seen: set[tuple[str, str]] = set()
        edges: list[LineageEdge] = []
        for edge in [*self.lineage_edges, *direct]:
            if (edge.parent, edge.child) not in seen:
                seen.add((edge.parent, edge.child))
                edges.append(edge)
        return edges


class FailedMergeRecord(BaseModel):
    """A merge attempt that failed: what was to go in, how, and the error it ended with."""

    model_config = ConfigDict(frozen=True)

    run_id: int
    attempt: int = 1
    method: str
    params: dict[str, object] = Field(default_factory=dict)
    inputs: list[MergeInput]
    base: CheckpointRecord | None = None
    policy_name: str | None = None
    error: str
