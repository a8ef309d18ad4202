"""Low-rank fine-tunes of the LM zoo, folded into full checkpoints (issue 19, round 3).

A real fine-tune of a large pretrained model moves it little; on the zoo's 0.3 M-parameter
model a full fine-tune that learns its task moves every weight (‖τ‖/‖θ0‖ ≈ 0.13) and forgets
the other tasks. ``lowrank_finetune`` trains LoRA factors (https://arxiv.org/abs/2106.09685)
on the attention and MLP projections only (embeddings and norms stay the base's), then folds
``W + (alpha/r)·B·A`` into full weights, so every merge method sees an ordinary full checkpoint
whose task vector is rank ``r`` per projection. Trajectory points are folded copies.

A LoRA run has no optimizer state for the full weights; the second moments the zoo ships
(OTA reads them) are Adam's ``exp_avg_sq`` over ``config.moment_steps`` steps at learning
rate 0 on the folded model and the fine-tune's own batches (the weights do not move).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch

Trajectory = list[tuple[int, float, dict[str, torch.Tensor]]]
#: The projections a LoRA adapter (and a low-rank fine-tune) trains.
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def lora_model(base: torch.nn.Module, rank: int) -> Any:
    """A PEFT LoRA model on a copy of ``base`` (alpha = 2r; B starts at zero: it equals the base)."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        lora_dropout=0.0,
        target_modules=list(TARGETS),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(copy.deepcopy(base), lora)


def folded(model: Any) -> torch.nn.Module:
    """A plain model with the LoRA factors folded into its weights (``model`` is untouched)."""
    return copy.deepcopy(model).merge_and_unload()


def _folded_state(model: Any) -> dict[str, torch.Tensor]:
    from bench.lmzoo.train import saved_state

    return saved_state(folded(model))


def second_moments(
    model: torch.nn.Module, sampler: Any, *, steps: int, batch_size: int
) -> torch.optim.Optimizer:
    """An Adam optimizer whose ``exp_avg_sq`` is filled by ``steps`` lr-0 steps on ``model``."""
    from bench.lmzoo.model import answer_loss

    optimizer = torch.optim.Adam(model.parameters(), lr=0.0)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for _ in range(steps):
        loss = answer_loss(model, sampler.next(batch_size))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    moved = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    if moved:
        raise RuntimeError(f"second-moment steps moved weights {moved[:3]}: lr must be 0")
    return optimizer


def lowrank_finetune(
    base: torch.nn.Module,
    sampler: Any,
    config: Any,
    *,
    save_at: Sequence[int],
    fit: Callable[..., Trajectory],
) -> tuple[torch.nn.Module, torch.optim.Optimizer, Trajectory]:
    """(folded model, optimizer holding its second moments, folded trajectory) of a rank
    ``config.finetune_rank`` fine-tune at ``config.finetune_lr`` for ``config.finetune_steps``."""
    model = lora_model(base, config.finetune_rank)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=config.finetune_lr)
    saved = fit(
        model,
        optimizer,
        sampler,
        steps=config.finetune_steps,
        batch_size=config.batch_size,
        save_at=save_at,
        snapshot=_folded_state,
    )
    plain = model.merge_and_unload().eval().requires_grad_(True)  # PEFT froze the base
    moments = second_moments(
        plain, sampler, steps=config.moment_steps, batch_size=config.batch_size
    )
    return plain, moments, saved
