"""Metrics reported for a checkpoint by clients or by evaluations."""

from __future__ import annotations

import math
from collections.abc import Sequence

from sqlmodel import Session, col, select

from registry.errors import InvalidInput
from registry.models import Metric, MetricCreate, MetricSource
from registry.services.common import load_checkpoint
from registry.services.validation import check_text


def add_metrics(
    *, session: Session, checkpoint_id: int, metrics: Sequence[MetricCreate]
) -> list[Metric]:
    """Store metric values for a checkpoint; returns the new rows in order."""
    checkpoint = load_checkpoint(session, checkpoint_id)
    rows: list[Metric] = []
    for metric in metrics:
        if not math.isfinite(metric.value):
            raise InvalidInput(
                f"metric '{metric.name}' of checkpoint {checkpoint.id} is not finite: {metric.value}"
            )
        for field in ("name", "dataset", "split"):
            check_text(getattr(metric, field), what=f"metric {field}")
        row = Metric(checkpoint_id=checkpoint_id, **metric.model_dump())
        row.source = MetricSource(metric.source)
        session.add(row)
        rows.append(row)
    session.commit()
    for row in rows:
        session.refresh(row)
    return rows


def list_metrics(*, session: Session, checkpoint_id: int, name: str | None = None) -> list[Metric]:
    """A checkpoint's metrics, oldest first (optionally one metric name)."""
    load_checkpoint(session, checkpoint_id)
    query = select(Metric).where(Metric.checkpoint_id == checkpoint_id)
    if name is not None:
        query = query.where(Metric.name == name)
    return list(session.exec(query.order_by(col(Metric.id))).all())
