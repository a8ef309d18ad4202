"""``ckreg extract-lora``: a fine-tune minus its base as a PEFT LoRA adapter folder.

mergeops may not import the registry client, so ``--register`` goes through a hook that the
``ckreg`` app passes in: ``flows/cli.py`` mounts ``make_extract_lora_command(register_adapter)``
with ``registry.client.adapters.register_adapter``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

RegisterHook = Callable[..., dict[str, Any]]

RANK_RULE = (
    "Each differing 2-D weight W_ft - W_base = U S V^T keeps rank "
    "r = min(--max-rank, number of singular values > --sv-epsilon * largest singular value); "
    "B = U_r sqrt(S_r), A = sqrt(S_r) V_r^T, lora_alpha = r (scale 1), other ranks in "
    "rank_pattern."
)


def make_extract_lora_command(register: RegisterHook | None = None) -> Callable[..., None]:
    """The typer command; ``register(path, base_id=, name=, url=, token=)`` backs --register."""

    def extract_lora_command(
        base: Annotated[Path, typer.Option("--base", help="Base model folder or .safetensors.")],
        model: Annotated[
            Path, typer.Option("--model", help="Fine-tuned model folder or .safetensors.")
        ],
        out: Annotated[Path, typer.Option("--out", "-o", help="Adapter folder to write.")],
        max_rank: Annotated[
            int, typer.Option("--max-rank", min=1, help="Largest LoRA rank per module.")
        ] = 16,
        sv_epsilon: Annotated[
            float,
            typer.Option(
                "--sv-epsilon",
                min=0.0,
                max=0.999999,
                help="Drop singular values <= this fraction of the module's largest one.",
            ),
        ] = 0.0,
        embeddings: Annotated[
            bool,
            typer.Option(
                "--embeddings/--no-embeddings",
                help="Factorise embed_tokens (lora_embedding_A/B) and lm_head too; by "
                "default a changed embed_tokens or lm_head is stored whole in modules_to_save.",
            ),
        ] = False,
        device: Annotated[str, typer.Option(help="auto (CUDA when present), cpu, cuda:N.")] = (
            "auto"
        ),
        overwrite: Annotated[bool, typer.Option(help="Replace a non-empty --out.")] = False,
        progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
        register_flag: Annotated[
            bool,
            typer.Option("--register", help="Register the adapter as kind adapter of --base-id."),
        ] = False,
        base_id: Annotated[
            int | None, typer.Option("--base-id", help="Registry id of the base (--register).")
        ] = None,
        name: Annotated[
            str | None, typer.Option(help="Checkpoint name (--register; default: --out's name).")
        ] = None,
        registry_url: Annotated[
            str | None,
            typer.Option("--registry-url", help="Registry URL (default: CKREG_API_URL)."),
        ] = None,
        token: Annotated[
            str | None, typer.Option("--token", help="API token (default: CKREG_TOKEN).")
        ] = None,
    ) -> None:
        from mergeops.io.writer import OutputError
        from mergeops.lora_extract import ExtractError, extract_lora

        if register_flag and (register is None or base_id is None):
            reason = "needs --base-id" if register is not None else "is not available here"
            raise typer.BadParameter(f"--register {reason}")
        try:
            report = extract_lora(base, model, out, max_rank=max_rank, sv_epsilon=sv_epsilon,
                                  embeddings=embeddings, device=device, overwrite=overwrite,
                                  progress=progress)  # fmt: skip
        except (ExtractError, OutputError, ValueError) as exc:
            typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
            raise typer.Exit(1) from exc
        typer.echo(f"wrote {out}: {report.summary()}")
        if register_flag and register is not None:
            checkpoint = register(out, base_id=base_id, name=name, url=registry_url, token=token)
            typer.echo(f"registered adapter {checkpoint['id']} ({checkpoint['name']})")

    extract_lora_command.__doc__ = (
        "Extract a PEFT LoRA adapter (adapter_model.safetensors + adapter_config.json) from "
        f"--model minus --base by truncated SVD, one tensor at a time.\n\n{RANK_RULE} Changed "
        "norms, biases and other non-matrix tensors go whole into modules_to_save.\n\n"
        "Example: ckreg extract-lora --base llama-base --model llama-math --out math-lora "
        "--max-rank 32"
    )
    return extract_lora_command


extract_lora_command = make_extract_lora_command()
