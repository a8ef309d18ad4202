"""``extract-lora``: a fine-tune minus its base as a PEFT LoRA adapter folder.

Every 2-D ``*.weight`` whose difference is non-zero becomes ``lora_A``/``lora_B`` factors
(``mergeops.ops.lowrank``); input embeddings become ``lora_embedding_A``/``_B`` with
``embeddings=True``, else (like ``lm_head``) are stored whole in ``modules_to_save``; any
other differing tensor (norms, biases, >2-D) puts its module into ``modules_to_save`` with the
fine-tune's values. ``lora_alpha = r`` (and ``alpha_pattern = rank_pattern``) so the scale is 1.
Tensors are read one pair at a time; the adapter file is spooled to disk as it is produced.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mergeops.device import resolve_device
from mergeops.io.layouts import open_source
from mergeops.io.readers import SourceError
from mergeops.io.writer import safetensors_dtype, staged_output
from mergeops.ops.lowrank import lora_factors
from mergeops.sources import TensorSource

PREFIX = "base_model.model."
INPUT_EMBEDDINGS = ("embed_tokens", "wte", "word_embeddings", "embed_in")
OUTPUT_EMBEDDINGS = ("lm_head", "embed_out")


class ExtractError(ValueError):
    """Bad input to extract-lora (names the tensor or path)."""


@dataclass
class ExtractReport:
    """What went where: LoRA ranks and errors per module, modules saved whole, unchanged count."""

    ranks: dict[str, int] = field(default_factory=dict)
    rel_errors: dict[str, float] = field(default_factory=dict)
    modules_to_save: list[str] = field(default_factory=list)
    unchanged: int = 0

    def summary(self) -> str:
        worst = max(self.rel_errors.items(), key=lambda kv: kv[1], default=("-", 0.0))
        return (
            f"{len(self.ranks)} LoRA modules (ranks {min(self.ranks.values(), default=0)}.."
            f"{max(self.ranks.values(), default=0)}), largest relative error "
            f"{worst[1]:.3g} ({worst[0]}); {len(self.modules_to_save)} modules saved whole; "
            f"{self.unchanged} tensors unchanged"
        )


def extract_lora(
    base: str | Path,
    model: str | Path,
    out_dir: str | Path,
    *,
    max_rank: int = 16,
    sv_epsilon: float = 0.0,
    embeddings: bool = False,
    device: str = "auto",
    overwrite: bool = False,
    progress: bool = False,
) -> ExtractReport:
    """Write ``adapter_model.safetensors`` + ``adapter_config.json`` for ``model`` - ``base``."""
    base_src, model_src = _open("base", base), _open("model", model)
    names = _check_same_tensors(base_src, model_src)
    whole = _modules_saved_whole(base_src, model_src, names)
    report = ExtractReport()
    target = torch.device(resolve_device(device))
    with staged_output(out_dir, overwrite=overwrite) as staging:
        with _SpoolWriter(staging / "adapter_model.safetensors") as writer:
            for name in _progress(names, progress):
                _extract_one(name, base_src, model_src, writer, report, whole, target,
                             max_rank=max_rank, sv_epsilon=sv_epsilon, embeddings=embeddings)  # fmt: skip
            if not report.ranks:
                raise ExtractError(
                    f"no 2-D weight of '{model}' differs from '{base}': nothing to factorise"
                )
        config = adapter_config(report, base_name=str(base))
        (staging / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return report


def _open(role: str, path: str | Path) -> TensorSource:
    if not Path(path).exists():
        raise ExtractError(f"{role} checkpoint '{path}' does not exist")
    try:
        return open_source(path, name=role)
    except SourceError as exc:
        raise ExtractError(f"{role} checkpoint '{path}': {exc}") from exc


def _check_same_tensors(base: TensorSource, model: TensorSource) -> list[str]:
    """The model's tensor names; both must hold the same names with the same shapes."""
    base_keys, model_keys = set(base.keys()), list(model.keys())
    only_model = sorted(set(model_keys) - base_keys)
    only_base = sorted(base_keys - set(model_keys))
    if only_model or only_base:
        raise ExtractError(
            f"base and model hold different tensors: only in model {only_model[:5]}, "
            f"only in base {only_base[:5]}"
        )
    for name in model_keys:
        a, b = base.metadata(name).shape, model.metadata(name).shape
        if tuple(a) != tuple(b):
            vocab_only = _is_embedding(name) and tuple(a)[1:] == tuple(b)[1:]
            hint = " (a different vocabulary: resize the base's first)" if vocab_only else ""
            raise ExtractError(
                f"shape mismatch for '{name}': base {tuple(a)}, model {tuple(b)}{hint}"
            )
    return model_keys


def _module(name: str) -> str:
    return name.rsplit(".", 1)[0]


def _is_embedding(name: str) -> bool:
    return _module(name).rsplit(".", 1)[-1] in INPUT_EMBEDDINGS + OUTPUT_EMBEDDINGS


def _is_lora_weight(name: str, ndim: int) -> bool:
    return ndim == 2 and name.endswith(".weight")


def _modules_saved_whole(base: TensorSource, model: TensorSource, names: list[str]) -> set[str]:
    """Modules with a differing tensor LoRA cannot hold (norms, biases, >2-D); small reads."""
    whole: set[str] = set()
    for name in names:
        if _is_lora_weight(name, len(model.metadata(name).shape)):
            continue
        if not torch.equal(base.get(name), model.get(name)):
            whole.add(_module(name))
    return whole


def _extract_one(
    name: str,
    base: TensorSource,
    model: TensorSource,
    writer: _SpoolWriter,
    report: ExtractReport,
    whole: set[str],
    device: torch.device,
    **options: Any,
) -> None:
    module = _module(name)
    tuned = model.get(name)
    if module in whole:
        writer.add(PREFIX + name, tuned)
        if module not in report.modules_to_save:
            report.modules_to_save.append(module)
        return
    if not _is_lora_weight(name, tuned.ndim):
        report.unchanged += 1
        return
    delta = tuned.to(device, torch.float32) - base.get(name).to(device, torch.float32)
    if not bool(delta.any()):
        report.unchanged += 1
        return
    is_input = module.rsplit(".", 1)[-1] in INPUT_EMBEDDINGS
    if _is_embedding(name) and not options["embeddings"]:
        writer.add(PREFIX + name, tuned)
        report.modules_to_save.append(module)
        return
    factors = lora_factors(
        delta.T if is_input else delta,
        max_rank=options["max_rank"],
        sv_epsilon=options["sv_epsilon"],
    )
    kind, suffix = ("lora_embedding", "") if is_input else ("lora", ".weight")
    writer.add(f"{PREFIX}{module}.{kind}_A{suffix}", factors.a.to(tuned.dtype))
    writer.add(f"{PREFIX}{module}.{kind}_B{suffix}", factors.b.to(tuned.dtype))
    report.ranks[module] = factors.rank
    report.rel_errors[module] = factors.rel_error


def adapter_config(report: ExtractReport, *, base_name: str) -> dict[str, Any]:
    """PEFT LoraConfig fields: r = the largest rank, others in rank_pattern; alpha = rank."""
    rank = max(report.ranks.values())
    pattern = {m: r for m, r in sorted(report.ranks.items()) if r != rank}
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_name,
        "r": rank,
        "lora_alpha": rank,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "target_modules": sorted(report.ranks),
        "modules_to_save": sorted(report.modules_to_save) or None,
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": False,
        "fan_in_fan_out": False,
        "inference_mode": True,
    }


def _progress(names: list[str], enabled: bool) -> Iterator[str]:
    if not enabled:
        yield from names
        return
    from tqdm import tqdm

    yield from tqdm(names, desc="extract-lora", unit="tensor")


class _SpoolWriter:
    """One safetensors file written in two steps: tensor bytes spooled as they come, then the
    header and the spooled bytes into the final file, so memory holds one tensor at a time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._spool_path = path.with_suffix(".spool")
        self._spool = self._spool_path.open("wb")
        self._header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        self._offset = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        size = flat.numel() * flat.element_size()
        self._header[name] = {
            "dtype": safetensors_dtype(name, tensor),
            "shape": list(tensor.shape),
            "data_offsets": [self._offset, self._offset + size],
        }
        if size:
            self._spool.write(flat.view(torch.uint8).numpy().data)
        self._offset += size

    def __enter__(self) -> _SpoolWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self._spool.close()
        try:
            if exc_type is None:
                raw = json.dumps(self._header, separators=(",", ":")).encode()
                raw += b" " * (-len(raw) % 8)
                with self.path.open("wb") as out, self._spool_path.open("rb") as spool:
                    out.write(struct.pack("<Q", len(raw)) + raw)
                    while chunk := spool.read(16 * 1024 * 1024):
                        out.write(chunk)
        finally:
            self._spool_path.unlink(missing_ok=True)
