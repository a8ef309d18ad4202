"""Python client for the ckreg REST API (``/api/v1``): register, browse and download checkpoints.

Example::

    with Client("http://127.0.0.1:8321", token="ckreg_...") as client:
        ckpt = client.register("out/checkpoint-500", base_id=1, task="math", run="r1")
        client.download_file(ckpt["id"], "model.safetensors", "copy.safetensors")
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from registry.client.layouts import plan_upload, sha256_file
from registry.client.merges import MergesMixin
from registry.client.presigned import UNSUPPORTED, upload_presigned
from registry.client.pull import pull_checkpoint
from registry.client.searches import SearchesMixin
from registry.client.trainer_moments import side_artifacts
from registry.client.transport import API_PREFIX, ClientError

__all__ = ["API_PREFIX", "Client", "ClientError"]
log = logging.getLogger("registry.client")


class Client(MergesMixin, SearchesMixin):
    """A synchronous client for one registry server; use as a context manager or call ``close()``.

    Checkpoints, files, metrics and artifacts here; policies and merges in ``MergesMixin``.
    """

    # -- checkpoints -------------------------------------------------------------------------

    def create_checkpoint(
        self,
        *,
        name: str,
        kind: str = "finetune",
        base_id: int | None = None,
        task: str | None = None,
        run: str | None = None,
        step: int | None = None,
        tags: Iterable[str] = (),
        metadata: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Create a pending checkpoint; returns its ``CheckpointPublic``."""
        body: dict[str, Any] = {
            "name": name,
            "kind": kind,
            "base_id": base_id,
            "task": task,
            "run": run,
            "step": step,
        }
        body |= {"tags": list(tags), "metadata": dict(metadata or {})}
        return self._json("POST", "/checkpoints", json=body)

    def upload_file(
        self,
        checkpoint_id: int,
        path: Path | str,
        *,
        name: str | None = None,
        progress: bool = True,
        presigned: bool | None = None,
    ) -> dict[str, Any]:
        """Upload a file to a pending checkpoint, declaring its sha256; returns ``FilePublic``.

        ``presigned=None`` sends files of ``presigned_threshold`` bytes or more straight to S3
        with presigned multipart URLs when the server's store offers them, else streams a PUT;
        ``True`` insists on presigned (a file store's 409 is raised), ``False`` always PUTs.
        """
        path = Path(path)
        name = name or path.name
        digest = sha256_file(path, progress=progress)
        use = presigned
        if use is None:
            use = self._presigned_ok and path.stat().st_size >= self.presigned_threshold
        if use:
            try:
                url = f"/checkpoints/{checkpoint_id}/uploads"
                result = upload_presigned(
                    self._json, self._http, url, path, name=name, sha256=digest, progress=progress
                )
            except ClientError as exc:
                if presigned or exc.error != UNSUPPORTED:
                    raise
                self._presigned_ok = False
            else:
                self.last_upload_presigned = True
                return result
        self.last_upload_presigned = False
        headers = {"X-Content-SHA256": digest}
        return self._upload(
            "PUT", f"/checkpoints/{checkpoint_id}/files/{name}", path, headers, progress=progress
        )

    def complete(
        self, checkpoint_id: int, *, sha256: Mapping[str, str] | None = None
    ) -> dict[str, Any]:
        """Ask the server to validate and finalise the checkpoint; returns it with status ``ready``."""
        return self._json(
            "POST", f"/checkpoints/{checkpoint_id}/complete", json={"sha256": dict(sha256 or {})}
        )

    def register(
        self,
        path: Path | str,
        *,
        name: str | None = None,
        kind: str | None = None,
        base_id: int | None = None,
        task: str | None = None,
        run: str | None = None,
        step: int | None = None,
        tags: Iterable[str] = (),
        metadata: Mapping[str, Any] | None = None,
        metrics: Mapping[str, float] | None = None,
        second_moment: Path | str | None = None,
        gram: Path | str | None = None,
        features: Path | str | None = None,
        optimizer_param_names: Sequence[str] | None = None,
        include_training_state: bool = False,
        progress: bool = True,
    ) -> dict[str, Any]:
        """Upload a checkpoint (file or directory, see ``registry.client.layouts``) and complete it.

        ``kind`` defaults to ``adapter`` for a PEFT directory and ``finetune`` otherwise; ``step``
        and the ``loss`` metric default to a Trainer directory's ``trainer_state.json``.
        ``second_moment`` is a safetensors file of Adam ``exp_avg_sq`` keyed by parameter name
        (see ``registry.client.capture``); else a folder's ``second_moment.safetensors`` or its
        Trainer ``optimizer.pt`` converted (``registry.client.trainer_moments``; names in optimizer
        order from ``optimizer_param_names``, else from ``config.json``). Skipped files (training
        state unless ``include_training_state``) are logged. ``gram``: layer-input Gram matrices
        (``registry.client.capture_gram``) stored as a ``gram`` artifact for regmean; ``features``:
        per-layer features (``registry.client.capture_features``) for pleas/ot_fusion. Returns the
        final ``CheckpointPublic``.
        """
        plan = plan_upload(Path(path), include_training_state=include_training_state)
        for note in plan.notes:
            log.warning(note)
        with tempfile.TemporaryDirectory(prefix="ckreg-") as tmp:  # converted optimizer state
            extra = side_artifacts(
                plan,
                second_moment=second_moment,
                optimizer_param_names=optimizer_param_names,
                work_dir=Path(tmp),
            )
            checkpoint = self.create_checkpoint(
                name=name or plan.name,
                kind=kind or plan.kind,
                base_id=base_id,
                task=task,
                run=run,
                step=step if step is not None else plan.step,
                tags=tags,
                metadata={"layout": plan.layout} | dict(metadata or {}),
            )
            checkpoint_id = int(checkpoint["id"])
            hashes = {}
            for file in plan.files:
                hashes[file.name] = self.upload_file(checkpoint_id, file, progress=progress)[
                    "sha256"
                ]
            self.complete(checkpoint_id, sha256=hashes)
            all_metrics = plan.metrics | dict(metrics or {})
            if all_metrics:
                self.add_metrics(checkpoint_id, all_metrics, step=checkpoint.get("step"))
            for role, artifact in extra:
                self.upload_artifact(checkpoint_id, artifact, role, progress=progress)
            if gram is not None:
                self.upload_artifact(checkpoint_id, Path(gram), "gram", progress=progress)
            if features is not None:
                self.upload_artifact(checkpoint_id, Path(features), "features", progress=progress)
        return self.get_checkpoint(checkpoint_id)

    def list_checkpoints(self, **filters: Any) -> dict[str, Any]:
        """``{items, total, limit, offset}``; filters: base_id, kind, task, run, tag, status, name,
        limit, offset (``None`` values are dropped)."""
        params = {key: value for key, value in filters.items() if value is not None}
        return self._json("GET", "/checkpoints", params=params)

    def get_checkpoint(self, checkpoint_id: int) -> dict[str, Any]:
        return self._json("GET", f"/checkpoints/{checkpoint_id}")

    def lineage(self, checkpoint_id: int, *, depth: int = 5) -> dict[str, Any]:
        """``{checkpoint_id, ancestors: [Edge], descendants: [Edge]}``."""
        return self._json("GET", f"/checkpoints/{checkpoint_id}/lineage", params={"depth": depth})

    def delete(self, checkpoint_id: int, *, force: bool = False) -> dict[str, Any]:
        return self._json(
            "DELETE", f"/checkpoints/{checkpoint_id}", params={"force": str(force).lower()}
        )

    def similar(self, checkpoint_id: int, *, limit: int = 10) -> list[dict[str, Any]]:
        """``[{checkpoint_id, name, task, cosine}]`` by task-vector cosine similarity."""
        return self._json("GET", f"/checkpoints/{checkpoint_id}/similar", params={"limit": limit})

    def download_file(
        self, checkpoint_id: int, name: str, dest: Path | str, *, progress: bool = True
    ) -> Path:
        """Stream a checkpoint file to ``dest`` (a file path, or a directory to put ``name`` in)."""
        return self._download(
            f"/checkpoints/{checkpoint_id}/files/{name}", name, Path(dest), progress
        )

    # -- metrics and artifacts ---------------------------------------------------------------

    def add_metrics(
        self,
        checkpoint_id: int,
        metrics: Mapping[str, float],
        *,
        step: int | None = None,
        dataset: str | None = None,
        split: str | None = None,
    ) -> list[dict[str, Any]]:
        """Record client metrics (name -> value); returns ``[MetricPublic]``."""
        body = [
            {
                "name": key,
                "value": float(value),
                "step": step,
                "dataset": dataset,
                "split": split,
                "source": "client",
            }
            for key, value in metrics.items()
        ]
        return self._json("POST", f"/checkpoints/{checkpoint_id}/metrics", json=body)

    def metrics(self, checkpoint_id: int) -> list[dict[str, Any]]:
        return self._json("GET", f"/checkpoints/{checkpoint_id}/metrics")

    def upload_artifact(
        self,
        checkpoint_id: int,
        path: Path | str,
        role: str,
        *,
        name: str | None = None,
        progress: bool = True,
    ) -> dict[str, Any]:
        """Stream a safetensors artifact (``second_moment``, ``fisher``, ``mask``, ...); returns ``ArtifactPublic``."""
        path = Path(path)
        params = {"role": role, "name": name or path.name}
        url = f"/checkpoints/{checkpoint_id}/artifacts"
        headers = {"X-Content-SHA256": sha256_file(path, progress=progress)}
        return self._upload("POST", url, path, headers, progress=progress, params=params)

    def artifacts(self, checkpoint_id: int) -> list[dict[str, Any]]:
        return self._json("GET", f"/checkpoints/{checkpoint_id}/artifacts")

    def download_artifact(
        self, checkpoint_id: int, artifact_id: int, dest: Path | str, *, progress: bool = True
    ) -> Path:
        url = f"/checkpoints/{checkpoint_id}/artifacts/{artifact_id}/content"
        return self._download(url, f"artifact-{artifact_id}.safetensors", Path(dest), progress)

    def pull(self, ref: str | int, dest: Path | str, **options: Any) -> Path:
        """Every file of checkpoint ``ref`` (id or name) into ``dest``; see ``registry.client.pull``."""
        return pull_checkpoint(self, ref, dest, **options)

    def health(self) -> dict[str, Any]:
        """``{"status": "ok"}`` when the server is up."""
        return self._json("GET", "/healthz")
