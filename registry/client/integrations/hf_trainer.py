"""``CkregCallback``: a ``transformers.TrainerCallback`` that registers every checkpoint the
Trainer saves — step, loss, eval metrics, second moments (from ``optimizer.pt``, with the exact
parameter names of the live optimizer), run name and base — from a background thread.

    trainer = Trainer(..., callbacks=[CkregCallback(base_id=1, task="math")])

``on_save`` only snapshots the ``checkpoint-N`` folder (hard links: instant, and safe from
``save_total_limit`` rotation) and queues it; ``on_train_end`` waits at most
``flush_timeout_s`` for the uploads. A registry that is down costs one warning line.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from registry.client.integrations.uploader import (
    BackgroundRegistrar,
    RegistrationJob,
    RetryPolicy,
    log,
)
from registry.settings import get_settings

STAGING = ".ckreg-staging"  # under output_dir, so hard links stay on one filesystem


class CkregCallback(TrainerCallback):
    """Register each saved checkpoint as ``<run>-step<N>`` (kind ``finetune`` of ``base_id``).

    ``url`` / ``token`` default to ``CKREG_API_URL`` / ``CKREG_TOKEN``; ``run`` to
    ``args.run_name`` or the output folder's name; ``name_template`` may use ``{run}`` and
    ``{step}``. ``attempts`` tries per checkpoint with backoff from ``backoff_s``; at most
    ``queue_size`` checkpoints wait (more are skipped with a warning, training never blocks).
    """

    def __init__(
        self,
        base_id: int | None = None,
        *,
        url: str | None = None,
        token: str | None = None,
        task: str | None = None,
        run: str | None = None,
        tags: Iterable[str] = (),
        name_template: str = "{run}-step{step}",
        queue_size: int = 8,
        attempts: int = 5,
        backoff_s: float = 2.0,
        flush_timeout_s: float = 300.0,
    ) -> None:
        if base_id is None:
            log.warning(
                "ckreg: CkregCallback without base_id registers fine-tunes with no base; "
                "task-vector merges cannot use them (give the base checkpoint's id)"
            )
        settings = get_settings()
        self.url = url or settings.api_url
        self.token = token or settings.token
        self.base_id, self.task, self.run, self.tags = base_id, task, run, list(tags)
        self.name_template = name_template
        self.flush_timeout_s = flush_timeout_s
        self.registrar = BackgroundRegistrar(
            self._client,
            url=self.url,
            queue_size=queue_size,
            retry=RetryPolicy(attempts=attempts, backoff_s=backoff_s),
        )

    @property
    def registered(self) -> list[dict[str, Any]]:
        """The checkpoints registered so far (``CheckpointPublic``), in order."""
        return self.registrar.registered

    def _client(self) -> Any:
        from registry.client.api import Client

        return Client(self.url, token=self.token, timeout=120.0)

    def on_save(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        **kwargs: Any,
    ) -> None:
        if not state.is_world_process_zero:
            return
        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if not folder.is_dir():
            log.warning("ckreg: %s was not saved; nothing to register", folder)
            return
        run = self.run or args.run_name or Path(args.output_dir).resolve().name
        options = {
            "name": self.name_template.format(run=run, step=state.global_step),
            "kind": "finetune",
            "base_id": self.base_id,
            "task": self.task,
            "run": run,
            "step": state.global_step,
            "tags": self.tags,
            "metrics": trainer_metrics(state.log_history, state.global_step),
            "progress": False,
        }
        names = optimizer_order(kwargs.get("model"), kwargs.get("optimizer"))
        if names is not None:
            options["optimizer_param_names"] = names
        staged = snapshot(folder, Path(args.output_dir) / STAGING / folder.name)
        self.registrar.submit(RegistrationJob(staged, options, staged=True))

    def on_train_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        **kwargs: Any,
    ) -> None:
        if self.registrar.flush(self.flush_timeout_s):
            shutil.rmtree(Path(args.output_dir) / STAGING, ignore_errors=True)


def trainer_metrics(log_history: list[dict[str, Any]], step: int) -> dict[str, float]:
    """The newest ``loss`` and ``eval_*`` values logged at or before ``step``."""
    metrics: dict[str, float] = {}
    for entry in log_history:
        if entry.get("step", 0) > step:
            continue
        for key, value in entry.items():
            wanted = key == "loss" or (key.startswith("eval_") and not key.endswith("_per_second"))
            if wanted and isinstance(value, int | float) and not isinstance(value, bool):
                metrics[key] = float(value)
    return metrics


def optimizer_order(model: Any, optimizer: Any) -> list[str] | None:
    """Parameter names in the optimizer's order (what ``optimizer.pt`` indexes by), or None
    when the optimizer holds a parameter the model does not name (wrapped or sharded)."""
    if model is None or optimizer is None or not hasattr(optimizer, "param_groups"):
        return None
    by_id = {id(parameter): name for name, parameter in model.named_parameters()}
    names = [by_id.get(id(p)) for group in optimizer.param_groups for p in group["params"]]
    return None if any(name is None for name in names) else [str(n) for n in names]


def snapshot(folder: Path, target: Path) -> Path:
    """Hard-link ``folder``'s files into ``target`` (copy across filesystems); returns it."""
    shutil.rmtree(target, ignore_errors=True)
    for source in folder.rglob("*"):
        if not source.is_file():
            continue
        dest = target / source.relative_to(folder)
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(source, dest)
        except OSError:
            shutil.copy2(source, dest)
    return target
