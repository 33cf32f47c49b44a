"""Paged quantized KV cache (the layout a serving engine plugs in) and decode attention over its pages.

Papers: KIVI (Liu et al., ICML 2024) for the quantization layout and the residual window; vLLM's
PagedAttention (Kwon et al., SOSP 2023) for the page pool + block table; Flash-Decoding (Dao et al.,
2023) for the split-K scheme.  Spec of the group quantization: ``DESIGN.md`` ("Quantized KV").
Mapping onto vLLM's and FlashInfer's block tables: ``docs/paged_kv.md``.

Layout (:class:`PagedKVCache`), ``H_kv`` kv heads, head dim ``D``, page size ``P`` tokens, group size ``G``:

* **Page pool**, shared by every row and every layer: ``num_pages`` pages; one page id names the same
  slot in every layer (like vLLM, whose block table is shared by the layers).  Per layer and page,
  the KIVI layout of ``P`` consecutive tokens of one row (``P`` a multiple of ``G`` and of 16, so a
  group never straddles a page):

  - ``mode="int"`` (int8/int4/int2): keys per channel (a group is ``G`` consecutive tokens of one
    channel): ``k_codes (L, pages, H_kv, P*bits_k/32, D) int32``, ``k_scale, k_zero (L, pages, H_kv,
    P/G, D) fp16``; values per token (a group is ``G`` consecutive channels of one token):
    ``v_codes (L, pages, H_kv, P, D*bits_v/32) int32``, ``v_scale, v_zero (L, pages, H_kv, P, D/G)
    fp16``.  Each page slice is exactly ``tokops.kv.quantize`` of its tokens (``axis=-2`` / ``-1``).
  - ``mode="fp8"``: ``k_codes, v_codes (L, pages, H_kv, P, D) uint8`` (e4m3fn bit patterns),
    ``k_scale, v_scale (L, pages, H_kv, P) fp32`` (one per token and head, ``amax / 448``).

* **Block table** ``block_table (max_rows, max_pages_per_row) int32`` on the device: entry ``[b, j]``
  is the page holding row ``b``'s tokens ``[j*P, (j+1)*P)`` (the FlashAttention / vLLM convention;
  unused entries are ``-1`` and never read).  **Lengths** ``lengths (max_rows,) int32`` on the device.
  The host keeps mirrors of both (the scheduler knows the lengths, like vLLM's block manager); the
  decode kernels read only the device tensors.

* **Residual window** (KIVI), per layer and row, in the cache's dtype: a ring buffer ``k_res, v_res
  (L, max_rows, H_kv, R + G, D)``; token position ``p`` lives in slot ``p % (R + G)``.

**Residual rule (exact).**  A row of length ``n`` holds its first
``n_quant(n) = G * floor(max(0, n - R) / G)`` tokens quantized in pages and the other
``n - n_quant(n)`` tokens (``min(n, R) <= . <= R + G - 1``) in full precision in the ring.  A pure
function of the length: the same as :class:`~tokops.kv.QuantizedKVCache`'s flush rule without pinned
tokens, whatever the sequence of appends; a group is quantized once, when it leaves the window,
never padded, never re-quantized.  ``residual=0`` keeps only the tokens that do not yet fill a group.

**Appending** (different numbers of tokens per row): :meth:`PagedKVCache.extend` (once per step, on
the host: allocates pages from the free list, advances the lengths, plans the writes) then
:meth:`PagedKVCache.write` once per layer (device work only: gathers the groups that leave the window,
quantizes them with ``tokops::kv_quantize``, scatters them into their pages, writes the new window
tokens into the ring).  :meth:`PagedKVCache.append` does both for a one-layer cache.
:meth:`PagedKVCache.free_row` returns a finished row's pages to the free list.

**Decode** (:func:`paged_decode_attention`, op ``tokops::kv_paged_decode_attention``): ``q (B, H, nq,
D)`` with ``B = max_rows`` (a row of length 0 returns 0 and LSE ``-inf``), GQA, the causal rule of
:func:`tokops.kv.decode_attention` per row (query ``i`` of row ``b`` sees positions
``j <= lengths[b] - nq + i``).  Split-K over the pages of each row with an LSE merge; the launch grid
depends only on ``(B, H_kv, max_pages_per_row)`` (never on the lengths' values), so a CUDA graph can
replay it.  Returns ``(out, lse, mass)``: ``mass (B, H, max_pages_per_row * P + R + G)`` fp32 indexed
by token position (0 at positions ``>= lengths[b]``), or ``(B, H, 0)`` when not asked.  No host sync.

Backends (verification level, DESIGN.md): ``torch`` dequantizes every block-table column of every row
into a temporary and runs masked dense fp32 attention (the reference path; float64 in
:func:`paged_decode_reference`); ``triton`` (``triton_kernels/kv_paged_decode.py``) reads the packed
codes through the block table, never a dequantized copy (interpreter-tested; compiled for sm_80/sm_90
by ``benchmarks/kernel_check.py``: pipelined, no spills); ``cuda`` (``csrc/kv/paged_decode_cuda.cu``,
head dims 32/64/128/256) executed under the CPU emulation of ``tests/emu`` only: not GPU-verified, so
``auto`` never picks it.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from .. import _registry as reg
from .._checks import FLOAT_DTYPES, check_int, check_power_of_two, check_tensor, dense
from . import reference as ref
from .quant import BITS, MAX_GROUP, MIN_GROUP

MODES = ("int", "fp8")
MAX_NQ = 8
PAGE_MULTIPLE = 16  # page sizes are multiples of 16 tokens (the kernels' token tiles divide a page)


class PagePoolExhausted(RuntimeError):
    """:meth:`PagedKVCache.extend` needs more free pages than the pool has (nothing was changed)."""


def n_quant_of(length, residual: int, group_size: int):
    """Tokens of a row of ``length`` held quantized in pages (int or int tensor): the residual rule."""
    if isinstance(length, torch.Tensor):
        return group_size * torch.div((length - residual).clamp(min=0), group_size, rounding_mode="floor")
    return group_size * (max(0, length - residual) // group_size)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# --------------------------------------------------------------------------- the cache
class _Plan:
    """Device index tensors of one :meth:`PagedKVCache.extend` step (written once per layer)."""

    def __init__(self):
        self.rows = []
        self.n_new = []
        self.n_max = 0
        self.ng = 0  # groups to quantize
        self.m = 0  # tokens to put in the ring
        self.written = set()


class PagedKVCache:
    """A paged KIVI-quantized KV cache shared by ``max_rows`` rows and ``num_layers`` layers (see the
    module docstring for the layout, the residual rule and the append protocol).

    ``num_pages`` pages of ``page_size`` tokens (a multiple of ``group_size`` and of 16);
    ``max_pages_per_row`` columns of the block table (default: ``num_pages``); ``bits_k, bits_v`` in
    {8, 4, 2} (``mode="int"``) or ``mode="fp8"``; ``residual`` (``R``, a multiple of ``group_size``)
    full-precision tokens kept per row; ``dtype`` of the tokens (fp16/bf16/fp32).
    """

    def __init__(self, num_pages: int, page_size: int, num_kv_heads: int, head_dim: int, max_rows: int, *,
                 max_pages_per_row: int | None = None, num_layers: int = 1, bits_k: int = 4, bits_v: int = 4,
                 group_size: int = 32, residual: int = 128, mode: str = "int", dtype: torch.dtype = torch.float16,
                 device="cpu", backend: str = "auto"):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        for name, v in (("num_pages", num_pages), ("page_size", page_size), ("num_kv_heads", num_kv_heads),
                        ("head_dim", head_dim), ("max_rows", max_rows), ("num_layers", num_layers)):
            check_int(name, v, min_value=1)
        check_power_of_two("group_size", group_size, MIN_GROUP, MAX_GROUP)
        check_int("residual", residual, min_value=0)
        if page_size % group_size or page_size % PAGE_MULTIPLE:
            raise ValueError(f"page_size must be a multiple of group_size={group_size} and of {PAGE_MULTIPLE} "
                             f"(a group never straddles a page), got {page_size}")
        if residual % group_size:
            raise ValueError(f"residual must be a multiple of group_size={group_size}, got {residual}")
        max_pages_per_row = num_pages if max_pages_per_row is None else max_pages_per_row
        check_int("max_pages_per_row", max_pages_per_row, min_value=1)
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"dtype must be one of float16, bfloat16, float32, got {dtype}")
        if mode == "int":
            check_int("bits_k", bits_k, choices=BITS)
            check_int("bits_v", bits_v, choices=BITS)
            if (group_size * bits_k) % 32:
                raise ValueError(f"keys are grouped per channel (G tokens packed into int32 words): group_size*bits_k "
                                 f"must be a multiple of 32, got group_size={group_size}, bits_k={bits_k}")
            if head_dim % group_size or (head_dim * bits_v) % 32:
                raise ValueError(f"values are grouped per token (G channels): group_size={group_size} must divide "
                                 f"head_dim={head_dim} and head_dim*bits_v must be a multiple of 32")
        else:
            bits_k = bits_v = 8
        if not isinstance(backend, str) or backend not in reg.BACKENDS:
            raise ValueError(f"backend must be one of {reg.BACKENDS}; got {backend!r}")
        self.num_pages, self.page_size, self.max_rows, self.num_layers = num_pages, page_size, max_rows, num_layers
        self.num_kv_heads, self.head_dim, self.max_pages_per_row = num_kv_heads, head_dim, max_pages_per_row
        self.bits_k, self.bits_v, self.group_size, self.residual = bits_k, bits_v, group_size, residual
        self.mode, self.dtype, self.device, self.backend = mode, dtype, torch.device(device), backend
        self.ring = residual + group_size
        NL, NP, H, P, D, G = num_layers, num_pages, num_kv_heads, page_size, head_dim, group_size
        dev = self.device
        if mode == "int":
            self.k_codes = torch.zeros(NL, NP, H, P * bits_k // 32, D, dtype=torch.int32, device=dev)
            self.k_scale = torch.zeros(NL, NP, H, P // G, D, dtype=torch.float16, device=dev)
            self.k_zero = torch.zeros_like(self.k_scale)
            self.v_codes = torch.zeros(NL, NP, H, P, D * bits_v // 32, dtype=torch.int32, device=dev)
            self.v_scale = torch.zeros(NL, NP, H, P, D // G, dtype=torch.float16, device=dev)
            self.v_zero = torch.zeros_like(self.v_scale)
        else:
            self.k_codes = torch.zeros(NL, NP, H, P, D, dtype=torch.uint8, device=dev)
            self.v_codes = torch.zeros_like(self.k_codes)
            self.k_scale = torch.zeros(NL, NP, H, P, dtype=torch.float32, device=dev)
            self.v_scale = torch.zeros_like(self.k_scale)
            self.k_zero = self.v_zero = torch.zeros(NL, 0, dtype=torch.float16, device=dev)
        self.k_res = torch.zeros(NL, max_rows, H, self.ring, D, dtype=dtype, device=dev)
        self.v_res = torch.zeros_like(self.k_res)
        # host mirrors (the scheduler's view) and the device tensors the kernels read
        self._len = [0] * max_rows
        self._pages: list[list[int]] = [[] for _ in range(max_rows)]
        self._free = list(range(num_pages - 1, -1, -1))  # pop() hands out the lowest id first
        self._table_host = torch.full((max_rows, max_pages_per_row), -1, dtype=torch.int32)
        self.block_table = self._table_host.to(dev)
        self.lengths = torch.zeros(max_rows, dtype=torch.int32, device=dev)
        self._plan: _Plan | None = None

    # ------------------------------------------------------------------ host-side views
    def length(self, row: int) -> int:
        return self._len[row]

    def lengths_host(self) -> list[int]:
        return list(self._len)

    def pages_of(self, row: int) -> list[int]:
        return list(self._pages[row])

    @property
    def num_free_pages(self) -> int:
        return len(self._free)

    def n_quant(self, row: int) -> int:
        return n_quant_of(self._len[row], self.residual, self.group_size)

    def layer(self, layer: int) -> dict:
        """The op's tensors of one layer (views of the pool, no copy)."""
        check_int("layer", layer, min_value=0, max_value=self.num_layers - 1)
        return {"k_codes": self.k_codes[layer], "k_scale": self.k_scale[layer], "k_zero": self.k_zero[layer],
                "v_codes": self.v_codes[layer], "v_scale": self.v_scale[layer], "v_zero": self.v_zero[layer],
                "k_res": self.k_res[layer], "v_res": self.v_res[layer]}

    def memory_bytes(self) -> int:
        ts = (self.k_codes, self.k_scale, self.k_zero, self.v_codes, self.v_scale, self.v_zero, self.k_res,
              self.v_res)
        return sum(t.numel() * t.element_size() for t in ts)

    # ------------------------------------------------------------------ allocation
    def _rows_arg(self, rows) -> list[int]:
        if rows is None:
            return list(range(self.max_rows))
        if isinstance(rows, torch.Tensor):
            if rows.device.type != "cpu":
                raise ValueError(f"rows must be a host (CPU) tensor or a list of ints, got a tensor on {rows.device}")
            rows = rows.tolist()
        rows = list(rows)
        for r in rows:
            check_int("rows[i]", r, min_value=0, max_value=self.max_rows - 1)
        if len(set(rows)) != len(rows):
            raise ValueError(f"rows must not repeat a row, got {rows}")
        return rows

    def extend(self, n_new, rows: Sequence[int] | None = None) -> None:
        """Start a step: row ``rows[i]`` (default: every row) grows by ``n_new[i]`` tokens (an int for all).

        Host-side: allocates the pages the new lengths need from the free list (all-or-nothing:
        :class:`PagePoolExhausted` or ``ValueError`` leave the cache unchanged), advances the lengths
        (host and device) and plans the writes.  Then call :meth:`write` once per layer with the new
        tokens before attending over that layer."""
        rows = self._rows_arg(rows)
        if isinstance(n_new, int) and not isinstance(n_new, bool):
            n_new = [n_new] * len(rows)
        if isinstance(n_new, torch.Tensor):
            if n_new.device.type != "cpu":
                raise ValueError(f"n_new must be host ints (the scheduler's counts), got a tensor on {n_new.device}")
            n_new = n_new.tolist()
        n_new = list(n_new)
        if len(n_new) != len(rows):
            raise ValueError(f"n_new must have one count per row ({len(rows)}), got {len(n_new)}")
        for n in n_new:
            check_int("n_new[i]", n, min_value=0)
        if self._plan is not None and self._plan.n_max and len(self._plan.written) != self.num_layers:
            missing = sorted(set(range(self.num_layers)) - self._plan.written)
            raise RuntimeError(f"extend: the previous step's tokens were not written for layers {missing}")
        P, G, R, RC = self.page_size, self.group_size, self.residual, self.ring
        new_pages = {}
        need_total = 0
        for r, n in zip(rows, n_new):
            L1 = self._len[r] + n
            pages = _cdiv(n_quant_of(L1, R, G), P)
            if pages > self.max_pages_per_row:
                raise ValueError(f"n_new: row {r} would reach length {L1}, which needs {pages} pages > "
                                 f"max_pages_per_row={self.max_pages_per_row}")
            new_pages[r] = pages - len(self._pages[r])
            need_total += new_pages[r]
        if need_total > len(self._free):
            raise PagePoolExhausted(f"the page pool has {len(self._free)} free pages, this step needs {need_total} "
                                    f"(free finished rows with free_row, or make the pool larger)")
        plan = _Plan()
        plan.rows, plan.n_new, plan.n_max = rows, n_new, max(n_new, default=0)
        g_row, g_src, g_page, g_slot = [], [], [], []
        r_row_abs, r_row_loc, r_src, r_dst = [], [], [], []
        ar = torch.arange(G)
        for i, (r, n) in enumerate(zip(rows, n_new)):
            for _ in range(new_pages[r]):
                pid = self._free.pop()
                self._table_host[r, len(self._pages[r])] = pid
                self._pages[r].append(pid)
            L0, L1 = self._len[r], self._len[r] + n
            q0, q1 = n_quant_of(L0, R, G), n_quant_of(L1, R, G)
            if q1 > q0:
                starts = torch.arange(q0, q1, G)
                pos = starts[:, None] + ar[None, :]
                g_src.append(torch.where(pos < L0, pos % RC, RC + pos - L0))
                g_row.append(torch.full((len(starts),), i))
                g_page.append(self._table_host[r, (starts // P).long()].long())
                g_slot.append((starts % P) // G)
            lo = max(L0, q1)
            if L1 > lo:
                pos = torch.arange(lo, L1)
                r_row_abs.append(torch.full((len(pos),), r))
                r_row_loc.append(torch.full((len(pos),), i))
                r_src.append(pos - L0)
                r_dst.append(pos % RC)
            self._len[r] = L1
        dev = self.device
        if g_row:
            plan.ng = sum(len(t) for t in g_row)
            plan.g_row = torch.cat(g_row).to(dev)
            plan.g_src = torch.cat(g_src).to(dev)
            plan.g_page = torch.cat(g_page).to(dev)
            plan.g_slot = torch.cat(g_slot).to(dev)
        if r_row_abs:
            plan.m = sum(len(t) for t in r_row_abs)
            plan.r_row_abs = torch.cat(r_row_abs).to(dev)
            plan.r_row_loc = torch.cat(r_row_loc).to(dev)
            plan.r_src = torch.cat(r_src).to(dev)
            plan.r_dst = torch.cat(r_dst).to(dev)
        plan.rows_dev = torch.tensor(rows, dtype=torch.long).to(dev)
        self._plan = plan
        grown = [r for r in rows if new_pages[r]]
        if grown:  # host -> device copies of the rows that got pages (never a device -> host read)
            idx = torch.tensor(grown, dtype=torch.long)
            self.block_table.index_copy_(0, idx.to(dev), self._table_host[idx].to(dev))
        self.lengths.copy_(torch.tensor(self._len, dtype=torch.int32))

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write the current step's new tokens of ``layer``: ``k, v (len(rows), H_kv, n, D)`` in the
        cache's dtype, ``n >= max(n_new)`` (row ``i`` uses its first ``n_new[i]`` tokens).  Device work
        only (gathers, ``tokops::kv_quantize``, scatters): no host sync -- so, unlike
        :func:`tokops.kv.quantize`, no check that fp32/bf16 values fit the fp16 scale/zero (a group
        beyond ~6.5e4 gets an inf scale; use ``mode="fp8"`` for such values)."""
        plan = self._plan
        if plan is None:
            raise RuntimeError("write: call extend(n_new) first (it plans the step)")
        check_int("layer", layer, min_value=0, max_value=self.num_layers - 1)
        if layer in plan.written:
            raise RuntimeError(f"write: layer {layer} was already written in this step")
        for name, t in (("k", k), ("v", v)):
            check_tensor(name, t, dtypes=(self.dtype,), ndim=4, nonempty=False, contiguous=False)
            want = (len(plan.rows), self.num_kv_heads, self.head_dim)
            if (t.shape[0], t.shape[1], t.shape[3]) != want or t.shape[2] < plan.n_max:
                raise ValueError(f"{name} must have shape ({want[0]}, {want[1]}, n >= {plan.n_max}, {want[2]}) "
                                 f"(rows of this step, kv heads, new tokens, head dim), got {tuple(t.shape)}")
            if t.device != self.device:
                raise ValueError(f"{name} must be on the cache's device {self.device}, got {t.device}")
        plan.written.add(layer)
        if plan.ng:
            self._write_groups(layer, plan, k, v)
        if plan.m:
            for res, x in ((self.k_res[layer], k), (self.v_res[layer], v)):
                res[plan.r_row_abs, :, plan.r_dst] = x[plan.r_row_loc, :, plan.r_src]

    def _write_groups(self, layer, plan, k, v):
        G, P = self.group_size, self.page_size
        be_q = reg.resolve_backend("kv_quantize" if self.mode == "int" else "kv_quantize_fp8", self.backend,
                                   self.device)
        for side, x, res in (("k", k, self.k_res[layer]), ("v", v, self.v_res[layer])):
            comb = torch.cat([res.index_select(0, plan.rows_dev), x], 2)  # (rows, H, RC + n, D)
            grp = comb[plan.g_row[:, None], :, plan.g_src].permute(0, 2, 1, 3).contiguous()  # (Ng, H, G, D)
            codes_t = getattr(self, side + "_codes")[layer]
            scale_t = getattr(self, side + "_scale")[layer]
            NP, H = codes_t.shape[:2]
            if self.mode == "fp8":
                codes, scale = torch.ops.tokops.kv_quantize_fp8(grp, be_q)
                codes_t.view(NP, H, P // G, G, -1)[plan.g_page, :, plan.g_slot] = codes.view(torch.uint8)
                scale_t.view(NP, H, P // G, G)[plan.g_page, :, plan.g_slot] = scale
                continue
            zero_t = getattr(self, side + "_zero")[layer]
            bits = self.bits_k if side == "k" else self.bits_v
            axis = -2 if side == "k" else -1
            codes, scale, zero = torch.ops.tokops.kv_quantize(grp, bits, G, axis, be_q)
            if axis == -2:  # codes (Ng, H, G*bits/32, D), scale (Ng, H, 1, D)
                codes_t.view(NP, H, P // G, G * bits // 32, -1)[plan.g_page, :, plan.g_slot] = codes
                scale_t[plan.g_page, :, plan.g_slot] = scale[:, :, 0]
                zero_t[plan.g_page, :, plan.g_slot] = zero[:, :, 0]
            else:  # codes (Ng, H, G, WD), scale (Ng, H, G, D/G)
                codes_t.view(NP, H, P // G, G, -1)[plan.g_page, :, plan.g_slot] = codes
                scale_t.view(NP, H, P // G, G, -1)[plan.g_page, :, plan.g_slot] = scale
                zero_t.view(NP, H, P // G, G, -1)[plan.g_page, :, plan.g_slot] = zero

    def append(self, k: torch.Tensor, v: torch.Tensor, n_new=None, rows: Sequence[int] | None = None) -> None:
        """One-layer cache: :meth:`extend` + :meth:`write`.  ``n_new`` defaults to ``k.shape[2]`` for
        every row of ``rows``."""
        if self.num_layers != 1:
            raise ValueError(f"append is for a one-layer cache (num_layers={self.num_layers}): call "
                             f"extend(n_new) once per step and write(layer, k, v) per layer")
        check_tensor("k", k, dtypes=FLOAT_DTYPES, ndim=4, nonempty=False, contiguous=False)
        self.extend(k.shape[2] if n_new is None else n_new, rows)
        self.write(0, k, v)

    def free_row(self, row: int) -> None:
        """The row finished: its pages go back to the free list, its length becomes 0 (host and device)."""
        check_int("row", row, min_value=0, max_value=self.max_rows - 1)
        if self._plan is not None and self._plan.n_max and len(self._plan.written) != self.num_layers:
            raise RuntimeError("free_row: finish the current step (write every layer) first")
        self._free.extend(reversed(self._pages[row]))
        self._pages[row] = []
        self._len[row] = 0
        self._table_host[row] = -1
        self.block_table[row] = -1
        self.lengths[row] = 0

    def flashinfer_indices(self) -> dict:
        """FlashInfer's paged-KV descriptors of the quantized pages (``docs/paged_kv.md``), built from the
        host mirrors (no sync): ``kv_indptr (max_rows + 1,)``, ``kv_indices (sum of pages,)``,
        ``kv_last_page_len (max_rows,)`` int32 on the cache's device; ``(kv_indptr[b+1] - kv_indptr[b] - 1)
        * page_size + kv_last_page_len[b] == n_quant(b)`` (0 for a row without pages).  The residual
        tokens (``lengths[b] - n_quant(b)``) are in the ring, not in pages."""
        P = self.page_size
        counts = [len(p) for p in self._pages]
        indptr = [0]
        for c in counts:
            indptr.append(indptr[-1] + c)
        indices = [pid for p in self._pages for pid in p]
        last = [self.n_quant(r) - (c - 1) * P if c else 0 for r, c in enumerate(counts)]
        as_t = lambda x: torch.tensor(x, dtype=torch.int32).to(self.device)  # noqa: E731
        return {"kv_indptr": as_t(indptr), "kv_indices": as_t(indices), "kv_last_page_len": as_t(last)}

    def __repr__(self) -> str:
        what = "fp8" if self.mode == "fp8" else f"int{self.bits_k}/int{self.bits_v}"
        return (f"PagedKVCache({what}, pages={self.num_pages}x{self.page_size}, free={len(self._free)}, "
                f"rows={self.max_rows}, layers={self.num_layers}, H_kv={self.num_kv_heads}, D={self.head_dim}, "
                f"G={self.group_size}, R={self.residual})")


def block_table_from_csr(kv_indptr: torch.Tensor, kv_indices: torch.Tensor, max_pages: int) -> torch.Tensor:
    """A padded block table ``(B, max_pages) int32`` (unused entries ``-1``) from FlashInfer-style CSR page
    lists (``kv_indptr (B + 1,)``, ``kv_indices``), on the host (a scheduler-side conversion)."""
    check_tensor("kv_indptr", kv_indptr, ndim=1, contiguous=False)
    check_tensor("kv_indices", kv_indices, ndim=1, nonempty=False, contiguous=False)
    check_int("max_pages", max_pages, min_value=1)
    ptr, idx = kv_indptr.cpu().tolist(), kv_indices.cpu()
    B = len(ptr) - 1
    table = torch.full((B, max_pages), -1, dtype=torch.int32)
    for b in range(B):
        n = ptr[b + 1] - ptr[b]
        if n < 0 or n > max_pages:
            raise ValueError(f"kv_indptr: row {b} has {n} pages, expected 0..{max_pages} (max_pages)")
        table[b, :n] = idx[ptr[b]:ptr[b + 1]].to(torch.int32)
    return table.to(kv_indices.device)


# --------------------------------------------------------------------------- pure torch
def dequantize_pages(codes, scale, zero, pages: torch.Tensor, mode: str, bits: int, group_size: int, axis: int,
                     P: int, D: int, dtype=torch.float32) -> torch.Tensor:
    """Dequantize the pages ``pages (B, M)`` (valid ids) of one side: ``(B, H_kv, M * P, D)``."""
    B, M = pages.shape
    c = codes[pages.reshape(-1)]
    H = c.shape[1]
    if mode == "fp8":
        s = scale[pages.reshape(-1)]
        wide = torch.float64 if dtype == torch.float64 else torch.float32
        x = c.view(torch.float8_e4m3fn).to(wide) * s[..., None].to(wide)
    else:
        s, z = scale[pages.reshape(-1)], zero[pages.reshape(-1)]
        x = ref.dequantize(c, s, z, bits, group_size, axis, P if axis == -2 else D,
                           torch.float64 if dtype == torch.float64 else torch.float32)
    return x.reshape(B, M, H, P, D).permute(0, 2, 1, 3, 4).reshape(B, H, M * P, D).to(dtype)


def _torch_paged(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_res, v_res, block_table, lengths,
                 residual, mode, bits_k, bits_v, group_size, scale, return_mass, dtype=torch.float32):
    B, H, nq, D = q.shape
    NP, Hk = k_codes.shape[:2]
    P = v_codes.shape[2]
    M = block_table.shape[1]
    RC = k_res.shape[2]
    T = M * P + RC
    pages = block_table.long().clamp(0, NP - 1)  # entries past a row's pages are never attended
    kq = dequantize_pages(k_codes, k_scale, k_zero, pages, mode, bits_k, group_size, -1 if mode == "fp8" else -2,
                          P, D, dtype)
    vq = dequantize_pages(v_codes, v_scale, v_zero, pages, mode, bits_v, group_size, -1, P, D, dtype)
    pos = torch.arange(T, device=q.device)
    L = lengths.long()[:, None]  # (B, 1)
    nqt = n_quant_of(L, residual, group_size)
    pad = torch.zeros(B, Hk, RC, D, dtype=dtype, device=q.device)
    kq, vq = torch.cat([kq, pad], 2), torch.cat([vq, pad], 2)
    is_q = (pos[None, :] < nqt)[:, None, :, None]
    k = torch.where(is_q, kq, k_res[:, :, pos % RC].to(dtype))
    v = torch.where(is_q, vq, v_res[:, :, pos % RC].to(dtype))
    g = H // Hk
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = (q.to(dtype) @ k.transpose(-1, -2)) * scale  # (B, H, nq, T)
    i = torch.arange(nq, device=q.device)
    allowed = (pos[None, None, :] <= (L[:, :, None] - nq + i[None, :, None])) & (pos[None, None, :] < L[:, :, None])
    allowed = allowed[:, None]  # (B, 1, nq, T)
    s = s.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(s, -1)
    fin = torch.isfinite(lse)
    p = torch.where(allowed & fin[..., None], torch.exp(s - torch.where(fin, lse, 0)[..., None]),
                    torch.zeros((), dtype=dtype, device=q.device))
    out = p @ v
    if dtype == torch.float64:
        return out, lse, p.sum(2) if return_mass else p.new_zeros(B, H, 0)
    o = reg.new_output(q.shape, q.dtype, q.device)
    o.copy_(out)
    lse_o = reg.new_output((B, H, nq), torch.float32, q.device)
    lse_o.copy_(lse)
    m = reg.new_output((B, H, T if return_mass else 0), torch.float32, q.device)
    if return_mass:
        m.copy_(p.sum(2))
    return o, lse_o, m


# --------------------------------------------------------------------------- checks
def _check_paged(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_res, v_res, block_table, lengths,
                 residual, mode, bits_k, bits_v, group_size, scale, return_mass):
    """Shape / dtype / layout checks (no tensor values read).  Returns the tensors the kernels take
    (``q`` made contiguous: nq <= 8 tokens)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    check_power_of_two("group_size", group_size, MIN_GROUP, MAX_GROUP)
    check_int("residual", residual, min_value=0)
    if residual % group_size:
        raise ValueError(f"residual must be a multiple of group_size={group_size}, got {residual}")
    if mode == "int":
        check_int("bits_k", bits_k, choices=BITS)
        check_int("bits_v", bits_v, choices=BITS)
    check_tensor("q", q, dtypes=FLOAT_DTYPES, ndim=4, contiguous=False)
    B, H, nq, D = q.shape
    if not 1 <= nq <= MAX_NQ:
        raise ValueError(f"q must have 1 <= nq <= {MAX_NQ} new queries (q.shape[2]), got shape {tuple(q.shape)}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                              or not math.isfinite(scale)):
        raise TypeError(f"scale must be a finite float or None, got {scale!r}")
    if not isinstance(return_mass, bool):
        raise TypeError(f"return_mass must be a bool, got {type(return_mass).__name__}")
    check_tensor("block_table", block_table, dtypes=(torch.int32,), ndim=2, contiguous=False)
    check_tensor("lengths", lengths, dtypes=(torch.int32,), ndim=1, contiguous=False)
    if block_table.shape[0] != B or lengths.shape[0] != B:
        raise ValueError(f"block_table and lengths must have q's batch size {B} rows, got block_table "
                         f"{tuple(block_table.shape)}, lengths {tuple(lengths.shape)}")
    check_tensor("k_res", k_res, dtypes=(q.dtype,), ndim=4, contiguous=False)
    check_tensor("v_res", v_res, dtypes=(q.dtype,), ndim=4, contiguous=False)
    Hk = k_res.shape[1]
    if k_res.shape != v_res.shape or k_res.shape[0] != B or k_res.shape[3] != D:
        raise ValueError(f"k_res / v_res must have shape ({B}, H_kv, residual + group_size, {D}), got "
                         f"{tuple(k_res.shape)} / {tuple(v_res.shape)}")
    if k_res.shape[2] != residual + group_size:
        raise ValueError(f"k_res must be a ring of residual + group_size = {residual + group_size} tokens "
                         f"(k_res.shape[2]), got {k_res.shape[2]}")
    if H % Hk:
        raise ValueError(f"q must have a number of heads (q.shape[1]={H}) that is a multiple of the kv heads {Hk}")
    if mode == "fp8":
        check_tensor("k_codes", k_codes, dtypes=(torch.uint8,), ndim=4)
        check_tensor("v_codes", v_codes, dtypes=(torch.uint8,), ndim=4)
        NP, _, P, _ = k_codes.shape
        want_c, want_s = (NP, Hk, P, D), (NP, Hk, P)
        for name, t, want in (("k_codes", k_codes, want_c), ("v_codes", v_codes, want_c)):
            if tuple(t.shape) != want:
                raise ValueError(f"{name} must have shape {want} (pages, H_kv, page_size, D), got {tuple(t.shape)}")
        for name, t in (("k_scale", k_scale), ("v_scale", v_scale)):
            check_tensor(name, t, dtypes=(torch.float32,), ndim=3)
            if tuple(t.shape) != want_s:
                raise ValueError(f"{name} must have shape {want_s}, got {tuple(t.shape)}")
        k_zero, v_zero = k_scale, v_scale  # unused by the kernels
    else:
        check_tensor("v_codes", v_codes, dtypes=(torch.int32,), ndim=4)
        NP, _, P, _ = v_codes.shape
        G = group_size
        shapes = {"k_codes": (NP, Hk, P * bits_k // 32, D), "k_scale": (NP, Hk, P // G, D), "k_zero": (NP, Hk, P // G, D),
                  "v_codes": (NP, Hk, P, D * bits_v // 32), "v_scale": (NP, Hk, P, D // G),
                  "v_zero": (NP, Hk, P, D // G)}
        for name, t in (("k_codes", k_codes), ("k_scale", k_scale), ("k_zero", k_zero), ("v_codes", v_codes),
                        ("v_scale", v_scale), ("v_zero", v_zero)):
            check_tensor(name, t, dtypes=(torch.int32,) if name.endswith("codes") else (torch.float16,), ndim=4)
            if tuple(t.shape) != shapes[name]:
                raise ValueError(f"{name} must have shape {shapes[name]} (page_size={P}, group_size={G}, "
                                 f"bits_k={bits_k}, bits_v={bits_v}, D={D}), got {tuple(t.shape)}")
        if D % G or (D * bits_v) % 32 or (G * bits_k) % 32:
            raise ValueError(f"group_size={G} must divide D={D}, D*bits_v and group_size*bits_k must be multiples "
                             f"of 32")
    if P % group_size or P % PAGE_MULTIPLE:
        raise ValueError(f"page_size (v_codes.shape[2]={P}) must be a multiple of group_size={group_size} and of "
                         f"{PAGE_MULTIPLE}")
    devs = {t.device for t in (q, k_codes, k_scale, v_codes, v_scale, k_res, v_res, block_table, lengths)}
    if len(devs) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devs))}")
    return (dense(q), k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, dense(k_res), dense(v_res),
            dense(block_table), dense(lengths))


def validate_block_table(block_table: torch.Tensor, lengths: torch.Tensor, num_pages: int, page_size: int,
                         residual: int, group_size: int) -> None:
    """Value checks of a block table and lengths (reads them on the host: one sync on a GPU).

    Raises ``ValueError`` for a negative length, a row whose quantized tokens need more pages than the
    block table has columns, a used entry out of ``[0, num_pages)``, or a page used by two rows."""
    bt, L = block_table.cpu().long(), lengths.cpu().long()
    if (L < 0).any():
        b = int(torch.nonzero(L < 0)[0, 0])
        raise ValueError(f"lengths[{b}] = {int(L[b])} is negative")
    need = (n_quant_of(L, residual, group_size) + page_size - 1) // page_size
    M = bt.shape[1]
    if (need > M).any():
        b = int(torch.nonzero(need > M)[0, 0])
        raise ValueError(f"lengths[{b}] = {int(L[b])} needs {int(need[b])} pages of {page_size} tokens, the "
                         f"block table has {M} columns")
    used = torch.arange(M)[None, :] < need[:, None]
    bad = used & ((bt < 0) | (bt >= num_pages))
    if bad.any():
        b, j = (int(x) for x in torch.nonzero(bad)[0])
        raise ValueError(f"block_table[{b}, {j}] = {int(bt[b, j])} is out of range [0, {num_pages}) (num_pages), "
                         f"and row {b} (length {int(L[b])}) uses it")
    ids = bt[used]
    if ids.numel() != ids.unique().numel():
        vals, counts = ids.unique(return_counts=True)
        raise ValueError(f"block_table: page {int(vals[counts > 1][0])} is used by two rows (or twice by one)")


# --------------------------------------------------------------------------- op
def _paged_fake(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_res, v_res, block_table, lengths, residual,
                mode, bits_k, bits_v, group_size, scale, return_mass, backend):
    B, H, nq, D = q.shape
    T = block_table.shape[1] * v_codes.shape[2] + k_res.shape[2]
    return (q.new_empty(q.shape), q.new_empty((B, H, nq), dtype=torch.float32),
            q.new_empty((B, H, T if return_mass else 0), dtype=torch.float32))


_paged_op = reg.define(
    "kv_paged_decode_attention",
    "(Tensor q, Tensor k_codes, Tensor k_scale, Tensor k_zero, Tensor v_codes, Tensor v_scale, Tensor v_zero, "
    "Tensor k_res, Tensor v_res, Tensor block_table, Tensor lengths, int residual, str mode, int bits_k, "
    "int bits_v, int group_size, float scale, bool return_mass, str backend) -> (Tensor, Tensor, Tensor)",
    _paged_fake)
reg.implements("kv_paged_decode_attention", "torch", _torch_paged)
reg.implements("kv_paged_decode_attention", "triton", "tokops.triton_kernels.kv_paged_decode:paged_decode_attention")
reg.implements("kv_paged_decode_attention", "cuda", reg.cuda_op("kv_paged_decode_attention"))
CUDA_HEAD_DIMS = (32, 64, 128, 256)


def paged_decode(q: torch.Tensor, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_res, v_res,
                 block_table: torch.Tensor, lengths: torch.Tensor, *, residual: int, group_size: int,
                 mode: str = "int", bits_k: int = 4, bits_v: int = 4, scale: float | None = None,
                 return_mass: bool = False, validate: bool | None = None, backend: str = "auto"):
    """Decode attention over raw paged tensors (one layer of a :class:`PagedKVCache`, or an engine's
    own pool in the same layout; shapes in the module docstring).  Returns ``(out, lse, mass)``.

    ``validate``: check the *values* of ``block_table`` and ``lengths`` (:func:`validate_block_table`,
    one host sync on a GPU).  ``None`` (default) validates CPU tensors outside ``torch.compile``
    only; the kernels never read a block-table column past a row's pages.
    """
    t = _check_paged(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_res, v_res, block_table, lengths,
                     residual, mode, bits_k, bits_v, group_size, scale, return_mass)
    if validate is None:
        validate = q.device.type == "cpu" and not torch.compiler.is_compiling()
    if validate:
        validate_block_table(block_table, lengths, k_codes.shape[0], t[4].shape[2], residual, group_size)
    scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
    be = reg.resolve_backend("kv_paged_decode_attention", backend, q.device)
    if be == "cuda" and q.shape[-1] not in CUDA_HEAD_DIMS:
        if backend == "cuda":
            raise ValueError(f"q: backend='cuda' supports head dims {CUDA_HEAD_DIMS}, got {q.shape[-1]}; use "
                             f"backend='triton'")
        be = "triton"
    return _paged_op(*t, residual, mode, bits_k if mode == "int" else 8, bits_v if mode == "int" else 8,
                     group_size, scale, return_mass, be)


def paged_decode_attention(q: torch.Tensor, cache: PagedKVCache, layer: int = 0, *, scale: float | None = None,
                           return_mass: bool = False, return_lse: bool = False, backend: str = "auto"):
    """Attention of ``q: (max_rows, H, nq, D)`` (the cache's dtype, ``1 <= nq <= 8``) over every row of
    ``cache`` at ``layer`` (quantized pages + residual ring), GQA when ``H_kv < H``; rows of length 0
    give 0 (LSE ``-inf``).  Causal among the new queries as in :func:`tokops.kv.decode_attention`,
    per row.  No host sync; the cache's block table is valid by construction (not re-checked).

    Returns ``out (max_rows, H, nq, D)``; with ``return_mass`` also the per-key mass
    ``(max_rows, H, max_pages_per_row * page_size + residual + group_size)`` fp32 by token position
    (0 past each row's length); with ``return_lse`` also the fp32 LSE ``(max_rows, H, nq)``.
    Tuple order: ``(out[, mass][, lse])``."""
    if not isinstance(cache, PagedKVCache):
        raise TypeError(f"cache must be a tokops.kv.PagedKVCache, got {type(cache).__name__}")
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")
    check_tensor("q", q, dtypes=FLOAT_DTYPES, ndim=4, contiguous=False)
    if q.shape[0] != cache.max_rows or q.shape[3] != cache.head_dim:
        raise ValueError(f"q must have shape ({cache.max_rows}, H, nq, {cache.head_dim}) (max_rows, heads, new "
                         f"queries, head dim), got {tuple(q.shape)}")
    if q.dtype != cache.dtype:
        raise TypeError(f"q must have the cache's dtype {cache.dtype}, got {q.dtype}")
    t = cache.layer(layer)
    out, lse, mass = paged_decode(q, t["k_codes"], t["k_scale"], t["k_zero"], t["v_codes"], t["v_scale"],
                                  t["v_zero"], t["k_res"], t["v_res"], cache.block_table, cache.lengths,
                                  residual=cache.residual, group_size=cache.group_size, mode=cache.mode,
                                  bits_k=cache.bits_k, bits_v=cache.bits_v, scale=scale, return_mass=return_mass,
                                  validate=False, backend=backend)
    res = [out]
    if return_mass:
        res.append(mass)
    if return_lse:
        res.append(lse)
    return res[0] if len(res) == 1 else tuple(res)


def paged_decode_reference(q: torch.Tensor, cache: PagedKVCache, layer: int = 0, *, scale: float | None = None):
    """float64 reference (the torch path in float64): ``(out, lse, mass)`` in float64."""
    t = cache.layer(layer)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return _torch_paged(q, t["k_codes"], t["k_scale"], t["k_zero"], t["v_codes"], t["v_scale"], t["v_zero"],
                        t["k_res"], t["v_res"], cache.block_table, cache.lengths, cache.residual, cache.mode,
                        cache.bits_k, cache.bits_v, cache.group_size, scale, True, dtype=torch.float64)


__all__ = ["PagedKVCache", "PagePoolExhausted", "paged_decode_attention", "paged_decode", "paged_decode_reference",
           "validate_block_table", "n_quant_of", "block_table_from_csr"]
