"""The tiny MoE zoo: an MoE built from the LM zoo's task fine-tunes, and that MoE with its experts halved.

Everything is built in code (a Llama base pretrained on a mix of tasks, one full fine-tune per
task, a Mixtral assembled from them by ``mergeops.moe.build``) and measured on the LM zoo's held-out
test prompts (exact match, greedy). Claims checked (issue 22):

1. the MoE of the task fine-tunes beats their task-arithmetic merge on the tasks;
2. halving the experts with MC-SMoE or Sub-MoE keeps >= 90 % of the MoE's average accuracy, where
   naive averaging of neighbouring expert pairs keeps less; and how many bytes halving saves
   (dense, and Sub-MoE's factored form at ranks 16 and 32).

Also: the MoE with a shared expert (Qwen2-MoE; the base's MLP or the fine-tunes' average), and
mc_smoe with ``leaders="diverse"``. Where a halving keeps less than 90 %, ``why`` says why from its
expert groups (tasks merged into one expert, twin experts both leading, routing lost at M = top-k).

Run: ``python -m bench.moezoo [--out results.json]`` (a few minutes on one core).
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from bench.lmzoo.model import batch, exact_match, lm_config, new_model
from bench.lmzoo.tasks import BOS, TOKEN_ID, encode, examples
from bench.lmzoo.train import LMTrainConfig, Sampler, _fit, pretrain
from bench.zoo.build import deterministic_torch

TASKS = ("reverse", "sort", "shift", "copy")
TEST_SIZE = 112
CONFIG = LMTrainConfig(
    hidden=64, heads=4, pretrain_steps=400, finetune_steps=250, finetune_lr=3e-3, batch_size=32
)


def accuracy(model: torch.nn.Module, task: str, split: str = "test", seed: int = 0) -> float:
    return float(exact_match(model, batch(examples(task, split, n=TEST_SIZE, seed=seed))).mean())


def prompt_ids(task: str, n: int, seed: int) -> list[torch.Tensor]:
    """Token ids of ``n`` train prompts of ``task`` (what the gates and calibration see)."""
    return [
        torch.tensor([TOKEN_ID[BOS], *encode(prompt)])
        for prompt, _ in examples(task, "train", n=n, seed=seed + 17)
    ]


def _load(folder: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def _bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def _row(name: str, model: torch.nn.Module, folder: Path | None, note: str = "") -> dict[str, Any]:
    scores = {t: accuracy(model, t) for t in TASKS}
    return {
        "model": name,
        **scores,
        "avg": sum(scores.values()) / len(TASKS),
        "bytes": _bytes(folder) if folder else None,
        "note": note,
    }


def finetune_mlps(base: torch.nn.Module, task: str, seed: int) -> torch.nn.Module:
    """A copy of ``base`` with only its MLPs trained on ``task``: attention, norms and embeddings
    stay the base's, as they will in the MoE (full fine-tunes also move attention, which an MoE of
    their MLPs cannot carry: with them the MoE scored 0.23 and task arithmetic 0.16 here)."""
    model = copy.deepcopy(base)
    for name, param in model.named_parameters():
        param.requires_grad_(".mlp." in name)
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trained, lr=CONFIG.finetune_lr)
    sampler = Sampler([task], seed=seed, pool=CONFIG.pool)
    _fit(model, optimizer, sampler, steps=CONFIG.finetune_steps, batch_size=CONFIG.batch_size)
    return model


def build_dense(root: Path, log: Callable[[str], None]) -> tuple[Path, list[Path], list[Path]]:
    """Base (pretrained on every task), one MLP fine-tune per task, and a second one per task
    with another seed (the redundant experts of the compression section), as HF folders."""
    base = new_model(lm_config(hidden=CONFIG.hidden, layers=CONFIG.layers, heads=CONFIG.heads), 0)
    pretrain(base, TASKS, seed=0, config=CONFIG)
    base.save_pretrained(root / "base")
    tunes, twins = [], []
    for i, task in enumerate(TASKS):
        finetune_mlps(base, task, seed=i + 1).save_pretrained(root / task)
        finetune_mlps(base, task, seed=i + 11).save_pretrained(root / f"{task}-b")
        tunes.append(root / task)
        twins.append(root / f"{task}-b")
        log(f"fine-tuned {task} (twice)")
    return root / "base", tunes, twins


def task_arithmetic_rows(base_dir: Path, tunes: Sequence[Path]) -> dict[str, Any]:
    """Task arithmetic with the scaling picked on validation accuracy."""
    import mergeops

    base = _load(base_dir)
    states = [_load(t).state_dict() for t in tunes]
    best: tuple[float, float, dict[str, torch.Tensor]] | None = None
    for lam in (0.3, 0.5, 0.7, 1.0):
        merged = mergeops.merge("task_arithmetic", states, base=base.state_dict(), weight=lam)
        base.load_state_dict(merged)
        score = sum(accuracy(base, t, "validation") for t in TASKS)
        if best is None or score > best[0]:
            best = (score, lam, merged)
    assert best is not None
    base.load_state_dict(best[2])
    return _row("task_arithmetic", base, base_dir, f"lambda={best[1]} (validation)")


def _experts(tunes: Sequence[Path], seed: int) -> list[Any]:
    from mergeops.moe.build import ExpertSource

    return [
        ExpertSource(t, positive=prompt_ids(TASKS[i % len(TASKS)], 64, seed + i))
        for i, t in enumerate(tunes)
    ]


def build_rows(root: Path, base_dir: Path, tunes: Sequence[Path]) -> list[dict[str, Any]]:
    """The MoE of the four task fine-tunes, with each gate mode (top-2 of 4)."""
    from mergeops.moe.build import BuildParams, build_moe

    rows = []
    for mode in ("hidden", "cheap_embed", "random"):
        out = root / f"moe-{mode}"
        build_moe(base_dir, _experts(tunes, 0), out, BuildParams(gate_mode=mode))  # type: ignore[arg-type]
        rows.append(_row(f"moe[{mode}] 4 experts", _load(out), out, "top-2"))
    for shared in ("base", "average"):  # Qwen2-MoE: (1 - w) routed + w shared, w = 0.5
        out = root / f"moe-shared-{shared}"
        params = BuildParams(shared_expert=shared)  # type: ignore[arg-type]
        build_moe(base_dir, _experts(tunes, 0), out, params)
        note = f"qwen2_moe, top-2 + shared expert = {shared} MLP, w=0.5"
        rows.append(_row(f"moe[hidden] 4 experts + shared {shared}", _load(out), out, note))
    return rows


def compress_rows(root: Path, source: Path, num_experts: int, tag: str) -> list[dict[str, Any]]:
    """``source`` with its experts halved by each method (calibration: train prompts of all tasks)."""
    from mergeops.moe.compress import compress_moe

    calibration = [p for task in TASKS for p in prompt_ids(task, 32, 99)]
    rows = []
    for method, options in (
        ("mc_smoe", {}),
        ("sub_moe", {}),
        ("average", {}),
        ("mc_smoe", {"align": False}),
        ("mc_smoe", {"leaders": "diverse"}),
    ):
        label = method + ("" if options.get("align", True) else " (no align)")
        label += " (diverse leaders)" if options.get("leaders") == "diverse" else ""
        out = root / f"{tag}-{label.replace(' ', '_')}"
        result = compress_moe(
            source, out, method, num_experts, calibration, progress=False, **options
        )  # type: ignore[arg-type]
        groups = "; ".join(str(g) for g in result.groups.values())
        name = f"{label} {result.experts_before}->{num_experts}"
        row = _row(name, _load(out), out, f"groups {groups}")
        rows.append({**row, "section": tag, "groups": result.groups, "experts_after": num_experts})
    return rows


def factored_rows(root: Path, source: Path, num_experts: int, tag: str) -> list[dict[str, Any]]:
    """Sub-MoE kept factored (rank r of the shared basis; hidden 64, intermediate 128, so a
    projection costs 192 r numbers instead of 8192): bytes of the factored folder, accuracy of
    its materialized (dense) form."""
    from mergeops.moe.compress import compress_moe
    from mergeops.moe.factored import materialize

    calibration = [p for task in TASKS for p in prompt_ids(task, 32, 99)]
    rows = []
    for rank in (16, 32):
        out = root / f"{tag}-factored-{rank}"
        result = compress_moe(
            source,
            out,
            "sub_moe",
            num_experts,
            calibration,
            progress=False,
            rank=rank,
            factored=True,
        )
        dense = materialize(out, root / f"{tag}-factored-{rank}-dense")
        name = f"sub_moe factored r={rank} {result.experts_before}->{num_experts}"
        row = _row(name, _load(dense), out, "bytes: factored folder; accuracy: materialized")
        rows.append({**row, "section": tag, "groups": result.groups, "experts_after": num_experts})
    return rows


def why(row: dict[str, Any], top_k: int = 2) -> str:
    """Why a halving lost accuracy, from its groups: expert e serves TASKS[e % 4] (the 8-expert
    MoE holds each task twice, seed-major)."""
    reasons = []
    if row["experts_after"] <= top_k:
        reasons.append(
            f"{row['experts_after']} experts with top-{top_k} routing: every token uses every "
            "expert, so the router no longer selects anything"
        )
    if row["experts_after"] < len(TASKS):
        reasons.append(
            f"{row['experts_after']} experts for {len(TASKS)} tasks: any grouping merges "
            "experts of different tasks"
        )
    for layer, groups in row["groups"].items():
        tasks = [sorted({TASKS[e % len(TASKS)] for e in g}) for g in groups]
        leads = [TASKS[g[0] % len(TASKS)] for g in groups]
        twins = sorted({t for t in leads if leads.count(t) > 1})
        if twins and row.get("model", "").startswith("mc_smoe"):  # groups led by a leader
            reasons.append(
                f"layer {layer}: both experts of {', '.join(twins)} lead a group (leaders "
                f"{[g[0] for g in groups]}), so other tasks' experts have to share"
            )
        mixed = [t for t in tasks if len(t) > 1]
        own = {t[0] for t in tasks if len(t) == 1}
        lost = [t for t in TASKS if t not in own]
        if mixed:
            reasons.append(
                f"layer {layer}: {len(mixed)} of {len(groups)} merged experts mix tasks "
                f"({'; '.join('+'.join(t) for t in mixed)}); no expert of its own for {', '.join(lost)}"
            )
    return "; ".join(reasons) or "groups keep tasks apart"


def run(root: Path, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    from mergeops.moe.build import BuildParams, build_moe

    with deterministic_torch(1):
        base_dir, tunes, twins = build_dense(root, log)
        rows = [_row("base", _load(base_dir), base_dir)]
        rows += [
            _row(f"finetune[{t}]", _load(d), d, "one model per task")
            for t, d in zip(TASKS, tunes, strict=True)
        ]
        rows.append(task_arithmetic_rows(base_dir, tunes))
        rows += build_rows(root, base_dir, tunes)
        log("built the MoEs of 4 experts")
        rows += compress_rows(root, root / "moe-hidden", 2, "distinct")
        rows += factored_rows(root, root / "moe-hidden", 2, "distinct")
        # 8 experts, two per task, in seed-major order: index neighbours serve different tasks
        eight = root / "moe-8"
        build_moe(base_dir, _experts([*tunes, *twins], 0), eight, BuildParams())
        rows.append(_row("moe[hidden] 8 experts", _load(eight), eight, "2 per task, top-2"))
        log("built the MoE of 8 experts")
        rows += compress_rows(root, eight, 4, "redundant")
        rows += factored_rows(root, eight, 4, "redundant")
    return rows


def table(rows: Sequence[dict[str, Any]]) -> str:
    head = ["model", *TASKS, "avg", "bytes", "note"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [
            row["model"],
            *(f"{row[t]:.3f}" for t in TASKS),
            f"{row['avg']:.3f}",
            str(row["bytes"] or ""),
            row["note"],
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.moezoo", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="moezoo-") as scratch:
        rows = run(Path(scratch))
    print(table(rows))
    by_name = {r["model"]: r for r in rows}
    for source, tag in (
        ("moe[hidden] 4 experts", "distinct"),
        ("moe[hidden] 8 experts", "redundant"),
    ):
        moe = by_name[source]
        for row in (r for r in rows if r.get("section") == tag):
            kept = row["avg"] / moe["avg"] if moe["avg"] else 0.0
            saved = 1 - row["bytes"] / moe["bytes"]
            print(
                f"{row['model']}: keeps {kept:.1%} of {source}'s average accuracy, {saved:.1%} fewer bytes"
            )
            if kept < 0.9:
                print(f"    below 90 % because: {why(row)}")
    ta = by_name["task_arithmetic"]["avg"]
    print(
        f"moe[hidden] 4 experts avg {by_name['moe[hidden] 4 experts']['avg']:.3f} vs task_arithmetic {ta:.3f}"
    )
    print(f"{time.perf_counter() - start:.0f} s")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2))
