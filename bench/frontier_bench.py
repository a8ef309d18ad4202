"""Cost of the activation-aware and learnt merges (issue 19, item 6):
``python -m bench.frontier_bench [--shape 20m|100m|270m|tiny] [--models 4] [--ada-steps 5]
[--work DIR] [--train-steps 60]``.

1. Merges: on a generated bf16 Llama-shaped base + fine-tunes (``bench._synth``), with one
   synthetic ``gram`` file per fine-tune (a PSD (in, in) matrix per linear weight, as
   ``capture_gram`` writes them), ``regmean`` and ``adamerging`` (layer-wise, ``--ada-steps``
   Adam steps against the prediction entropy of the merged Llama on a random token batch) each
   run as its own process through ``mergeops.merge_files``; wall time and peak RSS (``wait4``
   rusage, as ``bench.merge_engine`` measures) per merge. ``task_arithmetic`` is the reference.
2. Gram capture during training: a tiny Llama trained for ``--train-steps`` AdamW steps with
   no recorder, with ``GramRecorder(every=10)`` and with ``every=1``; seconds per step and the
   overhead against no recorder (goal: <= 10 % at every=10).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from bench._synth import SHAPES, LlamaShape, write_family

#: bench._synth's shapes plus a ~21M-parameter one that runs in about a minute on 2 cores.
BENCH_SHAPES: dict[str, LlamaShape] = {
    **SHAPES,
    "20m": LlamaShape(vocab=8000, hidden=512, intermediate=1408, layers=4, heads=8),
}
METHODS = ("task_arithmetic", "regmean", "adamerging")
GRAM_RANK = 256  # rows of the random X behind each synthetic Gram (XᵀX / n + 0.1·I)


def write_grams(root: Path, shape: LlamaShape, models: int, *, seed: int = 0) -> list[Path]:
    """One Gram file per fine-tune, keyed by every 2-D linear weight (not the embedding)."""
    from safetensors.torch import save_file

    paths = []
    for index in range(1, models + 1):
        path = root / f"gram-{index}.safetensors"
        paths.append(path)
        if path.is_file():
            continue
        generator = torch.Generator().manual_seed(seed * 1000 + index)
        grams = {}
        for name, dims in shape.tensor_shapes():
            if len(dims) == 2 and name != "model.embed_tokens.weight":
                x = torch.randn(GRAM_RANK, dims[1], generator=generator)
                grams[name] = x.T @ x / GRAM_RANK + 0.1 * torch.eye(dims[1])
        save_file(grams, str(path))
    return paths


class LlamaEntropy:
    """Mean next-token entropy of the Llama of ``shape`` (parameters substituted) on a fixed
    random token batch: AdaMerging's objective, for timing only."""

    def __init__(self, shape: LlamaShape, *, batch: int = 2, length: int = 32) -> None:
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(**{k: v for k, v in shape.hf_config().items() if k != "torch_dtype"})
        with torch.device("meta"):
            model = LlamaForCausalLM(config)
        self.model = model.to_empty(device="cpu").eval()  # pages never touched: no RSS
        rotary = type(self.model.model.rotary_emb)(config=config)
        self.model.model.rotary_emb = rotary
        generator = torch.Generator().manual_seed(0)
        self.ids = torch.randint(shape.vocab, (batch, length), generator=generator)

    def loss(self, params: dict[str, torch.Tensor]) -> torch.Tensor:
        from torch.func import functional_call

        logits = functional_call(self.model, params, args=(self.ids,), strict=False).logits
        logp = torch.log_softmax(logits.float(), -1)
        return -(logp.exp() * logp).sum(-1).mean()


def child(
    method: str, work: Path, shape_name: str, models: int, ada_steps: int, hold: str = "float32"
) -> None:
    """One merge, in this process (the parent measures it)."""
    import mergeops

    shape = BENCH_SHAPES[shape_name]
    folders = [work / "base"] + [work / f"ft-{i}" for i in range(1, models + 1)]
    out = work / f"out-{method}"
    options: dict[str, object] = {}
    if method == "regmean":
        options = {"grams": [str(p) for p in write_grams(work, shape, models)], "base": None}
        params: dict[str, object] = {"alpha": 0.9}
    elif method == "adamerging":
        options = {"objective": LlamaEntropy(shape), "base": str(folders[0])}
        params = {"granularity": "layer", "steps": ada_steps, "lr": 1e-3, "hold_dtype": hold}
    else:
        options, params = {"base": str(folders[0])}, {"lambda": 0.3}
    started = time.perf_counter()
    mergeops.merge_files(method, [str(f) for f in folders[1:]], out_dir=out, params=params,
                         device="cpu", overwrite=True, progress=False, **options)  # type: ignore[arg-type]  # fmt: skip
    print(json.dumps({"method": method, "merge_s": time.perf_counter() - started}))


def merge_rows(
    work: Path,
    shape_name: str,
    models: int,
    ada_steps: int,
    methods: Sequence[str] = METHODS,
    hold: str = "float32",
) -> list[dict[str, object]]:
    """Each merge as its own process; wall time, CPU time and peak RSS."""
    from bench.merge_engine import measure

    shape = BENCH_SHAPES[shape_name]
    write_family(work, shape=shape, finetunes=models)
    write_grams(work, shape, models)  # outside the timed run
    rows = []
    for method in methods:
        cmd = [sys.executable, "-m", "bench.frontier_bench", "--child", method, "--work",
               str(work.parent), "--shape", shape_name, "--models", str(models),
               "--ada-steps", str(ada_steps), "--ada-hold", hold]  # fmt: skip
        run = measure(cmd, engine="ckreg", device="cpu", log=work / f"{method}.log")
        if not run.ok:
            raise RuntimeError(f"{method} merge failed; see {run.log}")
        label = f"{method} ({hold})" if method == "adamerging" else method
        rows.append({"method": label, "wall_s": run.wall_s, "cpu_s": run.cpu_s,
                     "peak_rss_mib": run.peak_rss / 2**20})  # fmt: skip
    return rows


def train_step_seconds(every: int | None, steps: int, *, seed: int = 0) -> tuple[float, float]:
    """Mean (wall, CPU) seconds per AdamW step of a tiny Llama (hidden 256, 4 layers, batch 8 x 128 tokens)
    with a ``GramRecorder(every=...)`` active (``None``: no recorder); first 5 steps untimed."""
    from contextlib import nullcontext

    from transformers import LlamaConfig, LlamaForCausalLM

    from registry.client.capture import GramRecorder

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=688,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4)  # fmt: skip
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(1024, (8, 128), generator=torch.Generator().manual_seed(seed))
    recorder = GramRecorder(model, every=every) if every else nullcontext()
    with recorder:
        for step in range(steps + 5):
            if step == 5:
                started, cpu = time.perf_counter(), time.process_time()
            loss = model(input_ids=ids, labels=ids).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return (time.perf_counter() - started) / steps, (time.process_time() - cpu) / steps


def capture_rows(steps: int, repeats: int = 2) -> list[dict[str, object]]:
    """Seconds per step without a recorder, with every=10 and every=1 (best of ``repeats``,
    interleaved so a busy neighbour hits every setting alike): wall time and the process's CPU
    time (steadier on a shared machine; the overhead is computed on both)."""
    settings: tuple[int | None, ...] = (None, 10, 1)
    wall: dict[int | None, float] = {}
    cpu: dict[int | None, float] = {}
    for _ in range(repeats):
        for every in settings:
            w, c = train_step_seconds(every, steps)
            wall[every], cpu[every] = min(wall.get(every, w), w), min(cpu.get(every, c), c)
    rows = []
    for every in settings:
        rows.append({"recorder": "none" if every is None else f"every={every}",
                     "s_per_step": wall[every], "overhead_pct": 100 * (wall[every] / wall[None] - 1),
                     "cpu_s_per_step": cpu[every],
                     "cpu_overhead_pct": 100 * (cpu[every] / cpu[None] - 1)})  # fmt: skip
    return rows


def _table(rows: Sequence[dict[str, object]]) -> str:
    keys = list(rows[0])
    lines = ["  ".join(f"{k:>14}" for k in keys)]
    for row in rows:
        cells = [f"{v:14.3f}" if isinstance(v, float) else f"{v!s:>14}" for v in row.values()]
        lines.append("  ".join(cells))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.frontier_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--shape", choices=sorted(BENCH_SHAPES), default="20m",
                        help="synthetic Llama size (default 20m; 270m is the issue's size)")  # fmt: skip
    parser.add_argument("--models", type=int, default=4, help="fine-tunes merged (default 4)")
    parser.add_argument("--ada-steps", type=int, default=5, help="adamerging Adam steps")
    parser.add_argument(
        "--ada-hold",
        choices=("float32", "bfloat16"),
        default="float32",
        help="adamerging's hold_dtype (bfloat16 halves the held task vectors)",
    )
    parser.add_argument(
        "--methods", default=",".join(METHODS), help=f"merges to time (default {','.join(METHODS)})"
    )
    parser.add_argument("--repeats", type=int, default=2, help="capture: runs per setting")
    parser.add_argument("--train-steps", type=int, default=30, help="timed steps per setting")
    parser.add_argument("--work", type=Path, default=Path("bench/out/frontier_bench"),
                        help="where models and outputs are written (reused)")  # fmt: skip
    parser.add_argument("--skip-merges", action="store_true", help="only the capture timing")
    parser.add_argument("--skip-capture", action="store_true", help="only the merges")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    work = args.work / args.shape
    if args.child:
        child(args.child, work, args.shape, args.models, args.ada_steps, args.ada_hold)
        return
    result: dict[str, object] = {
        "shape": args.shape,
        "parameters": BENCH_SHAPES[args.shape].parameters,
    }
    if not args.skip_merges:
        work.mkdir(parents=True, exist_ok=True)
        methods = [m for m in args.methods.split(",") if m]
        unknown = sorted(set(methods) - set(METHODS))
        if unknown:
            parser.error(f"unknown --methods {unknown}; known: {', '.join(METHODS)}")
        result["merges"] = merge_rows(
            work, args.shape, args.models, args.ada_steps, methods, args.ada_hold
        )
        print(f"merges of {args.models} fine-tunes, {args.shape} "
              f"({BENCH_SHAPES[args.shape].parameters / 1e6:.0f}M parameters, bf16):")  # fmt: skip
        print(_table(result["merges"]))  # type: ignore[arg-type]
    if not args.skip_capture:
        result["capture"] = capture_rows(args.train_steps, args.repeats)
        print(f"gram capture during training ({args.train_steps} steps per setting):")
        print(_table(result["capture"]))  # type: ignore[arg-type]
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
