"""Block-sparse attention as a HuggingFace transformers attention implementation.

    import tokops.patch
    tokops.patch.sparse_attention(model, tokops.patch.SparsePolicy("topk", keep=0.5, block=64))
    # or: AutoModel.from_pretrained(..., attn_implementation="tokops_block_sparse")  (then the default policy)

Registers ``"tokops_block_sparse"`` with transformers' ``AttentionInterface`` (and the sdpa-style
mask with ``AttentionMaskInterface``). Every attention call builds its block mask from the
module's :class:`SparsePolicy`: ``"topk"`` (FlexPrefill / MInference-style content selection:
mean-pooled q/k per block, :func:`tokops.attention.topk_block_mask`), ``"window"`` (sliding
window + attention sinks, StreamingLLM; causal models), or ``"full"``. Key padding from the
attention mask becomes a ``-inf`` key bias and the builders' ``valid`` mask (padded key blocks are
never selected, a fraction ``keep`` counts each row's valid blocks), so in a right-padded batch
every row gives what it gives alone, for every policy. Causal models (``module.is_causal``) attend
causally.

No host sync per layer (issue 12): the key padding is read from the mask on the device
(:func:`key_padding_mask`), the builders' masks are known valid (the attention op does not read them
again) and the call compiles with ``torch.compile(fullgraph=True)``.  (transformers' own mask
creation, once per forward and not under ``torch.compile``, checks on the host whether a 2-D
attention mask pads anything, to skip the mask.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import attention as tka

ATTN_IMPLEMENTATION = "tokops_block_sparse"
POLICIES = ("topk", "window", "full")


@dataclass(frozen=True)
class SparsePolicy:
    """How each attention call chooses its key blocks.

    ``kind``: ``"topk"`` keeps ``keep`` key blocks per query block (int count or float fraction of
    each row's valid key blocks); ``"window"`` keeps a causal window of ``window`` keys plus
    ``sinks`` first keys; ``"full"`` keeps every block. ``block``: block size (a power of two >= 16).

    Defaults (``keep=0.7, block=16``) were chosen on the retrieval task of ``python -m tokops.demo``
    (README "Demo and defaults"): the old ``keep=0.5, block=64`` lost 12 points of top-1 there,
    ``keep=0.7`` with 32-token blocks 3 points, with 16-token blocks none, while skipping ~27% of
    the key blocks of ~240-token inputs. Inputs of one block (short queries) stay dense. For long
    causal LLM prompts on a GPU, larger blocks (64/128) and smaller ``keep`` are the usual choice.
    """

    kind: str = "topk"
    keep: int | float = 0.7
    block: int = 16
    window: int = 256
    sinks: int = 4
    backend: str = "auto"

    def __post_init__(self):
        from .._checks import check_int, check_power_of_two
        from .._registry import BACKENDS
        from ..attention.masks import MAX_BLOCK, MIN_BLOCK, check_keep

        if self.kind not in POLICIES:
            raise ValueError(f"kind must be one of {POLICIES}, got {self.kind!r}")
        check_keep(self.keep)
        check_power_of_two("block", self.block, MIN_BLOCK, MAX_BLOCK)
        check_int("window", self.window, min_value=1)
        check_int("sinks", self.sinks, min_value=0)
        if not isinstance(self.backend, str) or self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}; got {self.backend!r}")


DEFAULT_POLICY = SparsePolicy()


def key_padding_valid(attention_mask, B: int, Nk: int) -> torch.Tensor | None:
    """Key validity ``(B, Nk)`` bool from a transformers attention mask (2-D 0/1, or 4-D bool /
    additive); None when nothing is padded.  This reads the mask on the host (one sync): call it once
    per forward, not per layer (ToMe's BERT forward does, to take the unpadded path); the sparse
    attention path uses :func:`key_padding_mask`, which does not read it."""
    valid = key_padding_mask(attention_mask, B, Nk)
    return None if valid is None or bool(valid.all()) else valid


def key_padding_mask(attention_mask, B: int, Nk: int) -> torch.Tensor | None:
    """Key validity ``(B, Nk)`` bool from a transformers attention mask, without a host sync (None
    only when there is no mask). A 4-D mask is read at its last query row, which sees every key
    that a padded row may see (also for causal masks)."""
    if attention_mask is None:
        return None
    m = attention_mask
    if m.dim() == 4:
        m = m[:, 0, -1, :]
        valid = m if m.dtype == torch.bool else m == 0
    elif m.dim() == 2:
        valid = m.bool()
    else:
        raise ValueError(f"attention_mask: expected a 2-D or 4-D mask, got shape {tuple(attention_mask.shape)}")
    return valid[:, -Nk:].expand(B, Nk).contiguous()


def _key_padding_bias(valid: torch.Tensor | None) -> torch.Tensor | None:
    """fp32 ``(B, Nk)`` bias: 0 for real keys, -inf for padding; None without a mask."""
    return None if valid is None else torch.where(valid, 0.0, float("-inf")).to(torch.float32).contiguous()


def block_mask_for(policy: SparsePolicy, q: torch.Tensor, k: torch.Tensor, causal: bool,
                   valid: torch.Tensor | None = None):
    """The block mask that ``policy`` gives for ``q: (B, H, Nq, D)``, ``k: (B, H_kv, Nk, D)``.

    ``valid: (B, Nk)`` key padding: padded key blocks are never selected, a fraction ``keep``
    counts each row's valid blocks, and (right padding) every row gets the blocks it gets alone."""
    Nq, Nk = q.shape[2], k.shape[2]
    if policy.kind == "full":
        if valid is None:
            return None
        return tka.full_block_mask(Nq, Nk, block_q=policy.block, valid=valid)
    if policy.kind == "window":
        return tka.sliding_window_mask(Nq, policy.window, policy.sinks, Nk, block_q=policy.block, device=q.device,
                                       valid=valid)
    return tka.topk_block_mask(q, k, policy.keep, block_q=policy.block, causal=causal, valid=valid)


def tokops_block_sparse_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                                          scaling: float | None = None, **kwargs):
    """transformers attention function: ``query (B, H, Nq, D)``, ``key/value (B, H_kv, Nk, D)`` ->
    ``(attn_output (B, Nq, H, D), None)``."""
    policy = getattr(module, "tokops_sparse_policy", DEFAULT_POLICY)
    causal = bool(getattr(module, "is_causal", False)) and query.shape[2] > 1
    q, k, v = query.contiguous(), key.contiguous(), value.contiguous()
    valid = key_padding_mask(attention_mask, q.shape[0], k.shape[2])
    bias = _key_padding_bias(valid)
    mask = block_mask_for(policy, q, k, causal, valid)
    out = tka.block_sparse_attention(q, k, v, mask, causal=causal, scale=scaling, key_bias=bias,
                                     backend=policy.backend)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Register ``"tokops_block_sparse"`` with transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(ATTN_IMPLEMENTATION, tokops_block_sparse_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_IMPLEMENTATION, sdpa_mask)


def sparse_attention(model: torch.nn.Module, policy: SparsePolicy | None = None) -> torch.nn.Module:
    """Switch a transformers model to block-sparse attention with ``policy`` (in place; returns it).

    The policy is stored on every attention module (``module.tokops_sparse_policy``); pass a list
    of policies, one per attention module in ``model.modules()`` order, for per-layer policies.
    """
    register()
    policy = DEFAULT_POLICY if policy is None else policy
    attn_modules = [m for m in model.modules() if hasattr(m, "config") and hasattr(m, "forward")
                    and m.__class__.__name__.endswith(("SelfAttention", "Attention"))
                    and any(hasattr(m, n) for n in ("query", "q_proj", "qkv"))]
    if not attn_modules:
        raise TypeError(f"sparse_attention: found no attention modules in {type(model).__name__}")
    policies = policy if isinstance(policy, (list, tuple)) else [policy] * len(attn_modules)
    if len(policies) != len(attn_modules):
        raise ValueError(f"policy: got {len(policies)} policies for {len(attn_modules)} attention modules")
    for m, p in zip(attn_modules, policies):
        if not isinstance(p, SparsePolicy):
            raise TypeError(f"policy must be a tokops.patch.SparsePolicy, got {type(p).__name__}")
        m.tokops_sparse_policy = p
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    return model
