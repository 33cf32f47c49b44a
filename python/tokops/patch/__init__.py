"""One-line integrations with model libraries (transformers, timm).

* :func:`tome` — Token Merging (with proportional attention, class-token protection and padded
  batches) for BERT-style encoders and ViTs (transformers and timm);
* :func:`sparse_attention` / ``attn_implementation="tokops_block_sparse"`` — block-sparse
  attention as a transformers attention implementation, driven by a :class:`SparsePolicy`;
* :func:`quantized_cache` — the KIVI quantized KV cache as a transformers ``Cache``
  (``model.generate(..., cache=tokops.patch.quantized_cache(...))``; ``past_key_values=`` before transformers 5.2x).

Importing this module needs no model library; each function imports what it patches.
"""

from .hf_attention import ATTN_IMPLEMENTATION, SparsePolicy, sparse_attention
from .tome import detect_tokens, parse_r, tome, unpatch_tome


def quantized_cache(*args, **kwargs):
    """``tokops.kv.hf.TokopsQuantizedCache(*args, **kwargs)`` (needs transformers)."""
    from ..kv.hf import TokopsQuantizedCache

    return TokopsQuantizedCache(*args, **kwargs)


__all__ = ["tome", "unpatch_tome", "parse_r", "detect_tokens", "sparse_attention", "SparsePolicy",
           "ATTN_IMPLEMENTATION", "quantized_cache"]
