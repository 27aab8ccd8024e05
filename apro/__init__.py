"""apro: label-efficient segmentation via affinity propagation (APro, NeurIPS 2023)."""
from .propagation import (
    GlobalAffinityPropagation,
    LocalAffinityPropagation,
    TreeFilter,
    global_propagation,
    local_affinity,
    local_propagation,
    tree_filter,
)
from .tree import SpanningTree, minimum_spanning_tree

__version__ = "0.1.0"

__all__ = [
    "GlobalAffinityPropagation",
    "LocalAffinityPropagation",
    "SpanningTree",
    "TreeFilter",
    "global_propagation",
    "local_affinity",
    "local_propagation",
    "minimum_spanning_tree",
    "tree_filter",
]
