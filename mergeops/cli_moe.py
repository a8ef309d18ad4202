"""``ckreg moe``: build an MoE from a base and its fine-tunes, or shrink an MoE by merging experts.

torch and transformers are imported inside the commands, so ``ckreg --help`` stays light.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml

moe_app = typer.Typer(
    help="Mixture-of-experts checkpoints: build one from fine-tunes, merge its experts.",
    no_args_is_help=True,
)

# mergeops may not import the registry client: flows/cli.py hands ``--register`` its functions
# (``registry.client.moe.register_moe`` / ``register_compressed``) through ``set_register_hooks``.
RegisterHook = Callable[..., dict[str, Any]]
_register_hooks: dict[str, RegisterHook] = {}


def set_register_hooks(*, build: RegisterHook, compress: RegisterHook) -> None:
    """Back ``--register``: ``build(path, base_id=, expert_ids=, name=, url=, token=)`` and
    ``compress(path, source_id=, metrics=, name=, url=, token=)``."""
    _register_hooks.update(build=build, compress=compress)


BUILD_EXAMPLE = """\
base_model: ./base                 # dense Llama-style model folder
base_checkpoint_id: 1              # registry ids, for --register (lineage to every expert)
gate_mode: hidden                  # hidden | cheap_embed | random
experts_per_token: 2
shared_weights: base               # attention/norms/embeddings: base | average
shared_expert: none                # none | base | average (MLP of the base / of the fine-tunes):
                                   # a shared expert makes it a Qwen2-MoE
shared_expert_weight: 0.5          # block = (1-w) * routed + w * shared
experts:
  - source_model: ./ft-math
    checkpoint_id: 7
    positive_prompts: ["Solve 12+7", "What is 3*4?"]
    negative_prompts: ["Write a poem"]
  - source_model: ./ft-code
    checkpoint_id: 8
    positive_token_ids: [[5, 9, 2]]  # instead of text, for models without a tokenizer
"""


_SETTINGS = (
    "gate_mode",
    "experts_per_token",
    "shared_weights",
    "seed",
    "architecture",
    "shared_expert",
    "shared_expert_weight",
)


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1)


def _tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as exc:
        _fail(
            f"text prompts need a tokenizer, and '{folder}' has none ({exc}); give token ids instead"
        )


def _prompts(entry: dict[str, Any], sign: str, tokenizer: Any) -> list[Any]:
    import torch

    ids = [torch.tensor(row, dtype=torch.long) for row in entry.get(f"{sign}_token_ids") or []]
    texts = entry.get(f"{sign}_prompts") or []
    if texts:
        tokenizer = tokenizer()
        ids += [tokenizer(text, return_tensors="pt").input_ids for text in texts]
    return ids


def _load_build_config(path: Path) -> dict[str, Any]:
    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        _fail(f"cannot read '{path}': {exc}")
    if not isinstance(config, dict) or "base_model" not in config or not config.get("experts"):
        _fail(f"'{path}' needs 'base_model' and a list of 'experts'; example:\n{BUILD_EXAMPLE}")
    unknown = set(config) - {
        "base_checkpoint_id",
        "base_model",
        "gate_mode",
        "experts_per_token",
        "shared_weights",
        "seed",
        "experts",
        *_SETTINGS,
    }
    if unknown:
        _fail(f"unknown key(s) in '{path}': {', '.join(sorted(unknown))}")
    return config


@moe_app.command(
    "build",
    help="Build a Mixtral (or, with a shared expert, a Qwen2-MoE): each fine-tune's MLP "
    "becomes one expert.\n\n"
    "Config (YAML):\n\n" + BUILD_EXAMPLE.replace("\n", "\n\n"),
)
def build_command(
    config: Annotated[Path, typer.Option("--config", "-c", help="MoE build YAML (see above).")],
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Model folder to write (must be empty).")
    ],
    register: Annotated[
        bool,
        typer.Option(
            "--register",
            help="Register the MoE (kind merged, base base_checkpoint_id) "
            "with lineage to every expert's checkpoint_id.",
        ),
    ] = False,
    name: Annotated[
        str | None, typer.Option(help="Checkpoint name (--register; default: --out's name).")
    ] = None,
    registry_url: Annotated[
        str | None, typer.Option("--registry-url", help="Registry URL (default: CKREG_API_URL).")
    ] = None,
    token: Annotated[
        str | None, typer.Option("--token", help="API token (default: CKREG_TOKEN).")
    ] = None,
) -> None:
    from mergeops.moe.build import BuildParams, build_moe
    from mergeops.moe.experts import MoeError

    spec = _load_build_config(config)
    expert_ids = _registry_ids(spec) if register else []
    settings = {k: spec[k] for k in _SETTINGS if k in spec}
    try:
        base, experts = _expert_sources(spec, config.parent)
        result = build_moe(base, experts, out, BuildParams(**settings))
    except (MoeError, ValueError, TypeError, OSError) as exc:
        _fail(str(exc))
    typer.echo(
        f"wrote {result.out_dir}: {result.num_experts} experts per layer, {result.bytes_written} bytes"
    )
    if register:
        checkpoint = _register_hooks["build"](
            out,
            base_id=spec.get("base_checkpoint_id"),
            expert_ids=expert_ids,
            name=name,
            url=registry_url,
            token=token,
        )
        typer.echo(
            f"registered MoE {checkpoint['id']} ({checkpoint['name']}) from experts {expert_ids}"
        )


def _registry_ids(spec: dict[str, Any]) -> list[int]:
    """Every expert's ``checkpoint_id``, checked before anything is built."""
    if "build" not in _register_hooks:
        _fail("--register is not available here (no registry client)")
    ids = [e.get("checkpoint_id") for e in spec["experts"]]
    missing = [i for i, value in enumerate(ids) if not isinstance(value, int)]
    if missing:
        _fail(
            f"--register needs 'checkpoint_id' (a registry id) on every expert; missing on expert(s) {missing}"
        )
    return [int(i) for i in ids if i is not None]


def _expert_sources(spec: dict[str, Any], root: Path) -> tuple[Path, list[Any]]:
    from mergeops.moe.build import ExpertSource

    base = root / spec["base_model"]
    cached: dict[str, Any] = {}

    def tokenizer() -> Any:  # loaded once, and only when some prompt is text
        if "tokenizer" not in cached:
            cached["tokenizer"] = _tokenizer(base)
        return cached["tokenizer"]

    experts = [
        ExpertSource(
            root / e["source_model"],
            _prompts(e, "positive", tokenizer),
            _prompts(e, "negative", tokenizer),
        )
        for e in spec["experts"]
    ]
    return base, experts


def _calibration(path: Path, model_dir: Path) -> list[Any]:
    import torch

    if path.suffix == ".json":
        rows = json.loads(path.read_text())
        return [torch.tensor(row, dtype=torch.long) for row in rows]
    tokenizer = _tokenizer(model_dir)
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    return [tokenizer(line, return_tensors="pt").input_ids for line in lines]


@moe_app.command("compress", help="Merge each MoE layer's N experts into --num-experts (M < N).")
def compress_command(
    model: Annotated[
        Path, typer.Argument(help="MoE model folder (Mixtral, Qwen2/3-MoE, DeepSeek-V3).")
    ],
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Model folder to write (must be empty).")
    ],
    num_experts: Annotated[
        int, typer.Option("--num-experts", "-m", min=1, help="Experts per layer after merging.")
    ],
    calibration: Annotated[
        Path,
        typer.Option(
            help="Calibration inputs: a .txt (one prompt a line, tokenized with the model's "
            "tokenizer) or a .json list of token-id lists."
        ),
    ],
    method: Annotated[
        str, typer.Option(help="mc_smoe | sub_moe | average (naive, neighbours).")
    ] = "mc_smoe",
    rank: Annotated[
        int | None, typer.Option(min=1, help="sub_moe: rank of the shared basis.")
    ] = None,
    low_rank: Annotated[
        int | None, typer.Option(min=1, help="mc_smoe: low-rank + sparse compression rank.")
    ] = None,
    align: Annotated[
        bool, typer.Option(help="Permute neurons onto each group's leader first.")
    ] = True,
    factored: Annotated[
        bool,
        typer.Option(
            help="sub_moe with --rank: store each merged expert as its two SVD factors "
            "(ckreg's own layout, fewer bytes; from_pretrained cannot load it: run "
            "`ckreg moe materialize` to get dense experts back)."
        ),
    ] = False,
    leaders: Annotated[
        str,
        typer.Option(
            help="mc_smoe group leaders: frequency (the M most used, as in the paper) | diverse "
            "(most used, then farthest-point on centred router-logit similarity; twins never "
            "both lead)."
        ),
    ] = "frequency",
    source_id: Annotated[
        int | None,
        typer.Option(
            "--register",
            help="Register the result as a merged child (lineage input) "
            "of this registry checkpoint id, with experts and bytes as metrics.",
        ),
    ] = None,
    name: Annotated[str | None, typer.Option(help="Checkpoint name (--register).")] = None,
    registry_url: Annotated[
        str | None, typer.Option("--registry-url", help="Registry URL (default: CKREG_API_URL).")
    ] = None,
    token: Annotated[
        str | None, typer.Option("--token", help="API token (default: CKREG_TOKEN).")
    ] = None,
) -> None:
    from mergeops.moe.compress import compress_moe
    from mergeops.moe.experts import MoeError

    if method not in ("mc_smoe", "sub_moe", "average"):
        _fail(f"unknown method '{method}'; available: mc_smoe, sub_moe, average")
    if source_id is not None and "compress" not in _register_hooks:
        _fail("--register is not available here (no registry client)")
    if leaders not in ("frequency", "diverse"):
        _fail(f"unknown --leaders '{leaders}'; available: frequency, diverse")
    options: dict[str, Any] = {
        "align": align,
        "rank": rank,
        "leaders": leaders,
        "factored": factored,
    }
    if low_rank is not None:
        options["low_rank"] = low_rank
    try:
        inputs = _calibration(calibration, model)
        result = compress_moe(model, out, method, num_experts, inputs, **options)  # type: ignore[arg-type]
    except (MoeError, ValueError, TypeError, OSError) as exc:
        _fail(str(exc))
    saved = result.bytes_before - result.bytes_after
    typer.echo(
        f"wrote {result.out_dir}: {result.experts_before} -> {result.experts_after} experts per layer, "
        f"{result.bytes_after} bytes ({saved} saved)"
    )
    if source_id is not None:
        metrics = {
            "moe/experts_before": float(result.experts_before),
            "moe/experts_after": float(result.experts_after),
            "moe/bytes_saved_fraction": saved / result.bytes_before if result.bytes_before else 0.0,
        }
        checkpoint = _register_hooks["compress"](
            out, source_id=source_id, metrics=metrics, name=name, url=registry_url, token=token
        )
        typer.echo(
            f"registered {checkpoint['id']} ({checkpoint['name']}), compressed from {source_id}"
        )


@moe_app.command(
    "materialize",
    help="Multiply a factored MoE (compress --factored) out into dense experts: a folder "
    "AutoModelForCausalLM.from_pretrained loads.",
)
def materialize_command(
    model: Annotated[Path, typer.Argument(help="Factored MoE folder.")],
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Model folder to write (must be empty).")
    ],
) -> None:
    from mergeops.moe.experts import MoeError
    from mergeops.moe.factored import materialize

    try:
        materialize(model, out)
    except (MoeError, ValueError, OSError) as exc:
        _fail(str(exc))
    size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    typer.echo(f"wrote {out}: dense experts, {size} bytes")
