"""``ckreg moe build-flow`` / ``ckreg moe compress-flow``: run the MoE flows server-side.

Like ``ckreg worker``, these use the registry's database and store directly (CKREG_DATABASE_URL,
CKREG_HOME, CKREG_STORE_URL) rather than the REST API: inputs are checkpoint ids, the output is
registered with its lineage (and, for compress, its metrics) as ``flows.moe_flow`` describes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml

moe_flow_app = typer.Typer()

SPEC_EXAMPLE = """\
base_checkpoint_id: 1
shared_expert: base            # optional; any `ckreg moe build` setting
experts:
  - checkpoint_id: 7
    positive_prompts: ["Solve 12+7"]
  - checkpoint_id: 8
    positive_token_ids: [[5, 9, 2]]
"""


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1)


def _read(path: Path) -> Any:
    try:
        text = path.read_text()
        return json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        _fail(f"cannot read '{path}': {exc}")


@moe_flow_app.command(
    "build-flow",
    help="Server-side: build an MoE from registry checkpoints (the moe_build flow) and register "
    "it with lineage to every expert and the base.\n\nSpec (YAML):\n\n"
    + SPEC_EXAMPLE.replace("\n", "\n\n"),
)
def build_flow_command(
    spec: Annotated[Path, typer.Option("--spec", "-c", help="Build spec (YAML, see above).")],
    name: Annotated[str, typer.Option(help="Name of the registered MoE checkpoint.")],
) -> None:
    from flows.moe_flow import moe_build
    from registry.errors import RegistryError

    body = _read(spec)
    if not isinstance(body, dict):
        _fail(f"'{spec}' must hold a mapping; example:\n{SPEC_EXAMPLE}")
    try:
        checkpoint_id = moe_build(body, name=name)
    except (ValueError, RegistryError) as exc:
        _fail(str(exc))
    typer.echo(f"registered MoE {checkpoint_id} ({name})")


@moe_flow_app.command(
    "compress-flow",
    help="Server-side: merge a registered MoE's experts (the moe_compress flow) and register the "
    "result as its child with metrics (experts, bytes saved, calibration NLL before/after).",
)
def compress_flow_command(
    source_id: Annotated[int, typer.Argument(help="Registry id of the MoE checkpoint.")],
    num_experts: Annotated[
        int, typer.Option("--num-experts", "-m", min=1, help="Experts per layer after merging.")
    ],
    calibration: Annotated[
        Path, typer.Option(help="Calibration inputs: a .json list of token-id lists.")
    ],
    method: Annotated[str, typer.Option(help="mc_smoe | sub_moe | average.")] = "mc_smoe",
    name: Annotated[str | None, typer.Option(help="Name of the registered child.")] = None,
    rank: Annotated[int | None, typer.Option(min=1, help="sub_moe: rank.")] = None,
    factored: Annotated[bool, typer.Option(help="sub_moe: keep the factors.")] = False,
    leaders: Annotated[str, typer.Option(help="mc_smoe: frequency | diverse.")] = "frequency",
) -> None:
    from flows.moe_flow import moe_compress
    from registry.errors import RegistryError

    rows = _read(calibration)
    if not isinstance(rows, list) or not all(isinstance(r, list) for r in rows):
        _fail(f"'{calibration}' must hold a JSON list of token-id lists")
    options: dict[str, Any] = {"leaders": leaders, "factored": factored}
    if rank is not None:
        options["rank"] = rank
    try:
        child = moe_compress(source_id, num_experts, rows, method, name, options)
    except (ValueError, RegistryError) as exc:
        _fail(str(exc))
    typer.echo(f"registered {child}, compressed from {source_id}")
