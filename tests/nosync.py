"""``no_host_sync()``: a context manager that fails a test when the code inside it would make the host
wait for the device (issue 12: no host sync in a per-layer or per-token path).

Works on CPU tensors too: a ``TorchDispatchMode`` sees every aten call, and the calls that bring a
tensor's *values* to the host are the ones that sync on a GPU: ``aten._local_scalar_dense`` (behind
``.item()``, ``bool(t)``, ``int(t)``, ``float(t)``, ``.tolist()`` of a 0-d tensor, Python ``if t:``),
``.tolist()``/``.numpy()`` (refused while the context is active), ``aten.nonzero`` and the other ops whose output shape depends on the data (``masked_select``,
``unique``, boolean-mask indexing ``x[mask]``), and copies of a device tensor to the CPU -- also inside
the Python kernels of ``tokops::`` ops (the torch backend's code), which the dispatcher would otherwise
run with the mode popped.

    from nosync import no_host_sync
    with no_host_sync():
        out = decode_step(...)
"""

from __future__ import annotations

import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_DATA_DEPENDENT = {
    "aten::_local_scalar_dense", "aten::nonzero", "aten::nonzero_static", "aten::masked_select",
    "aten::_unique2", "aten::unique_dim", "aten::unique_consecutive", "aten::_unique",
    "aten::repeat_interleave",  # the Tensor-repeats overload syncs for its output size
    "aten::argwhere", "aten::item",
}


class HostSyncError(AssertionError):
    pass


class _NoSync(TorchDispatchMode):
    def __init__(self, allow_cpu_transfer: bool):
        super().__init__()
        self.allow_cpu_transfer = allow_cpu_transfer

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        if name in _DATA_DEPENDENT:
            if name == "aten::repeat_interleave" and not any(
                    isinstance(a, torch.Tensor) and a.dim() > 0 for a in args[1:2]):
                return func(*args, **kwargs)
            if name == "aten::repeat_interleave" and kwargs.get("output_size") is not None:
                return func(*args, **kwargs)
            raise HostSyncError(f"host sync: {func} (its result depends on tensor values the host must read)")
        if name in ("aten::index", "aten::index_put", "aten::index_put_") and any(
                isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)
                for i in (args[1] if len(args) > 1 and isinstance(args[1], (list, tuple)) else ())):
            raise HostSyncError(f"host sync: {func} with a boolean mask index (its output size depends on the data)")
        if not self.allow_cpu_transfer and name in ("aten::_to_copy", "aten::to", "aten::copy_"):
            dev = kwargs.get("device")
            src = args[0] if args and isinstance(args[0], torch.Tensor) else None
            if src is not None and src.device.type != "cpu" and dev is not None and torch.device(dev).type == "cpu":
                raise HostSyncError(f"host sync: {func} copies a {src.device} tensor to the CPU")
        if func.namespace == "tokops":
            # A tokops op's kernel is a Python function registered for the CPU/CUDA key; the dispatcher
            # runs it after this handler with the mode popped, so the aten calls inside it (the torch
            # backend's code, a launcher's host logic) would be invisible.  Run the kernel with the mode
            # pushed again, so a sync inside a kernel wrapper is caught too.
            dev = next((a.device for a in args if isinstance(a, torch.Tensor)), torch.device("cpu"))
            key = torch._C.DispatchKey.CUDA if dev.type == "cuda" else torch._C.DispatchKey.CPU
            with self:
                return func.redispatch(torch._C.DispatchKeySet(key), *args, **kwargs)
        return func(*args, **kwargs)


@contextlib.contextmanager
def no_host_sync(allow_cpu_transfer: bool = False):
    """Raise :class:`HostSyncError` on any operation inside that makes the host read device values."""
    def _refuse(self, *a, **k):
        raise HostSyncError("host sync: Tensor.tolist()/numpy() reads tensor values on the host")

    saved = torch.Tensor.tolist, torch.Tensor.numpy
    torch.Tensor.tolist = torch.Tensor.numpy = _refuse
    try:
        with _NoSync(allow_cpu_transfer):
            yield
    finally:
        torch.Tensor.tolist, torch.Tensor.numpy = saved
