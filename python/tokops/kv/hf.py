"""HuggingFace ``transformers`` integration: ``TokopsQuantizedCache`` (needs ``transformers`` >= 5,
which exposes the per-layer ``Cache(layers=...)`` API; checked with 5.23 and 5.24).

Usage::

    from tokops.kv.hf import TokopsQuantizedCache
    cache = TokopsQuantizedCache(num_layers=model.config.num_hidden_layers, bits_k=8, bits_v=8)
    out = model.generate(ids, cache=cache, max_new_tokens=32, do_sample=False)

(transformers 5.2x renamed the argument of ``generate`` and of the models' ``forward`` to ``cache=``;
``past_key_values=`` still works there with a deprecation warning and is the name in older 5.x.)

Batched prompts (left padding + ``attention_mask``), beam search (``reorder_cache``,
``batch_select_indices``, ``batch_repeat_interleave``: rows are copied as they are, never
re-quantized) and ``crop`` (speculative / assisted decoding rollback, see
:meth:`tokops.kv.QuantizedKVCache.truncate`) are supported; the cache-level methods are all or
nothing (the arguments are checked against every layer before any layer changes).

Each layer holds one :class:`tokops.kv.QuantizedKVCache`.  Two ways to attend:

* ``fused=False`` (default, works with any ``attn_implementation``): ``update`` appends the new
  tokens (quantizing whole groups as they leave the residual window, never re-quantizing) and
  returns the cache's tokens dequantized, like ``transformers.QuantizedCache`` does.
* ``fused=True`` with ``attn_implementation="tokops_kv"`` (registered by importing this module):
  decode steps (``q_len <= 8``, no padding mask) run :func:`tokops.kv.decode_attention` on the
  packed codes; prefill and masked steps fall back to dequantize + SDPA.

**Left-padded prompts without the padding** (issue 14): call ``cache.set_padding(attention_mask)``
with the prompt's 2-D mask before ``generate``.  Each layer's prefill then appends only the real
tokens of each row (``QuantizedKVCache.append(lengths=)``: a ragged cache; padding is never
quantized, stored or attended), decode steps append one token per row, and ``update`` hands the
model K/V in the left-padded layout the model's mask expects (zeros in the padding).  The fused
decode then reads each row's own length and never looks at the mask (no host sync); without
``set_padding`` a padded batch takes the dequantize + SDPA path in its decode steps (the mask is
never read on the host).
Beam search (the mask is repeated with the rows) and ``crop`` (per row) work there too.

Host syncs: none per token in the cache methods; ``reorder_cache`` / ``batch_select_indices``
check an index on the device with ``torch._assert_async`` (an out-of-range row is a device-side
assert on a GPU, as the row gather itself would be), an index on the CPU is checked at once; a
bool mask given to ``batch_select_indices`` is converted with ``nonzero`` (one sync: it is not a
per-token path of beam search).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.cache_utils import Cache, DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from .._checks import check_int
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

    is_croppable = True  # crop is exact: see QuantizedKVCache.truncate

    def __init__(self, fused: bool = False, backend: str = "auto", **cache_kwargs):
        super().__init__()
        self.cache_kwargs = dict(cache_kwargs, backend=backend)
        self.backend = backend
        self.fused = fused
        self.kv = QuantizedKVCache(**self.cache_kwargs)
        self._pad_mask = None  # (B, P) bool: the prompt's real tokens, until the prefill consumed it
        self.padding_free = False  # the prompt's padding was dropped: the kv cache is ragged

    def set_padding(self, attention_mask: torch.Tensor) -> None:
        """The next prefill (``P = attention_mask.shape[1]`` tokens into an empty layer) stores only the
        tokens where ``attention_mask`` is nonzero (left padding); see the module docstring."""
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
            raise ValueError(f"attention_mask must be a 2-D (batch, prompt length) tensor, got "
                             f"{getattr(attention_mask, 'shape', type(attention_mask).__name__)}")
        if self.kv.budget is not None:
            raise ValueError("set_padding: dropping the padding is not supported with budget (H2O eviction): "
                             "the left-padded view of the rows needs every token")
        if self.kv.initialized:
            raise ValueError("set_padding must be called before the prompt is appended (the layer is not empty)")
        self._pad_mask = attention_mask != 0

    def _padded(self, x: torch.Tensor) -> torch.Tensor:
        """Store-order ``x (B, H, W, D)`` of a padding-free cache -> the left-padded layout
        ``(B, H, seq_length, D)``: row ``b``'s tokens at the right end, zeros before them."""
        N = self.kv.seq_length
        L = self.kv.lengths().to(torch.int64)[:, None]  # (B, 1)
        p = torch.arange(N, device=x.device)[None, :]
        j = p - (N - L)  # store index of padded position p
        idx = j.clamp(0, max(x.shape[2] - 1, 0))
        B, H, _, D = x.shape
        out = x.gather(2, idx[:, None, :, None].expand(B, H, N, D)) if x.shape[2] else x.new_zeros(B, H, N, D)
        return torch.where((j >= 0)[:, None, :, None], out, torch.zeros((), dtype=x.dtype, device=x.device))

    def lazy_initialization(self, key_states, value_states) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        lengths = None
        m = self._pad_mask
        if m is not None and not self.kv.initialized and key_states.shape[-2] == m.shape[1]:
            B = key_states.shape[0]
            if m.shape[0] != B and B % m.shape[0] == 0:  # generate expanded the rows (beams) after set_padding
                m = m.repeat_interleave(B // m.shape[0], 0)
            if m.shape[0] != B:
                raise ValueError(f"set_padding: attention_mask has {m.shape[0]} rows, the prompt has {B}")
            m = m.to(key_states.device)
            # each row's real tokens first, in order (a stable sort of the mask), then its padding
            order = (~m).to(torch.int8).argsort(dim=-1, stable=True)
            gi = order[:, None, :, None].expand_as(key_states)
            key_states, value_states = key_states.gather(2, gi), value_states.gather(2, gi)
            lengths = m.sum(-1)
            self._pad_mask = None
            self.padding_free = True
        elif self.padding_free:
            lengths = None  # decode steps: every row appends its new tokens
        self.kv.append(key_states.contiguous(), value_states.contiguous(), lengths=lengths)
        if self.fused and key_states.shape[-2] <= MAX_NQ:
            # the fused attention reads the packed cache itself: hand it a marker instead of K/V
            marker = torch.Tensor._make_subclass(
                _FusedMarker, key_states.new_empty((*key_states.shape[:2], 0, key_states.shape[-1])))
            marker._tokops_layer = self
            return marker, marker
        k, v = self.kv.dequantized(key_states.dtype)
        if self.padding_free:
            k, v = self._padded(k), self._padded(v)
        return k, v

    def get_seq_length(self) -> int:
        # padding-free: the model's (left-padded) length, padding included
        return self.kv.seq_length if self.padding_free else len(self.kv)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.kv = QuantizedKVCache(**self.cache_kwargs)
        self.is_initialized = False
        self._pad_mask, self.padding_free = None, False

    def _batch_index(self, name: str, index) -> torch.Tensor | None:
        """``index`` as an int64 row index checked against the batch size (``None``: empty cache)."""
        return _batch_index(name, index, self.kv._shape[0]) if self.kv.initialized and len(self.kv) else None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        idx = self._batch_index("beam_idx", beam_idx)
        if idx is not None:
            self.kv.select_batch(idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        idx = self._batch_index("indices", indices)
        if idx is not None:
            self.kv.select_batch(idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        check_int("repeats", repeats, min_value=1)
        if len(self.kv):
            B = self.kv._shape[0]
            self.kv.select_batch(torch.arange(B, device=self.kv.device).repeat_interleave(repeats))

    def _crop_length(self, tokens_to_remove: int):
        """The ``truncate`` argument: an int, or per-row lengths ``(B,)`` for a ragged cache."""
        check_int("tokens_to_remove", tokens_to_remove)
        n = self.kv.seq_length
        if tokens_to_remove < 0:  # transformers >= 5.2x: remove that many of the last tokens
            target = max(0, n + tokens_to_remove)
        else:
            target = n if tokens_to_remove == 0 else tokens_to_remove  # > 0: the legacy absolute max_length
        if self.kv.initialized and not self.kv.is_uniform and target < n:
            # ragged rows (e.g. padding-free): every row drops the same last n - target tokens
            return (self.kv.seq_lengths() - (n - target)).clamp(min=0)
        return target

    def crop(self, tokens_to_remove: int) -> None:
        """``tokens_to_remove < 0``: drop the last ``-tokens_to_remove`` tokens; ``0``: no-op; ``> 0``:
        keep the first ``tokens_to_remove`` tokens (the older ``crop(max_length)`` meaning).  Exact, all
        or nothing: :meth:`tokops.kv.QuantizedKVCache.truncate`."""
        self.kv.truncate(self._crop_length(tokens_to_remove))

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

    # all-or-nothing batch / length edits: every argument is checked against every layer first
    def _select_rows(self, name: str, index) -> None:
        idx = [layer._batch_index(name, index) for layer in self.layers]  # checks every layer first
        for layer, i in zip(self.layers, idx):
            if i is not None:
                layer.kv.select_batch(i)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select_rows("beam_idx", beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select_rows("indices", indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        check_int("repeats", repeats, min_value=1)
        super().batch_repeat_interleave(repeats)

    def set_padding(self, attention_mask: torch.Tensor) -> None:
        """Drop the prompt's padding in every layer (call before ``generate`` with its
        ``attention_mask``); see the module docstring."""
        if self.layer_class_to_replicate is not None:
            raise ValueError("set_padding needs the layers up front: make the cache with num_layers=")
        for layer in self.layers:
            layer.set_padding(attention_mask)

    def crop(self, tokens_to_remove: int) -> None:
        """Roll back every layer (speculative decoding); see :meth:`TokopsQuantizedLayer.crop`."""
        lengths = [layer._crop_length(tokens_to_remove) for layer in self.layers]
        for layer, length in zip(self.layers, lengths):
            layer.kv._check_truncate(length)
        for layer, length in zip(self.layers, lengths):
            layer.kv.truncate(length)

    def kv_caches(self) -> list[QuantizedKVCache]:
        return [layer.kv for layer in self.layers]

    def memory_bytes(self) -> int:
        return sum(c.memory_bytes() for c in self.kv_caches())


def _batch_index(name: str, index, batch: int) -> torch.Tensor:
    """A 1-D int (or bool mask of length ``batch``) row index as int64, every entry in ``[0, batch)``."""
    if isinstance(index, (list, tuple)):
        index = torch.tensor(index, dtype=torch.int64)
    if not isinstance(index, torch.Tensor):
        raise TypeError(f"{name} must be a 1-D integer tensor, got {type(index).__name__}")
    if index.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(index.shape)}")
    if index.dtype == torch.bool:
        if index.numel() != batch:
            raise ValueError(f"{name} as a bool mask must have {batch} entries (the batch size), got {index.numel()}")
        index = index.nonzero().flatten()
    elif index.dtype.is_floating_point or index.dtype.is_complex:
        raise TypeError(f"{name} must be an integer tensor, got {index.dtype}")
    index = index.to(torch.int64)
    if index.numel() == 0:
        raise ValueError(f"{name} must select at least one batch row, got an empty index")
    if index.device.type == "cpu":  # checked now: no device sync
        lo, hi = int(index.min()), int(index.max())
        if lo < 0 or hi >= batch:
            raise ValueError(f"{name} must hold batch rows in [0, {batch}), got values in [{lo}, {hi}]")
    elif not torch.compiler.is_compiling():
        # beam search reorders every step: checked on the device, no host sync (a device-side assert)
        torch._assert_async(((index >= 0) & (index < batch)).all(), f"{name} must hold batch rows in [0, {batch})")
    return index


def tokops_kv_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                                scaling: float | None = None, **kwargs):
    """``attn_implementation="tokops_kv"``: fused quantized decode when the cache handed a marker."""
    layer = getattr(key, "_tokops_layer", None)
    if layer is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    # padding-free rows: the mask only marks padding the cache never stored -- per-row lengths suffice.
    # Otherwise the fused path runs when transformers passes no mask (no padding: its mask function
    # returns None for decode steps); a mask is not read on the host (no sync): dequantize + SDPA.
    if layer.padding_free or attention_mask is None:
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
