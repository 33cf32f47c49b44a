"""Block-sparse attention benchmark cases: dense torch SDPA (baseline), FlexAttention with the same
block mask (compiled), and tokops, forward and forward+backward.

``flops = 4 * B * H * Nq * Nk * D * density`` (density = the fraction of kept blocks, measured
from the mask; for causal the dense count halved), x3.5 for forward+backward (backward = 2.5x forward).  Dense SDPA
computes all blocks regardless: its TFLOP/s column is "useful" throughput at the sparse density.

Varlen (issue 14): packed sequences of spread lengths (``cu_seqlens``), causal, against the same batch
padded to the longest sequence (pad q/k/v, the padded op, unpad the output: what a packed pipeline
pays without a varlen kernel; right padding with causal attention leaves the real rows exact).
``flops`` counts the real sequences only (``sum 4 H L^2 D / 2``).
"""

from __future__ import annotations

import itertools
import math

import torch

from .harness import Case, gpu_backends

BLOCK = 128
# FlexAttention is compiled per mask function and shape; quick runs (gpu_check.sh) compile it for at
# most this many cases (forward, non-causal), full runs for every case.
QUICK_FLEX_CASES = 2


def _random_mask(B, H, n, density, device, seed=0):
    """Each query block keeps round(density * nK) key blocks (at least 1), always its diagonal."""
    from tokops.attention import BlockMask

    nb = math.ceil(n / BLOCK)
    keep = max(1, round(density * nb))
    g = torch.Generator(device="cpu").manual_seed(seed)
    score = torch.rand(B, H, nb, nb, generator=g)
    score[..., torch.arange(nb), torch.arange(nb)] = 2.0
    top = score.topk(keep, -1).indices
    dense = torch.zeros(B, H, nb, nb, dtype=torch.bool).scatter_(-1, top, True)
    return BlockMask.from_dense(dense.to(device), BLOCK, BLOCK, n, n)


def _flex_fn(q, k, v, mask, causal):
    from torch.nn.attention.flex_attention import BlockMask as FlexBlockMask, flex_attention

    mask_mod = None
    if causal:
        def mask_mod(b, h, qi, ki):
            return qi >= ki
    fm = FlexBlockMask.from_kv_blocks(mask.kv_num_blocks, mask.kv_indices, BLOCK_SIZE=(BLOCK, BLOCK),
                                      mask_mod=mask_mod, seq_lengths=(mask.q_len, mask.k_len))
    compiled = torch.compile(flex_attention, fullgraph=True)
    return lambda: compiled(q, k, v, block_mask=fm)


def _with_backward(fn, inputs, grad):
    def run():
        out = fn()
        torch.autograd.grad(out, inputs, grad)
    return run


def _attention_fns(q, k, v, mask, causal, device, flex=True):
    """Dense SDPA (baseline), FlexAttention (``flex``), and tokops with each backend named explicitly;
    ``cuda`` only where its kernel covers the call (else Triton would be what runs)."""
    import tokops
    from tokops.attention.ops import cuda_kernel_unsupported

    sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)  # noqa: E731
    if device == "cpu":
        return {"sdpa_dense": sdpa, "tokops torch": lambda: tokops.attention.block_sparse_attention(
            q, k, v, mask, causal=causal, backend="torch")}
    fns = {"sdpa_dense": sdpa}
    if flex:
        fns["flex"] = _flex_fn(q, k, v, mask, causal)
    for be in gpu_backends("block_sparse_attn_fwd"):
        if be == "cuda" and cuda_kernel_unsupported(q, k, v, mask.block_q, mask.block_k):
            continue
        fns[f"tokops {be}"] = (lambda be=be: tokops.attention.block_sparse_attention(
            q, k, v, mask, causal=causal, check_mask=False, backend=be))
    return fns


def _mass_fns(q, k, v, n, device):
    import tokops

    mask = tokops.attention.causal_block_mask(n, device=device)
    fns = {"sdpa_dense": lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)}
    for be in gpu_backends("attn_key_mass"):
        fns[f"tokops {be} (with mass)"] = (lambda be=be: tokops.attention.attention_with_key_mass(
            q, k, v, mask, causal=True, check_mask=False, backend=be))
    return fns


def cases(device: str, quick: bool) -> list[Case]:
    import tokops

    out: list[Case] = []
    if device == "cpu":
        # tiny sizes, torch paths only (the Triton interpreter is far too slow to time)
        configs = [(256, d, 64) for d in (1.0, 0.5)]
        B, H, dtype = 1, 2, torch.float32
    else:
        Ns = (4096,) if quick else (4096, 16384, 32768)
        dens = (1.0, 0.2) if quick else (1.0, 0.5, 0.2, 0.1, 0.05)
        Ds = (128,) if quick else (64, 128)
        configs = [(n, d, hd) for n in Ns for d in dens for hd in Ds]
        B, H, dtype = 1, 16, torch.bfloat16
    g = torch.Generator(device="cpu").manual_seed(0)
    flex_left = QUICK_FLEX_CASES if quick else len(configs) * 4
    for n, density, D in configs:
        q, k, v = (torch.randn(B, H, n, D, generator=g).to(dtype).to(device) for _ in range(3))
        for causal in ((False, True) if density == 1.0 else (False,)):
            if causal:
                mask = tokops.attention.causal_block_mask(n, block_q=BLOCK, device=device)
            else:
                mask = _random_mask(1, H, n, density, device)
            real_density = mask.expand(B, H).density()
            flops = 4 * B * H * n * n * D * (0.5 if causal else real_density)
            kind = "causal" if causal else f"density {density:.0%}"
            params = dict(B=B, H=H, N=n, D=D, block=BLOCK, density=round(real_density, 4), causal=causal,
                          dtype=str(dtype).replace("torch.", ""))
            flex = flex_left > 0 and not (quick and causal)
            flex_left -= flex
            out.append(Case("attention", f"block-sparse attention fwd, {kind}", dict(params, pass_="fwd"),
                            _attention_fns(q, k, v, mask, causal, device, flex), flops=flops))
            qg, kg, vg = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
            grad = torch.randn_like(q)
            fns = _attention_fns(qg, kg, vg, mask, causal, device, flex=not quick)
            fb = {name: _with_backward(f, (qg, kg, vg), grad) for name, f in fns.items()}
            out.append(Case("attention", f"block-sparse attention fwd+bwd, {kind}", dict(params, pass_="fwd+bwd"),
                            fb, flops=flops * 3.5))
        if device != "cpu" and density == 1.0 and D == 128 and n <= 16384:
            out.append(Case("attention", "attention + per-key mass (causal)", dict(B=B, H=H, N=n, D=D, causal=True),
                            _mass_fns(q, k, v, n, device), flops=4 * B * H * n * n * D * 0.5 * 1.5,
                            notes="tokops computes the output and the key mass (an extra QK^T pass)"))
    out += _decode_cases(device, quick)
    out += _varlen_cases(device, quick)
    return out


def _decode_fns(q, k, v, device):
    import tokops

    sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)  # noqa: E731
    fns = {"sdpa_dense": sdpa}
    for be in (["torch"] if device == "cpu" else gpu_backends("attn_key_mass")):
        fns[f"tokops {be} (decode + mass)"] = (
            lambda be=be: tokops.attention.decode_attention_with_key_mass(q, k, v, backend=be))
    return fns


def _decode_cases(device: str, quick: bool) -> list[Case]:
    """One decode step (1 query) against a long KV cache, GQA, with the per-key mass (H2O/SnapKV-style
    eviction statistics); bytes = K + V + q + out."""
    if device == "cpu":
        configs, H, Hkv, D, dtype = [512], 4, 2, 64, torch.float32
    else:
        configs, H, Hkv, D, dtype = ([16384] if quick else [16384, 65536]), 32, 8, 128, torch.bfloat16
    out = []
    g = torch.Generator(device="cpu").manual_seed(1)
    for n in configs:
        q = torch.randn(1, H, 1, D, generator=g).to(dtype).to(device)
        k, v = (torch.randn(1, Hkv, n, D, generator=g).to(dtype).to(device) for _ in range(2))
        nbytes = (k.numel() + v.numel() + 2 * q.numel()) * k.element_size()
        out.append(Case("attention", "decode attention + per-key mass", dict(B=1, H=H, H_kv=Hkv, Nk=n, D=D,
                                                                           dtype=str(dtype).replace("torch.", "")),
                        _decode_fns(q, k, v, device), bytes=nbytes, flops=4 * H * n * D,
                        notes="tokops also returns the per-key mass (a second pass over K)"))
    return out


def _varlen_lengths(device: str, quick: bool) -> list[int]:
    """Deterministic spread of sequence lengths (log-uniform between the bounds)."""
    if device == "cpu":
        return [5, 64, 23]
    S, lo, hi = (8, 256, 4096) if quick else (16, 256, 8192)
    g = torch.Generator().manual_seed(3)
    return [int(round(math.exp(math.log(lo) + (math.log(hi) - math.log(lo)) * float(u))))
            for u in torch.rand(S, generator=g)]


def _varlen_fns(q, k, v, cu, lens, device, backward):
    """Padded (pad + attention + unpad; the baseline) and varlen, each on every backend that runs it,
    returning the packed ``(total, H, D)`` output (forward) or the packed gradients (fwd+bwd)."""
    import tokops

    S, n = len(lens), max(lens)
    H, D = q.shape[1], q.shape[2]
    seq = torch.repeat_interleave(torch.arange(S), torch.tensor(lens)).to(device)
    pos = torch.cat([torch.arange(n_) for n_ in lens]).to(device)
    block = 16 if device == "cpu" else BLOCK
    mask = tokops.attention.causal_block_mask(n, block_q=block, device=device)
    grad = torch.randn_like(q)

    def pad(t):  # (total, H, D) -> (S, H, n, D) view of a zero-padded (S, n, H, D) buffer
        buf = t.new_zeros(S, n, t.shape[1], D)
        buf[seq, pos] = t
        return buf.transpose(1, 2)

    def padded(be):
        def run():
            out = tokops.attention.block_sparse_attention(pad(q), pad(k), pad(v), mask, causal=True,
                                                          check_mask=False, backend=be)
            return out.transpose(1, 2)[seq, pos]
        return run

    def varlen(be):
        return lambda: tokops.attention.block_sparse_attention_varlen(q, k, v, cu, cu, n, n, mask, causal=True,
                                                                      check_mask=False, backend=be)

    bes = ["torch"] if device == "cpu" else ["triton"]
    fns = {f"tokops {be} padded (pad + attn + unpad)": padded(be) for be in bes}
    fns.update({f"tokops {be} varlen": varlen(be) for be in bes})
    if backward:
        fns = {name: _grads(f, (q, k, v), grad) for name, f in fns.items()}
    return fns


def _grads(fn, inputs, grad):
    def run():
        return torch.autograd.grad(fn(), inputs, grad)
    return run


def _varlen_cases(device: str, quick: bool) -> list[Case]:
    lens = _varlen_lengths(device, quick)
    H, Hkv, D, dtype = (2, 2, 16, torch.float32) if device == "cpu" else (16, 16, 128, torch.bfloat16)
    g = torch.Generator(device="cpu").manual_seed(4)
    T = sum(lens)
    q = torch.randn(T, H, D, generator=g).to(dtype).to(device)
    k, v = (torch.randn(T, Hkv, D, generator=g).to(dtype).to(device) for _ in range(2))
    cu = torch.tensor([0] + list(itertools.accumulate(lens)), dtype=torch.int32, device=device)
    flops = sum(4 * H * n * n * D * 0.5 for n in lens)
    params = dict(S=len(lens), H=H, D=D, total=T, max_seqlen=max(lens), min_seqlen=min(lens), causal=True,
                  dtype=str(dtype).replace("torch.", ""))
    pad_frac = 1 - T / (len(lens) * max(lens))
    out = [Case("attention", "varlen attention fwd (packed vs padded), causal", dict(params, pass_="fwd"),
                _varlen_fns(q, k, v, cu, lens, device, False), flops=flops,
                notes=f"padding is {pad_frac:.0%} of the padded batch's tokens")]
    qg, kg, vg = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out.append(Case("attention", "varlen attention fwd+bwd (packed vs padded), causal", dict(params, pass_="fwd+bwd"),
                    _varlen_fns(qg, kg, vg, cu, lens, device, True), flops=flops * 3.5,
                    notes=f"padding is {pad_frac:.0%} of the padded batch's tokens"))
    return out
