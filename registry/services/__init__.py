"""Registry services: the only code that writes to the database or the object store.

Every function is keyword-only and typed; domain errors come from ``registry.errors``.
"""

from __future__ import annotations

from registry.services.artifacts import add_artifact, artifact_public, get_artifact, list_artifacts
from registry.services.checkpoints import (
    checkpoint_public,
    checkpoints_public,
    create_checkpoint,
    get_checkpoint,
    list_checkpoints,
)
from registry.services.completion import complete_checkpoint, fail_checkpoint, register_directory
from registry.services.deletion import DeletionReport, delete_checkpoint, delete_checkpoint_report
from registry.services.files import (
    StoredFile,
    add_file_by_reference,
    add_file_from_path,
    add_file_from_stream,
    get_checkpoint_file,
    stream_artifact,
)
from registry.services.gc import GcReport, collect_garbage
from registry.services.lineage import add_lineage_edges, get_lineage
from registry.services.metrics import add_metrics, list_metrics
from registry.services.task_vectors import Similarity, compute_task_vector, similar_checkpoints
from registry.services.tensors import checkpoint_tensor_source
from registry.services.tokens import authenticate, create_token, list_tokens, revoke_token

__all__ = [
    "DeletionReport",
    "GcReport",
    "Similarity",
    "StoredFile",
    "add_artifact",
    "add_file_by_reference",
    "add_file_from_path",
    "add_file_from_stream",
    "add_lineage_edges",
    "add_metrics",
    "artifact_public",
    "authenticate",
    "checkpoint_public",
    "checkpoint_tensor_source",
    "checkpoints_public",
    "collect_garbage",
    "complete_checkpoint",
    "compute_task_vector",
    "create_checkpoint",
    "create_token",
    "delete_checkpoint",
    "delete_checkpoint_report",
    "fail_checkpoint",
    "get_artifact",
    "get_checkpoint",
    "get_checkpoint_file",
    "get_lineage",
    "list_artifacts",
    "list_checkpoints",
    "list_metrics",
    "list_tokens",
    "register_directory",
    "revoke_token",
    "similar_checkpoints",
    "stream_artifact",
]
