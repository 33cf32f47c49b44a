"""Sparse attention: block-sparse flash attention (FlexAttention-compatible CSR block masks),
per-key attention mass, and block-mask builders."""

from .masks import (BlockMask, causal_block_mask, full_block_mask, is_known_valid, retrieval_heads_mask,
                    sliding_window_mask, stack_heads, token_select_mask, topk_block_mask, validate_mask)
from .ops import (attention_with_key_mass, attention_with_key_mass_varlen, block_sparse_attention,
                  block_sparse_attention_varlen, decode_attention_with_key_mass, validate_cu_seqlens)

__all__ = ["BlockMask", "block_sparse_attention", "attention_with_key_mass", "decode_attention_with_key_mass",
           "block_sparse_attention_varlen", "attention_with_key_mass_varlen", "validate_cu_seqlens",
           "causal_block_mask", "full_block_mask", "sliding_window_mask", "topk_block_mask", "retrieval_heads_mask",
           "stack_heads", "token_select_mask", "validate_mask", "is_known_valid"]
