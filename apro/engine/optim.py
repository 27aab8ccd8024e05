"""Optimizer and learning-rate schedule built from an :class:`~apro.engine.config.EngineConfig`."""
from __future__ import annotations

import math

import torch
from torch import nn


def build_optimizer(model: nn.Module, config) -> torch.optim.Optimizer:
    """SGD with momentum or AdamW over the trainable parameters; no decay on norms and biases."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError("the model has no trainable parameters")
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum)
    return torch.optim.AdamW(groups, lr=config.lr)


class WarmupSchedule:
    """LR multiplier at step ``s``: linear warm-up from ``warmup_factor`` over ``warmup_steps``,
    then constant, step decay by ``gamma`` at each milestone fraction, or cosine to zero."""

    def __init__(self, config):
        self.steps = int(config.steps)
        self.warmup_steps = int(config.warmup_steps)
        self.warmup_factor = float(config.warmup_factor)
        self.schedule = config.schedule
        self.milestones = [int(round(m * self.steps)) for m in config.milestones]
        self.gamma = float(config.gamma)

    def __call__(self, step: int) -> float:
        if self.schedule == "step":
            factor = self.gamma ** sum(step >= m for m in self.milestones)
        elif self.schedule == "cosine":
            t = min(max(step - self.warmup_steps, 0) / max(self.steps - self.warmup_steps, 1), 1.0)
            factor = 0.5 * (1.0 + math.cos(math.pi * t))
        else:
            factor = 1.0
        if step < self.warmup_steps:
            alpha = step / self.warmup_steps
            factor *= self.warmup_factor * (1 - alpha) + alpha
        return factor


def build_scheduler(optimizer: torch.optim.Optimizer, config):
    """A ``LambdaLR`` stepping once per optimizer step with :class:`WarmupSchedule`."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupSchedule(config))
