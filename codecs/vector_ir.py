"""Pieces of LLVM vector IR for Numba intrinsics: 16-wide operations Numba cannot express.

Numba's loop vectoriser would not vectorise the rANS loops: they gather table entries by a data-dependent
index, and a state reads its next word from a position that depends on every state before it. LLVM has
instructions for exactly that: `masked.gather`, and `masked.expandload`/`masked.compressstore`. On AVX-512 they
are vpgatherdd and vpexpandw/vpcompressw. On other CPUs LLVM lowers them to scalar code, which is slower but
gives the same result. These helpers emit them from an `@intrinsic`'s codegen; `codecs/rans_wide.py` uses them.

Numba's IR layer still prints typed pointers (i32*), which LLVM reads as opaque ones; hence the `.v16p0`
intrinsic names.
"""

from __future__ import annotations

from typing import Any

from llvmlite import ir
from numba.core import cgutils

#: Elements per vector operation: one 512-bit register of 32-bit states.
WIDTH = 16
I1, I8, I16, I32, I64 = ir.IntType(1), ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)


def vec(element: ir.Type) -> ir.VectorType:
    return ir.VectorType(element, WIDTH)


def pointer(element: ir.Type) -> ir.PointerType:
    return ir.PointerType(element)


def constant(element: ir.IntType, value: int) -> ir.Constant:
    """A vector with `value` in every element."""
    return ir.Constant(vec(element), [value] * WIDTH)


def array_data(context: Any, builder: ir.IRBuilder, array_type: Any, array: Any) -> ir.Value:
    """The data pointer of a Numba array argument."""
    return context.make_array(array_type)(context, builder, array).data


def element_pointer(builder: ir.IRBuilder, base: ir.Value, index: ir.Value, element: ir.Type) -> ir.Value:
    """A pointer to base[index] (index an i64 scalar; element the type read or written there)."""
    address = builder.add(builder.ptrtoint(base, I64), builder.mul(index, ir.Constant(I64, element.width // 8)))
    return builder.inttoptr(address, pointer(element))


def vector_pointer(builder: ir.IRBuilder, base: ir.Value, index: ir.Value, element: ir.Type) -> ir.Value:
    """A pointer to the WIDTH elements base[index:index + WIDTH], for an unaligned vector load or store."""
    return builder.bitcast(element_pointer(builder, base, index, element), pointer(vec(element)))


def splat(builder: ir.IRBuilder, value: ir.Value) -> ir.Value:
    """A vector with the scalar `value` in every element."""
    one = builder.insert_element(ir.Constant(ir.VectorType(value.type, WIDTH), ir.Undefined), value, ir.Constant(I32, 0))
    return builder.shuffle_vector(one, one, ir.Constant(vec(I32), [0] * WIDTH))


def gather(builder: ir.IRBuilder, base: ir.Value, index: ir.Value, element: ir.IntType) -> ir.Value:
    """base[index[i]] for every i (index <WIDTH x i32>, each in bounds): one getelementptr with 32-bit indices,
    so x86 gathers with one vpgatherdd, not two vpgatherqd (measured 10-15 % faster)."""
    base = builder.bitcast(base, pointer(element))
    addresses = ir.instructions.GEPInstr(builder.block, base, [index], inbounds=True, name="", source_etype=element)
    addresses.type = vec(pointer(element))  # llvmlite would type a vector-indexed getelementptr as a scalar
    builder._insert(addresses)
    mask = ir.Constant(vec(I1), [1] * WIDTH)
    return _call(
        builder,
        f"llvm.masked.gather.v{WIDTH}i{element.width}.v{WIDTH}p0",
        vec(element),
        [addresses, _align(element), mask, constant(element, 0)],
    )


def expand_load(builder: ir.IRBuilder, source: ir.Value, mask: ir.Value, element: ir.IntType) -> ir.Value:
    """The next popcount(mask) elements from `source` (a pointer), one into each masked element in order; 0 in
    the others. Reads nothing past those elements."""
    return _call(builder, f"llvm.masked.expandload.v{WIDTH}i{element.width}", vec(element), [source, mask, constant(element, 0)])


def compress_store(builder: ir.IRBuilder, values: ir.Value, target: ir.Value, mask: ir.Value) -> None:
    """The masked elements of `values`, in order, to consecutive elements from `target` (a pointer)."""
    element = values.type.element
    _call(builder, f"llvm.masked.compressstore.v{WIDTH}i{element.width}", ir.VoidType(), [values, target, mask])


def popcount(builder: ir.IRBuilder, mask: ir.Value) -> ir.Value:
    """How many elements of a <WIDTH x i1> mask are set, as an i64."""
    return builder.zext(_call(builder, f"llvm.ctpop.i{WIDTH}", ir.IntType(WIDTH), [builder.bitcast(mask, ir.IntType(WIDTH))]), I64)


def _align(element: ir.IntType) -> ir.Constant:
    return ir.Constant(I32, element.width // 8)


def _call(builder: ir.IRBuilder, name: str, result: ir.Type, args: list[ir.Value]) -> ir.Value:
    function = cgutils.get_or_insert_function(builder.module, ir.FunctionType(result, [a.type for a in args]), name)
    return builder.call(function, args)
