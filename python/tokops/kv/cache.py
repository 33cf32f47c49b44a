"""``QuantizedKVCache``: a KIVI-style quantized KV cache with a full-precision residual window.

Paper: Liu et al., "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache" (ICML 2024);
mixed precision after He et al., "ZipVL" (2024); eviction after Zhang et al., "H2O" (NeurIPS 2023).
Spec: ``DESIGN.md`` ("Quantized KV").

Layout of one cache (one transformer layer), ``B`` batch, ``H_kv`` kv heads, head dim ``D``:

* **Quantized store** (the tokens in *store order* ``[0, n_quant)``), pre-allocated for ``capacity``
  tokens and grown by doubling (old codes are copied, never re-quantized):

  - ``mode="int"``: ``tokops.kv.quantize`` layout of a ``(B, H_kv, capacity, D)`` tensor along
    ``key_axis`` / ``value_axis`` (``-2``: groups of ``G`` tokens per channel, KIVI keys;
    ``-1``: groups of ``G`` channels per token, KIVI values).  ``codes`` int32, ``scale``/``zero`` fp16.
  - ``mode="fp8"``: e4m3fn codes ``(B, H_kv, capacity, D)`` with one fp32 scale per (token, head).

* **Residual window**: the most recent tokens in the input dtype, ``(B, H_kv, n_res, D)``.

**Flush rule (exact).**  Let ``c`` be the number of residual tokens that are not *pinned* (see mixed
precision).  After every ``append``, the oldest ``G * floor(max(0, c - R) / G)`` unpinned residual
tokens are quantized in one call and moved to the quantized store.  So with no pinned tokens the
residual holds ``min(len, R) <= n_res <= R + G - 1`` tokens, and every quantized key group holds
``G`` consecutive tokens (a group is never padded, never re-quantized).  ``residual=0`` is allowed.

**Mixed precision (ZipVL-style), the choice made here:** ``append(k, v, important=mask)`` with a
per-token bool mask ``(n,)`` (shared by the batch and heads) *pins* those tokens: they never leave
the full-precision residual (so they are kept at full precision, not at a higher bit width).  The
quantized store then holds the unpinned tokens in order, the residual holds the pinned tokens and
the recent window in order; :meth:`positions` maps store order to token positions.

**H2O eviction** (``budget=``): :meth:`accumulate_mass` adds the per-key attention mass returned by
``decode_attention(..., return_mass=True)`` (summed over the query heads of each kv head) to a
per-(batch, kv head, token) score.  When ``len(cache) > budget`` after an ``append``, the quantized
store is compacted per (batch, kv head) to its ``budget - n_res`` highest-score tokens (kept in
order); the residual window is the "recent" set and is always kept.  Eviction needs a per-token
layout of the quantized store (``key_axis=value_axis=-1`` or ``mode="fp8"``): a per-channel key group
mixes ``G`` tokens and cannot drop one without re-quantizing.  After an eviction the store order is
still chronological, but :meth:`positions` (per batch and kv head) gives the original positions.

**Rollback** (speculative decoding): :meth:`truncate` removes every token at position ``>= length``
and leaves the layout a cache fed only the first ``length`` tokens would have (see its docstring).
"""

from __future__ import annotations

import torch

from .. import _registry as reg
from .._checks import FLOAT_DTYPES, check_int, check_power_of_two, check_tensor
from .quant import BITS, MAX_GROUP, MIN_GROUP, quantize, quantize_fp8

MODES = ("int", "fp8")


def _ceil_to(a: int, b: int) -> int:
    return -(-a // b) * b


class QuantizedKVCache:
    """A quantized KV cache for one attention layer (see the module docstring for the layout).

    ``append(k, v)`` with ``k, v: (B, H_kv, n, D)`` (fp16/bf16/fp32, any ``n >= 0``: prefill chunks
    or single decode steps); ``len(cache)`` is the number of cached tokens;
    ``tokops.kv.decode_attention(q, cache)`` attends over them.
    """

    def __init__(self, bits_k: int = 4, bits_v: int = 4, group_size: int = 32, residual: int = 128,
                 mode: str = "int", key_axis: int = -2, value_axis: int = -1, *, capacity: int = 0,
                 budget: int | None = None, backend: str = "auto"):
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
        self.mode, self.bits_k, self.bits_v, self.group_size = mode, bits_k, bits_v, group_size
        self.residual, self.key_axis, self.value_axis = residual, key_axis, value_axis
        self.budget, self.backend, self._init_capacity = budget, backend, capacity
        self.n_quant = 0
        self.n_res = 0
        self.n_evicted = 0
        self._n_pinned = 0
        self._shape = None  # (B, H_kv, D), dtype, device after the first append

    # ------------------------------------------------------------------ properties
    def __len__(self) -> int:
        return self.n_quant + self.n_res

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
        """Tokens pinned in full precision by ``append(..., important=)`` (they never leave the residual)."""
        return self._n_pinned

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
        self._qcap = _ceil_to(max(self._init_capacity, 0), self.group_size)
        self._store = self._alloc_store(self._qcap)
        self._q_pos = torch.zeros(B, H, self._qcap, dtype=torch.int64, device=k.device)
        self._q_score = torch.zeros(B, H, self._qcap, dtype=torch.float32, device=k.device)
        self._rcap = 0
        self._k_res = k.new_zeros(B, H, 0, D)
        self._v_res = k.new_zeros(B, H, 0, D)
        self._r_pos = torch.zeros(0, dtype=torch.int64, device=k.device)
        self._r_pin = torch.zeros(0, dtype=torch.bool, device=k.device)
        self._r_score = torch.zeros(B, H, 0, dtype=torch.float32, device=k.device)
        self._next_pos = 0

    def _grow(self, need: int):
        if need <= self._qcap:
            return
        cap = _ceil_to(max(need, 2 * self._qcap, 2 * self.group_size), self.group_size)
        new = self._alloc_store(cap)
        n = self.n_quant
        for name, old in self._store.items():
            dim = self._token_dim(name)
            frac = self._units_per_token(name)
            used = int(n * frac)
            new[name].narrow(dim, 0, used).copy_(old.narrow(dim, 0, used))
        self._store = new
        for attr in ("_q_pos", "_q_score"):
            old = getattr(self, attr)
            buf = old.new_zeros(old.shape[0], old.shape[1], cap)
            buf[..., :n] = old[..., :n]
            setattr(self, attr, buf)
        self._qcap = cap

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
    def _check_append(self, k, v, important):
        # strided views are fine: append copies k/v into the residual window (torch.cat)
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
        if important is not None:
            check_tensor("important", important, dtypes=(torch.bool,), ndim=1, nonempty=False, contiguous=False)
            cache_dev = self._device if self.initialized else k.device
            if important.device not in (cache_dev, torch.device("cpu")):
                raise ValueError(f"important must be on the cache's device ({cache_dev}) or the CPU, "
                                 f"got {important.device}")
            if important.shape[0] != k.shape[2]:
                raise ValueError(f"important must have shape ({k.shape[2]},) (one flag per new token), "
                                 f"got {tuple(important.shape)}")
            if self.budget is not None:
                raise ValueError("important (pinned tokens) cannot be combined with budget (H2O eviction)")

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

    def append(self, k: torch.Tensor, v: torch.Tensor, important: torch.Tensor | None = None) -> None:
        """Append ``n`` new tokens ``k, v: (B, H_kv, n, D)``; ``important: (n,) bool`` pins tokens in
        full precision (mixed precision).  Whole groups leave the residual window as described in the
        module docstring.  All-or-nothing: when it raises (bad argument, allocation failure, a value
        the quantizer refuses), the cache is unchanged."""
        self._check_append(k, v, important)
        snap = self._snapshot()
        try:
            self._append(k, v, important)
        except BaseException:
            self._restore(snap)
            raise
        self._sync_lengths()

    def _append(self, k, v, important) -> None:
        if not self.initialized:
            self._init(k)
        n = k.shape[2]
        if n == 0:
            return
        dev = self._device
        pos = torch.arange(self._next_pos, self._next_pos + n, device=dev)
        self._next_pos += n
        pin = important.to(dev) if important is not None else torch.zeros(n, dtype=torch.bool, device=dev)
        if important is not None:
            self._n_pinned += int(important.sum())
        kr = torch.cat([self._k_res[:, :, : self.n_res], k], 2)
        vr = torch.cat([self._v_res[:, :, : self.n_res], v], 2)
        rpos = torch.cat([self._r_pos[: self.n_res], pos])
        rpin = torch.cat([self._r_pin[: self.n_res], pin])
        B, H, D = self._shape
        rscore = torch.cat([self._r_score[..., : self.n_res], torch.zeros(B, H, n, device=dev)], 2)
        c = rpin.numel() - self._n_pinned
        nf = (max(0, c - self.residual) // self.group_size) * self.group_size
        if nf:
            if self._n_pinned:
                unpinned = (~rpin).nonzero().flatten()
                fidx = unpinned[:nf]
                keep = torch.ones(rpin.numel(), dtype=torch.bool, device=dev)
                keep[fidx] = False
                kidx = keep.nonzero().flatten()
                self._flush(kr.index_select(2, fidx), vr.index_select(2, fidx), rpos[fidx], rscore[..., fidx])
                kr, vr, rpos, rpin, rscore = (kr.index_select(2, kidx), vr.index_select(2, kidx), rpos[kidx],
                                              rpin[kidx], rscore[..., kidx])
            else:
                self._flush(kr[:, :, :nf], vr[:, :, :nf], rpos[:nf], rscore[..., :nf])
                kr, vr, rpos, rpin, rscore = kr[:, :, nf:], vr[:, :, nf:], rpos[nf:], rpin[nf:], rscore[..., nf:]
        self._set_residual(kr, vr, rpos, rpin, rscore)
        if self.budget is not None and len(self) > self.budget:
            self._evict()

    def _set_residual(self, kr, vr, rpos, rpin, rscore):
        m = kr.shape[2]
        if m > self._rcap:
            cap = max(m, 2 * self._rcap, self.residual + self.group_size)
            B, H, D = self._shape
            self._k_res = kr.new_zeros(B, H, cap, D)
            self._v_res = vr.new_zeros(B, H, cap, D)
            self._r_pos = rpos.new_zeros(cap)
            self._r_pin = rpin.new_zeros(cap)
            self._r_score = rscore.new_zeros(B, H, cap)
            self._rcap = cap
        self._k_res[:, :, :m] = kr
        self._v_res[:, :, :m] = vr
        self._r_pos[:m] = rpos
        self._r_pin[:m] = rpin
        self._r_score[..., :m] = rscore
        self.n_res = m

    def _flush(self, kf, vf, fpos, fscore):
        """Quantize ``nf`` (a multiple of G) tokens and write them after the quantized store."""
        nf = kf.shape[2]
        n0 = self.n_quant
        # quantize both tensors before writing anything (a refused value leaves the store untouched)
        if self.mode == "fp8":
            fts = [(p, quantize_fp8(x.contiguous(), backend=self.backend)) for p, x in (("k", kf), ("v", vf))]
        else:
            qts = [(p, quantize(x.contiguous(), bits, self.group_size, ax, backend=self.backend))
                   for p, x, bits, ax in (("k", kf, self.bits_k, self.key_axis),
                                          ("v", vf, self.bits_v, self.value_axis))]
        self._grow(n0 + nf)
        st = self._store
        if self.mode == "fp8":
            for p, ft in fts:
                st[p + "_codes"][:, :, n0:n0 + nf] = ft.codes.view(torch.uint8)
                st[p + "_scale"][:, :, n0:n0 + nf] = ft.scale
        else:
            for p, qt in qts:
                for name, t in (("_codes", qt.codes), ("_scale", qt.scale), ("_zero", qt.zero)):
                    off = int(n0 * self._units_per_token(p + name))
                    st[p + name][:, :, off:off + t.shape[2]] = t
        self._q_pos[..., n0:n0 + nf] = fpos
        self._q_score[..., n0:n0 + nf] = fscore
        self.n_quant = n0 + nf

    # ------------------------------------------------------------------ H2O
    def accumulate_mass(self, mass: torch.Tensor) -> None:
        """Add per-key attention mass ``(B, H, len(cache))`` fp32 (``decode_attention(...,
        return_mass=True)``, ``H`` query heads) to the H2O scores, summed over each kv head's query heads."""
        if not self.initialized:
            raise ValueError("accumulate_mass: the cache is empty")
        B, Hk, _ = self._shape
        check_tensor("mass", mass, dtypes=(torch.float32,), ndim=3, nonempty=False, contiguous=False)
        if mass.shape[0] != B or mass.shape[2] != len(self) or mass.shape[1] % Hk:
            raise ValueError(f"mass must have shape ({B}, H, {len(self)}) with H a multiple of {Hk}, "
                             f"got {tuple(mass.shape)}")
        if mass.device != self._device:
            raise ValueError(f"mass must be on the cache's device {self._device}, got {mass.device}")
        # a NaN / inf score would make the eviction order arbitrary: refuse it (one host sync)
        if not bool(torch.isfinite(mass).all()):
            raise ValueError("mass must be finite (an attention mass); got NaN or inf values")
        m = mass.reshape(B, Hk, mass.shape[1] // Hk, -1).sum(2)  # reshape: mass may be a strided view
        self._q_score[..., : self.n_quant] += m[..., : self.n_quant]
        self._r_score[..., : self.n_res] += m[..., self.n_quant:]

    def _evict(self):
        keep_n = self.budget - self.n_res
        if keep_n >= self.n_quant:
            return
        n = self.n_quant
        idx = self._q_score[..., :n].topk(keep_n, dim=-1).indices.sort(-1).values  # (B, H, keep_n)
        st = self._store
        # gather everything first, then write (in place, over the valid tokens) only when nothing can fail
        new = {}
        for name, t in st.items():
            used = t[:, :, :n]
            gi = idx.view(*idx.shape, *([1] * (used.dim() - 3))).expand(*idx.shape, *used.shape[3:])
            new[name] = used.gather(2, gi)
        pos = self._q_pos[..., :n].gather(2, idx)
        score = self._q_score[..., :n].gather(2, idx)
        for name, t in st.items():
            t[:, :, :keep_n] = new[name]
        self._q_pos[..., :keep_n] = pos
        self._q_score[..., :keep_n] = score
        self.n_evicted += n - keep_n
        self.n_quant = keep_n

    def select_batch(self, index: torch.Tensor) -> None:
        """Keep / reorder / repeat batch rows: row ``i`` of the result is row ``index[i]`` (beam search).
        Packed codes are copied as they are (no re-quantization)."""
        if not self.initialized:
            return
        check_tensor("index", index, dtypes=(torch.int64, torch.int32), ndim=1, contiguous=False)
        if index.device.type == "meta":
            raise ValueError("index must be a real tensor on the cache's device or the CPU, got a meta tensor")
        index = index.to(self._device)
        B = self._shape[0]
        lo, hi = (int(x) for x in torch.stack([index.min(), index.max()]).tolist())
        if lo < 0 or hi >= B:
            raise ValueError(f"index must hold batch rows in [0, {B}), got values in [{lo}, {hi}]")
        # build every new tensor first, then swap them in (all-or-nothing)
        store = {name: t.index_select(0, index) for name, t in self._store.items()}
        attrs = {a: getattr(self, a).index_select(0, index) for a in ("_q_pos", "_q_score", "_k_res", "_v_res",
                                                                       "_r_score")}
        self._store = store
        for a, t in attrs.items():
            setattr(self, a, t)
        self._shape = (index.numel(), *self._shape[1:])
        self._sync_lengths()

    # ------------------------------------------------------------------ rollback (speculative decoding)
    @property
    def seq_length(self) -> int:
        """Tokens appended so far (positions ``[0, seq_length)``); ``len(cache)`` less the evicted ones."""
        return self._next_pos if self.initialized else 0

    def _check_truncate(self, length: int) -> None:
        check_int("length", length, min_value=0)
        if self.initialized and self.n_evicted and length < self._next_pos:
            first_res = int(self._r_pos[0]) if self.n_res else self._next_pos
            if length < first_res:
                raise ValueError(f"truncate: after H2O eviction only tokens of the residual window (positions >= "
                                 f"{first_res}) can be removed, got length={length}")

    def truncate(self, length: int) -> None:
        """Remove every token at position ``>= length`` (speculative-decoding rollback); all or nothing.

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
        if not self.initialized or length >= self._next_pos:
            return
        from .decode import dequantize_store

        nr = self.n_res
        rpos, rpin = self._r_pos[:nr], self._r_pin[:nr]
        keep = (rpos < length).nonzero().flatten()
        kr, vr = self._k_res[:, :, :nr].index_select(2, keep), self._v_res[:, :, :nr].index_select(2, keep)
        rpos, rpin, rscore = rpos[keep], rpin[keep], self._r_score[..., :nr].index_select(2, keep)
        nq = self.n_quant
        if self.n_evicted:  # only residual tokens are removed (checked): the store is kept as it is
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
        self._set_residual(kr, vr, rpos, rpin, rscore)
        self.n_quant, self._n_pinned, self._next_pos = new_nq, n_pinned, length
        self._sync_lengths()

    # ------------------------------------------------------------------ views for the kernels
    def _sync_lengths(self) -> None:
        """Bring the device length tensors ``(2, B)`` int32 (row 0: n_quant, row 1: n_res per batch row)
        up to date with the ints.  Updated in place with ``fill_`` (a kernel launch with the value as an
        argument: no host->device copy, no sync), so a captured CUDA graph that reads them replays
        with the new lengths; reallocated only when the batch size or device changes."""
        if not self.initialized:
            return
        B = self._shape[0]
        lt = self.__dict__.get("_len_t")
        if lt is None or lt.shape[1] != B or lt.device != self._device:
            lt = torch.empty(2, B, dtype=torch.int32, device=self._device)
            self._len_t, self._len_key = lt, None
        key = (self.n_quant, self.n_res)
        if self._len_key != key:
            lt[0].fill_(self.n_quant)
            lt[1].fill_(self.n_res)
            self._len_key = key

    def tensors(self) -> dict:
        """The cache's buffers (capacity-sized; only the first ``n_quant`` / ``n_res`` tokens are valid)
        and the per-row lengths ``n_quant``/``n_res``: int32 ``(B,)`` on the cache's device (the
        decode op's length arguments).  fp8 codes are returned as uint8 bit patterns;
        ``k_zero``/``v_zero`` are empty in fp8 mode."""
        if not self.initialized:
            raise ValueError("the cache is empty and was never appended to: its shape is unknown")
        self._sync_lengths()
        st = dict(self._store)
        if self.mode == "fp8":
            empty = torch.zeros(0, dtype=torch.float16, device=self._device)
            st["k_zero"] = st["v_zero"] = empty
        st["k_res"], st["v_res"] = self._k_res, self._v_res
        st["n_quant"], st["n_res"] = self._len_t[0], self._len_t[1]
        return st

    def positions(self) -> torch.Tensor:
        """Token positions in store order: ``(B, H_kv, len(cache))`` int64 (quantized then residual)."""
        if not self.initialized:
            return torch.zeros(0, dtype=torch.int64)
        B, H, _ = self._shape
        return torch.cat([self._q_pos[..., : self.n_quant],
                          self._r_pos[: self.n_res].expand(B, H, self.n_res)], 2)

    def dequantized(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """All cached tokens, dequantized, in store order: ``k, v: (B, H_kv, len, D)`` (for tests and
        the reference; the fused decode never builds this)."""
        from .decode import dequantize_store

        if not self.initialized:
            raise ValueError("the cache is empty and was never appended to: its shape is unknown")
        D = self._shape[2]
        t = self.tensors()
        outs = []
        for p, bits, ax in (("k", self.bits_k, self.key_axis), ("v", self.bits_v, self.value_axis)):
            xq = dequantize_store(t[p + "_codes"], t[p + "_scale"], t[p + "_zero"], self.mode, bits,
                                  self.group_size, ax, self.n_quant, D, dtype)
            outs.append(torch.cat([xq, t[p + "_res"][:, :, : self.n_res].to(dtype)], 2))
        return outs[0], outs[1]

    # ------------------------------------------------------------------ accounting
    def memory_bytes(self, allocated: bool = False) -> int:
        """Bytes of the cached tokens: packed codes + scales + zeros of the quantized tokens + the
        residual window (+ 8 bytes per token of positions are not counted).  ``allocated=True``: the
        bytes of the pre-allocated buffers instead."""
        if not self.initialized:
            return 0
        total = 0
        for name, t in self._store.items():
            if allocated:
                total += t.numel() * t.element_size()
            else:
                per_slice = t[0, 0, 0:1].numel() * t.element_size() if t.shape[2] else 0
                units = int(self.n_quant * self._units_per_token(name))
                total += t.shape[0] * t.shape[1] * units * per_slice
        B, H, D = self._shape
        esz = torch.empty(0, dtype=self._dtype).element_size()
        r = self._rcap if allocated else self.n_res
        return total + 2 * B * H * r * D * esz

    def compression_report(self) -> dict:
        """Sizes and compression ratio against an fp16 cache of the same tokens."""
        tokens = len(self)
        rep = {"mode": self.mode, "bits_k": self.bits_k, "bits_v": self.bits_v, "group_size": self.group_size,
               "residual": self.residual, "key_axis": self.key_axis, "value_axis": self.value_axis,
               "tokens": tokens, "quantized_tokens": self.n_quant, "residual_tokens": self.n_res,
               "pinned_tokens": self.n_pinned, "evicted_tokens": self.n_evicted,
               "bytes": self.memory_bytes(), "allocated_bytes": self.memory_bytes(allocated=True)}
        if self.initialized:
            B, H, D = self._shape
            fp16 = 2 * B * H * tokens * D * 2
            rep["fp16_bytes"] = fp16
            rep["ratio_vs_fp16"] = fp16 / rep["bytes"] if rep["bytes"] else float("nan")
            rep["bits_per_element"] = 8 * rep["bytes"] / (2 * B * H * tokens * D) if tokens else float("nan")
        else:
            rep.update(fp16_bytes=0, ratio_vs_fp16=float("nan"), bits_per_element=float("nan"))
        return rep

    def __repr__(self) -> str:
        return (f"QuantizedKVCache(mode={self.mode!r}, bits_k={self.bits_k}, bits_v={self.bits_v}, "
                f"group_size={self.group_size}, residual={self.residual}, len={len(self)}, "
                f"quantized={self.n_quant}, residual_tokens={self.n_res})")
