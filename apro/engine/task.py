"""What a task supplies to the engine: its config class, data, model and training forward.

The engine (:func:`apro.engine.train`) knows nothing about boxes, points or classes; a task
is an object with the attributes below. :mod:`apro.tasks` registers the built-in tasks by
name, so that a checkpoint (which records its task's name) can be turned back into a model.
"""
from __future__ import annotations

from typing import Callable, Dict

import torch
from torch import nn
from torch.utils.data import Dataset

from .config import EngineConfig


class Task:
    """Base class of a task. Subclasses set ``name`` and ``config_class`` and implement
    :meth:`build_dataset`, :meth:`build_model` and :meth:`losses`."""

    name: str = "task"
    config_class: type = EngineConfig

    def build_dataset(self, config) -> Dataset:
        """The training dataset described by ``config``."""
        raise NotImplementedError

    def build_model(self, config, meta: dict) -> nn.Module:
        """The model described by ``config``; ``meta`` is :meth:`dataset_meta` of the training set."""
        raise NotImplementedError

    def collate_fn(self) -> Callable:
        """The DataLoader's ``collate_fn``."""
        return torch.utils.data.default_collate

    def losses(self, net: nn.Module, batch: dict, device: torch.device) -> Dict[str, torch.Tensor]:
        """One training forward: move ``batch`` to ``device``, run ``net`` and return its loss
        tensors as a dict including ``"loss"`` (the one that is back-propagated)."""
        raise NotImplementedError

    def dataset_meta(self, dataset) -> dict:
        """What inference needs besides the weights (saved in every checkpoint), e.g. the
        number of classes."""
        meta = {}
        if getattr(dataset, "num_classes", None) is not None:
            meta["num_classes"] = int(dataset.num_classes)
        return meta

    def inference_config(self, config):
        """``config`` as used to rebuild a trained model from a checkpoint (e.g. without
        loading pretrained backbone weights, which the checkpoint's weights replace)."""
        return config

    def describe(self, config) -> str:
        """A few words for the progress bar."""
        return f"train {self.name}"
