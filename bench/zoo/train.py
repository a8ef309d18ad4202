"""Seeded training routines of the zoo: pretraining, Adam fine-tunes with trajectories, Fisher.

Each task fine-tunes the pretrained backbone jointly with a freshly initialised task head (as
task-vector papers fine-tune a shared encoder under task-specific heads). The pretrained
backbone under a task's final head is therefore a weak reference, as a zero-shot model is, and a
merged backbone shows how much of each fine-tune's gain it keeps. Only backbones are merged.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from pydantic import BaseModel, ConfigDict
from torch.func import grad, vmap

from bench.zoo.data import TaskData
from bench.zoo.model import (
    Params,
    init_backbone,
    init_linear,
    logits,
    mean_loss,
)


class TrainConfig(BaseModel):
    """Hyperparameters of every training phase (defaults build the full zoo in seconds)."""

    model_config = ConfigDict(frozen=True)

    hidden: int = 512
    features: int = 64
    batch_size: int = 64
    pretrain_epochs: int = 30
    pretrain_lr: float = 3e-3
    finetune_epochs: int = 10
    finetune_lr: float = 1e-3
    trajectory_points: int = 6
    fisher_examples: int = 512  # train examples the Fisher is averaged over
    fisher_chunk: int = 128


@dataclass(frozen=True)
class TrajectoryPoint:
    """One checkpoint along a fine-tuning run: its step, full-train-set loss, backbone, head."""

    step: int
    loss: float
    backbone: dict[str, torch.Tensor]
    head: dict[str, torch.Tensor]


@dataclass(frozen=True)
class FinetuneResult:
    """A fine-tuned backbone and head, the backbone's Adam second moments, and the trajectory."""

    backbone: dict[str, torch.Tensor]
    head: dict[str, torch.Tensor]
    second_moment: dict[str, torch.Tensor]
    trajectory: list[TrajectoryPoint]
    steps: int


def _batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    order = torch.randperm(n, generator=generator)
    yield from order.split(batch_size)


def _leaves(params: Params) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone().requires_grad_(True) for name, t in params.items()}


def _frozen(params: Params) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in params.items()}


def _adam_loop(
    trainable: dict[str, torch.Tensor],
    batch_loss: Callable[[torch.Tensor], torch.Tensor],
    *,
    n: int,
    epochs: int,
    lr: float,
    config: TrainConfig,
    generator: torch.Generator,
    after_step: Callable[[int], None] | None = None,
) -> torch.optim.Adam:
    """Minimise ``batch_loss`` over shuffled mini-batches; returns the optimizer (its state)."""
    optimizer = torch.optim.Adam(list(trainable.values()), lr=lr)
    step = 0
    for _ in range(epochs):
        for idx in _batches(n, config.batch_size, generator):
            optimizer.zero_grad(set_to_none=True)
            batch_loss(idx).backward()
            optimizer.step()
            step += 1
            if after_step is not None:
                after_step(step)
    return optimizer


def pretrain(
    data: TaskData, *, n_classes: int, config: TrainConfig, generator: torch.Generator
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Train backbone and head from scratch; returns (backbone, head)."""
    backbone = _leaves(init_backbone(generator, config.hidden, config.features))
    head = _leaves(init_linear(n_classes, config.features, generator))
    trainable = {**backbone, **{f"head.{k}": v for k, v in head.items()}}
    _adam_loop(
        trainable,
        lambda idx: mean_loss(backbone, head, data.x[idx], data.y[idx]),
        n=len(data.y),
        epochs=config.pretrain_epochs,
        lr=config.pretrain_lr,
        config=config,
        generator=generator,
    )
    return _frozen(backbone), _frozen(head)


def trajectory_steps(total_steps: int, points: int) -> list[int]:
    """Evenly spaced checkpoint steps ending at ``total_steps`` (at most ``points`` of them)."""
    points = max(1, min(points, total_steps))
    return sorted({math.ceil(total_steps * (i + 1) / points) for i in range(points)})


def finetune(
    base: Params,
    data: TaskData,
    *,
    n_classes: int,
    config: TrainConfig,
    generator: torch.Generator,
) -> FinetuneResult:
    """Fine-tune backbone and a new head with Adam, saving trajectory checkpoints."""
    backbone = _leaves(base)
    head = _leaves(init_linear(n_classes, config.features, generator))
    n = len(data.y)
    total = config.finetune_epochs * math.ceil(n / config.batch_size)
    save_at = set(trajectory_steps(total, config.trajectory_points))
    trajectory: list[TrajectoryPoint] = []

    def record(step: int) -> None:
        if step in save_at:
            with torch.no_grad():
                loss = mean_loss(backbone, head, data.x, data.y).item()
            trajectory.append(TrajectoryPoint(step, loss, _frozen(backbone), _frozen(head)))

    optimizer = _adam_loop(
        {**backbone, **{f"head.{k}": v for k, v in head.items()}},
        lambda idx: mean_loss(backbone, head, data.x[idx], data.y[idx]),
        n=n,
        epochs=config.finetune_epochs,
        lr=config.finetune_lr,
        config=config,
        generator=generator,
        after_step=record,
    )
    second_moment = {
        name: optimizer.state[tensor]["exp_avg_sq"].detach().clone()
        for name, tensor in backbone.items()
    }
    return FinetuneResult(_frozen(backbone), _frozen(head), second_moment, trajectory, total)


def diagonal_fisher(
    backbone: Params, head: Params, x: torch.Tensor, *, chunk: int = 256
) -> dict[str, torch.Tensor]:
    """True diagonal Fisher of the backbone: mean over x of sum_y p(y|x) (d log p(y|x))^2."""
    frozen_head = _frozen(head)
    params = _frozen(backbone)

    def log_prob(p: Params, example: torch.Tensor, cls: int) -> torch.Tensor:
        return torch.log_softmax(logits(p, frozen_head, example[None]), -1)[0, cls]

    n_classes = frozen_head["weight"].shape[0]
    fisher = {name: torch.zeros_like(t) for name, t in params.items()}
    for block in x.split(chunk):
        with torch.no_grad():
            probs = torch.softmax(logits(params, frozen_head, block), -1)
        for cls in range(n_classes):
            grads = vmap(grad(log_prob), in_dims=(None, 0, None))(params, block, cls)
            for name, g in grads.items():
                weight = probs[:, cls].reshape(-1, *([1] * (g.dim() - 1)))
                fisher[name] += (weight * g.square()).sum(0)
    return {name: f / x.shape[0] for name, f in fisher.items()}
