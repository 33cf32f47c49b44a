"""HuggingFace ``transformers`` integration: ``TokopsQuantizedCache`` (needs ``transformers`` >= 5,
which exposes the per-layer ``Cache(layers=...)`` API; checked with 5.23).

Usage::

    from tokops.kv.hf import TokopsQuantizedCache
    cache = TokopsQuantizedCache(num_layers=model.config.num_hidden_layers, bits_k=8, bits_v=8)
    out = model.generate(ids, past_key_values=cache, max_new_tokens=32, do_sample=False)

Each layer holds one :class:`tokops.kv.QuantizedKVCache`.  Two ways to attend:

* ``fused=False`` (default, works with any ``attn_implementation``): ``update`` appends the new
  tokens (quantizing whole groups as they leave the residual window, never re-quantizing) and
  returns the cache's tokens dequantized, like ``transformers.QuantizedCache`` does.
* ``fused=True`` with ``attn_implementation="tokops_kv"`` (registered by importing this module):
  decode steps (``q_len <= 8``, no padding mask) run :func:`tokops.kv.decode_attention` on the
  packed codes; prefill and masked steps fall back to dequantize + SDPA.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.cache_utils import Cache, DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from .cache import QuantizedKVCache
from .decode import MAX_NQ, decode_attention

ATTN_IMPLEMENTATION = "tokops_kv"


class _FusedMarker(torch.Tensor):
    """What a ``fused=True`` layer returns from ``update`` instead of K/V: the ``tokops_kv`` attention
    reads the packed cache through ``marker._tokops_layer``; any other attention implementation would
    attend over nothing, so every tensor operation on the marker raises a clear error instead."""

    _ALLOWED = {"shape", "dtype", "device", "ndim", "dim", "size", "is_cuda", "__get__", "requires_grad",
                "is_floating_point"}

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        owner = getattr(func, "__self__", None)
        if name in cls._ALLOWED or getattr(owner, "__name__", None) in cls._ALLOWED:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **(kwargs or {}))
        raise RuntimeError(
            "TokopsQuantizedCache(fused=True) only works with attn_implementation='tokops_kv' (the fused "
            f"decode reads the packed cache itself); this model's attention used the key/value states "
            f"({name}), which would attend over no keys. Load the model with attn_implementation='tokops_kv' "
            "(model.set_attn_implementation('tokops_kv')) or use fused=False.")


class TokopsQuantizedLayer(DynamicLayer):
    """One layer of :class:`TokopsQuantizedCache` (a ``transformers`` cache layer)."""

    is_croppable = False

    def __init__(self, fused: bool = False, backend: str = "auto", **cache_kwargs):
        super().__init__()
        self.cache_kwargs = dict(cache_kwargs, backend=backend)
        self.backend = backend
        self.fused = fused
        self.kv = QuantizedKVCache(**self.cache_kwargs)

    def lazy_initialization(self, key_states, value_states) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.kv.append(key_states.contiguous(), value_states.contiguous())
        if self.fused and key_states.shape[-2] <= MAX_NQ:
            # the fused attention reads the packed cache itself: hand it a marker instead of K/V
            marker = torch.Tensor._make_subclass(
                _FusedMarker, key_states.new_empty((*key_states.shape[:2], 0, key_states.shape[-1])))
            marker._tokops_layer = self
            return marker, marker
        k, v = self.kv.dequantized(key_states.dtype)
        return k, v

    def get_seq_length(self) -> int:
        return len(self.kv)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.kv = QuantizedKVCache(**self.cache_kwargs)
        self.is_initialized = False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if len(self.kv):
            self.kv.select_batch(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if len(self.kv):
            self.kv.select_batch(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if len(self.kv):
            B = self.kv._shape[0]
            self.kv.select_batch(torch.arange(B, device=self.kv.device).repeat_interleave(repeats))

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("TokopsQuantizedCache cannot crop quantized tokens (no assisted decoding)")

    def offload(self):
        raise NotImplementedError("TokopsQuantizedCache does not support offloading")


class TokopsQuantizedCache(Cache):
    """A ``transformers`` cache whose layers are tokops quantized KV caches.

    ``num_layers``: create the layers up front (else one is added per new ``layer_idx``).
    Other keyword arguments go to :class:`tokops.kv.QuantizedKVCache` (``bits_k``, ``bits_v``,
    ``group_size``, ``residual``, ``mode``, ``key_axis``, ``value_axis``, ``backend``); ``fused``:
    see the module docstring.
    """

    def __init__(self, num_layers: int | None = None, *, fused: bool = False, **cache_kwargs):
        QuantizedKVCache(**cache_kwargs)  # validate the arguments now, with the cache's error messages
        self._layer_kwargs = dict(cache_kwargs, fused=fused)
        if num_layers is None:
            super().__init__(layer_class_to_replicate=self._make_layer)
        else:
            super().__init__(layers=[self._make_layer() for _ in range(num_layers)])

    def _make_layer(self):
        return TokopsQuantizedLayer(**self._layer_kwargs)

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        if self.layer_class_to_replicate is None and not 0 <= layer_idx < len(self.layers):
            raise ValueError(f"num_layers: this TokopsQuantizedCache was made with num_layers={len(self.layers)}, but "
                             f"the model updates layer {layer_idx}; pass num_layers=model.config.num_hidden_layers "
                             f"(or None to add layers as they come)")
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def kv_caches(self) -> list[QuantizedKVCache]:
        return [layer.kv for layer in self.layers]

    def memory_bytes(self) -> int:
        return sum(c.memory_bytes() for c in self.kv_caches())


def _mask_allows_all(mask) -> bool:
    if mask is None:
        return True
    if mask.dtype == torch.bool:
        return bool(mask.all())
    return bool((mask == 0).all())


def tokops_kv_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                                scaling: float | None = None, **kwargs):
    """``attn_implementation="tokops_kv"``: fused quantized decode when the cache handed a marker."""
    layer = getattr(key, "_tokops_layer", None)
    if layer is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if _mask_allows_all(attention_mask):
        out = decode_attention(query.contiguous(), layer.kv, scale=scaling, backend=layer.backend)
        return out.transpose(1, 2).contiguous(), None
    k, v = layer.kv.dequantized(query.dtype)
    g = query.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    m = attention_mask[..., : k.shape[-2]] if attention_mask is not None else None
    out = F.scaled_dot_product_attention(query, k, v, attn_mask=m, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Register ``"tokops_kv"`` with transformers: the attention function and, so that padded
    batches get their attention mask (without one transformers passes ``attention_mask=None``), the
    sdpa-style mask function (idempotent; done on import)."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(ATTN_IMPLEMENTATION, tokops_kv_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_IMPLEMENTATION, sdpa_mask)


register()

__all__ = ["TokopsQuantizedCache", "TokopsQuantizedLayer", "tokops_kv_attention_forward", "ATTN_IMPLEMENTATION"]
