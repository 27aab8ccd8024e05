"""Training losses: APro's box and sparse-label losses and the methods the paper compares with.

Every loss takes logits (never probabilities), the label (box mask or sparse label map) and
the image as RGB in [0, 1] at the logits' resolution; each normalises the image as its
method requires (ImageNet mean/std for GP, LP and the CRF, LAB for BoxInst's pairwise loss,
raw RGB for the tree filter). Pseudo labels are detached; every loss returns a scalar.

- Box supervision (``(N, 1, H, W)`` logits and box masks): :func:`box_projection_loss`,
  :func:`apro_box_loss`, :func:`pairwise_loss`, :func:`tree_filter_box_loss`,
  :func:`tree_filter_local_box_loss`, :func:`crf_loss`; full losses by name in
  :data:`BOX_MASK_LOSSES` / :func:`box_mask_loss`.
- Sparse labels (``(B, K, H, W)`` logits, ``(B, H, W)`` labels with 255 = unlabeled):
  :func:`partial_cross_entropy`, :func:`apro_sparse_loss`, :func:`tree_energy_loss`; full
  losses in :data:`SPARSE_LOSSES` / :func:`sparse_loss`.
- Shared trees: ``minimum_spanning_tree(tree_guide(name, image))`` builds the tree a loss would
  build itself, to share one per image among its instances (pass ``tree=``).
"""
from .box import APRoBoxLoss, BoxProjectionLoss, apro_box_loss, box_projection_loss
from .crf import CRFLoss, crf_kernel, crf_loss, mean_field_target
from .pairwise import PairwiseLoss, color_similarity, pairwise_loss
from .registry import (
    BOX_LOSS_OPTIONS,
    BOX_MASK_LOSSES,
    CRF_WEIGHT,
    PROJECTION_WEIGHT,
    SPARSE_LOSSES,
    BoxMaskLoss,
    SparseLoss,
    box_mask_loss,
    sparse_loss,
    tree_guide,
)
from .sparse import APRoSparseLoss, PartialCrossEntropy, apro_sparse_loss, partial_cross_entropy
from .tree_filter import (
    TreeEnergyLoss,
    TreeFilterBoxLoss,
    TreeFilterLocalBoxLoss,
    tree_energy_loss,
    tree_filter_box_loss,
    tree_filter_local_box_loss,
)

__all__ = [
    "APRoBoxLoss",
    "APRoSparseLoss",
    "BOX_LOSS_OPTIONS",
    "BOX_MASK_LOSSES",
    "BoxMaskLoss",
    "BoxProjectionLoss",
    "CRFLoss",
    "CRF_WEIGHT",
    "PROJECTION_WEIGHT",
    "PairwiseLoss",
    "PartialCrossEntropy",
    "SPARSE_LOSSES",
    "SparseLoss",
    "TreeEnergyLoss",
    "TreeFilterBoxLoss",
    "TreeFilterLocalBoxLoss",
    "apro_box_loss",
    "apro_sparse_loss",
    "box_mask_loss",
    "box_projection_loss",
    "color_similarity",
    "crf_kernel",
    "crf_loss",
    "mean_field_target",
    "pairwise_loss",
    "partial_cross_entropy",
    "sparse_loss",
    "tree_energy_loss",
    "tree_filter_box_loss",
    "tree_filter_local_box_loss",
    "tree_guide",
]
