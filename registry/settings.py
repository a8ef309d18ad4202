"""The one place that reads ckreg's environment variables (``CKREG_*``)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Runtime configuration; every field maps to ``CKREG_<FIELD>``."""

    model_config = SettingsConfigDict(env_prefix="CKREG_", frozen=True, extra="ignore")

    home: Path = Path(".ckreg")
    database_url: str = ""
    store_url: str = ""
    s3_endpoint_url: str | None = None
    s3_region: str = "us-east-1"
    mlflow_tracking_uri: str = ""
    mlflow_experiment: str = "ckreg"
    prefect_mode: Literal["embedded", "server"] = "embedded"
    device: str = "auto"
    # Client side: where the registry runs and which token to send.
    api_url: str = "http://127.0.0.1:8321"
    token: str | None = None
    host: str = "127.0.0.1"
    port: int = 8321
    # Upload and validation limits.
    s3_part_size: int = 16 * 1024 * 1024
    max_header_bytes: int = 100 * 1024 * 1024
    scan_nonfinite: bool = False
    task_vectors_on_complete: bool = True
    # Registry server: reads need a 'read' token too when set (writes always need 'write').
    auth_reads: bool = False
    # Registry server hardening (see README "Limits and hardening").
    max_json_body_bytes: int = 1024 * 1024
    max_metadata_bytes: int = 64 * 1024
    upload_idle_timeout_s: float = 30.0
    max_uploads_per_token: int = 8
    max_concurrent_uploads: int = 64
    upload_retry_after_s: int = 5
    server_keep_alive_s: float = 5.0
    # Merge work: where merged outputs are staged before upload.
    work_dir: Path | None = None
    # Bound on the merge-input download cache (S3 stores only; file stores are read in place).
    cache_max_bytes: int = 20 * 1024**3
    # Many workers: a merge run's lease (renewed every third of it while the merge runs), and
    # how long a queued run may wait for a worker's claim before the recovery sweep resubmits it.
    merge_lease_s: float = Field(default=60.0, gt=0)
    merge_claim_grace_s: float = Field(default=60.0, gt=0)
    # How merges read inputs a store cannot hand out as local files (S3, compressed blobs):
    # "stream" range-reads rows in place (no download), "cache" downloads them into the cache.
    merge_inputs: Literal["stream", "cache"] = "stream"
    # The digits model zoo used by the `digits` evaluator (default: <home>/zoo/digits-seed0).
    zoo_dir: Path | None = None
    # Storage lifecycle (`ckreg gc`): unreferenced blobs younger than the grace period are never
    # deleted; uploads not completed within the TTL are aborted and their temp objects removed.
    gc_grace_s: float = Field(default=3600.0, ge=0)
    upload_ttl_s: float = Field(default=24 * 3600.0, ge=0)
    # Recovery sweep (embedded launcher, every `recovery_sweep_s`; also at start-up): checkpoints
    # pending with no upload or complete for longer than `pending_ttl_s` are failed, their blobs
    # released to gc; lost on_register merges are planned, an interrupted complete compressed.
    pending_ttl_s: float = Field(default=24 * 3600.0, gt=0)
    recovery_sweep_s: float = Field(default=60.0, gt=0)
    # Stored safetensors files: compressed losslessly at `complete` ("zipnn", with deltas against
    # the base's file where smaller) or kept as uploaded ("off"). Downloads are always the original.
    store_compression: Literal["zipnn", "off"] = "zipnn"

    @model_validator(mode="after")
    def _derive_defaults(self) -> Settings:
        home = self.home.resolve()
        defaults = {
            "database_url": f"sqlite:///{home / 'registry.db'}",
            "store_url": f"file://{home / 'store'}",
            "mlflow_tracking_uri": f"sqlite:///{home / 'mlflow.db'}",
        }
        for field, value in defaults.items():
            if not getattr(self, field):
                object.__setattr__(self, field, value)
        if self.work_dir is None:
            object.__setattr__(self, "work_dir", home / "work")
        return self


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once from the environment."""
    return Settings()
