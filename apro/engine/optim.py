"""Optimizer and learning-rate schedule built from an :class:`~apro.engine.config.EngineConfig`."""
from __future__ import annotations

import math

import torch
from torch import nn


def build_optimizer(model: nn.Module, config) -> torch.optim.Optimizer:
    """SGD with momentum or AdamW over the trainable parameters; no decay on norms and biases.

    ``config.lr_multipliers`` (prefix -> factor, longest prefix wins) scales the learning rate of
    the parameters whose names start with a prefix; a prefix matching no trainable parameter is
    an error (a typo would otherwise train everything at the base rate).
    """
    multipliers = dict(getattr(config, "lr_multipliers", None) or {})
    by_prefix = sorted(multipliers, key=len, reverse=True)
    used = set()
    groups: dict = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        prefix = next((k for k in by_prefix if name.startswith(k)), None)
        if prefix is not None:
            used.add(prefix)
        factor = float(multipliers[prefix]) if prefix is not None else 1.0
        groups.setdefault((factor, p.ndim <= 1), []).append(p)
    unused = sorted(set(multipliers) - used)
    if unused:
        raise ValueError(f"lr_multipliers: prefix(es) {', '.join(map(repr, unused))} match no trainable parameter "
                         "(names look like 'backbone.blocks.0.conv.weight')")
    if not groups:
        raise ValueError("the model has no trainable parameters")
    # base-rate groups first, decayed before not decayed: without multipliers the groups (and so
    # the optimizer state of older checkpoints) are what they always were
    order = sorted(groups, key=lambda key: (key[0] != 1.0, key[0], key[1]))
    param_groups = [{"params": groups[key], "weight_decay": 0.0 if key[1] else config.weight_decay,
                     "lr": config.lr * key[0]} for key in order]
    if config.optimizer == "sgd":
        return torch.optim.SGD(param_groups, lr=config.lr, momentum=config.momentum)
    return torch.optim.AdamW(param_groups, lr=config.lr)


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
