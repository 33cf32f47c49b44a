"""``QuantizedKVCache``: a KIVI-style quantized KV cache with a full-precision residual window.

Paper: Liu et al., "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache" (ICML 2024);
mixed precision after He et al., "ZipVL" (2024); eviction after Zhang et al., "H2O" (NeurIPS 2023).
Spec: ``DESIGN.md`` ("Quantized KV").

Layout of one cache (one transformer layer), ``B`` batch, ``H_kv`` kv heads, head dim ``D``.  Every
batch row ``b`` has its own length: ``n_quant[b]`` quantized tokens then ``n_res[b]`` residual
tokens, in *store order* (``cache.tensors()["n_quant"]`` / ``["n_res"]``: int32 ``(B,)`` tensors
on the cache's device):

* **Quantized store** (row ``b``: store slots ``[0, n_quant[b])``), pre-allocated for ``capacity``
  tokens and grown by doubling (old codes are copied, never re-quantized):

  - ``mode="int"``: ``tokops.kv.quantize`` layout of a ``(B, H_kv, capacity, D)`` tensor along
    ``key_axis`` / ``value_axis`` (``-2``: groups of ``G`` tokens per channel, KIVI keys;
    ``-1``: groups of ``G`` channels per token, KIVI values).  ``codes`` int32, ``scale``/``zero`` fp16.
  - ``mode="fp8"``: e4m3fn codes ``(B, H_kv, capacity, D)`` with one fp32 scale per (token, head).

* **Residual window**: the most recent tokens in the input dtype, ``(B, H_kv, rcap, D)``, row ``b``
  valid in ``[0, n_res[b])``.

**Flush rule (exact, per row).**  Let ``c`` be the number of residual tokens of a row that are not
*pinned* (see mixed precision).  After every ``append``, the oldest ``G * floor(max(0, c - R) / G)``
unpinned residual tokens of that row are quantized and moved to its quantized store.  So with no
pinned tokens a row holds ``min(len, R) <= n_res <= R + G - 1`` residual tokens, and every quantized
key group holds ``G`` consecutive tokens *of that row* (a group is never padded, never
re-quantized).  ``residual=0`` is allowed.

**Ragged batches.**  ``append(k, v, lengths=lengths)`` with ``lengths: (B,)`` int on the cache's
device appends only the first ``lengths[b]`` of the ``T`` tokens of row ``b`` (the rest is padding:
never stored, never quantized, never attended; values of ``lengths`` outside ``[0, T]`` are clamped).
Each row then fills and quantizes its own groups, so rows hold different numbers of quantized and
residual tokens.  Nothing in ``append`` (or in :meth:`accumulate_mass`, :meth:`select_batch`)
reads a device value on the host: the per-row counts live in device tensors and every flush is
decided per row on the device with fixed shapes (a fixed-size candidate set of the oldest
``F = G * floor((G - 1 + T) / G)`` unpinned residual tokens is quantized; groups a row does not
flush are written past its valid tokens, where nothing reads them).  The host keeps only *upper
bounds*: ``len(cache)`` (the width of the store order, the mass width of ``decode_attention``,
``>=`` every row's length), ``n_quant``, ``n_res`` and ``seq_length`` are exact while every append
was uniform (``lengths=None`` and pins known on the host), upper bounds over the rows after a
ragged one (then :meth:`lengths` / :meth:`seq_lengths` give the exact per-row values on the
device).  Costs of a ragged cache: (1) memory: the buffers are sized by the host bounds, i.e. like
a cache of the longest possible row for every row (``memory_bytes(allocated=True)``), while
``memory_bytes()`` counts only the real tokens of each row (padding is never stored; only a paged
layout also returns the unused tail of short rows); (2) work per append: the ``F`` candidates are
quantized every step (``G`` tokens per row for a one-token step, of which a row uses a whole group
once every ``G`` steps) and the residual window is compacted with a gather of ``n_res + T`` tokens.
``lengths=None`` runs the uniform path: bit-identical results and layout, and with no pinned
tokens only the ``T`` new tokens are written per step (plus one quantize call per full group).

**CUDA graphs** (``static=True``, needs ``capacity=``): the host bounds are frozen at
``n_quant = capacity`` and ``n_res = R + G - 1``, so every append of ``T`` tokens and every decode
step has the same shapes whatever the rows hold, all updates are in place on buffers allocated by
the first (prefill) append, and a step captured once replays with only the device counts moving.
Every row must fit the capacity (not checked: that would be a sync); pinned tokens are refused (the
window's size is fixed); each step reads the whole capacity (like a static cache in transformers).

**Mixed precision (ZipVL-style), the choice made here:** ``append(k, v, important=mask)`` with a
per-token bool mask ``(T,)`` (shared by the batch and heads) or ``(B, T)`` (per row) *pins* those
tokens: they never leave the full-precision residual (so they are kept at full precision, not at a
higher bit width).  The quantized store then holds the unpinned tokens in order, the residual holds
the pinned tokens and the recent window in order; :meth:`positions` maps store order to token
positions (each row counts its own positions from 0).  A ``(T,)`` mask keeps the host counts of a
uniform cache exact (its count is read on the host: free for a CPU mask, one sync for a mask on
the GPU); a ``(B, T)`` mask makes the cache ragged (the pin counts stay on the device, no sync; on
the GPU the host bound on pinned tokens then grows by ``T`` per append: see :meth:`refresh_bounds`).

**H2O eviction** (``budget=``): :meth:`accumulate_mass` adds the per-key attention mass returned by
``decode_attention(..., return_mass=True)`` (summed over the query heads of each kv head) to a
per-(batch, kv head, token) score.  When a row holds more than ``budget`` tokens after an
``append``, its quantized store is compacted per kv head to its ``max(0, budget - n_res)``
highest-score tokens (kept in order); the residual window (the "recent" set and every pinned
token) is always kept, so pinned tokens and eviction combine: pinned tokens count against the
budget but are never evicted (a row whose pinned tokens alone exceed ``budget`` keeps them all).
Eviction needs a per-token layout of the quantized store (``key_axis=value_axis=-1`` or
``mode="fp8"``): a per-channel key group mixes ``G`` tokens and cannot drop one without
re-quantizing.  After an eviction the store order is still chronological, but :meth:`positions`
(per batch and kv head) gives the original positions.  Ties in the score keep the older token in a
ragged cache (a stable sort); the uniform path keeps ``torch.topk``'s choice.

**Checks without host syncs** (``checks=``).  Two checks read a device value: a finite input that
overflows the fp16 ``scale``/``zero`` of int quantization (:func:`tokops.kv.quant.fp16_overflow`),
and a non-finite mass given to :meth:`accumulate_mass`.  ``checks="immediate"`` raises
``ValueError`` in the call (one host sync per check; the call is then all or nothing);
``checks="deferred"`` records a sticky device flag instead (no sync; the overflowed group is stored
and dequantizes to inf, a non-finite mass counts as 0) and :meth:`check` raises the
``ValueError`` later (it is also run by :meth:`truncate` and :meth:`compression_report`).
``"auto"`` (default) is immediate for CPU tensors (a CPU "sync" costs nothing) and deferred on a
GPU and under ``torch.compile``.

**Rollback** (speculative decoding): :meth:`truncate` removes every token at position ``>= length``
and leaves the layout a cache fed only the first ``length`` tokens would have (see its docstring).
"""

from __future__ import annotations

import torch

from .. import _registry as reg
from .._checks import FLOAT_DTYPES, check_int, check_power_of_two, check_tensor
from .quant import (BITS, MAX_GROUP, MIN_GROUP, check_fp16_range, fp16_overflow, fp16_overflow_error,
                    quantize_fp8, quantize_unchecked)

MODES = ("int", "fp8")
CHECKS = ("auto", "immediate", "deferred")


def _ceil_to(a: int, b: int) -> int:
    return -(-a // b) * b


def _expand_idx(idx: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``idx (B, H, n)`` (or ``(B, n)``, broadcast over heads) expanded over ``like``'s trailing dims."""
    if idx.dim() == 2:
        idx = idx[:, None].expand(like.shape[0], like.shape[1], idx.shape[1])
    return idx.view(*idx.shape, *([1] * (like.dim() - 3))).expand(*idx.shape, *like.shape[3:])


def _gather_src(keep: torch.Tensor, n: int) -> torch.Tensor:
    """For a bool ``keep (..., S)``: the source index of each of the first ``n`` kept entries in order
    (``(..., n)`` int64, clamped into ``[0, S)`` where fewer are kept).  Fixed shapes, no sync."""
    S = keep.shape[-1]
    cum = keep.to(torch.int32).cumsum(-1).to(torch.int32)
    want = torch.arange(1, n + 1, device=keep.device, dtype=torch.int32).expand(*keep.shape[:-1], n).contiguous()
    return torch.searchsorted(cum.contiguous(), want).clamp_(max=max(S - 1, 0))


class QuantizedKVCache:
    """A quantized KV cache for one attention layer (see the module docstring for the layout).

    ``append(k, v)`` with ``k, v: (B, H_kv, T, D)`` (fp16/bf16/fp32, any ``T >= 0``: prefill chunks
    or single decode steps; ``lengths=`` for ragged rows); ``len(cache)`` is the number of cached
    tokens (an upper bound over the rows of a ragged cache); ``tokops.kv.decode_attention(q, cache)``
    attends over them.  ``capacity``: tokens pre-allocated per row; ``budget``: H2O eviction;
    ``checks``: when the value checks raise (``"auto"``/``"immediate"``/``"deferred"``); ``static``:
    fixed shapes for CUDA-graph capture (see the module docstring for each).
    """

    def __init__(self, bits_k: int = 4, bits_v: int = 4, group_size: int = 32, residual: int = 128,
                 mode: str = "int", key_axis: int = -2, value_axis: int = -1, *, capacity: int = 0,
                 budget: int | None = None, backend: str = "auto", checks: str = "auto", static: bool = False):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        check_power_of_two("group_size", group_size, MIN_GROUP, MAX_GROUP)
        check_int("residual", residual, min_value=0)
        check_int("capacity", capacity, min_value=0)
        if mode == "int":
            check_int("bits_k", bits_k, choices=BITS)
            check_int("bits_v", bits_v, choices=BITS)
            for name, ax, bits in (("key_axis", key_axis, bits_k), ("value_axis", value_axis, bits_v)):
                check_int(name, ax, choices=(-1, -2))
                if ax == -2 and (group_size * bits) % 32:
                    raise ValueError(f"{name}=-2 packs whole groups of tokens into int32 words: group_size*bits "
                                     f"must be a multiple of 32, got group_size={group_size}, bits={bits}")
        else:
            key_axis = value_axis = -1
            bits_k = bits_v = 8
        if budget is not None:
            check_int("budget", budget, min_value=1)
            if mode == "int" and (key_axis, value_axis) != (-1, -1):
                raise ValueError("budget (H2O eviction) needs a per-token layout of the quantized store: "
                                 f"key_axis=-1 and value_axis=-1 (or mode='fp8'), got key_axis={key_axis}, "
                                 f"value_axis={value_axis}")
            if budget < residual + group_size:
                raise ValueError(f"budget must be >= residual + group_size = {residual + group_size} "
                                 f"(the residual window is always kept), got {budget}")
        if not isinstance(backend, str) or backend not in reg.BACKENDS:
            raise ValueError(f"backend must be one of {reg.BACKENDS}; got {backend!r}")
        if not isinstance(checks, str) or checks not in CHECKS:
            raise ValueError(f"checks must be one of {CHECKS}; got {checks!r}")
        if not isinstance(static, bool):
            raise TypeError(f"static must be a bool, got {type(static).__name__}")
        if static and capacity == 0:
            raise ValueError("static=True needs capacity= (the most tokens any row will hold)")
        self.mode, self.bits_k, self.bits_v, self.group_size = mode, bits_k, bits_v, group_size
        self.residual, self.key_axis, self.value_axis = residual, key_axis, value_axis
        self.budget, self.backend, self._init_capacity, self.checks = budget, backend, capacity, checks
        # host bookkeeping: exact while ``_exact`` (every row identical), else upper bounds over the rows
        self._exact = True
        self._hq = 0  # quantized tokens per row
        self._hr = 0  # residual tokens per row
        self._n_pinned = 0  # pinned tokens per row
        self._next_pos = 0  # tokens appended per row (positions [0, _next_pos))
        self._hev = 0  # evicted tokens per row (exact mode only)
        self._shape = None  # (B, H_kv, D), dtype, device after the first append
        self.static = static
        if static:  # host bounds frozen at the capacity: shapes never change, a CUDA graph can replay a step
            self._exact = False
            self._hq = _ceil_to(capacity, group_size)
            self._hr = residual + group_size - 1

    # ------------------------------------------------------------------ properties
    def __len__(self) -> int:
        """Cached tokens per row (exact for a uniform cache; for a ragged one an upper bound over the
        rows: the width of :meth:`positions`, :meth:`dequantized` and of the decode mass)."""
        if not self.initialized:
            return 0
        if self._exact or self.static:
            return self._hq + self._hr
        return min(self._next_pos, self._hq + self._hr)

    @property
    def n_quant(self) -> int:
        """Quantized tokens per row (host; an upper bound over the rows of a ragged cache)."""
        return self._hq if self.initialized else 0

    @property
    def n_res(self) -> int:
        """Residual tokens per row (host; an upper bound over the rows of a ragged cache)."""
        return self._hr if self.initialized else 0

    @property
    def is_uniform(self) -> bool:
        """True while the host knows every row's counts exactly (every append was uniform)."""
        return self._exact

    @property
    def n_evicted(self) -> int:
        """Evicted tokens per row (the maximum over the rows of a ragged cache: one host sync)."""
        if self._exact or not self.initialized:
            return self._hev
        return int(self._nev.max())

    @property
    def initialized(self) -> bool:
        return self._shape is not None

    @property
    def dtype(self):
        return self._dtype if self.initialized else None

    @property
    def device(self):
        return self._device if self.initialized else None

    @property
    def num_kv_heads(self):
        return self._shape[1] if self.initialized else None

    @property
    def head_dim(self):
        return self._shape[2] if self.initialized else None

    @property
    def capacity(self) -> int:
        return self._qcap if self.initialized else 0

    @property
    def n_pinned(self) -> int:
        """Tokens pinned in full precision by ``append(..., important=)`` (they never leave the
        residual); exact for a uniform cache, else an upper bound over the rows (no sync)."""
        return self._n_pinned

    def lengths(self) -> torch.Tensor:
        """Cached tokens of each row, ``(B,)`` int32 on the cache's device (no sync)."""
        if not self.initialized:
            raise ValueError("the cache is empty and was never appended to: its shape is unknown")
        return self._nq + self._nr

    def seq_lengths(self) -> torch.Tensor:
        """Tokens appended to each row (its positions ``[0, n)``), ``(B,)`` int64 on the device."""
        if not self.initialized:
            raise ValueError("the cache is empty and was never appended to: its shape is unknown")
        return self._seq.clone()

    def _deferred(self, device) -> bool:
        if self.checks == "deferred" or torch.compiler.is_compiling():
            return True
        return self.checks == "auto" and torch.device(device).type != "cpu"

    # ------------------------------------------------------------------ allocation
    def _alloc_store(self, cap: int):
        B, H, D = self._shape
        dev = self._device
        if self.mode == "fp8":
            return {"k_codes": torch.zeros(B, H, cap, D, dtype=torch.uint8, device=dev),
                    "k_scale": torch.zeros(B, H, cap, dtype=torch.float32, device=dev),
                    "v_codes": torch.zeros(B, H, cap, D, dtype=torch.uint8, device=dev),
                    "v_scale": torch.zeros(B, H, cap, dtype=torch.float32, device=dev)}
        G = self.group_size
        out = {}
        for p, bits, ax in (("k", self.bits_k, self.key_axis), ("v", self.bits_v, self.value_axis)):
            if ax == -2:
                out[p + "_codes"] = torch.zeros(B, H, cap * bits // 32, D, dtype=torch.int32, device=dev)
                sshape = (B, H, cap // G, D)
            else:
                out[p + "_codes"] = torch.zeros(B, H, cap, D * bits // 32, dtype=torch.int32, device=dev)
                sshape = (B, H, cap, D // G)
            out[p + "_scale"] = torch.zeros(sshape, dtype=torch.float16, device=dev)
            out[p + "_zero"] = torch.zeros(sshape, dtype=torch.float16, device=dev)
        return out

    def _init(self, k: torch.Tensor):
        B, H, _, D = k.shape
        if self.mode == "int":
            for name, ax in (("key_axis", self.key_axis), ("value_axis", self.value_axis)):
                if ax == -1 and D % self.group_size:
                    raise ValueError(f"group_size={self.group_size} must divide the head dim D={D} when "
                                     f"{name}=-1 (groups of channels)")
                if ax == -1 and D * (self.bits_k if name == "key_axis" else self.bits_v) % 32:
                    raise ValueError(f"D * bits must be a multiple of 32 for {name}=-1, got D={D}")
        self._shape, self._dtype, self._device = (B, H, D), k.dtype, k.device
        dev = k.device
        self._qcap = _ceil_to(max(self._init_capacity, 0), self.group_size)
        self._store = self._alloc_store(self._qcap)
        self._q_pos = torch.zeros(B, H, self._qcap, dtype=torch.int64, device=dev)
        self._q_score = torch.zeros(B, H, self._qcap, dtype=torch.float32, device=dev)
        self._rcap = 0
        self._k_res = k.new_zeros(B, H, 0, D)
        self._v_res = k.new_zeros(B, H, 0, D)
        self._r_pos = torch.zeros(B, 0, dtype=torch.int64, device=dev)
        self._r_pin = torch.zeros(B, 0, dtype=torch.bool, device=dev)
        self._r_score = torch.zeros(B, H, 0, dtype=torch.float32, device=dev)
        # per-row counts (device): quantized, residual, pinned, appended, evicted
        self._nq = torch.zeros(B, dtype=torch.int32, device=dev)
        self._nr = torch.zeros(B, dtype=torch.int32, device=dev)
        self._npin = torch.zeros(B, dtype=torch.int32, device=dev)
        self._seq = torch.zeros(B, dtype=torch.int64, device=dev)
        self._nev = torch.zeros(B, dtype=torch.int64, device=dev)
        self._flags = torch.zeros(2, dtype=torch.bool, device=dev)  # deferred: [fp16 overflow, non-finite mass]
        self._amax = torch.zeros((), dtype=torch.float32, device=dev)  # largest |x| that overflowed (message)

    def _grow(self, need: int):
        """Quantized store capacity >= ``need`` tokens (doubling; everything is copied, the codes as they are)."""
        if need <= self._qcap:
            return
        cap = _ceil_to(need if self.static else max(need, 2 * self._qcap, 2 * self.group_size), self.group_size)
        new = self._alloc_store(cap)
        for name, old in self._store.items():
            new[name].narrow(2, 0, old.shape[2]).copy_(old)
        self._store = new
        for attr in ("_q_pos", "_q_score"):
            old = getattr(self, attr)
            buf = old.new_zeros(old.shape[0], old.shape[1], cap)
            buf[..., :old.shape[2]] = old
            setattr(self, attr, buf)
        self._qcap = cap

    def _grow_res(self, need: int):
        """Residual capacity >= ``need`` tokens (everything is copied)."""
        if need <= self._rcap:
            return
        cap = max(need, 2 * self._rcap, self.residual + self.group_size)
        B, H, D = self._shape
        old = self._rcap
        k_res, v_res = self._k_res.new_zeros(B, H, cap, D), self._v_res.new_zeros(B, H, cap, D)
        r_pos, r_pin = self._r_pos.new_zeros(B, cap), self._r_pin.new_zeros(B, cap)
        r_score = self._r_score.new_zeros(B, H, cap)
        k_res[:, :, :old], v_res[:, :, :old] = self._k_res, self._v_res
        r_pos[:, :old], r_pin[:, :old], r_score[..., :old] = self._r_pos, self._r_pin, self._r_score
        self._k_res, self._v_res, self._r_pos, self._r_pin, self._r_score = k_res, v_res, r_pos, r_pin, r_score
        self._rcap = cap

    def _token_dim(self, name: str) -> int:
        return 2

    def _units_per_token(self, name: str) -> float:
        """How many entries along dim 2 of store tensor ``name`` one token occupies."""
        if self.mode == "fp8":
            return 1
        ax = self.key_axis if name[0] == "k" else self.value_axis
        if ax == -1:
            return 1
        bits = self.bits_k if name[0] == "k" else self.bits_v
        return bits / 32 if name.endswith("codes") else 1 / self.group_size

    # ------------------------------------------------------------------ append
    def _check_append(self, k, v, important, lengths):
        # strided views are fine: append copies k/v into the residual window
        check_tensor("k", k, dtypes=FLOAT_DTYPES, ndim=4, nonempty=False, contiguous=False)
        check_tensor("v", v, dtypes=FLOAT_DTYPES, ndim=4, nonempty=False, contiguous=False)
        if v.shape != k.shape:
            raise ValueError(f"v must have the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
        if v.dtype != k.dtype:
            raise TypeError(f"v must have the dtype of k ({k.dtype}), got {v.dtype}")
        if v.device != k.device:
            raise ValueError(f"v must be on the device of k ({k.device}), got {v.device}")
        if k.shape[0] == 0 or k.shape[1] == 0 or k.shape[3] == 0:
            raise ValueError(f"k must have non-empty batch, head and head-dim sizes, got shape {tuple(k.shape)}")
        if self.initialized:
            B, H, D = self._shape
            if (k.shape[0], k.shape[1], k.shape[3]) != (B, H, D):
                raise ValueError(f"k must have shape ({B}, {H}, n, {D}) like the cached tokens, got {tuple(k.shape)}")
            if k.dtype != self._dtype:
                raise TypeError(f"k must have the cache's dtype {self._dtype}, got {k.dtype}")
            if k.device != self._device:
                raise ValueError(f"k must be on the cache's device {self._device}, got {k.device}")
        cache_dev = self._device if self.initialized else k.device
        if important is not None:
            if self.static:
                raise ValueError("important (pinned tokens) is not supported with static=True (the residual "
                                 "window's size is fixed there)")
            check_tensor("important", important, dtypes=(torch.bool,), nonempty=False, contiguous=False)
            if important.device not in (cache_dev, torch.device("cpu")):
                raise ValueError(f"important must be on the cache's device ({cache_dev}) or the CPU, "
                                 f"got {important.device}")
            if important.shape not in ((k.shape[2],), (k.shape[0], k.shape[2])):
                raise ValueError(f"important must have shape ({k.shape[2]},) or ({k.shape[0]}, {k.shape[2]}) "
                                 f"(one flag per new token, shared by the rows or per row), "
                                 f"got {tuple(important.shape)}")
        if lengths is not None:
            check_tensor("lengths", lengths, dtypes=(torch.int32, torch.int64), ndim=1, contiguous=False)
            if lengths.device not in (cache_dev, torch.device("cpu")):
                raise ValueError(f"lengths must be on the cache's device ({cache_dev}) or the CPU, "
                                 f"got {lengths.device}")
            if lengths.shape[0] != k.shape[0]:
                raise ValueError(f"lengths must have shape ({k.shape[0]},) (one length per batch row), "
                                 f"got {tuple(lengths.shape)}")

    # ------------------------------------------------------------------ all-or-nothing updates
    def _snapshot(self) -> dict:
        """The cache's state (attributes and the store's dict; tensors by reference).  Every method
        that changes the cache writes in place only past the valid tokens until its last, infallible
        step, so restoring this snapshot after an error leaves the cache exactly as it was."""
        snap = dict(self.__dict__)
        if "_store" in snap:
            snap["_store"] = dict(snap["_store"])
        return snap

    def _restore(self, snap: dict) -> None:
        self.__dict__.clear()
        self.__dict__.update(snap)

    def append(self, k: torch.Tensor, v: torch.Tensor, important: torch.Tensor | None = None,
               lengths: torch.Tensor | None = None) -> None:
        """Append ``T`` new tokens ``k, v: (B, H_kv, T, D)``.

        ``lengths: (B,)`` int (on the cache's device; no host sync): row ``b`` appends only its first
        ``lengths[b]`` tokens, the rest is padding and is never stored (``None``: every row appends
        ``T``).  ``important: (T,)`` or ``(B, T)`` bool pins tokens in full precision (mixed
        precision).  Whole groups leave each row's residual window as described in the module
        docstring.  All-or-nothing: when it raises (bad argument, allocation failure, a value the
        quantizer refuses with ``checks="immediate"``), the cache is unchanged."""
        self._check_append(k, v, important, lengths)
        if torch.compiler.is_compiling():  # no rollback under compile (nothing raises on the hot path)
            self._append(k, v, important, lengths)
            return
        snap = self._snapshot()
        try:
            self._append(k, v, important, lengths)
        except BaseException:
            self._restore(snap)
            raise

    def _quantize(self, x: torch.Tensor, bits: int, axis: int):
        """Quantize ``x (B, H, F, D)``; the fp16-range check is immediate or a device flag (``checks``)."""
        qt = quantize_unchecked(x.contiguous(), bits, self.group_size, axis, backend=self.backend)
        if self._deferred(x.device):
            flag = fp16_overflow(x, qt.scale, qt.zero)
            if flag is not None:
                self._flags[0] |= flag
                self._amax.copy_(torch.where(flag, torch.maximum(self._amax, x.abs().max().float()), self._amax))
        else:
            check_fp16_range(x, qt.scale, qt.zero, bits)
        return qt

    def _append(self, k, v, important, lengths) -> None:
        if not self.initialized:
            self._init(k)
        T = k.shape[2]
        if T == 0:
            return
        B, H, D = self._shape
        dev = self._device
        G, R = self.group_size, self.residual
        ar_T = torch.arange(T, device=dev)
        # ---- what the host knows
        pin_host = None  # exact pinned count of the new tokens (same for every row), if known
        pin_bound_cpu = None  # bound on the new pinned tokens of any row, when the mask is on the CPU
        pin = None  # (B, T) bool on the device
        if important is not None:
            if important.dim() == 1 and (lengths is None or important.device.type == "cpu"):
                # a CPU mask costs no device sync; a (T,) mask on the device costs one (the uniform
                # cache keeps exact host counts: pass the mask on the CPU, or per row, to avoid it)
                pin_host = int(important.sum())
            elif important.device.type == "cpu":  # per row, on the CPU: a tight bound for free
                pin_bound_cpu = int(important.sum(-1).max()) if important.numel() else 0
            pin = important.to(dev)
            pin = pin.expand(B, T) if pin.dim() == 1 else pin
        if lengths is not None:
            lens = lengths.to(device=dev, dtype=torch.int64).clamp(0, T)
            tok_valid = ar_T < lens[:, None]  # (B, T)
            if pin is not None:
                pin = pin & tok_valid
        else:
            lens, tok_valid = None, None
        exact = self._exact and lengths is None and (important is None or pin_host is not None)
        new_pin_bound = 0 if important is None else (
            pin_host if pin_host is not None else pin_bound_cpu if pin_bound_cpu is not None else T)
        no_pins = self._n_pinned == 0 and new_pin_bound == 0  # host bound: no row has a pinned token

        # ---- 1. write the new tokens after each row's residual tokens (past the valid ones)
        nr0 = self._hr
        S = nr0 + T
        self._grow_res(S)
        seq0 = self._next_pos
        if exact:
            self._k_res[:, :, nr0:S] = k
            self._v_res[:, :, nr0:S] = v
            self._r_pos[:, nr0:S] = torch.arange(seq0, seq0 + T, device=dev)
            self._r_pin[:, nr0:S] = pin if pin is not None else False
            self._r_score[..., nr0:S] = 0
        else:
            idx = self._nr.to(torch.int64)[:, None] + ar_T  # (B, T), < nr0 + T = S <= rcap
            kk, vv = k, v
            if tok_valid is not None:  # padding is never stored: zeros in the scratch slots past the row
                zero = torch.zeros((), dtype=k.dtype, device=dev)
                kk = torch.where(tok_valid[:, None, :, None], k, zero)
                vv = torch.where(tok_valid[:, None, :, None], v, zero)
            self._k_res.scatter_(2, _expand_idx(idx, kk), kk)
            self._v_res.scatter_(2, _expand_idx(idx, vv), vv)
            self._r_pos.scatter_(1, idx, self._seq[:, None] + ar_T)
            self._r_pin.scatter_(1, idx, pin if pin is not None else torch.zeros(B, T, dtype=torch.bool, device=dev))
            self._r_score.scatter_(2, idx[:, None].expand(B, H, T), torch.zeros(B, H, T, device=dev))
        add = lens if lens is not None else T
        nr_new = self._nr + add  # (B,) int
        pinned_new = self._npin + (pin.sum(1) if pin is not None else 0)

        # ---- 2. flush: each row's oldest whole groups of unpinned residual tokens beyond R
        if exact:
            c = S - (self._n_pinned + (pin_host or 0))
            F = (max(0, c - R) // G) * G
            nf = None  # == F in every row
        else:
            F = min(G * ((G - 1 + T) // G), (S // G) * G)
        slot = torch.arange(S, device=dev)
        if F:
            if no_pins:
                unp = None
                src = None  # the first F residual slots
            else:
                valid = slot < nr_new[:, None]
                unp = valid & ~self._r_pin[:, :S]
                src = _gather_src(unp, F)  # (B, F)
            if not exact:
                n_unp = unp.sum(1) if unp is not None else nr_new
                nf = ((n_unp - R).clamp(min=0) // G * G).clamp(max=F)  # (B,)
            flushed = []
            for x in (self._k_res, self._v_res):
                xf = x[:, :, :F] if src is None else x.gather(2, _expand_idx(src, x[:, :, :F]))
                if nf is not None:  # candidates a row does not flush: zeros (quantized, never kept)
                    fvalid = torch.arange(F, device=dev) < nf[:, None]
                    xf = torch.where(fvalid[:, None, :, None], xf, torch.zeros((), dtype=xf.dtype, device=dev))
                flushed.append(xf)
            fpos = self._r_pos[:, :F] if src is None else self._r_pos.gather(1, src)
            fpos = fpos[:, None].expand(B, H, F)
            fscore = self._r_score[..., :F] if src is None else self._r_score.gather(2, src[:, None].expand(B, H, F))
            self._flush(flushed[0], flushed[1], fpos, fscore, nf)
            # ---- 3. compact each row's residual window (in place, infallible from here on)
            if no_pins and exact:
                self._k_res[:, :, :S - F] = self._k_res[:, :, F:S].clone()
                self._v_res[:, :, :S - F] = self._v_res[:, :, F:S].clone()
                self._r_pos[:, :S - F] = self._r_pos[:, F:S].clone()
                self._r_pin[:, :S - F] = self._r_pin[:, F:S].clone()
                self._r_score[..., :S - F] = self._r_score[..., F:S].clone()
            else:
                nfl = nf if nf is not None else torch.full((B,), F, dtype=torch.int64, device=dev)
                if no_pins:
                    rsrc = (slot[None, :] + nfl[:, None]).clamp_(max=S - 1)
                else:
                    rank = unp.to(torch.int32).cumsum(1)
                    keep = (slot[None, :] < nr_new[:, None]) & ~(unp & (rank <= nfl[:, None]))
                    rsrc = _gather_src(keep, S)
                for x in (self._k_res, self._v_res):
                    x[:, :, :S].copy_(x.gather(2, _expand_idx(rsrc, x[:, :, :S])))
                self._r_pos[:, :S].copy_(self._r_pos.gather(1, rsrc))
                self._r_pin[:, :S].copy_(self._r_pin.gather(1, rsrc))
                self._r_score[..., :S].copy_(self._r_score.gather(2, rsrc[:, None].expand(B, H, S)))
            nfl = nf if nf is not None else F
            self._nq += nfl
            nr_new = nr_new - nfl
        # ---- 4. counts
        self._nr.copy_(nr_new)
        self._npin.copy_(pinned_new)
        self._seq += add
        self._next_pos += T
        self._hq += F
        if exact:
            self._hr = S - F
            self._n_pinned += pin_host or 0
        else:
            self._exact = False
            self._n_pinned += new_pin_bound
            self._hr = min(S, R + G - 1 + self._n_pinned)
            self._hq = min(self._hq, G * (max(0, self._next_pos - R) // G))
            if self.static:
                self._hq, self._hr = _ceil_to(self._init_capacity, G), R + G - 1
        # ---- 5. H2O eviction
        if self.budget is not None and self._hq + self._hr > self.budget:
            if exact:
                self._evict_exact()
            else:
                self._evict_rows()

    def _flush(self, kf, vf, fpos, fscore, nf):
        """Quantize ``F`` (a multiple of G) candidate tokens per row and write them after each row's
        quantized tokens (``nf``: ``None`` = all ``F`` in every row, at the host offset; else a ``(B,)``
        tensor, candidates past ``nf[b]`` land past the row's valid tokens)."""
        F = kf.shape[2]
        n0 = self._hq
        # quantize both tensors before writing anything (a refused value leaves the store untouched)
        if self.mode == "fp8":
            qts = [(p, (quantize_fp8(x.contiguous(), backend=self.backend),)) for p, x in (("k", kf), ("v", vf))]
            parts = [(p, (("_codes", ft.codes.view(torch.uint8)), ("_scale", ft.scale))) for p, (ft,) in qts]
        else:
            qts = [(p, self._quantize(x, bits, ax)) for p, x, bits, ax in (("k", kf, self.bits_k, self.key_axis),
                                                                           ("v", vf, self.bits_v, self.value_axis))]
            parts = [(p, (("_codes", qt.codes), ("_scale", qt.scale), ("_zero", qt.zero))) for p, qt in qts]
        self._grow(n0 + F)
        st = self._store
        B, H, _ = self._shape
        for p, items in parts:
            for name, t in items:
                u = self._units_per_token(p + name)
                if nf is None:
                    off = int(n0 * u)
                    st[p + name][:, :, off:off + t.shape[2]] = t
                else:
                    units = t.shape[2]
                    idx = (self._nq.to(torch.int64) * units // F)[:, None] + torch.arange(units, device=t.device)
                    st[p + name].scatter_(2, _expand_idx(idx, t), t)
        if nf is None:
            self._q_pos[..., n0:n0 + F] = fpos
            self._q_score[..., n0:n0 + F] = fscore
        else:
            idx = self._nq.to(torch.int64)[:, None] + torch.arange(F, device=fpos.device)
            self._q_pos.scatter_(2, idx[:, None].expand(B, H, F), fpos)
            self._q_score.scatter_(2, idx[:, None].expand(B, H, F), fscore)

    # ------------------------------------------------------------------ H2O
    def accumulate_mass(self, mass: torch.Tensor) -> None:
        """Add per-key attention mass ``(B, H, len(cache))`` fp32 (``decode_attention(...,
        return_mass=True)``, ``H`` query heads, store order; entries past a row's length are
        ignored) to the H2O scores, summed over each kv head's query heads.  A non-finite mass is
        refused (``checks``: ``ValueError`` now, or a deferred flag, see the module docstring)."""
        if not self.initialized:
            raise ValueError("accumulate_mass: the cache is empty")
        B, Hk, _ = self._shape
        W = len(self)
        check_tensor("mass", mass, dtypes=(torch.float32,), ndim=3, nonempty=False, contiguous=False)
        if mass.shape[0] != B or mass.shape[2] != W or mass.shape[1] % Hk:
            raise ValueError(f"mass must have shape ({B}, H, {W}) with H a multiple of {Hk}, "
                             f"got {tuple(mass.shape)}")
        if mass.device != self._device:
            raise ValueError(f"mass must be on the cache's device {self._device}, got {mass.device}")
        m = mass.reshape(B, Hk, mass.shape[1] // Hk, -1).sum(2)  # reshape: mass may be a strided view
        if self._deferred(mass.device):
            finite = torch.isfinite(m)
            self._flags[1] |= ~finite.all()
            m = torch.where(finite, m, 0.0)
        elif not bool(torch.isfinite(mass).all()):
            # a NaN / inf score would make the eviction order arbitrary: refuse it
            raise ValueError("mass must be finite (an attention mass); got NaN or inf values")
        if W == 0:
            return
        nq, nr = self._hq, self._hr
        if self._exact:
            self._q_score[..., :nq] += m[..., :nq]
            self._r_score[..., :nr] += m[..., nq:]
            return
        Q = min(nq, W)
        rq = self._nq.to(torch.int64)[:, None, None]
        if Q:
            j = torch.arange(Q, device=m.device)
            self._q_score[..., :Q] += torch.where(j < rq, m[..., :Q], 0.0)
        if nr:
            i = torch.arange(nr, device=m.device)
            idx = (rq + i).clamp(max=W - 1).expand(B, Hk, nr)
            self._r_score[..., :nr] += torch.where(i < self._nr[:, None, None], m.gather(2, idx), 0.0)

    def _evict_exact(self):
        keep_n = max(0, self.budget - self._hr)
        if keep_n >= self._hq:
            return
        n = self._hq
        idx = self._q_score[..., :n].topk(keep_n, dim=-1).indices.sort(-1).values  # (B, H, keep_n)
        st = self._store
        # gather everything first, then write (in place, over the valid tokens) only when nothing can fail
        new = {name: t[:, :, :n].gather(2, _expand_idx(idx, t[:, :, :n])) for name, t in st.items()}
        pos = self._q_pos[..., :n].gather(2, idx)
        score = self._q_score[..., :n].gather(2, idx)
        for name, t in st.items():
            t[:, :, :keep_n] = new[name]
        self._q_pos[..., :keep_n] = pos
        self._q_score[..., :keep_n] = score
        self._hev += n - keep_n
        self._nev += n - keep_n
        self._hq = keep_n
        self._nq.fill_(keep_n)

    def _evict_rows(self):
        """Per-row eviction on the device (fixed shapes): row ``b`` holding more than ``budget`` tokens
        keeps, per kv head, its ``max(0, budget - n_res[b])`` highest-score quantized tokens in order."""
        Q = self._hq
        if Q == 0:
            return
        B, H, _ = self._shape
        dev = self._device
        nq = self._nq.to(torch.int64)
        over = (nq + self._nr) > self.budget
        keep = torch.where(over, (self.budget - self._nr.to(torch.int64)).clamp(min=0), nq).minimum(nq)  # (B,)
        j = torch.arange(Q, device=dev)
        valid = j < nq[:, None, None]  # (B, 1, Q)
        s = torch.where(valid, self._q_score[..., :Q], float("-inf"))
        order = s.argsort(dim=-1, descending=True, stable=True)
        rank = torch.empty_like(order).scatter_(-1, order, j.expand(B, H, Q).contiguous())
        kept = valid & (rank < keep[:, None, None])
        src = _gather_src(kept, Q)  # (B, H, Q)
        st = self._store
        for name, t in st.items():
            t[:, :, :Q].copy_(t[:, :, :Q].gather(2, _expand_idx(src, t[:, :, :Q])))
        self._q_pos[..., :Q].copy_(self._q_pos[..., :Q].gather(2, src))
        self._q_score[..., :Q].copy_(self._q_score[..., :Q].gather(2, src))
        self._nev += nq - keep
        self._nq.copy_(keep)
        if not self.static:
            self._hq = min(self._hq, self.budget)

    def select_batch(self, index: torch.Tensor) -> None:
        """Keep / reorder / repeat batch rows: row ``i`` of the result is row ``index[i]`` (beam search).
        Packed codes are copied as they are (no re-quantization).  No host sync for an index on the
        device: its range is checked there (``torch._assert_async``: an out-of-range row is a device
        assert on a GPU, as ``index_select`` would raise anyway); an index on the CPU is checked now."""
        if not self.initialized:
            return
        check_tensor("index", index, dtypes=(torch.int64, torch.int32), ndim=1, contiguous=False)
        if index.device.type == "meta":
            raise ValueError("index must be a real tensor on the cache's device or the CPU, got a meta tensor")
        B = self._shape[0]
        if index.device.type == "cpu":
            if index.numel() and (int(index.min()) < 0 or int(index.max()) >= B):
                raise ValueError(f"index must hold batch rows in [0, {B}), got values in "
                                 f"[{int(index.min())}, {int(index.max())}]")
        elif not torch.compiler.is_compiling():
            torch._assert_async(((index >= 0) & (index < B)).all(), f"index must hold batch rows in [0, {B})")
        index = index.to(self._device)
        # build every new tensor first, then swap them in (all-or-nothing)
        store = {name: t.index_select(0, index) for name, t in self._store.items()}
        attrs = {a: getattr(self, a).index_select(0, index)
                 for a in ("_q_pos", "_q_score", "_k_res", "_v_res", "_r_pos", "_r_pin", "_r_score", "_nq", "_nr",
                           "_npin", "_seq", "_nev")}
        self._store = store
        for a, t in attrs.items():
            setattr(self, a, t)
        self._shape = (index.numel(), *self._shape[1:])

    def refresh_bounds(self) -> None:
        """Tighten the host bounds of a ragged cache to the rows' real maxima (one host sync; not for
        a per-token path).  A ``(B, T)`` pin mask on the device raises the bound on pinned tokens by
        ``T`` per append (the counts are not read back), which widens the residual window every step
        reads; call this now and then in such a loop.  No-op for a uniform or static cache."""
        if not self.initialized or self._exact or self.static:
            return
        nq, nr, npin = (int(t.max()) for t in (self._nq, self._nr, self._npin))
        self._hq, self._hr, self._n_pinned = nq, nr, npin

    # ------------------------------------------------------------------ deferred checks
    def check(self) -> None:
        """Raise the ``ValueError`` of a deferred check (``checks="deferred"``/``"auto"`` on a GPU):
        an fp16-range overflow of int quantization, or a non-finite mass given to
        :meth:`accumulate_mass`.  One host sync; the flags are sticky (the overflowed group stays)."""
        if not self.initialized:
            return
        over, bad_mass = (bool(x) for x in self._flags.cpu())
        if over:
            raise fp16_overflow_error(float(self._amax), min(self.bits_k, self.bits_v))
        if bad_mass:
            raise ValueError("mass must be finite (an attention mass); got NaN or inf values (a deferred "
                             "check: they were counted as 0)")

    # ------------------------------------------------------------------ rollback (speculative decoding)
    @property
    def seq_length(self) -> int:
        """Tokens appended so far (positions ``[0, seq_length)``); ``len(cache)`` plus the evicted ones.
        An upper bound over the rows of a ragged cache (see :meth:`seq_lengths`)."""
        return self._next_pos if self.initialized else 0

    def _check_truncate(self, length) -> None:
        if isinstance(length, torch.Tensor):
            check_tensor("length", length, dtypes=(torch.int32, torch.int64), ndim=1, contiguous=False)
            if self.initialized and length.shape[0] != self._shape[0]:
                raise ValueError(f"length must have shape ({self._shape[0]},) (one length per row), "
                                 f"got {tuple(length.shape)}")
            if bool((length < 0).any()):
                raise ValueError("length must be >= 0 in every row")
            if self.initialized:
                for b, lb in enumerate(length.tolist()):
                    self._row(b)._check_truncate(lb)
            return
        check_int("length", length, min_value=0)
        if not self.initialized or length >= self._next_pos:
            return
        if not self._exact:
            for b in range(self._shape[0]):
                self._row(b)._check_truncate(length)
            return
        if self._hev:
            # only tokens of the residual window may be removed: every quantized token must stay
            # (pinned residual tokens are older: the first removable position is past every quantized
            # token and at the first unpinned residual token)
            nq, nr = self._hq, self._hr
            last_q = int(self._q_pos[..., :nq].max()) if nq else -1
            unp = ~self._r_pin[0, :nr]
            first_res = int(self._r_pos[0, :nr][unp].min()) if bool(unp.any()) else self._next_pos
            first_res = max(first_res, last_q + 1)
            if length < first_res:
                raise ValueError(f"truncate: after H2O eviction only tokens of the residual window (positions >= "
                                 f"{first_res}) can be removed, got length={length}")

    def truncate(self, length) -> None:
        """Remove every token at position ``>= length`` (speculative-decoding rollback); all or nothing.

        ``length``: an int (the same for every row; each row counts its own positions) or a ``(B,)``
        int tensor (per row).  Not a per-token path of ordinary decoding: it reads counts on the host.

        Exact: the removed tokens leave no trace, including those already quantized.  The cache is
        left with the layout a cache that was only ever appended the first ``length`` tokens (same
        pins) has: ``n_quant = G * floor(max(0, c - R) / G)`` with ``c`` the unpinned tokens kept.
        Whole groups below that are kept as they are (codes, scales, zeros: bitwise); kept tokens
        above it that were already quantized (the group the cut falls in, and any group needed to
        refill the residual window to ``R``) go back to the full-precision residual window as their
        dequantized values, i.e. the values attention already used for them (the original inputs
        are not stored); their groups are re-derived (quantized again, with whatever tokens then
        complete them) when they next leave the window.  After H2O eviction the rows keep different
        tokens, so only tokens of the residual window can be removed (else ``ValueError``).
        ``length >= seq_length`` is a no-op.
        """
        self._check_truncate(length)
        self.check()
        if not self.initialized:
            return
        if isinstance(length, torch.Tensor) or not self._exact:
            self._truncate_rows(length)
            return
        if length >= self._next_pos:
            return
        self._truncate_exact(length)

    def _truncate_exact(self, length: int) -> None:
        """Truncate a cache whose rows are identical in layout (every count and position; row 0 is read)."""
        from .decode import dequantize_store

        nr = self._hr
        rpos, rpin = self._r_pos[0, :nr], self._r_pin[0, :nr]
        keep = (rpos < length).nonzero().flatten()
        kr, vr = self._k_res[:, :, :nr].index_select(2, keep), self._v_res[:, :, :nr].index_select(2, keep)
        rpos, rpin, rscore = rpos[keep], rpin[keep], self._r_score[..., :nr].index_select(2, keep)
        nq = self._hq
        if self._hev:  # only residual tokens are removed (checked): the store is kept as it is
            new_nq = nq
        else:
            # store order of the quantized tokens is chronological and the same for every row
            kept_q = int((self._q_pos[0, 0, :nq] < length).sum())
            c = kept_q + int((~rpin).sum())
            new_nq = (max(0, c - self.residual) // self.group_size) * self.group_size
            if new_nq < kept_q:
                t = self.tensors()
                D = self._shape[2]
                back = []
                for p, bits, ax in (("k", self.bits_k, self.key_axis), ("v", self.bits_v, self.value_axis)):
                    x = dequantize_store(t[p + "_codes"], t[p + "_scale"], t[p + "_zero"], self.mode, bits,
                                         self.group_size, ax, nq, D, self._dtype)
                    back.append(x[:, :, new_nq:kept_q])
                bpos = self._q_pos[0, 0, new_nq:kept_q]
                kr, vr = torch.cat([back[0], kr], 2), torch.cat([back[1], vr], 2)
                rpos = torch.cat([bpos, rpos])
                rpin = torch.cat([torch.zeros_like(bpos, dtype=torch.bool), rpin])
                rscore = torch.cat([self._q_score[..., new_nq:kept_q], rscore], 2)
                order = rpos.argsort(stable=True)  # pinned residual tokens may be older than the ones put back
                kr, vr, rpos, rpin, rscore = (kr.index_select(2, order), vr.index_select(2, order), rpos[order],
                                              rpin[order], rscore.index_select(2, order))
            else:
                new_nq = kept_q
        n_pinned = int(rpin.sum())
        # commit (nothing above changed the cache)
        m = kr.shape[2]
        self._grow_res(m)
        self._k_res[:, :, :m] = kr
        self._v_res[:, :, :m] = vr
        self._r_pos[:, :m] = rpos
        self._r_pin[:, :m] = rpin
        self._r_score[..., :m] = rscore
        self._hr, self._hq, self._n_pinned, self._next_pos = m, new_nq, n_pinned, length
        self._nr.fill_(m)
        self._nq.fill_(new_nq)
        self._npin.fill_(n_pinned)
        self._seq.fill_(length)

    def _row(self, b: int) -> "QuantizedKVCache":
        """Row ``b`` as a one-row exact cache whose buffers are views of this cache's (host sync)."""
        sub = QuantizedKVCache.__new__(QuantizedKVCache)
        sub.__dict__.update(self.__dict__)
        sub._store = {name: t[b:b + 1] for name, t in self._store.items()}
        for a in ("_q_pos", "_q_score", "_k_res", "_v_res", "_r_pos", "_r_pin", "_r_score", "_nq", "_nr", "_npin",
                  "_seq", "_nev"):
            setattr(sub, a, getattr(self, a)[b:b + 1])
        sub._shape = (1, *self._shape[1:])
        nq, nr, npin, seq, nev = (int(t[b]) for t in (self._nq, self._nr, self._npin, self._seq, self._nev))
        sub._exact, sub._hq, sub._hr, sub._n_pinned, sub._next_pos, sub._hev = True, nq, nr, npin, seq, nev
        return sub

    def _truncate_rows(self, length) -> None:
        """Per-row truncation (host syncs): each row is truncated as a one-row exact cache, in place."""
        B = self._shape[0]
        lens = length.tolist() if isinstance(length, torch.Tensor) else [length] * B
        # the residual of a truncated row holds at most R + G - 1 unpinned tokens plus its pins
        self._grow_res(max(self._hr, self.residual + self.group_size + self.n_pinned))
        rows = []
        for b in range(B):
            sub = self._row(b)
            if lens[b] < sub._next_pos:
                sub._truncate_exact(lens[b])
            rows.append(sub)
        # _truncate_exact wrote each row in place (views, no reallocation): only the counts remain
        for name, vals in (("_nq", [r._hq for r in rows]), ("_nr", [r._hr for r in rows]),
                           ("_npin", [r._n_pinned for r in rows]), ("_seq", [r._next_pos for r in rows])):
            getattr(self, name).copy_(torch.tensor(vals, dtype=getattr(self, name).dtype))
        self._hq = max(r._hq for r in rows)
        self._hr = max(r._hr for r in rows)
        self._n_pinned = max(r._n_pinned for r in rows)
        self._next_pos = max(r._next_pos for r in rows)
        self._exact = False
        if self.static:
            self._hq, self._hr = _ceil_to(self._init_capacity, self.group_size), self.residual + self.group_size - 1

    # ------------------------------------------------------------------ views for the kernels
    def tensors(self) -> dict:
        """The cache's buffers (capacity-sized; row ``b`` holds ``n_quant[b]`` quantized and ``n_res[b]``
        residual tokens) and the per-row counts ``"n_quant"``, ``"n_res"`` (int32 ``(B,)``, on the
        device).  fp8 codes are returned as uint8 bit patterns; ``k_zero``/``v_zero`` are empty in fp8
        mode."""
        if not self.initialized:
            raise ValueError("the cache is empty and was never appended to: its shape is unknown")
        st = dict(self._store)
        if self.mode == "fp8":
            empty = torch.zeros(0, dtype=torch.float16, device=self._device)
            st["k_zero"] = st["v_zero"] = empty
        st["k_res"], st["v_res"] = self._k_res, self._v_res
        st["n_quant"], st["n_res"] = self._nq, self._nr
        return st

    def _store_order(self, xq: torch.Tensor, xr: torch.Tensor, fill) -> torch.Tensor:
        """Per-row store order ``(B, H, len(cache), ...)`` from quantized slots ``xq (B, H, >=n_quant, ...)``
        and residual slots ``xr (B, H, >=n_res, ...)``; ``fill`` past each row's length."""
        Q, Rr, W = self._hq, self._hr, len(self)
        x = torch.cat([xq[:, :, :Q], xr[:, :, :Rr]], 2)
        if self._exact or W == 0:
            return x[:, :, :W]
        j = torch.arange(W, device=x.device)
        nq = self._nq.to(torch.int64)[:, None, None]
        L = nq + self._nr[:, None, None]
        idx = torch.where(j < nq, j, Q + j - nq).clamp(0, max(Q + Rr - 1, 0))
        idx = idx.expand(x.shape[0], x.shape[1], W)
        out = x.gather(2, _expand_idx(idx, x[:, :, :W]))
        ok = (j < L).view(*L.shape[:2], W, *([1] * (x.dim() - 3)))
        return torch.where(ok, out, torch.as_tensor(fill, dtype=x.dtype, device=x.device))

    def positions(self) -> torch.Tensor:
        """Token positions in store order: ``(B, H_kv, len(cache))`` int64 (quantized then residual;
        each row counts its own positions from 0; ``-1`` past a row's length)."""
        if not self.initialized:
            return torch.zeros(0, dtype=torch.int64)
        B, H, _ = self._shape
        return self._store_order(self._q_pos, self._r_pos[:, None].expand(B, H, self._rcap), -1)

    def dequantized(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """All cached tokens, dequantized, in store order: ``k, v: (B, H_kv, len, D)`` (zeros past a
        row's length; for tests and the reference; the fused decode never builds this)."""
        from .decode import dequantize_store

        if not self.initialized:
            raise ValueError("the cache is empty and was never appended to: its shape is unknown")
        D = self._shape[2]
        t = self.tensors()
        outs = []
        for p, bits, ax in (("k", self.bits_k, self.key_axis), ("v", self.bits_v, self.value_axis)):
            xq = dequantize_store(t[p + "_codes"], t[p + "_scale"], t[p + "_zero"], self.mode, bits,
                                  self.group_size, ax, self._hq, D, dtype)
            outs.append(self._store_order(xq, t[p + "_res"].to(dtype), 0))
        return outs[0], outs[1]

    # ------------------------------------------------------------------ accounting
    def memory_bytes(self, allocated: bool = False) -> int:
        """Bytes of the cached tokens: packed codes + scales + zeros of the quantized tokens + the
        residual window, summed over the rows' real tokens (+ 8 bytes per token of positions are not
        counted; one host sync for a ragged cache).  ``allocated=True``: the bytes of the
        pre-allocated buffers instead."""
        if not self.initialized:
            return 0
        B, H, D = self._shape
        if self._exact:
            nq_sum, nr_sum = B * self._hq, B * self._hr
        else:
            nq_sum, nr_sum = int(self._nq.sum()), int(self._nr.sum())
        total = 0
        for name, t in self._store.items():
            if allocated:
                total += t.numel() * t.element_size()
            else:
                per_slice = t[0, 0, 0:1].numel() * t.element_size() if t.shape[2] else 0
                units = int(nq_sum * self._units_per_token(name))
                total += t.shape[1] * units * per_slice
        esz = torch.empty(0, dtype=self._dtype).element_size()
        r = B * self._rcap if allocated else nr_sum
        return total + 2 * H * r * D * esz

    def compression_report(self) -> dict:
        """Sizes and compression ratio against an fp16 cache of the same tokens (runs :meth:`check`)."""
        self.check()
        if self.initialized and not self._exact:
            tokens_sum = int(self.lengths().sum())
            tokens = int(self.lengths().max())
        else:
            tokens = len(self)
            tokens_sum = tokens * (self._shape[0] if self.initialized else 0)
        rep = {"mode": self.mode, "bits_k": self.bits_k, "bits_v": self.bits_v, "group_size": self.group_size,
               "residual": self.residual, "key_axis": self.key_axis, "value_axis": self.value_axis,
               "tokens": tokens, "quantized_tokens": self.n_quant, "residual_tokens": self.n_res,
               "pinned_tokens": self.n_pinned, "evicted_tokens": self.n_evicted,
               "bytes": self.memory_bytes(), "allocated_bytes": self.memory_bytes(allocated=True)}
        if self.initialized:
            B, H, D = self._shape
            fp16 = 2 * H * tokens_sum * D * 2
            rep["fp16_bytes"] = fp16
            rep["ratio_vs_fp16"] = fp16 / rep["bytes"] if rep["bytes"] else float("nan")
            rep["bits_per_element"] = 8 * rep["bytes"] / (2 * H * tokens_sum * D) if tokens_sum else float("nan")
        else:
            rep.update(fp16_bytes=0, ratio_vs_fp16=float("nan"), bits_per_element=float("nan"))
        return rep

    def __repr__(self) -> str:
        return (f"QuantizedKVCache(mode={self.mode!r}, bits_k={self.bits_k}, bits_v={self.bits_v}, "
                f"group_size={self.group_size}, residual={self.residual}, len={len(self)}, "
                f"quantized={self.n_quant}, residual_tokens={self.n_res}"
                f"{'' if self._exact else ', ragged'})")
