"""Block-sparse attention ops (forward, backward, per-key attention mass).

Spec: DESIGN.md "Sparse attention".  The mask format is FlexAttention's CSR block mask
(:class:`tokops.attention.BlockMask`); kernels visit only the listed key blocks of each query block
(FlashAttention-2 tiling, Dao 2023, with a block-sparse walk as in FlexAttention / BigBird-style
block sparsity).  Reference: :mod:`tokops.attention.reference` (float64).
"""

from __future__ import annotations

import math

import torch

from .. import _registry as reg
from .._checks import FLOAT_DTYPES, check_int, check_same_device, check_tensor, dense, last_dim_dense
from . import reference as ref
from .masks import (_CANONICAL, BlockMask, _known_how, as_block_mask, canonical_csr, full_block_mask,
                    transpose_csr, validate_mask)

MAX_HEAD_DIM = 256


# --------------------------------------------------------------------------- checks
def _check_attention(q, k, v, key_bias, scale, causal):
    """Checks; returns ``(q, k, v, key_bias, scale)``.  Strided inputs: ``q``/``k``/``v`` are passed
    as they are when their last dim is contiguous (the Triton and torch paths take the other strides:
    transposed ``(B, N, H, D) -> (B, H, N, D)`` views, slices, batch/head-expanded views); a view
    strided in the last dim is copied once.  ``key_bias`` (small) is made contiguous."""
    check_tensor("q", q, dtypes=FLOAT_DTYPES, ndim=4, contiguous=False)
    check_tensor("k", k, dtypes=FLOAT_DTYPES, ndim=4, contiguous=False)
    check_tensor("v", v, dtypes=FLOAT_DTYPES, ndim=4, contiguous=False)
    q, k, v = last_dim_dense(q), last_dim_dense(k), last_dim_dense(v)
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"k and v must have the dtype of q ({q.dtype}), got k {k.dtype}, v {v.dtype}")
    check_same_device(q=q, k=k, v=v)
    B, H, Nq, D = q.shape
    if k.shape[0] != B or k.shape[-1] != D:
        raise ValueError(f"k must have shape (B={B}, H_kv, Nk, D={D}), got {tuple(k.shape)}")
    if H % k.shape[1]:
        raise ValueError(f"k: the number of query heads ({H}) must be a multiple of the KV heads ({k.shape[1]})")
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"v must have the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    if D > MAX_HEAD_DIM:
        raise ValueError(f"q: head dim must be <= {MAX_HEAD_DIM}, got {D}")
    Nk = k.shape[2]
    if key_bias is not None:
        check_tensor("key_bias", key_bias, dtypes=(torch.float32,), contiguous=False)
        key_bias = dense(key_bias)
        if tuple(key_bias.shape) not in ((B, Nk), (B, H, Nk)):
            raise ValueError(f"key_bias must have shape (B, Nk) = {(B, Nk)} or (B, H, Nk) = {(B, H, Nk)}, "
                             f"got {tuple(key_bias.shape)}")
        check_same_device(q=q, key_bias=key_bias)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if scale is None:
        return q, k, v, key_bias, 1.0 / math.sqrt(D)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise TypeError(f"scale must be a finite float or None, got {scale!r}")
    return q, k, v, key_bias, float(scale)


def _prepare(q, k, v, mask, causal, scale, key_bias, block_q, block_k, check_mask, trusted: bool = False):
    """Checks and mask conversion; returns ``(q, k, v, key_bias, mask, scale)``.  ``trusted``: the
    caller wrote ``mask`` itself (valid and canonical by construction, also under ``torch.compile``):
    only its shapes are checked."""
    q, k, v, key_bias, scale = _check_attention(q, k, v, key_bias, scale, causal)
    B, H, Nq, _ = q.shape
    Nk = k.shape[2]
    mask = as_block_mask(mask, Nq, Nk, block_q, block_k, q.device)
    if not isinstance(check_mask, bool):
        raise TypeError(f"check_mask must be a bool, got {type(check_mask).__name__}")
    # Known-valid masks (every tokops builder's output, or a mask validated once) are not read again:
    # no host sync per call.  Any other mask is validated once with check_mask (one host sync, a
    # ValueError naming the field), after which it is known valid.  Meta tensors (shape propagation)
    # have no values to check: the op's fake kernel runs.
    how = _CANONICAL if trusted else _known_how(mask)
    read_values = check_mask and how is None and not torch.compiler.is_compiling() and q.device.type != "meta"
    validate_mask(mask, B, H, Nq, Nk, q.device, read_values=read_values)
    # A builder's mask is canonical already; a mask validated by a check (valid, maybe unsorted) runs
    # as it is with check_mask, as before, and is canonicalised without.
    if not read_values and how != _CANONICAL and not (check_mask and how is not None):
        # Values not validated (torch.compile, check_mask=False): make the CSR canonical on device (no
        # host sync): counts clamped to [0, nK], out-of-range indices dropped, a repeated block counted
        # once -- the set semantics of the torch backend.  The kernels bound-check too (never read out
        # of range), but they assume distinct indices.
        num, idx = canonical_csr(mask.kv_num_blocks, mask.kv_indices)
        mask = mask._replace(kv_num_blocks=num, kv_indices=idx)
    return q, k, v, _finite_key_bias(key_bias), mask, scale


def _kernel_inputs(be: str, q, k, v):
    """The CUDA kernels take contiguous q/k/v only: a strided view is copied for them (the Triton
    and torch backends read it in place)."""
    if be == "cuda":
        return dense(q), dense(k), dense(v)
    return q, k, v


# A key bias of +inf means "this key takes all the weight of every row that sees it" (the limit of a
# growing bias; several +inf keys of one row share it evenly).  exp(inf - inf) would make the row NaN,
# so the wrappers replace +inf by this finite bias, identically for every backend: far above any
# realistic logit, yet small enough that the fp32 LSE round trip of the backward stays accurate.
POS_INF_BIAS = 1.0e4


def _finite_key_bias(key_bias):
    if key_bias is None:
        return None
    return torch.where(key_bias == float("inf"), torch.full_like(key_bias, POS_INF_BIAS), key_bias)


# --------------------------------------------------------------------------- op definitions
def _fwd_fake(q, k, v, kv_num_blocks, kv_indices, block_q, block_k, causal, scale, key_bias, backend):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)  # contiguous, as the kernels


def _bwd_fake(dout, q, k, v, out, lse, dlse, kv_num_blocks, kv_indices, q_num_blocks, q_indices, block_q, block_k,
              causal, scale, key_bias, backend):
    B, H = q.shape[:2]
    nb = (B, H, k.shape[2]) if key_bias is not None else (0,)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), q.new_empty(nb, dtype=torch.float32)


def _mass_fake(q, k, lse, q_num_blocks, q_indices, block_q, block_k, causal, scale, key_bias, backend):
    return q.new_empty((*q.shape[:2], k.shape[2]), dtype=torch.float32)


_fwd_op = reg.define(
    "block_sparse_attn_fwd",
    "(Tensor q, Tensor k, Tensor v, Tensor kv_num_blocks, Tensor kv_indices, int block_q, int block_k, "
    "bool causal, float scale, Tensor? key_bias, str backend) -> (Tensor, Tensor)", _fwd_fake, differentiable=True)
_bwd_op = reg.define(
    "block_sparse_attn_bwd",
    "(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? dlse, Tensor kv_num_blocks, "
    "Tensor kv_indices, Tensor q_num_blocks, Tensor q_indices, int block_q, int block_k, bool causal, float scale, "
    "Tensor? key_bias, str backend) -> (Tensor, Tensor, Tensor, Tensor)", _bwd_fake)
_mass_op = reg.define(
    "attn_key_mass",
    "(Tensor q, Tensor k, Tensor lse, Tensor q_num_blocks, Tensor q_indices, int block_q, int block_k, "
    "bool causal, float scale, Tensor? key_bias, str backend) -> Tensor", _mass_fake)

reg.implements("block_sparse_attn_fwd", "torch", ref.fwd)
reg.implements("block_sparse_attn_bwd", "torch", ref.bwd)
reg.implements("attn_key_mass", "torch", ref.mass_from_lse)
reg.implements("block_sparse_attn_fwd", "triton", "tokops.triton_kernels.block_sparse_attn:fwd")
reg.implements("block_sparse_attn_bwd", "triton", "tokops.triton_kernels.block_sparse_attn:bwd")
reg.implements("attn_key_mass", "triton", "tokops.triton_kernels.block_sparse_attn:key_mass")


def cuda_kernel_unsupported(q, k, v, block_q: int, block_k: int) -> str | None:
    """Why the CUDA forward kernel cannot take this call (None when it can): it covers fp16/bf16,
    head dim 64/128, mask blocks multiple of 64, 16-byte aligned data, sm_80+."""
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"it takes fp16/bf16, got {q.dtype}"
    if q.shape[-1] not in (64, 128):
        return f"it takes head dim 64 or 128, got {q.shape[-1]}"
    if block_q % 64 or block_k % 64:
        return f"it takes mask blocks that are multiples of 64, got {block_q}x{block_k}"
    if any(t.data_ptr() % 16 for t in (q, k, v)):
        return "it needs 16-byte aligned q/k/v"
    if torch.cuda.get_device_capability(q.device)[0] < 8:
        return "it needs sm_80 or newer"
    return None


def cuda_backward_restricted(head_dim: int, capability: tuple[int, int]) -> str | None:
    """Why the CUDA *backward* is not used for this call although the CUDA forward ran (None: it is).

    Issue 12: a CUDA kernel runs only where its design can beat the Triton one.  The CUDA backward
    (``block_sparse_attn_bwd_cuda.cu``) is compiled and run under the CPU emulation for D 64/128, but
    its resources (``benchmarks/cuda_resources.py``, nvcc 13) rule out two cases: at D=128 the dK/dV
    kernel needs 255 registers and spills (18-27 local stores per thread on sm_80 and sm_90a), and on
    sm_90 the Triton backward has warpgroup MMA (wgmma) that ``mma.sync`` cannot match (the CUDA dQ also
    spills 8 B at D=64 on sm_90a).  So it is taken on sm_80-class GPUs (A100, sm_86/89) at D=64 only;
    everything else runs the Triton backward."""
    if tuple(capability) >= (9, 0):
        return "on sm_90+ the Triton backward (wgmma) is preferred"
    if head_dim != 64:
        return f"the CUDA dK/dV kernel spills at head dim {head_dim} (used at D=64 only)"
    return None


def _fwd_backend(backend: str, q, k, v, mask: BlockMask) -> str:
    """Resolve ``backend`` for the forward: ``auto`` takes the CUDA kernel only where it applies
    (else Triton); an explicit ``"cuda"`` that cannot run this call is an error, not a fallback."""
    be = reg.resolve_backend("block_sparse_attn_fwd", backend, q.device)
    if be == "cuda":
        why = cuda_kernel_unsupported(q, k, v, mask.block_q, mask.block_k)
        if why is not None:
            if backend == "cuda":
                raise ValueError(f"q: backend='cuda' cannot run this call: {why}; use backend='auto' or 'triton'")
            be = "triton" if reg.triton_available() else "torch"
    return be


# The CUDA backend has forward and backward kernels (same coverage: cuda_kernel_unsupported); its
# key-mass pass is the Triton kernel.
reg.implements("block_sparse_attn_fwd", "cuda", reg.cuda_op("block_sparse_attn_fwd"))
reg.implements("block_sparse_attn_bwd", "cuda", reg.cuda_op("block_sparse_attn_bwd"))


def _companion_backend(backend: str) -> str:
    return "triton" if backend == "cuda" else backend


def _bwd_backend(backend: str, dout, q, k, v, out, block_q: int, block_k: int) -> str:
    """Backend of the backward of a forward that ran on ``backend``.

    After a CUDA forward the CUDA backward kernel runs where it covers the call (the forward's
    cases, plus 16-byte aligned ``dout``/``out``), else the Triton backward: a forward that ran
    on CUDA -- explicitly asked for or chosen by ``auto`` -- never fails in its backward.  Like
    ``auto`` for the forward, the untested-on-a-GPU CUDA backward is only taken when ``auto``
    could not have picked the CUDA forward by itself (so ``backend="cuda"`` was explicit) or when
    ``auto`` may take the CUDA backward too (GPU_VERIFIED_CUDA / ``TOKOPS_AUTO_CUDA=1``)."""
    if backend != "cuda":
        return backend
    fallback = "triton" if reg.triton_available() else "torch"
    if not reg.cuda_compiled() or not reg.has_impl("block_sparse_attn_bwd", "cuda"):
        return fallback
    if reg.auto_may_use_cuda("block_sparse_attn_fwd") and not reg.auto_may_use_cuda("block_sparse_attn_bwd"):
        return fallback
    if cuda_kernel_unsupported(q, k, v, block_q, block_k) is not None:
        return fallback
    if cuda_backward_restricted(q.shape[-1], torch.cuda.get_device_capability(q.device)) is not None:
        return fallback
    if any(t.data_ptr() % 16 for t in (dout, out)):
        return fallback
    return "cuda"


def _setup_context(ctx, inputs, output):
    q, k, v, num, idx, block_q, block_k, causal, scale, key_bias, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, num, idx, key_bias)
    ctx.args = (block_q, block_k, causal, scale, backend)
    ctx.bias_dim = None if key_bias is None else key_bias.dim()


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, num, idx, key_bias = ctx.saved_tensors
    block_q, block_k, causal, scale, backend = ctx.args
    if dout is None:
        dout = torch.zeros_like(out)
    qn, qi = transpose_csr(num, idx)
    dout = dout.contiguous()  # autograd may hand an expanded (stride-0) gradient
    if dlse is not None:
        dlse = dlse.contiguous()
    be = _bwd_backend(backend, dout, q, k, v, out, block_q, block_k)
    dq, dk, dv, dbias = _bwd_op(dout, q, k, v, out, lse, dlse, num, idx, qn, qi, block_q, block_k, causal, scale,
                                key_bias, be)
    if ctx.bias_dim is None:
        dbias = None
    elif ctx.bias_dim == 2:
        dbias = dbias.sum(1)
    return dq, dk, dv, None, None, None, None, None, None, dbias, None


torch.library.register_autograd("tokops::block_sparse_attn_fwd", _backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- public API
def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask=None, *, causal: bool = False,
                           scale: float | None = None, key_bias: torch.Tensor | None = None,
                           return_lse: bool = False, block_q: int | None = None, block_k: int | None = None,
                           check_mask: bool = True, backend: str = "auto"):
    """Block-sparse softmax attention.

    ``q: (B, H, Nq, D)``, ``k, v: (B, H_kv, Nk, D)`` (fp16/bf16/fp32, ``H % H_kv == 0`` for GQA/MQA,
    ``D <= 256``).  Strided views are read in place when the last dim is contiguous (e.g.
    ``q.transpose(1, 2)`` of a ``(B, N, H, D)`` projection); else, and for the CUDA kernels, they
    are copied once.  ``mask``: a :class:`BlockMask`, a dense bool block mask
    ``(B|1, H|1, ceil(Nq/block_q), ceil(Nk/block_k))`` (``block_q``/``block_k`` default 128), or
    ``None`` for all blocks.  Logits ``scale * q.k + key_bias[j]`` (``scale`` default ``D**-0.5``,
    ``key_bias`` fp32 ``(B, Nk)`` or ``(B, H, Nk)``, e.g. ToMe's ``log(size)``) are softmaxed over the
    keys of the allowed blocks only, plus ``j <= i + Nk - Nq`` when ``causal``.  A row with no allowed
    key gives 0 (and ``lse = -inf``), never NaN.  A ``-inf`` bias removes a key; a ``+inf`` bias gives
    the key all the weight of every row that sees it (shared evenly among a row's ``+inf`` keys;
    implemented as a bias of ``POS_INF_BIAS = 1e4``, so the ``lse`` of such a row is finite).

    ``check_mask`` validates the mask *values* (indices in range, no repeats) where that is needed,
    never per call: a mask built by the tokops builders is valid by construction and a mask that
    passed :func:`~tokops.attention.validate_mask` (or :meth:`BlockMask.validate`, or an earlier
    checked call) is known valid; neither is read again (no host sync; see
    :func:`~tokops.attention.is_known_valid`).  Any other mask (CSR tensors built by hand) is checked
    on its first use: one host sync and a ``ValueError`` naming the bad field; validate it once
    up front to keep the per-layer path free of that sync.  ``check_mask=False``, and every call under
    ``torch.compile``, reads no values: a mask whose values were not validated is never read out of
    bounds: it is taken as the *set* of its valid entries (counts clamped to ``[0, nK]``,
    out-of-range indices ignored, a repeated block counted once; canonicalised on the device),
    identically on every backend.

    Returns ``out (B, H, Nq, D)`` in the input dtype, and ``lse (B, H, Nq)`` fp32 (natural log) with
    ``return_lse``.  Differentiable in ``q``, ``k``, ``v`` and ``key_bias`` (and through ``lse``).
    The backward of a CUDA forward runs the CUDA backward kernel where it covers the call, else the
    Triton backward (e.g. for a ``dout`` that is not 16-byte aligned; see ``_bwd_backend``).
    """
    q, k, v, key_bias, mask, scale = _prepare(q, k, v, mask, causal, scale, key_bias, block_q, block_k, check_mask)
    be = _fwd_backend(backend, q, k, v, mask)
    q, k, v = _kernel_inputs(be, q, k, v)
    out, lse = _fwd_op(q, k, v, mask.kv_num_blocks, mask.kv_indices, mask.block_q, mask.block_k, causal, scale,
                       key_bias, be)
    return (out, lse) if return_lse else out


def attention_with_key_mass(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask=None, *, causal: bool = False,
                            scale: float | None = None, key_bias: torch.Tensor | None = None,
                            block_q: int | None = None, block_k: int | None = None, check_mask: bool = True,
                            backend: str = "auto"):
    """Attention output plus the attention mass each key receives.

    Same arguments as :func:`block_sparse_attention`.  Returns ``(out, mass)`` with
    ``mass[b, h, j] = sum_i P[b, h, i, j]`` (fp32, ``(B, H, Nk)``, per *query* head) for the same
    masked softmax ``P``.  ``P`` is never materialised: a second, key-block-major pass over the
    transposed mask recomputes ``exp(s - lse)`` tile by tile from the forward LSE (the dV pass of the
    backward with ``dO = 1``).  ``out`` is differentiable; ``mass`` is not (it is a statistic, e.g. for
    H2O / SnapKV style KV eviction or ToMe/PiToMe-style token importance).
    """
    q, k, v, key_bias, mask, scale = _prepare(q, k, v, mask, causal, scale, key_bias, block_q, block_k, check_mask)
    qn, qi = transpose_csr(mask.kv_num_blocks, mask.kv_indices)
    return _attention_and_mass(q, k, v, mask, qn, qi, causal, scale, key_bias, backend)


def _attention_and_mass(q, k, v, mask: BlockMask, qn, qi, causal: bool, scale: float, key_bias, backend: str):
    """Forward + key-mass pass over ``mask`` and its transpose ``(qn, qi)`` (inputs already checked)."""
    be = _fwd_backend(backend, q, k, v, mask)
    q, k, v = _kernel_inputs(be, q, k, v)
    out, lse = _fwd_op(q, k, v, mask.kv_num_blocks, mask.kv_indices, mask.block_q, mask.block_k, causal, scale,
                       key_bias, be)
    kb = None if key_bias is None else key_bias.detach()
    mass = _mass_op(q.detach(), k.detach(), lse.detach(), qn, qi, mask.block_q, mask.block_k, causal, scale, kb,
                    _companion_backend(be))
    return out, mass


def decode_attention_with_key_mass(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                                   scale: float | None = None, key_bias: torch.Tensor | None = None,
                                   block_k: int = 128, backend: str = "auto"):
    """Decode step: few queries (``Nq <= 128``, e.g. 1 or a speculative window) against a long KV
    cache; returns ``(out, mass)`` as :func:`attention_with_key_mass` with every key allowed (or the
    bottom-right causal rule, for a window of new tokens appended at the end of the cache).

    Uses one query block of ``max(16, next_pow2(Nq))`` rows; the mass pass runs one program per key
    tile (parallel over the cache).  Note: the forward walks the cache sequentially per (b, h) (no
    split-K yet), so it is correct but not a tuned long-context decode kernel.

    Per step nothing is read on the host and nothing is sorted: the one-query-block mask (every key
    block, ``(1, 1, 1, nK)``) and its transpose (``(1, 1, nK, 1)``) are written directly with
    ``arange``/``full`` (the values :func:`full_block_mask` and :func:`transpose_csr` would give).
    """
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        raise ValueError(f"q must be a (B, H, Nq, D) tensor, got {getattr(q, 'shape', type(q).__name__)}")
    nq = q.shape[2]
    if nq > 128:
        raise ValueError(f"q: decode_attention_with_key_mass takes at most 128 queries, got {nq}; "
                         "use attention_with_key_mass")
    bq = max(16, 1 << (nq - 1).bit_length())
    if not isinstance(k, torch.Tensor) or k.dim() != 4:
        raise ValueError(f"k must be a (B, H_kv, Nk, D) tensor, got {getattr(k, 'shape', type(k).__name__)}")
    nk_tok = k.shape[2]
    if isinstance(block_k, int) and not isinstance(block_k, bool) and block_k > 0 and nk_tok > 0 and nq > 0:
        n_blocks = -(-nk_tok // block_k)
        dev = q.device
        mask = BlockMask(torch.full((1, 1, 1), n_blocks, dtype=torch.int32, device=dev),
                         torch.arange(n_blocks, dtype=torch.int32, device=dev).view(1, 1, 1, n_blocks),
                         bq, block_k, nq, nk_tok)
    else:  # a bad block_k / empty input: the builder raises the usual error
        mask = full_block_mask(nq, nk_tok, block_q=bq, block_k=block_k, device=q.device)
    q, k, v, key_bias, mask, scale = _prepare(q, k, v, mask, causal, scale, key_bias, None, None, False, trusted=True)
    nb = mask.kv_indices.shape[-1]
    qn = torch.ones((1, 1, nb), dtype=torch.int32, device=q.device)  # transpose: every key block has query block 0
    qi = torch.zeros((1, 1, nb, 1), dtype=torch.int32, device=q.device)
    return _attention_and_mass(q, k, v, mask, qn, qi, causal, scale, key_bias, backend)


# =========================================================================== variable-length (packed) attention
# FlashAttention's varlen convention: the sequences of a batch are packed along the token dim,
# ``q: (total_q, H, D)``, ``k, v: (total_k, H_kv, D)``, sequence ``s`` being rows
# ``cu_seqlens[s]:cu_seqlens[s+1]``.  The kernels are the padded ones with per-sequence offsets
# (tokops.triton_kernels.block_sparse_attn, VARLEN=True): one program per (query tile, sequence, head).
def _varlen_fwd_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, kv_num_blocks, kv_indices,
                     block_q, block_k, causal, scale, key_bias, backend):
    return q.new_empty(q.shape), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


def _varlen_bwd_fake(dout, q, k, v, out, lse, dlse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                     kv_num_blocks, kv_indices, q_num_blocks, q_indices, block_q, block_k, causal, scale, key_bias,
                     backend):
    nb = (q.shape[1], k.shape[0]) if key_bias is not None else (0,)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), q.new_empty(nb, dtype=torch.float32)


def _varlen_mass_fake(q, k, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, q_num_blocks, q_indices,
                      block_q, block_k, causal, scale, key_bias, backend):
    return q.new_empty((q.shape[1], k.shape[0]), dtype=torch.float32)


_VARLEN_ARGS = "Tensor cu_seqlens_q, Tensor cu_seqlens_k, int max_seqlen_q, int max_seqlen_k"
_varlen_fwd_op = reg.define(
    "block_sparse_attn_varlen_fwd",
    f"(Tensor q, Tensor k, Tensor v, {_VARLEN_ARGS}, Tensor kv_num_blocks, Tensor kv_indices, int block_q, "
    "int block_k, bool causal, float scale, Tensor? key_bias, str backend) -> (Tensor, Tensor)", _varlen_fwd_fake,
    differentiable=True)
_varlen_bwd_op = reg.define(
    "block_sparse_attn_varlen_bwd",
    f"(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? dlse, {_VARLEN_ARGS}, "
    "Tensor kv_num_blocks, Tensor kv_indices, Tensor q_num_blocks, Tensor q_indices, int block_q, int block_k, "
    "bool causal, float scale, Tensor? key_bias, str backend) -> (Tensor, Tensor, Tensor, Tensor)", _varlen_bwd_fake)
_varlen_mass_op = reg.define(
    "attn_key_mass_varlen",
    f"(Tensor q, Tensor k, Tensor lse, {_VARLEN_ARGS}, Tensor q_num_blocks, Tensor q_indices, int block_q, "
    "int block_k, bool causal, float scale, Tensor? key_bias, str backend) -> Tensor", _varlen_mass_fake)

reg.implements("block_sparse_attn_varlen_fwd", "torch", ref.varlen_fwd)
reg.implements("block_sparse_attn_varlen_bwd", "torch", ref.varlen_bwd)
reg.implements("attn_key_mass_varlen", "torch", ref.varlen_mass_from_lse)
reg.implements("block_sparse_attn_varlen_fwd", "triton", "tokops.triton_kernels.block_sparse_attn:fwd_varlen")
reg.implements("block_sparse_attn_varlen_bwd", "triton", "tokops.triton_kernels.block_sparse_attn:bwd_varlen")
reg.implements("attn_key_mass_varlen", "triton", "tokops.triton_kernels.block_sparse_attn:key_mass_varlen")


def _varlen_setup_context(ctx, inputs, output):
    (q, k, v, cu_q, cu_k, max_q, max_k, num, idx, block_q, block_k, causal, scale, key_bias, backend) = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, num, idx, key_bias)
    ctx.args = (max_q, max_k, block_q, block_k, causal, scale, backend)
    ctx.bias_dim = None if key_bias is None else key_bias.dim()


def _varlen_backward(ctx, dout, dlse):
    q, k, v, out, lse, cu_q, cu_k, num, idx, key_bias = ctx.saved_tensors
    max_q, max_k, block_q, block_k, causal, scale, backend = ctx.args
    if dout is None:
        dout = torch.zeros_like(out)
    qn, qi = transpose_csr(num, idx)
    dout = dout.contiguous()
    if dlse is not None:
        dlse = dlse.contiguous()
    dq, dk, dv, dbias = _varlen_bwd_op(dout, q, k, v, out, lse, dlse, cu_q, cu_k, max_q, max_k, num, idx, qn, qi,
                                       block_q, block_k, causal, scale, key_bias, backend)
    if ctx.bias_dim is None:
        dbias = None
    elif ctx.bias_dim == 1:
        dbias = dbias.sum(0)
    return dq, dk, dv, None, None, None, None, None, None, None, None, None, None, dbias, None


torch.library.register_autograd("tokops::block_sparse_attn_varlen_fwd", _varlen_backward,
                                setup_context=_varlen_setup_context)


def _check_cu_seqlens(name: str, cu, device) -> None:
    check_tensor(name, cu, dtypes=(torch.int32,), ndim=1, contiguous=False)
    if cu.shape[0] < 2:
        raise ValueError(f"{name} must have shape (S + 1,) with S >= 1 sequences, got {tuple(cu.shape)}")
    if cu.device != device:
        raise ValueError(f"{name} must be on the device of q ({device}), got {cu.device} (cu_seqlens stay on the "
                         f"device: the kernels read them there, the host never does)")


def _check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, key_bias, scale, causal):
    """Checks of the packed layout (shapes, dtypes, devices only: no value of ``cu_seqlens`` is read);
    returns ``(q, k, v, cu_q, cu_k, key_bias, scale)``."""
    check_tensor("q", q, dtypes=FLOAT_DTYPES, ndim=3, contiguous=False)
    check_tensor("k", k, dtypes=FLOAT_DTYPES, ndim=3, contiguous=False)
    check_tensor("v", v, dtypes=FLOAT_DTYPES, ndim=3, contiguous=False)
    q, k, v = last_dim_dense(q), last_dim_dense(k), last_dim_dense(v)
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"k and v must have the dtype of q ({q.dtype}), got k {k.dtype}, v {v.dtype}")
    check_same_device(q=q, k=k, v=v)
    Tq, H, D = q.shape
    if k.shape[-1] != D:
        raise ValueError(f"k must have shape (total_k, H_kv, D={D}), got {tuple(k.shape)}")
    if H % k.shape[1]:
        raise ValueError(f"k: the number of query heads ({H}) must be a multiple of the KV heads ({k.shape[1]})")
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"v must have the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    if D > MAX_HEAD_DIM:
        raise ValueError(f"q: head dim must be <= {MAX_HEAD_DIM}, got {D}")
    Tk = k.shape[0]
    _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.device)
    _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, q.device)
    if cu_seqlens_k.shape != cu_seqlens_q.shape:
        raise ValueError(f"cu_seqlens_k must have the shape of cu_seqlens_q {tuple(cu_seqlens_q.shape)} (one entry "
                         f"per sequence + 1), got {tuple(cu_seqlens_k.shape)}")
    for name, m, total in (("max_seqlen_q", max_seqlen_q, Tq), ("max_seqlen_k", max_seqlen_k, Tk)):
        check_int(name, m, min_value=1)
        if m > total:
            raise ValueError(f"{name} must be <= the number of packed rows ({total}), got {m}")
    if key_bias is not None:
        check_tensor("key_bias", key_bias, dtypes=(torch.float32,), contiguous=False)
        key_bias = dense(key_bias)
        if tuple(key_bias.shape) not in ((Tk,), (H, Tk)):
            raise ValueError(f"key_bias must have shape (total_k,) = {(Tk,)} or (H, total_k) = {(H, Tk)}, "
                             f"got {tuple(key_bias.shape)}")
        check_same_device(q=q, key_bias=key_bias)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise TypeError(f"scale must be a finite float or None, got {scale!r}")
    return q, k, v, cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous(), key_bias, float(scale)


def validate_cu_seqlens(cu_seqlens: torch.Tensor, total: int, max_seqlen: int, name: str = "cu_seqlens") -> None:
    """Check the *values* of ``cu_seqlens`` (one host sync): ``cu[0] == 0``, non-decreasing,
    ``cu[-1] == total`` and every length ``<= max_seqlen``.  The attention calls never do this by
    themselves (it would sync the host with the device on every call); call it once where the packing
    is built, or pass ``check_seqlens=True``."""
    cu = cu_seqlens.long()
    lens = cu[1:] - cu[:-1]
    first, last, neg, longest = torch.stack([cu[0], cu[-1], (lens < 0).any().long(), lens.max()]).tolist()
    if first != 0:
        raise ValueError(f"{name}[0] must be 0, got {first}")
    if neg:
        raise ValueError(f"{name} must be non-decreasing (sequence lengths >= 0), got {cu.tolist()}")
    if last != total:
        raise ValueError(f"{name}[-1] must equal the number of packed rows {total}, got {last}")
    if longest > max_seqlen:
        raise ValueError(f"a sequence of {name} is {longest} long, more than max_seqlen = {max_seqlen}")


def _prepare_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, mask, causal, scale, key_bias,
                    block_q, block_k, check_mask, check_seqlens):
    q, k, v, cu_q, cu_k, key_bias, scale = _check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                                         max_seqlen_k, key_bias, scale, causal)
    S, H = cu_q.shape[0] - 1, q.shape[1]
    for name, flag in (("check_mask", check_mask), ("check_seqlens", check_seqlens)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    read_values = not torch.compiler.is_compiling() and q.device.type != "meta"
    if check_seqlens and read_values:
        validate_cu_seqlens(cu_q, q.shape[0], max_seqlen_q, "cu_seqlens_q")
        validate_cu_seqlens(cu_k, k.shape[0], max_seqlen_k, "cu_seqlens_k")
    # blocks of every sequence counted from its start: the mask's grid covers max_seqlen_q x max_seqlen_k
    if isinstance(mask, BlockMask) and (mask.q_len, mask.k_len) != (max_seqlen_q, max_seqlen_k):
        raise ValueError(f"mask: a varlen block mask covers the max_seqlen_q x max_seqlen_k grid "
                         f"({max_seqlen_q} x {max_seqlen_k}), got mask.q_len={mask.q_len}, mask.k_len={mask.k_len}")
    mask = as_block_mask(mask, max_seqlen_q, max_seqlen_k, block_q, block_k, q.device)
    validate_mask(mask, S, H, max_seqlen_q, max_seqlen_k, q.device, read_values=check_mask and read_values)
    if not (check_mask and read_values):
        num, idx = canonical_csr(mask.kv_num_blocks, mask.kv_indices)
        mask = mask._replace(kv_num_blocks=num, kv_indices=idx)
    return q, k, v, cu_q, cu_k, _finite_key_bias(key_bias), mask, scale


def _varlen_backend(backend: str, q) -> str:
    if backend == "cuda":
        raise ValueError("backend='cuda': the CUDA attention kernels take padded batches only (q: (B, H, N, D)); "
                         "varlen (cu_seqlens) attention runs on backend='triton' (what 'auto' picks on a GPU) or "
                         "'torch'")
    return reg.resolve_backend("block_sparse_attn_varlen_fwd", backend, q.device)


def block_sparse_attention_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                                  cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, mask=None, *,
                                  causal: bool = False, scale: float | None = None,
                                  key_bias: torch.Tensor | None = None, return_lse: bool = False,
                                  block_q: int | None = None, block_k: int | None = None, check_mask: bool = True,
                                  check_seqlens: bool = False, backend: str = "auto"):
    """Block-sparse attention over packed variable-length sequences (FlashAttention's varlen convention).

    ``q: (total_q, H, D)``, ``k, v: (total_k, H_kv, D)`` (fp16/bf16/fp32, ``H % H_kv == 0``, ``D <= 256``;
    views whose last dim is contiguous are read in place); sequence ``s`` is rows
    ``cu_seqlens_q[s]:cu_seqlens_q[s+1]`` of ``q`` and ``cu_seqlens_k[s]:cu_seqlens_k[s+1]`` of ``k``/``v``.
    ``cu_seqlens_q``/``cu_seqlens_k``: int32 ``(S + 1,)`` on the device of ``q``, starting at 0,
    non-decreasing (empty sequences allowed), ending at ``total_q``/``total_k``.  ``max_seqlen_q``/
    ``max_seqlen_k``: host ints >= the longest sequence, used only to size the launch grids and the mask.

    The result equals running every sequence alone through :func:`block_sparse_attention`:

    * ``mask``: one block mask per sequence -- a :class:`BlockMask` or dense bool block mask with batch
      dim ``S`` (or 1 to share one mask), blocks counted from each sequence's start, on the grid of
      ``max_seqlen_q x max_seqlen_k`` (``ceil(max_seqlen_q / block_q)`` query blocks); entries past a
      sequence's own length are ignored; ``None`` = every block.  E.g.
      ``causal_block_mask(max_seqlen, ...)`` is each sequence's causal block mask when its ``q`` and
      ``k`` lengths are equal.
    * ``causal``: bottom-right aligned *per sequence*, as FlashAttention (>= 2.1) and the padded op:
      query ``i`` of sequence ``s`` sees key ``j`` iff ``j <= i + Lk_s - Lq_s``.
    * ``key_bias``: fp32 ``(total_k,)`` or ``(H, total_k)``, added to the logits of that key.
    * A query row with no allowed key (e.g. of a sequence with no key, or a mask row with no block)
      gives 0 and ``lse = -inf``.

    Returns ``out (total_q, H, D)`` in the input dtype, and with ``return_lse`` the fp32 natural-log
    ``lse (H, total_q)`` (FlashAttention's varlen ``softmax_lse`` layout).  Differentiable in ``q``,
    ``k``, ``v``, ``key_bias`` (and through ``lse``).

    No host sync: ``cu_seqlens`` are read by the kernels only (pass ``check_mask=False``, or run under
    ``torch.compile``, to skip the mask value check too).  Their values are therefore *not* checked: a
    ``cu_seqlens`` that is not non-decreasing, does not end at the total or has a sequence longer than
    ``max_seqlen`` gives undefined rows (never an out-of-bounds access: the kernels clamp every sequence
    to the packed tensors and to ``max_seqlen``).  ``check_seqlens=True`` checks them (one host sync,
    skipped while compiling), as does :func:`validate_cu_seqlens`.

    Backends: ``"triton"`` (``"auto"`` on a GPU) and ``"torch"`` (a dense packed float64 reference,
    O(H total_q total_k) memory).  The CUDA kernels take padded batches only: ``backend="cuda"`` raises.
    The Triton grid has ``S * H <= 65535`` programs in its second dimension.
    """
    q, k, v, cu_q, cu_k, key_bias, mask, scale = _prepare_varlen(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, mask, causal, scale, key_bias, block_q,
        block_k, check_mask, check_seqlens)
    be = _varlen_backend(backend, q)
    out, lse = _varlen_fwd_op(q, k, v, cu_q, cu_k, max_seqlen_q, max_seqlen_k, mask.kv_num_blocks, mask.kv_indices,
                              mask.block_q, mask.block_k, causal, scale, key_bias, be)
    return (out, lse) if return_lse else out


def attention_with_key_mass_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                                   cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, mask=None, *,
                                   causal: bool = False, scale: float | None = None,
                                   key_bias: torch.Tensor | None = None, block_q: int | None = None,
                                   block_k: int | None = None, check_mask: bool = True, check_seqlens: bool = False,
                                   backend: str = "auto"):
    """:func:`block_sparse_attention_varlen` plus the attention mass of every key: returns ``(out, mass)``,
    ``mass (H, total_k)`` fp32 with ``mass[h, j] = sum_i P[h, i, j]`` over the queries ``i`` of ``j``'s
    sequence (per *query* head; the layout of the varlen ``lse``).  As :func:`attention_with_key_mass`:
    ``P`` is never materialised, ``out`` is differentiable, ``mass`` is not."""
    q, k, v, cu_q, cu_k, key_bias, mask, scale = _prepare_varlen(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, mask, causal, scale, key_bias, block_q,
        block_k, check_mask, check_seqlens)
    be = _varlen_backend(backend, q)
    out, lse = _varlen_fwd_op(q, k, v, cu_q, cu_k, max_seqlen_q, max_seqlen_k, mask.kv_num_blocks, mask.kv_indices,
                              mask.block_q, mask.block_k, causal, scale, key_bias, be)
    qn, qi = transpose_csr(mask.kv_num_blocks, mask.kv_indices)
    kb = None if key_bias is None else key_bias.detach()
    mass = _varlen_mass_op(q.detach(), k.detach(), lse.detach(), cu_q, cu_k, max_seqlen_q, max_seqlen_k, qn, qi,
                           mask.block_q, mask.block_k, causal, scale, kb, be)
    return out, mass
