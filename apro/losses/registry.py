"""Full training losses by name: unary term + one method's pairwise term, as the paper compares them.

``BOX_MASK_LOSSES[name](logits, box_mask, image, tree=None)`` is the whole mask loss of a
box-supervised instance head: ``3.0 * box_projection_loss`` (SOLOv2's weight) plus the
method's pairwise term with its weight. ``SPARSE_LOSSES[name](logits, labels, image, tree=None)``
is partial cross-entropy plus the method's unlabeled-pixel term.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple, Union

import torch
from torch import nn

from ._inputs import check_image, check_valid, check_weight, normalized_guide, raw_guide, work_dtype
from .box import _apro_box_terms, box_projection_loss
from .crf import crf_loss
from .pairwise import pairwise_loss
from .sparse import _apro_sparse_terms, partial_cross_entropy
from .tree_filter import _tree_energy_terms, _tree_filter_box_terms

PROJECTION_WEIGHT = 3.0
CRF_WEIGHT = 3.0 * 0.5 / 4.0  # MAL weighs CRF 0.5 against its projection (MIL) loss 4.0
_APRO = dict(zeta_gl=0.01, zeta_gh=0.07, zeta_s=0.15, kernel_size=5, iterations=20, global_weight=2.0, local_weight=1.0)
_APRO_SPARSE = dict(zeta_g=0.01, zeta_gh=0.07, zeta_s=0.15, kernel_size=5, iterations=20, weight=0.4, ignore_index=255)
_APRO_NAMES = {"apro": "gp-lp-p", "gp": "gp", "lp": "lp", "gp-lp-c": "gp-lp-c", "lp-gp-c": "lp-gp-c"}


# Settings ``box_mask_loss(..., options=)`` may change (the Mask2Former head's: projection 5.0,
# GP on a fixed 96 x 96 grid with its zetas, terms over the total box area).
BOX_LOSS_OPTIONS = ("projection_weight", "normalization", "gp_size", *_APRO)


def check_box_loss_options(options) -> dict:
    """``options``: None or a dict with keys of :data:`BOX_LOSS_OPTIONS`; returns a copy."""
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise TypeError(f"options must be a dict or None, got {type(options).__name__}")
    unknown = sorted(set(options) - set(BOX_LOSS_OPTIONS))
    if unknown:
        raise ValueError(f"options: unknown key(s) {', '.join(unknown)}; known: {', '.join(BOX_LOSS_OPTIONS)}")
    return dict(options)


def check_box_loss(name: str, options=None) -> dict:
    """Check a box mask loss and its ``options`` where a model is built, not at its first step.

    Keys and values are checked by one call of the loss on a 4 x 4 box, so every setting is
    refused with the message the loss itself would give. Returns a copy of the options."""
    if name not in BOX_MASK_LOSSES:
        raise ValueError(f"unknown box mask loss {name!r}; choose one of {', '.join(BOX_MASK_LOSSES)}")
    try:
        options = check_box_loss_options(options)
    except TypeError as err:
        raise ValueError(str(err)) from None
    try:
        _box_terms(name, torch.zeros(1, 1, 4, 4), torch.ones(1, 1, 4, 4), torch.zeros(1, 3, 4, 4), None, options)
    except TypeError as err:
        raise ValueError(str(err)) from None
    return options


def _box_terms(name: str, logits, box_mask, image, tree, options=None) -> Dict[str, torch.Tensor]:
    """Weighted terms of ``BOX_MASK_LOSSES[name]`` (they sum to the loss)."""
    check_image(image, logits, "logits")
    options = check_box_loss_options(options)
    projection_weight = check_weight(options.pop("projection_weight", PROJECTION_WEIGHT), "projection_weight")
    normalization = options.get("normalization", "instance")
    apro = {**_APRO, **options}
    lp = (apro["zeta_s"], apro["kernel_size"], apro["iterations"])
    terms = {"projection": projection_weight * box_projection_loss(logits, box_mask)}
    if name in _APRO_NAMES:
        terms.update(_apro_box_terms(logits, box_mask, image, _APRO_NAMES[name], tree=tree, **apro))
    elif name == "pairwise":
        terms["pairwise"] = pairwise_loss(logits, box_mask, image)
    elif name == "treefilter":
        terms.update(_tree_filter_box_terms(logits, box_mask, image, 0.02, tree, 2.0, None, *lp, normalization))
    elif name == "treefilter-local":
        terms.update(_tree_filter_box_terms(logits, box_mask, image, 0.02, tree, apro["global_weight"],
                                            apro["local_weight"], *lp, normalization))
    elif name == "crf":
        terms["crf"] = crf_loss(logits, box_mask, image, weight=CRF_WEIGHT)
    elif name != "projection":
        raise ValueError(f"unknown box mask loss {name!r}; choose one of {', '.join(BOX_MASK_LOSSES)}")
    return terms


def _sparse_terms(name: str, logits, labels, image, tree, valid=None) -> Dict[str, torch.Tensor]:
    """Weighted terms of ``SPARSE_LOSSES[name]`` (they sum to the loss)."""
    terms = {"pce": partial_cross_entropy(logits, labels, 255)}
    if name in _APRO_NAMES:
        terms.update(_apro_sparse_terms(logits, labels, image, _APRO_NAMES[name], tree=tree, valid=valid,
                                        **_APRO_SPARSE))
    elif name == "treeenergy":
        terms.update(_tree_energy_terms(logits, labels, image, 0.02, 0.4, 255, tree, valid=valid))
    elif name == "pce":
        check_image(image, logits, "logits")
        check_valid(valid, labels)  # pCE reads labeled pixels only; a bad mask is still refused
    else:
        raise ValueError(f"unknown sparse loss {name!r}; choose one of {', '.join(SPARSE_LOSSES)}")
    return terms


def _total(terms: Dict[str, torch.Tensor], return_terms: bool):
    total = sum(terms.values())
    if not return_terms:
        return total
    report = {k: float(v.detach()) for k, v in terms.items()}
    report["total"] = float(total.detach())
    return total, report


def box_mask_loss(
    name: str,
    logits: torch.Tensor,
    box_mask: torch.Tensor,
    image: torch.Tensor,
    tree=None,
    return_terms: bool = False,
    options: Optional[dict] = None,
) -> Union[torch.Tensor, Tuple[torch.Tensor, Dict[str, float]]]:
    """The full box-supervised mask loss ``name`` (a key of :data:`BOX_MASK_LOSSES`).

    Args:
        name: "projection", "pairwise", "treefilter", "treefilter-local", "crf", "gp", "lp",
            "apro" (GP-LP-P), "gp-lp-c" or "lp-gp-c".
        logits: ``(N, 1, H, W)``; box_mask: ``(N, 1, H, W)``; image: ``(N, 3, H, W)`` RGB in [0, 1].
        tree: optional prebuilt trees (``N`` of them) of ``tree_guide(name, image)``; ignored by
            losses without a tree.
        return_terms: also return ``{term: float}`` of the weighted terms plus "total".
        options: None (the released SOLOv2 head's settings) or a dict overriding some of
            :data:`BOX_LOSS_OPTIONS`: ``projection_weight`` (3.0), ``normalization``
            ("instance"; "total" divides the GP, LP and tree-filter terms by the total box area
            of all instances), ``gp_size`` (None; an int or ``(h, w)`` runs GP on that grid and
            resizes the result back, ``tree`` then being trees of that grid), and the APro
            keywords of :func:`apro_box_loss` (``zeta_gl`` 0.01, ``zeta_gh`` 0.07, ``zeta_s``
            0.15, ``kernel_size`` 5, ``iterations`` 20, ``global_weight`` 2.0 — also the tree
            filter's weight in "treefilter-local" — and ``local_weight`` 1.0). The BoxInst
            pairwise and CRF terms keep their own normalisation.

    Returns:
        Scalar tensor, or ``(scalar, terms)``.
    """
    if name not in BOX_MASK_LOSSES:
        raise ValueError(f"unknown box mask loss {name!r}; choose one of {', '.join(BOX_MASK_LOSSES)}")
    return _total(_box_terms(name, logits, box_mask, image, tree, options), return_terms)


def sparse_loss(
    name: str,
    logits: torch.Tensor,
    labels: torch.Tensor,
    image: torch.Tensor,
    tree=None,
    return_terms: bool = False,
    valid: Optional[torch.Tensor] = None,
):
    """The full point/scribble loss ``name`` (a key of :data:`SPARSE_LOSSES`); like :func:`box_mask_loss`.

    ``valid``: optional ``(N, H, W)`` bool mask of the real (not padded) pixels; padding is left
    out of the pairwise term and cut from its trees and windows (see :func:`apro_sparse_loss`).
    """
    if name not in SPARSE_LOSSES:
        raise ValueError(f"unknown sparse loss {name!r}; choose one of {', '.join(SPARSE_LOSSES)}")
    return _total(_sparse_terms(name, logits, labels, image, tree, valid), return_terms)


def tree_guide(name: str, image: torch.Tensor) -> torch.Tensor:
    """The guide whose minimum spanning tree the loss ``name`` uses (to prebuild and share trees).

    ``image``: ``(N, 3, H, W)`` RGB in [0, 1] at the logits' resolution. The tree filter losses
    ("treefilter", "treefilter-local", "treeenergy") use the raw image; the others the
    ImageNet-normalised one. ``apro.minimum_spanning_tree(tree_guide(name, image))``.
    """
    if name not in BOX_MASK_LOSSES and name not in SPARSE_LOSSES:
        choices = sorted(set(BOX_MASK_LOSSES) | set(SPARSE_LOSSES))
        raise ValueError(f"unknown loss {name!r}; choose one of {', '.join(choices)}")
    check_image(image, image, "image")
    dtype = work_dtype(image)
    return raw_guide(image, dtype) if name.startswith("tree") else normalized_guide(image, dtype)


def _make(terms_fn, name: str, doc: str) -> Callable:
    def loss(logits, label, image, tree=None):
        return sum(terms_fn(name, logits, label, image, tree).values())

    loss.__name__ = loss.__qualname__ = f"{name.replace('-', '_')}_loss"
    loss.__doc__ = doc
    return loss


_BOX_DOCS = {
    "projection": "3.0 * projection only (the unary-only baseline of Table 4).",
    "pairwise": "3.0 * projection + BoxInst pairwise loss (weight 1.0).",
    "treefilter": "3.0 * projection + 2.0 * tree filter term (Table 5).",
    "treefilter-local": "3.0 * projection + 2.0 * tree filter + 1.0 * LP term (Table 5).",
    "crf": "3.0 * projection + 0.375 * MAL mean-field CRF Dice loss.",
    "gp": "3.0 * projection + 2.0 * GP term (Table 4).",
    "lp": "3.0 * projection + 1.0 * LP term (Table 4).",
    "apro": "3.0 * projection + 2.0 * GP + 1.0 * LP, in parallel (GP-LP-P, Table 7).",
    "gp-lp-c": "3.0 * projection + 3.0 * L1 to LP(GP(p)) (Table 7).",
    "lp-gp-c": "3.0 * projection + 3.0 * L1 to GP(LP(p)) (Table 7).",
}
_SPARSE_DOCS = {
    "pce": "Partial cross-entropy only.",
    "treeenergy": "Partial cross-entropy + 0.4 * tree energy term (TEL).",
    "gp": "Partial cross-entropy + 0.4 * GP term.",
    "lp": "Partial cross-entropy + 0.4 * LP term.",
    "apro": "Partial cross-entropy + 0.4 * (GP + LP terms), in parallel.",
    "gp-lp-c": "Partial cross-entropy + 0.8 * L1 to LP(GP(p)).",
    "lp-gp-c": "Partial cross-entropy + 0.8 * L1 to GP(LP(p)).",
}

BOX_MASK_LOSSES: Dict[str, Callable] = {n: _make(_box_terms, n, d) for n, d in _BOX_DOCS.items()}
SPARSE_LOSSES: Dict[str, Callable] = {n: _make(_sparse_terms, n, d) for n, d in _SPARSE_DOCS.items()}


class BoxMaskLoss(nn.Module):
    """Module form of :func:`box_mask_loss` for one ``name``: ``forward(logits, box_mask, image, tree=None)``."""

    def __init__(self, name: str = "apro"):
        super().__init__()
        if name not in BOX_MASK_LOSSES:
            raise ValueError(f"unknown box mask loss {name!r}; choose one of {', '.join(BOX_MASK_LOSSES)}")
        self.name = name

    def forward(self, logits, box_mask, image, tree=None, return_terms: bool = False):
        return box_mask_loss(self.name, logits, box_mask, image, tree=tree, return_terms=return_terms)

    def extra_repr(self) -> str:
        return f"name={self.name!r}"


class SparseLoss(nn.Module):
    """Module form of :func:`sparse_loss` for one ``name``: ``forward(logits, labels, image, tree=None, valid=None)``."""

    def __init__(self, name: str = "apro"):
        super().__init__()
        if name not in SPARSE_LOSSES:
            raise ValueError(f"unknown sparse loss {name!r}; choose one of {', '.join(SPARSE_LOSSES)}")
        self.name = name

    def forward(self, logits, labels, image, tree=None, return_terms: bool = False, valid=None):
        return sparse_loss(self.name, logits, labels, image, tree=tree, return_terms=return_terms, valid=valid)

    def extra_repr(self) -> str:
        return f"name={self.name!r}"
