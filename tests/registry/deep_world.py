"""Seeded objects for fuzzing the registry's deep states (``test_schemathesis_deep``).

A ``World`` is a live registry (uvicorn in a thread, NullLauncher: merge runs stay queued) on a
given store, with a ready base and fine-tune (weights, a second-moment artifact, the fine-tune's
task vector), a merged checkpoint, a deleted one, pending checkpoints with a file (and, on S3, an
open presigned upload each), an enabled and a disabled policy and a queued merge run. ``heal``
puts back whatever a fuzzed call changed, so every case meets the same states; ``pool`` gives the
real ids a path parameter is pinned to. ``consistency_problems`` checks the database and the store
afterwards.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import uvicorn
from sqlmodel import Session, col, select

from registry.api.app import create_app
from registry.models import (
    Artifact,
    ArtifactRole,
    Checkpoint,
    CheckpointStatus,
    MergeRun,
    MergeRunStatus,
)
from registry.services.blobs import stored_blob
from registry.storage.codecs import iter_original
from registry.storage.s3_presign import temp_key
from tests.registry.registry_fixtures import Env, st_bytes, tiny_state
from tests.services import free_port

MISSING_ID = 987_654_321  # no object has it
READY_ROLES = ("base", "ft", "ft2", "merged")
EXTRA = b"presigned!"


@contextmanager
def serve(env: Env) -> Iterator[str]:
    """The registry app of ``env`` on a free port (a uvicorn thread); yields its URL."""
    port = free_port()
    app = create_app(env.settings)
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="ckreg-deep-fuzz", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"registry did not start on port {port}")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@dataclass
class World:
    client: httpx.Client  # base URL .../api/v1, with a write token
    env: Env
    presigned: bool
    ids: dict[str, int] = field(default_factory=dict)
    uploads: dict[str, str] = field(default_factory=dict)  # role -> open presigned upload id
    parts: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # upload id -> sent
    pending_made: set[int] = field(default_factory=set)

    @property
    def url(self) -> str:
        """The server's root URL (no ``/api/v1``)."""
        return str(self.client.base_url).rstrip("/").removesuffix("/api/v1")

    # ---- seeding ----------------------------------------------------------------------------

    def _ok(self, response: httpx.Response, *codes: int) -> Any:
        assert response.status_code in (codes or (200, 201, 202)), response.text
        return response.json()

    def _create(self, name: str, **fields: Any) -> int:
        body = {"name": name, **fields}
        return int(self._ok(self.client.post("/checkpoints", json=body), 201)["id"])

    def _register(self, name: str, seed: int, **fields: Any) -> int:
        checkpoint = self._create(name, **fields)
        data = st_bytes(tiny_state(seed))
        self._ok(
            self.client.put(f"/checkpoints/{checkpoint}/files/model.safetensors", content=data)
        )
        self._ok(self.client.put(f"/checkpoints/{checkpoint}/files/config.json", content=b"{}"))
        self._ok(self.client.post(f"/checkpoints/{checkpoint}/complete", json={}))
        return checkpoint

    def _make_base(self) -> None:
        base = self._register("deep-base", 0, kind="base")
        moment = st_bytes({k: v * v for k, v in tiny_state(0).items()})
        params = {"role": "second_moment", "name": "m.safetensors"}
        self._ok(self.client.post(f"/checkpoints/{base}/artifacts", params=params, content=moment))
        self.ids["base"] = base
        self._make_ft()

    def _make_ft(self) -> None:
        """Two ready fine-tunes of the base (the fine-tune has a task vector)."""
        base = self.ids["base"]
        ft = self._register("deep-ft", 1, kind="finetune", base_id=base, task="t")
        self._ok(self.client.post(f"/checkpoints/{ft}/task-vector"))
        self.ids["ft"] = ft
        self.ids["ft2"] = self._register("deep-ft2", 5, kind="finetune", base_id=base, task="u")

    def _make_merged(self) -> None:
        self.ids["merged"] = self._register(
            "deep-merged", 2, kind="merged", base_id=self.ids["base"]
        )

    def _make_pending(self, role: str) -> None:
        checkpoint = self._create(f"deep-{role}", kind="finetune", base_id=self.ids["base"])
        data = st_bytes(tiny_state(3))
        self._ok(
            self.client.put(f"/checkpoints/{checkpoint}/files/model.safetensors", content=data)
        )
        self.ids[role] = checkpoint
        self.pending_made.add(checkpoint)
        if self.presigned:
            self._open_upload(role, checkpoint)

    def _open_upload(self, role: str, checkpoint: int) -> None:
        """A presigned upload of ``extra.bin`` whose one part is sent, not completed."""
        body = {
            "name": "extra.bin",
            "size": len(EXTRA),
            "sha256": hashlib.sha256(EXTRA).hexdigest(),
        }
        plan = self._ok(self.client.post(f"/checkpoints/{checkpoint}/uploads", json=body), 201)
        sent = httpx.put(plan["parts"][0]["url"], content=EXTRA, timeout=30)
        assert sent.status_code == 200, sent.text
        self.uploads[role] = plan["upload_id"]
        self.parts[plan["upload_id"]] = [{"part_number": 1, "etag": sent.headers["ETag"]}]

    def _make_policies(self) -> None:
        selector = {"base_id": self.ids["base"]}
        for role, enabled in (("policy", True), ("policy_off", False)):
            body = {"name": f"deep-{role}-{len(self.ids)}", "method": "task_arithmetic"}
            body |= {"selector": selector, "enabled": enabled}
            self.ids[role] = int(self._ok(self.client.post("/policies", json=body), 201)["id"])

    def seed(self) -> None:
        self._make_base()
        self._make_merged()
        gone = self._register("deep-gone", 4, kind="base")
        self._ok(self.client.delete(f"/checkpoints/{gone}"))
        self.ids["deleted"] = gone
        for role in ("pending", "pending2"):
            self._make_pending(role)
        self._make_policies()
        merge = {
            "method": "task_arithmetic",
            "base_id": self.ids["base"],
            "inputs": [{"checkpoint_id": self.ids["ft"], "weight": 0.5}],
        }
        self.ids["run"] = int(self._ok(self.client.post("/merges", json=merge), 202)["id"])

    # ---- keeping the states -----------------------------------------------------------------

    def _status(self, session: Session, role: str) -> CheckpointStatus | None:
        row = session.get(Checkpoint, self.ids[role])
        return None if row is None else row.status

    def heal(self, *, check_uploads: bool = False) -> None:
        """Put back every seeded state a fuzzed call changed (a new object under the role);
        with ``check_uploads``, also the open presigned uploads (one store listing)."""
        with self.env.session() as session:
            status = {
                role: self._status(session, role) for role in (*READY_ROLES, "pending", "pending2")
            }
        ready = CheckpointStatus.ready
        if status["base"] != ready:
            self._make_base()
        elif status["ft"] != ready or status["ft2"] != ready:
            self._make_ft()
        if status["merged"] != ready:
            self._make_merged()
        for role in ("pending", "pending2"):
            if status[role] != CheckpointStatus.pending or (
                check_uploads and self.presigned and not self._upload_open(role)
            ):
                self._make_pending(role)

    def _upload_open(self, role: str) -> bool:
        """Whether the role's presigned upload is still open (one S3 listing, of its key)."""
        store: Any = self.env.store
        return store._s3_upload_id(store._full(temp_key(self.uploads[role]))) is not None

    # ---- what a path parameter is pinned to ---------------------------------------------------

    def pool(
        self, parameter: str, pins: dict[str, Any], *, writes_files: bool = False
    ) -> list[Any]:
        """Real values for ``parameter`` (and one that names nothing), given the parameters
        already pinned; ``writes_files``: a call that needs a pending checkpoint gets mostly those."""
        ids = self.ids
        if parameter == "checkpoint_id":
            roles = ["pending", "pending", "pending2", "ft", "deleted"] if writes_files else []
            roles = roles or [*READY_ROLES, "pending", "deleted"]
            return [ids[role] for role in roles] + [MISSING_ID]
        if parameter == "artifact_id":
            return [*self._artifact_ids(pins.get("checkpoint_id")), MISSING_ID]
        if parameter == "upload_id":  # its own upload (twice), another checkpoint's, none
            mine = [u for r, u in self.uploads.items() if ids[r] == pins.get("checkpoint_id")]
            others = [u for u in self.uploads.values() if u not in mine]
            return [*mine, *mine, *others, "no-such-upload"]
        if parameter == "policy_id":
            return [ids["policy"], ids["policy_off"], MISSING_ID]
        if parameter == "run_id":
            return [ids["run"], MISSING_ID]
        if parameter == "merge":  # a whole valid merge body, to be varied
            inputs = [{"checkpoint_id": ids[r], "weight": 0.5} for r in ("ft", "merged")]
            return [{"method": "task_arithmetic", "base_id": ids["base"], "inputs": inputs}]
        if parameter == "name":  # the checkpoint's own files, an artifact's name, none
            return [*self._file_names(pins.get("checkpoint_id")), "m.safetensors", "nope.bin"]
        raise KeyError(parameter)

    def _file_names(self, checkpoint_id: int | None) -> list[str]:
        with self.env.session() as session:
            query = select(Artifact.name).where(
                Artifact.checkpoint_id == checkpoint_id,
                col(Artifact.role).in_([ArtifactRole.weights, ArtifactRole.config]),
            )
            return sorted(session.exec(query).all()) or ["model.safetensors"]

    def _artifact_ids(self, checkpoint_id: int | None) -> list[int]:
        """The checkpoint's own artifacts, then one of another checkpoint."""
        with self.env.session() as session:
            rows = session.exec(select(Artifact).order_by(Artifact.id)).all()  # type: ignore[arg-type]
        own = [row.id for row in rows if row.checkpoint_id == checkpoint_id]
        other = [row.id for row in rows if row.checkpoint_id != checkpoint_id][-1:]
        return [int(i) for i in own + other if i is not None]


# ---- afterwards ------------------------------------------------------------------------------


def consistency_problems(world: World) -> list[str]:
    """What is wrong in the database or the store after fuzzing (empty when all is well):
    a pending checkpoint the world did not leave pending, a running merge run, a ready file
    or artifact whose blob is missing or does not hash to its sha256."""
    problems: list[str] = []
    env = world.env
    with env.session() as session:
        pending = session.exec(
            select(Checkpoint.id).where(Checkpoint.status == CheckpointStatus.pending)  # type: ignore[arg-type]
        ).all()
        problems += [f"checkpoint {i} pending" for i in pending if i not in world.pending_made]
        running = session.exec(
            select(MergeRun.id).where(MergeRun.status == MergeRunStatus.running)  # type: ignore[arg-type]
        ).all()
        problems += [f"merge run {i} running" for i in running]
        query = select(Artifact).join(Checkpoint).where(Checkpoint.status == CheckpointStatus.ready)  # type: ignore[arg-type]
        for row in session.exec(query).all():
            blob = stored_blob(session, row)
            where = f"checkpoint {row.checkpoint_id} {row.role} '{row.name}'"
            if not all(env.store.exists(key) for key in sorted(blob.keys())):
                problems.append(f"{where}: blob missing")
                continue
            digest = hashlib.sha256(b"".join(iter_original(env.store, blob))).hexdigest()
            if digest != row.sha256:
                problems.append(f"{where}: sha256 {digest} != {row.sha256}")
    return problems


def ready_files(world: World) -> int:
    with world.env.session() as session:
        query = select(Artifact).join(Checkpoint).where(Checkpoint.status == CheckpointStatus.ready)  # type: ignore[arg-type]
        return len(session.exec(query).all())
