"""``prefetch(array, index)`` for numba kernels: a hint to start loading ``array[index]``
(``array`` one-dimensional).

The merge-tree kernels visit rows in an order the hardware cannot guess but the kernel knows
a few steps ahead; asking for them early overlaps the memory latency. It is an LLVM
intrinsic; where this numba/LLVM cannot emit it, ``prefetch`` is a no-op (same results,
a little slower).
"""
from __future__ import annotations

import numpy as np
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic


@intrinsic
def _llvm_prefetch(typingctx, array, index):
    def codegen(context, builder, signature, args):
        from llvmlite import ir

        array_type = signature.args[0]
        ary = context.make_array(array_type)(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, array_type, ary, [args[1]], wraparound=False)
        i8p = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0i8")
        # read access, high temporal locality, data cache
        builder.call(fn, [builder.bitcast(ptr, i8p), i32(0), i32(3), i32(1)])
        return context.get_dummy_value()

    return types.void(array, index), codegen


@njit(nogil=True, cache=True, inline="always")
def _hint(array, index):
    if 0 <= index < array.shape[0]:
        _llvm_prefetch(array, index)


@njit(nogil=True, cache=True, inline="always")
def _no_hint(array, index):
    pass


@njit(cache=True)
def _probe(a):
    _hint(a, 1)
    return a[0]


def _usable() -> bool:
    try:
        _probe(np.zeros(4))
        return True
    except Exception:  # pragma: no cover - depends on the installed numba / LLVM
        return False


prefetch = _hint if _usable() else _no_hint
