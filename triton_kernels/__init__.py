"""Triton kernels of tokops (installed as ``tokops.triton_kernels``).

Modules here import triton at import time; ``tokops`` imports them lazily, on
first use of a ``backend="triton"`` op.  Set ``TRITON_INTERPRET=1`` before
triton is imported to run them on CPU tensors.
"""
