"""Run-shaping options of ``bench.merge_engine``: which engines run, per-method (and per-size)
repeats, extra output shard sizes for the flat-RSS check, and the disk room a size needs.

Overrides name a method or ``method@size``; ``method@size`` wins over ``method``:

    --engines ckreg,mergekit --ckreg-only ties@3b --method-repeats ties@3b=1,linear=5
    --shard-sizes 256MB,5GB
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from mergeops.io.writer import OutputError, parse_size

ENGINES = ("ckreg", "mergekit")


def add_options(parser: argparse.ArgumentParser) -> None:
    """The options this module reads back (``engines_for``, ``repeats_for``, ...)."""
    parser.add_argument("--engines", default="ckreg,mergekit",
                        help="comma list of ckreg,mergekit (ckreg is always run; "
                             "'ckreg' alone skips mergekit everywhere)")  # fmt: skip
    parser.add_argument("--ckreg-only", default="", metavar="METHOD[@SIZE],...",
                        help="skip mergekit for these methods, or a method at one size, "
                             "e.g. ties@3b where mergekit takes too long")  # fmt: skip
    parser.add_argument(
        "--method-repeats",
        default="",
        metavar="METHOD[@SIZE]=N,...",
        help="--repeats for these methods (or a method at one size)",
    )
    parser.add_argument("--shard-sizes", default="", metavar="SIZE,...",
                        help="also run ckreg once at each of these output shard sizes "
                             "(e.g. 256MB,5GB) and print its peak RSS at each")  # fmt: skip
    parser.add_argument("--no-parity", action="store_true",
                        help="do not compare ckreg's output with mergekit's (saves a read of "
                             "both outputs and the disk room of a second output)")  # fmt: skip


def finish(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Parse and check the options in place (errors through ``parser.error``)."""
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = sorted(set(engines) - set(ENGINES))
    if unknown or "ckreg" not in engines:
        parser.error(f"--engines takes ckreg[,mergekit], got {args.engines!r}")
    if "mergekit" not in engines:
        args.mergekit = None
    args.ckreg_only = {k.strip() for k in args.ckreg_only.split(",") if k.strip()}
    args.method_repeats = _counts(args.method_repeats, parser)
    args.shard_sizes = [s.strip() for s in args.shard_sizes.split(",") if s.strip()]
    for size in [args.shard_size, *args.shard_sizes]:
        try:
            parse_size(size)
        except OutputError as exc:
            parser.error(f"bad shard size {size!r}: {exc}")


def _counts(text: str, parser: argparse.ArgumentParser) -> dict[str, int]:
    counts = {}
    for item in (i.strip() for i in text.split(",") if i.strip()):
        key, _, value = item.partition("=")
        if not value.strip().isdigit() or int(value) < 1:
            parser.error(f"--method-repeats wants METHOD[@SIZE]=N with N >= 1, got {item!r}")
        counts[key.strip()] = int(value)
    return counts


def _lookup(table: dict[str, int] | set[str], method: str, size: str) -> str | None:
    for key in (f"{method}@{size}", method):
        if key in table:
            return key
    return None


def runs_mergekit(args: argparse.Namespace, method: str, size: str) -> bool:
    """Whether mergekit runs for ``method`` at ``size``."""
    return bool(args.mergekit) and _lookup(args.ckreg_only, method, size) is None


def repeats_for(args: argparse.Namespace, method: str, size: str) -> int:
    """Repeats of ``method`` at ``size``: its override, else ``--repeats``."""
    key = _lookup(args.method_repeats, method, size)
    return args.method_repeats[key] if key else int(args.repeats)


def free_bytes(path: Path) -> int:
    """Free bytes on the file system that holds ``path`` (or its nearest existing parent)."""
    path = path.resolve()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def check_room(work: Path, size: str, need: int) -> str | None:
    """Why ``size`` cannot run in ``work`` (not enough free disk), or None."""
    free = free_bytes(work)
    if free >= need:
        return None
    return (
        f"{size}: needs {need / 1e9:.1f} GB free under {work} (inputs not yet written + one "
        f"float32 output), has {free / 1e9:.1f} GB; free space or pass --work on a larger disk"
    )
