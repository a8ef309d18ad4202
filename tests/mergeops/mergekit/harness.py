"""Parity harness: tiny Llama checkpoints, and one merge config run through mergekit and ckreg.

- ``build_zoo(root)`` writes a base and three fine-tunes (base + small quantised deltas, so
  equal magnitudes and TIES threshold ties occur) as Hugging Face folders with a tokenizer,
  once in float32 and once in bfloat16 (``conftest.py`` builds it once per session).
- ``run_mergekit(config, out_dir)`` runs mergekit 0.1.5 in-process (CPU, offline).
- ``run_ckreg(config, out_dir)`` runs the same config through ``ckreg merge --config``.
- ``assert_close(ours, theirs, dtype)``: ≤ 1e-6 relative in float32, ≤ 1 ulp in bfloat16.

Configs are plain dicts as a YAML would hold them; model paths are absolute strings.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

HIDDEN = 32
LAYERS = 4
VOCAB = 64
MODELS = ("base", "ft1", "ft2", "ft3")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Zoo:
    """Model folders by dtype name then model name, e.g. ``zoo.path("bfloat16", "ft2")``."""

    root: Path

    def path(self, dtype: str, model: str) -> str:
        return str(self.root / dtype / model)


def tiny_config() -> Any:
    """The LlamaConfig every zoo model shares (untied embeddings)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=2 * HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )


def tiny_tokenizer(extra_words: tuple[str, ...] = ()) -> Any:
    """A WordLevel tokenizer over ``VOCAB`` tokens (specials first), as a fast HF tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    words = [*extra_words, *(f"w{i}" for i in range(VOCAB))]
    vocab = {tok: i for i, tok in enumerate([*specials, *words][:VOCAB])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
    )


def _fine_tune(base: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """base + deltas that are multiples of 2**-8 in [-4, 4] * 2**-8: many exact ties."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, tensor in base.items():
        steps = torch.randint(-4, 5, tensor.shape, generator=gen).float()
        out[key] = tensor + steps * 2.0**-8
    return out


def build_zoo(root: Path) -> Zoo:
    """Write base, ft1..ft3 under ``root/<dtype>/<name>`` (config, weights, tokenizer)."""
    from transformers import GenerationConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config())
    base = {k: v.detach().clone().float() for k, v in model.state_dict().items()}
    # Quantise the base too, so base + delta stays exact in float32 and collides in bf16.
    base = {k: torch.round(v * 64) / 64 for k, v in base.items()}
    weights = {"base": base}
    for i, name in enumerate(MODELS[1:], start=1):
        weights[name] = _fine_tune(base, seed=100 + i)
    tokenizer = tiny_tokenizer()
    for dtype_name, dtype in DTYPES.items():
        for name, state in weights.items():
            folder = root / dtype_name / name
            model.load_state_dict(state)
            model.to(dtype)
            model.save_pretrained(folder, safe_serialization=True)
            GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=3).save_pretrained(folder)
            tokenizer.save_pretrained(folder)
            model.to(torch.float32)
    return Zoo(root)


def load_folder(out_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors files in ``out_dir`` (not its sub-folders)."""
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(Path(out_dir).glob("*.safetensors")):
        tensors.update(load_file(str(path)))
    return tensors


def run_mergekit(config: dict[str, Any], out_dir: Path, **options: Any) -> dict[str, torch.Tensor]:
    """Merge with mergekit's Python API in-process (CPU, tokenizer copied); the tensors."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    merge_config = MergeConfiguration.model_validate(config)
    settings = {"cuda": False, "copy_tokenizer": True, "lazy_unpickle": False, "quiet": True}
    run_merge(merge_config, str(out_dir), options=MergeOptions(**{**settings, **options}))
    return load_folder(out_dir)


class CkregMergeFailed(AssertionError):
    """``ckreg merge`` exited non-zero; ``message`` is what it printed."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(f"ckreg merge failed ({exit_code}): {message}")
        self.message = message
        self.exit_code = exit_code


def run_ckreg(
    config: dict[str, Any], out_dir: Path, *args: str, device: str = "cpu"
) -> dict[str, torch.Tensor]:
    """Write ``config`` as YAML next to ``out_dir`` and run ``ckreg merge --config`` on it
    (the CLI command itself, in-process); the output tensors. Raises ``CkregMergeFailed``."""
    from typer.testing import CliRunner

    from mergeops.cli import merge_app

    out_dir = Path(out_dir)
    config_path = out_dir.parent / f"{out_dir.name}.yml"
    config_path.parent.mkdir(parents=True, exist_ok=True)
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    argv = ["merge", "--config", str(config_path), "--out", str(out_dir), "--device", device]
    result = CliRunner().invoke(merge_app, [*argv, "--no-progress", *args])
    if result.exit_code != 0:
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            raise result.exception
        raise CkregMergeFailed(result.output.strip(), result.exit_code)
    return load_folder(out_dir)


def _ulp(reference: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of ``dtype`` at each value of ``reference`` (float32 tensor)."""
    info = torch.finfo(dtype)
    magnitude = reference.abs().clamp_min(info.tiny)
    exponent = torch.floor(torch.log2(magnitude))
    return torch.pow(2.0, exponent) * info.eps


def differences(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per tensor name: the largest absolute difference (float32 arithmetic)."""
    return {
        key: float((ours[key].float() - theirs[key].float()).abs().max())
        if theirs[key].numel()
        else 0.0
        for key in theirs
        if key in ours
    }


def max_difference(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> float:
    """The largest absolute difference over all shared tensors."""
    return max(differences(ours, theirs).values(), default=0.0)


def assert_close(
    ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor], dtype: torch.dtype | str
) -> None:
    """Same names, shapes and dtype ``dtype``; values within 1e-6 relative in float32 (of each
    value, floored at the tensor's largest magnitude) or 1 ulp in 16-bit dtypes."""
    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    assert sorted(ours) == sorted(theirs), (
        f"tensor names differ: only ours {sorted(set(ours) - set(theirs))[:5]}, "
        f"only mergekit {sorted(set(theirs) - set(ours))[:5]}"
    )
    for key, expected in theirs.items():
        got = ours[key]
        assert got.shape == expected.shape, (
            f"{key}: shape {tuple(got.shape)} vs {tuple(expected.shape)}"
        )
        assert got.dtype == expected.dtype == dtype, f"{key}: dtype {got.dtype} vs {expected.dtype}"
        if not dtype.is_floating_point:
            assert torch.equal(got, expected), key
            continue
        a, b = got.float(), expected.float()
        diff = (a - b).abs()
        if dtype == torch.float32:
            # relative to each value, floored at the tensor's scale: a sum that cancels to
            # ~0 keeps the rounding error of its terms
            scale = float(b.abs().max()) if b.numel() else 0.0
            bound = 1e-6 * torch.maximum(b.abs(), torch.full_like(b, scale)).clamp_min(1e-30)
        else:
            bound = _ulp(b, dtype)
        bad = diff > bound
        if bool(bad.any()):
            idx = int(bad.flatten().nonzero()[0])
            raise AssertionError(
                f"{key}: {int(bad.sum())} of {b.numel()} values differ beyond tolerance; "
                f"first at flat index {idx}: ours {a.flatten()[idx].item()!r}, "
                f"mergekit {b.flatten()[idx].item()!r}; max difference {float(diff.max())!r}"
            )
