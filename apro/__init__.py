"""apro: label-efficient segmentation via affinity propagation (APro, NeurIPS 2023).

The public names below are imported on first use (PEP 562), so ``import apro`` -- and the
``apro`` command's ``--help`` and ``--version`` -- do not pay for importing torch and numba.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> submodule that defines it
_EXPORTS = {
    "GlobalAffinityPropagation": "propagation",
    "LocalAffinityPropagation": "propagation",
    "TreeFilter": "propagation",
    "global_propagation": "propagation",
    "local_affinity": "propagation",
    "local_propagation": "propagation",
    "tree_filter": "propagation",
    "SpanningTree": "tree",
    "minimum_spanning_tree": "tree",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is not None:
        value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
        globals()[name] = value
        return value
    if not name.startswith("__"):
        # `import apro; apro.losses...` keeps working for submodules
        try:
            return importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"{__name__}.{name}":
                raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
