"""Upload benchmark: a large safetensors file through the registry API vs plain boto3.

``python -m bench.registry_upload --size-mib 1024`` starts ``moto_server`` and the registry
(uvicorn, its own process, S3 store on that endpoint, SQLite in a temp dir), then uploads the
same file (a) with boto3 ``upload_file`` and (b) through the API (create -> PUT -> complete),
sampling the registry process's RSS every 50 ms. Targets: API throughput >= 0.8x boto3's,
registry RSS growth < 150 MB. ``--diagnose`` adds rows that split the API path apart.
"""

from __future__ import annotations

import argparse
import hashlib
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench._common import (
    MIB,
    S3_ENV,
    RssSampler,
    ServerProcess,
    create_token,
    load_average,
    print_table,
    start_moto,
    start_registry,
)

BUCKET = "ckreg-bench"
PREFIX = "ckreg"
TARGET_RATIO = 0.8
TARGET_RSS_MB = 150.0


@dataclass(frozen=True)
class UploadResult:
    """One timed upload; ``rss_growth`` is the registry server's, None when it was not involved."""

    method: str
    seconds: float
    size: int
    rss_growth: int | None = None

    @property
    def mib_per_s(self) -> float:
        return self.size / MIB / self.seconds if self.seconds > 0 else float("inf")


def make_safetensors(path: Path, size_mib: int) -> Path:
    """A ``size_mib`` MiB safetensors file of a few large float16 tensors (random finite values)."""
    import torch
    from safetensors.torch import save_file

    count = 8 if size_mib >= 64 else 2
    elements = size_mib * MIB // 2 // count
    tensors = {}
    for index in range(count):
        # Bit patterns below 0x7C00 are finite, non-negative float16 values.
        bits = torch.empty(elements, dtype=torch.int16).random_(0, 0x7C00)
        tensors[f"layers.{index}.weight"] = bits.view(torch.float16)
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path


def s3_client(endpoint_url: str) -> Any:
    """A boto3 S3 client for ``endpoint_url`` configured as the registry's store is."""
    import boto3
    from botocore.config import Config

    config = Config(
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    return boto3.session.Session(
        aws_access_key_id=S3_ENV["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=S3_ENV["AWS_SECRET_ACCESS_KEY"],
        region_name=S3_ENV["AWS_DEFAULT_REGION"],
    ).client("s3", endpoint_url=endpoint_url, config=config)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(MIB):
            digest.update(chunk)
    return digest.hexdigest()


def timed(action: Callable[[], Any]) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def bench_boto3(s3: Any, path: Path) -> UploadResult:
    """boto3 ``upload_file`` with its default ``TransferConfig`` to a key outside the blob tree."""
    key = f"boto3-baseline/{path.name}"
    seconds = timed(lambda: s3.upload_file(str(path), BUCKET, key))
    s3.delete_object(Bucket=BUCKET, Key=key)  # free moto's memory before the next upload
    return UploadResult("boto3 upload_file", seconds, path.stat().st_size)


def bench_api(
    registry: ServerProcess, token: str, path: Path, *, name: str = "bench-base"
) -> list[UploadResult]:
    """create -> PUT -> complete with ``registry.client.Client``; rows for the total and its parts."""
    from registry.client import Client

    size = path.stat().st_size
    hash_seconds = timed(lambda: sha256_of(path))  # what Client.upload_file does before its PUT
    with Client(registry.url, token=token, timeout=900) as client:
        _warm_up(client, path.parent)
    with Client(registry.url, token=token, timeout=900) as client, RssSampler(registry.pid) as rss:
        start = time.perf_counter()
        checkpoint = client.create_checkpoint(name=name, kind="base")
        created = time.perf_counter()
        stored = client.upload_file(
            checkpoint["id"], path, name="model.safetensors", progress=False
        )
        uploaded = time.perf_counter()
        client.complete(checkpoint["id"], sha256={"model.safetensors": stored["sha256"]})
        done = time.perf_counter()
    growth = rss.growth
    return [
        UploadResult("API total (Client: hash+create+PUT+complete)", done - start, size, growth),
        UploadResult("  API PUT incl. client sha256", uploaded - created, size),
        UploadResult("  API PUT excl. client sha256", uploaded - created - hash_seconds, size),
        UploadResult("  client sha256 pass (1 MiB reads)", hash_seconds, size),
        UploadResult("  create (POST /checkpoints)", created - start, size),
        UploadResult("  complete (header range reads, DB)", done - uploaded, size),
    ]


def _warm_up(client: Any, workdir: Path) -> None:
    """One small upload first, so the baseline RSS includes imports and first-request caches."""
    small = make_safetensors(workdir / "warmup.safetensors", 1)
    checkpoint = client.create_checkpoint(name="bench-warmup", kind="base")
    client.upload_file(checkpoint["id"], small, progress=False)
    client.complete(checkpoint["id"])
    small.unlink()


def _delete_blob(s3: Any, sha256: str) -> None:
    s3.delete_object(Bucket=BUCKET, Key=f"{PREFIX}/blobs/sha256/{sha256}")


def bench_api_undeclared(
    registry: ServerProcess, token: str, path: Path, s3: Any, sha256: str
) -> UploadResult:
    """PUT without ``X-Content-SHA256``: the server uploads to tmp/ and copies to the final key."""
    import httpx

    from registry.client import Client

    _delete_blob(s3, sha256)  # so the copy to the final key really happens
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/octet-stream"}
    with Client(registry.url, token=token) as client:
        checkpoint_id = client.create_checkpoint(name="bench-undeclared", kind="base")["id"]
    url = f"{registry.url}/api/v1/checkpoints/{checkpoint_id}/files/model.safetensors"

    def body() -> Any:
        with path.open("rb") as handle:
            while chunk := handle.read(MIB):
                yield chunk

    with httpx.Client(timeout=900) as http, RssSampler(registry.pid) as rss:
        size = path.stat().st_size
        headers["Content-Length"] = str(size)
        seconds = timed(lambda: http.put(url, content=body(), headers=headers).raise_for_status())
    return UploadResult("  API PUT, no declared sha256 (tmp + copy)", seconds, size, rss.growth)


def bench_store_direct(endpoint_url: str, path: Path, s3: Any, sha256: str) -> UploadResult:
    """``S3ObjectStore.put_stream`` in this process, no HTTP: the store's own ceiling."""
    from registry.storage import open_store

    _delete_blob(s3, sha256)
    store = open_store(
        f"s3://{BUCKET}/{PREFIX}",
        endpoint_url=endpoint_url,
        aws_access_key_id=S3_ENV["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=S3_ENV["AWS_SECRET_ACCESS_KEY"],
    )
    with path.open("rb") as handle:
        seconds = timed(lambda: store.put_stream(handle, expected_sha256=sha256))
    return UploadResult(
        "  store.put_stream direct (declared, no HTTP)", seconds, path.stat().st_size
    )


def registry_env(workdir: Path, endpoint_url: str) -> dict[str, str]:
    """``CKREG_*`` settings for a registry on the S3 endpoint with SQLite under ``workdir``."""
    return {
        **S3_ENV,
        "CKREG_HOME": str(workdir / "home"),
        "CKREG_DATABASE_URL": f"sqlite:///{workdir / 'registry.db'}",
        "CKREG_STORE_URL": f"s3://{BUCKET}/{PREFIX}",
        "CKREG_S3_ENDPOINT_URL": endpoint_url,
    }


def run(
    size_mib: int, *, diagnose: bool = False, workdir: Path | None = None
) -> list[UploadResult]:
    """Start the servers, run every upload once, print the table; returns the rows."""
    from registry.db import upgrade_database

    with tempfile.TemporaryDirectory(prefix="ckreg-bench-", dir=workdir) as tmp:
        work = Path(tmp)
        path = make_safetensors(work / "model.safetensors", size_mib)
        env = registry_env(work, "")
        upgrade_database(env["CKREG_DATABASE_URL"])
        token = create_token(env["CKREG_DATABASE_URL"])
        with start_moto(work) as moto:
            s3 = s3_client(moto.url)
            s3.create_bucket(Bucket=BUCKET)
            env["CKREG_S3_ENDPOINT_URL"] = moto.url
            with start_registry(work, env) as registry:
                rows = [bench_boto3(s3, path)]
                rows += bench_api(registry, token, path)
                if diagnose:
                    sha256 = sha256_of(path)
                    rows.append(bench_api_undeclared(registry, token, path, s3, sha256))
                    rows.append(bench_store_direct(moto.url, path, s3, sha256))
    report(rows, size_mib)
    return rows


def report(rows: list[UploadResult], size_mib: int) -> None:
    baseline = rows[0].mib_per_s
    table = [
        (
            row.method,
            row.seconds,
            row.mib_per_s,
            row.mib_per_s / baseline,
            "-" if row.rss_growth is None else row.rss_growth / 1e6,
        )
        for row in rows
    ]
    headers = ("method", "seconds", "MiB/s", "x boto3", "server RSS growth MB")
    print_table(f"registry upload, {size_mib} MiB safetensors ({load_average()})", headers, table)
    total = rows[1]
    ratio = total.mib_per_s / baseline
    growth_mb = (total.rss_growth or 0) / 1e6
    print(
        f"targets: throughput >= {TARGET_RATIO}x boto3 -> {ratio:.2f}x "
        f"({'met' if ratio >= TARGET_RATIO else 'MISSED'}); "
        f"RSS growth < {TARGET_RSS_MB:.0f} MB -> {growth_mb:.1f} MB "
        f"({'met' if growth_mb < TARGET_RSS_MB else 'MISSED'})",
        flush=True,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024, help="file size in MiB")
    parser.add_argument(
        "--diagnose", action="store_true", help="add rows splitting the API path apart"
    )
    parser.add_argument("--workdir", type=Path, default=None, help="where the temp dir goes")
    args = parser.parse_args(argv)
    run(args.size_mib, diagnose=args.diagnose, workdir=args.workdir)


if __name__ == "__main__":
    main()
