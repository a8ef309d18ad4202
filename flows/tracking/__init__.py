"""MLflow lineage for ckreg: checkpoints as external LoggedModels, merges as runs.

The flows build plain records and call a :class:`Tracker`; when MLflow is unreachable the
events wait in an outbox directory and are sent, in order, on the next success or ``sync()``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from flows.tracking.mlflow_sync import Tracker, TrackingUnavailable, is_outage
from flows.tracking.mlflow_writer import experiment_ui_url
from flows.tracking.records import (
    CheckpointRecord,
    FailedMergeRecord,
    LineageEdge,
    MergeInput,
    MergeRecord,
)
from flows.tracking.registration import registered_model_name

if TYPE_CHECKING:
    from registry.settings import Settings

__all__ = [
    "CheckpointRecord",
    "FailedMergeRecord",
    "LineageEdge",
    "MergeInput",
    "MergeRecord",
    "Tracker",
    "TrackingUnavailable",
    "experiment_ui_url",
    "is_outage",
    "registered_model_name",
    "tracker_from_settings",
]


def tracker_from_settings(settings: Settings, *, experiment_name: str | None = None) -> Tracker:
    """The tracker for ``CKREG_MLFLOW_TRACKING_URI``, queueing under ``<home>/mlflow-outbox``.

    Records go to ``CKREG_MLFLOW_EXPERIMENT`` (default ``ckreg``): give each registry its own
    experiment when several share one MLflow server, since records are matched by registry ids.
    """
    return Tracker(
        settings.mlflow_tracking_uri,
        outbox_dir=settings.home.resolve() / "mlflow-outbox",
        experiment_name=experiment_name or settings.mlflow_experiment,
        database_url=settings.database_url,
    )
