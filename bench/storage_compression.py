"""Compressed storage benchmark: ``python -m bench.storage_compression [--shape 100m] [--family]``.

Section 1 (lossless, issue 11): bytes at rest of the digits zoo and of synthetic Llama-shaped
bf16 models (a base, a dense fine-tune = every weight moved, a sparse fine-tune = a share of
the weights moved) as raw, zstd-only (level 3, whole file), zipnn (the registry's chunked
container, ``registry.storage.zipnn_encoder``) and delta+zipnn (the same against the base's
file, chunk by chunk where smaller) — then upload and download throughput of the synthetic
models through the real API (the registry in its own process, file store) with compression off
and on, every download checked by sha256. Goals: >= 1.3x smaller than raw for bf16 whole
models, >= 3x for sparse fine-tunes stored as deltas, download >= 0.8x the uncompressed path.

Section 2 (``--family``): ``bench.family_compression`` (TALL masks), in the same run.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import struct
import tempfile
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
import zstandard

from bench._common import (
    MIB,
    S3_ENV,
    create_token,
    load_average,
    print_table,
    start_moto,
    start_registry,
)
from bench._synth import FINETUNE_SCALE, SHAPES, LlamaShape, synth_tensor, write_model
from mergeops.io.writer import ShardedWriter
from registry.storage import ObjectStore, open_store
from registry.storage.codecs import StoredBlob
from registry.storage.zipnn_encoder import TensorSpan, plan_segments, write_compressed

GOAL_WHOLE, GOAL_SPARSE_DELTA, GOAL_DOWNLOAD = 1.3, 3.0, 0.8
DEFAULT_ZOO = Path(".ckreg/demo/zoo/digits-seed0")
WEIGHTS = "model.safetensors"


@dataclass
class Sizes:
    """Bytes at rest of one file (or a sum of files) in each form."""

    label: str
    raw: int = 0
    zstd: int = 0
    zipnn: int = 0
    delta: int | None = None

    def add(self, other: Sizes) -> None:
        self.raw, self.zstd, self.zipnn = (
            self.raw + other.raw, self.zstd + other.zstd, self.zipnn + other.zipnn
        )  # fmt: skip
        if other.delta is not None:
            self.delta = (self.delta or 0) + other.delta


def _spans(path: Path, base: Path | None) -> list[TensorSpan]:
    def header(file: Path) -> tuple[int, dict]:
        with file.open("rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            return 8 + length, json.loads(handle.read(length))

    start, entries = header(path)
    base_start, base_entries = header(base) if base is not None else (0, {})
    spans = []
    for name, entry in entries.items():
        if name == "__metadata__":
            continue
        other = base_entries.get(name)
        same = other and other["dtype"] == entry["dtype"] and other["shape"] == entry["shape"]
        at = base_start + other["data_offsets"][0] if same and other else None
        begin, end = entry["data_offsets"]
        spans.append(TensorSpan(start + begin, start + end, entry["dtype"], at))
    return spans


def _zstd_size(path: Path) -> int:
    compressor, total = zstandard.ZstdCompressor(level=3), 0
    with path.open("rb") as handle:
        for chunk in compressor.read_to_iter(handle, read_size=MIB):
            total += len(chunk)
    return total


def _container_size(store: ObjectStore, path: Path, base: Path | None) -> int:
    original = store.put_file(path)
    base_blob = None
    if base is not None:
        info = store.put_file(base)
        base_blob = StoredBlob(info.key, info.size)
    segments = plan_segments(original.size, _spans(path, base))
    result = write_compressed(
        store, original=StoredBlob(original.key, original.size), segments=segments, base=base_blob
    )
    return result.info.size


def measure(store: ObjectStore, label: str, path: Path, base: Path | None = None) -> Sizes:
    """The four sizes of ``path`` (delta only when a base file is given)."""
    sizes = Sizes(label, path.stat().st_size, _zstd_size(path), _container_size(store, path, None))
    if base is not None:
        sizes.delta = min(_container_size(store, path, base), sizes.zipnn)
    return sizes


def write_sparse(folder: Path, shape: LlamaShape, *, seed: int, share: float) -> Path:
    """The base with ``share`` of each tensor's weights moved (a fine-tune of sparse updates)."""
    folder.mkdir(parents=True, exist_ok=True)
    with ShardedWriter(folder, max_shard_size="64GB") as writer:
        for name, tensor_shape in shape.tensor_shapes():
            base = synth_tensor(name, tensor_shape, seed=seed, finetune=0).float()
            gen = torch.Generator().manual_seed(hash((seed, name)) & 0xFFFF_FFFF)
            moved = torch.rand(tensor_shape, generator=gen) < share
            step = torch.randn(tensor_shape, generator=gen) * FINETUNE_SCALE * base.abs().mean()
            writer.add(name, (base + step * moved).to(torch.bfloat16))
    return _single_file(folder)


def _single_file(folder: Path) -> Path:
    (path,) = folder.glob("model-*.safetensors")  # one shard: ShardedWriter's naming
    return path


def synth_models(root: Path, shape: LlamaShape, share: float) -> dict[str, Path]:
    """``base``, ``dense`` and ``sparse`` single-file bf16 models under ``root``."""
    paths = {}
    for label, finetune in (("base", 0), ("dense", 1)):
        write_model(root / label, shape, seed=0, finetune=finetune, shard_size="64GB")
        paths[label] = _single_file(root / label)
    paths["sparse"] = write_sparse(root / "sparse", shape, seed=0, share=share)
    return paths


def size_rows(zoo: Path, models: dict[str, Path], work: Path) -> list[Sizes]:
    """Sizes of the digits zoo (base + task fine-tunes) and of the synthetic models."""
    from bench.zoo import ensure_zoo, load_manifest

    store = open_store(f"file://{work / 'sizes-store'}")
    ensure_zoo(zoo, seed=0)
    manifest = load_manifest(zoo)
    base = zoo / manifest.base
    rows = [measure(store, "digits base (f32)", base)]
    tuned = Sizes(f"digits {len(manifest.tasks)} fine-tunes (f32)")
    for entry in manifest.tasks.values():
        tuned.add(measure(store, entry.name, zoo / entry.model, base))
    rows.append(tuned)
    rows.append(measure(store, "llama bf16 base", models["base"]))
    rows.append(measure(store, "llama bf16 dense fine-tune", models["dense"], models["base"]))
    rows.append(measure(store, "llama bf16 sparse fine-tune", models["sparse"], models["base"]))
    return rows


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(MIB):
            digest.update(chunk)
    return digest.hexdigest()


def _store_env(home: Path, s3_endpoint: str | None) -> dict[str, str]:
    """``CKREG_*`` store settings: a file store under ``home``, or a fresh bucket on moto."""
    if s3_endpoint is None:
        return {"CKREG_STORE_URL": f"file://{home / 'store'}"}
    import boto3

    bucket = f"bench-{home.name}"
    boto3.client(
        "s3",
        endpoint_url=s3_endpoint,
        region_name=S3_ENV["AWS_DEFAULT_REGION"],
        aws_access_key_id=S3_ENV["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=S3_ENV["AWS_SECRET_ACCESS_KEY"],
    ).create_bucket(Bucket=bucket)
    return {
        **S3_ENV,
        "CKREG_STORE_URL": f"s3://{bucket}/ckreg",
        "CKREG_S3_ENDPOINT_URL": s3_endpoint,
    }


def api_round_trip(
    work: Path, models: dict[str, Path], compression: str, s3_endpoint: str | None = None
) -> list[list[object]]:
    """Upload base, dense and sparse through a fresh registry, download each back (sha256
    checked); rows of (mode, model, codec, stored MiB, upload MiB/s, download MiB/s)."""
    from registry.client import Client
    from registry.db import upgrade_database

    home = work / f"api-{compression}"
    database = f"sqlite:///{home / 'registry.db'}"
    home.mkdir(parents=True)
    upgrade_database(database)
    env = {
        "CKREG_HOME": str(home),
        "CKREG_DATABASE_URL": database,
        **_store_env(home, s3_endpoint),
        "CKREG_STORE_COMPRESSION": compression,
        "CKREG_TASK_VECTORS_ON_COMPLETE": "false",
    }
    token, rows, base_id = create_token(database), [], None
    with (
        start_registry(home, env) as server,
        Client(server.url, token=token, timeout=900) as client,
    ):
        for label, path in models.items():
            size = path.stat().st_size
            started = time.perf_counter()
            kind = "base" if base_id is None else "finetune"
            created = client.create_checkpoint(name=label, kind=kind, base_id=base_id)
            client.upload_file(created["id"], path, name=WEIGHTS, progress=False)
            done = client.complete(created["id"])
            uploaded = time.perf_counter() - started
            base_id = base_id or created["id"]
            target = home / f"download-{label}"
            started = time.perf_counter()
            client.download_file(created["id"], WEIGHTS, target, progress=False)
            downloaded = time.perf_counter() - started
            if _sha256(target) != _sha256(path):
                raise SystemExit(f"download of {label} ({compression}) differs from the original")
            target.unlink()
            file = next(f for f in done["files"] if f["name"] == WEIGHTS)
            rows.append([compression, label, file["codec"], file["stored_size"] / MIB,
                         size / MIB / uploaded, size / MIB / downloaded])  # fmt: skip
    return rows


def report_sizes(rows: list[Sizes]) -> None:
    def ratio(raw: int, stored: int | None) -> str:
        return "" if stored is None else f"{raw / stored:.2f}x"

    print_table(
        "Bytes at rest (lossless; ratio = raw / stored)",
        ["file(s)", "raw MiB", "zstd-3 MiB", "zipnn MiB", "delta+zipnn MiB",
         "zstd x", "zipnn x", "delta+zipnn x"],
        [[r.label, r.raw / MIB, r.zstd / MIB, r.zipnn / MIB,
          "" if r.delta is None else r.delta / MIB,
          ratio(r.raw, r.zstd), ratio(r.raw, r.zipnn), ratio(r.raw, r.delta)] for r in rows],
    )  # fmt: skip
    by_label = {r.label: r for r in rows}
    whole = by_label["llama bf16 base"]
    sparse = by_label["llama bf16 sparse fine-tune"]
    print(f"goal bf16 whole model >= {GOAL_WHOLE}x: {whole.raw / whole.zipnn:.2f}x; "
          f"sparse fine-tune as delta >= {GOAL_SPARSE_DELTA}x: "
          f"{sparse.raw / (sparse.delta or sparse.zipnn):.2f}x")  # fmt: skip


def report_api(rows: list[list[object]], store: str) -> None:
    print_table(
        f"Through the API ({store} store; upload = create + PUT + complete incl. compression)",
        ["compression", "model", "codec", "stored MiB", "upload MiB/s", "download MiB/s"],
        rows,
    )
    off = {row[1]: row for row in rows if row[0] == "off"}
    ratios = [float(row[5]) / float(off[row[1]][5]) for row in rows if row[0] != "off"]  # type: ignore[arg-type]
    print(f"goal download >= {GOAL_DOWNLOAD}x uncompressed: "
          + ", ".join(f"{r:.2f}x" for r in ratios))  # fmt: skip


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.storage_compression",
        description="Bytes at rest and API throughput with lossless compressed storage "
        "(section 1); --family adds TALL family compression (section 2).",
    )
    parser.add_argument("--shape", choices=sorted(SHAPES), default="100m", help="llama shape")
    parser.add_argument("--sparse-share", type=float, default=0.01, help="share of weights moved")
    parser.add_argument("--zoo", type=Path, default=DEFAULT_ZOO, help="digits zoo dir")
    parser.add_argument("--no-api", action="store_true", help="sizes only (no registry server)")
    parser.add_argument(
        "--store", choices=("file", "s3"), default="file", help="API runs: file store or S3 (moto)"
    )
    parser.add_argument("--family", action="store_true", help="also run section 2 (TALL)")
    parser.add_argument("--workdir", type=Path, default=None, help="scratch dir (default: temp)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> tuple[list[Sizes], list[list[object]]]:
    """Run section 1 (and section 2 with ``--family``); returns the size and API rows."""
    args = _parse_args(argv)
    started, api_rows = time.perf_counter(), []
    with tempfile.TemporaryDirectory(prefix="ckreg-compress-", dir=args.workdir) as scratch:
        work = Path(scratch)
        models = synth_models(work / "models", SHAPES[args.shape], args.sparse_share)
        print(f"llama shape {args.shape}: {models['base'].stat().st_size / MIB:.1f} MiB per "
              f"model; sparse fine-tune moves {args.sparse_share:.1%} of weights")  # fmt: skip
        sizes = size_rows(args.zoo, models, work)
        report_sizes(sizes)
        if not args.no_api:
            with ExitStack() as stack:
                endpoint = None
                if args.store == "s3":
                    endpoint = stack.enter_context(start_moto(work)).url
                for mode in ("off", "zipnn"):
                    api_rows += api_round_trip(work, models, mode, endpoint)
            report_api(api_rows, args.store)
    print(f"section 1 took {time.perf_counter() - started:.1f}s ({load_average()})")
    if args.family:  # section 2 lives in its own module (TALL family compression)
        family = importlib.import_module("bench.family_compression")
        family.report(family.run(args.zoo))
    return sizes, api_rows


if __name__ == "__main__":
    main()
