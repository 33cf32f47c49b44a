"""Packed layout of the KIVI group-quantized tensors (shapes only, no arithmetic).

Shared by the op checks, the kernels and the reference so that no kernel imports code from its
oracle (:mod:`tokops.kv.reference`).  Layout (``axis`` is the grouped axis of ``x: (..., N, D)``):

* ``axis=-1`` (groups of G channels of one token): ``codes (..., N, ceil(D*bits/32))``,
  ``scale, zero (..., N, D/G)``;
* ``axis=-2`` (groups of G tokens of one channel, ``N`` padded to whole groups):
  ``codes (..., ceil(Np*bits/32), D)``, ``scale, zero (..., Np/G, D)``.
"""

from __future__ import annotations


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def packed_shapes(shape, bits: int, group_size: int, axis: int):
    """(codes_shape, scale_shape) for a tensor of ``shape`` quantized along ``axis`` (-1 or -2)."""
    *lead, n, d = shape
    length = d if axis == -1 else n
    n_groups = ceil_div(length, group_size)
    words = ceil_div(n_groups * group_size * bits, 32)
    if axis == -1:
        return (*lead, n, words), (*lead, n, n_groups)
    return (*lead, words, d), (*lead, n_groups, d)
