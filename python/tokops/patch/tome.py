"""``tokops.patch.tome(model, r)``: Token Merging for HuggingFace BERT-style encoders and ViTs.

Bolya et al., "Token Merging: Your ViT But Faster" (ICLR 2023). In every layer, after attention
and before the MLP, ``r`` tokens are merged by bipartite soft matching on the keys averaged over
heads (:func:`tokops.merge.bipartite_soft_matching`), with size-weighted averaging
(:func:`tokops.merge.merge_wavg`) and *proportional attention*: the next attention adds
``log(size)`` to every key's logits (``key_bias`` of :func:`tokops.attention.block_sparse_attention`).
The class token (position 0) is never merged.

Supported models (matched by structure, not by class name):

* transformers BERT-style encoders (``BertModel``, ``RobertaModel``, MiniLM, ...): ``model.encoder.layer[i]``
  with ``attention.self.{query,key,value}``, ``attention.output``, ``intermediate``, ``output`` (post-LN);
* transformers ``ViTModel`` / ``DeiTModel`` (pre-LN), both layouts: ``attention.{q,k,v,o}_proj`` + ``mlp``
  (transformers >= 5.2x) or ``attention.attention.{query,key,value}`` + ``attention.output.dense`` +
  ``intermediate``/``output.dense`` (older); each layer's forward is replaced, the unmerge is a forward hook;
* timm ``VisionTransformer``: ``model.blocks[i]`` with ``norm1``, ``attn.qkv``, ``attn.proj``, ``ls1/ls2``,
  ``drop_path1/2``, ``norm2``, ``mlp``.

Padded text batches: the attention mask's key padding becomes ToMe's ``valid`` mask (padding is
never merged, DESIGN.md "Padded batches"), and a ``-inf`` key bias. With ``unmerge_output=True``
(default) the encoder's output is unmerged back to the input length (each token gets the value of
the merged token that holds it), so pooling and token-level heads work unchanged; mean pooling over
the unmerged tokens equals size-weighted pooling over the merged ones.

Inference only: the patched forward skips attention-probability dropout and does not return
attention weights or per-layer hidden states.
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field

import torch

from .. import attention as tka
from .. import merge as tkm
from .hf_attention import key_padding_valid


@dataclass
class ToMeState:
    """Per-forward bookkeeping (exposed as ``model._tome_state`` after each forward)."""

    r: int | float | list
    class_token: bool = True
    prop_attn: bool = True
    unmerge_output: bool = True
    backend: str = "auto"
    tokens_per_layer: list[int] = field(default_factory=list)
    # running state of a layer-by-layer (ViT) forward
    size: torch.Tensor | None = None
    valid: torch.Tensor | None = None
    matchings: list = field(default_factory=list)

    def r_for(self, layer: int):
        return self.r[layer] if isinstance(self.r, (list, tuple)) else self.r


def _key_bias(size: torch.Tensor | None, valid: torch.Tensor | None, prop_attn: bool, B: int, N: int, device):
    """``log(size)`` (proportional attention) plus ``-inf`` on padding keys, fp32 ``(B, N)``; None if all zero."""
    bias = None
    if prop_attn and size is not None:
        bias = size[..., 0].float().log()
    if valid is not None:
        pad = torch.where(valid, 0.0, float("-inf")).to(torch.float32)
        bias = pad if bias is None else bias + pad
    return None if bias is None else bias.contiguous()


def _attend(q, k, v, bias, scale, backend):
    """``q, k, v: (B, N, H, D)`` -> context ``(B, N, H*D)`` with the tokops attention op."""
    B, N, H, D = q.shape
    out = tka.block_sparse_attention(q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous(),
                                     v.transpose(1, 2).contiguous(), None, scale=scale, key_bias=bias,
                                     backend=backend)
    return out.transpose(1, 2).reshape(B, N, H * D)


def _merge_step(state: ToMeState, layer: int, x, k_heads, size, valid, matchings):
    """Merge ``x`` after attention; ``k_heads: (B, N, H, D)``; returns (x, size, valid)."""
    r = state.r_for(layer)
    if not r:
        return x, size, valid
    metric = k_heads.mean(2)
    m = tkm.bipartite_soft_matching(metric, r, class_token=state.class_token, valid=valid, backend=state.backend)
    if m.is_identity:
        return x, size, valid
    x, size = tkm.merge_wavg(m, x, size, backend=state.backend)
    matchings.append(m)
    return x, size, (m.valid if m.valid is not None else valid)


def _unmerge_all(state: ToMeState, x, matchings):
    if state.unmerge_output:
        for m in reversed(matchings):
            x = tkm.unmerge(m, x, backend=state.backend)
    return x


# --------------------------------------------------------------------------- transformers BERT-style
def _bert_encoder_forward(self, hidden_states, attention_mask=None, *args, **kwargs):
    from transformers.modeling_outputs import BaseModelOutputWithPastAndCrossAttentions as Output

    state: ToMeState = self._tome_state
    B, N, _ = hidden_states.shape
    valid = key_padding_valid(attention_mask, B, N)
    size = torch.ones_like(hidden_states[..., :1])
    matchings, x = [], hidden_states
    state.tokens_per_layer = []
    for i, layer in enumerate(self.layer):
        sa = layer.attention.self
        H, D = sa.num_attention_heads, sa.attention_head_size
        shp = (*x.shape[:2], H, D)
        q, k, v = sa.query(x).view(shp), sa.key(x).view(shp), sa.value(x).view(shp)
        ctx = _attend(q, k, v, _key_bias(size, valid, state.prop_attn, *x.shape[:2], x.device), D ** -0.5,
                      state.backend)
        a = layer.attention.output(ctx, x)
        a, size, valid = _merge_step(state, i, a, k, size, valid, matchings)
        x = layer.output(layer.intermediate(a), a)
        state.tokens_per_layer.append(x.shape[1])
    return Output(last_hidden_state=_unmerge_all(state, x, matchings))


# --------------------------------------------------------------------------- transformers ViT
def _vit_parts(layer):
    """(q, k, v, o projections, heads, head_dim, mlp) of a transformers ViT layer, old or new layout."""
    att = layer.attention
    if hasattr(att, "q_proj"):  # transformers >= 5.2x: attention.{q,k,v,o}_proj, mlp.{fc1,fc2}
        heads = getattr(att, "num_heads", None) or att.config.num_attention_heads
        D = att.q_proj.out_features // heads
        return att.q_proj, att.k_proj, att.v_proj, att.o_proj, heads, D, layer.mlp
    sa = att.attention  # older: attention.attention.{query,key,value}, attention.output.dense
    return (sa.query, sa.key, sa.value, att.output.dense, sa.num_attention_heads, sa.attention_head_size,
            lambda h: layer.output.dense(layer.intermediate(h)))


def _vit_layer_forward(layer, state: ToMeState, index: int):
    q_proj, k_proj, v_proj, o_proj, H, D, mlp = _vit_parts(layer)

    def forward(hidden_states, *args, **kwargs):
        x = hidden_states
        if index == 0:  # a new forward pass starts at the first layer
            state.size, state.valid, state.matchings, state.tokens_per_layer = torch.ones_like(x[..., :1]), None, [], []
        h = layer.layernorm_before(x)
        shp = (*h.shape[:2], H, D)
        q, k, v = q_proj(h).view(shp), k_proj(h).view(shp), v_proj(h).view(shp)
        ctx = _attend(q, k, v, _key_bias(state.size, state.valid, state.prop_attn, *x.shape[:2], x.device),
                      D ** -0.5, state.backend)
        x = x + o_proj(ctx)
        x, state.size, state.valid = _merge_step(state, index, x, k, state.size, state.valid, state.matchings)
        x = x + mlp(layer.layernorm_after(x))
        state.tokens_per_layer.append(x.shape[1])
        return x

    return forward


def _vit_unmerge_hook(model, args, kwargs, output):
    state: ToMeState = model._tome_state
    if state.unmerge_output and getattr(state, "matchings", None):
        output.last_hidden_state = _unmerge_all(state, output.last_hidden_state, state.matchings)
    return output


# --------------------------------------------------------------------------- timm ViT
def _timm_blocks_forward(model, x):
    state: ToMeState = model._tome_state
    size = torch.ones_like(x[..., :1])
    matchings, valid = [], None
    state.tokens_per_layer = []
    for i, blk in enumerate(model.blocks):
        attn = blk.attn
        B, N, C = x.shape
        H = attn.num_heads
        qkv = attn.qkv(blk.norm1(x)).reshape(B, N, 3, H, C // H).unbind(2)
        q, k, v = qkv
        if hasattr(attn, "q_norm"):
            q, k = attn.q_norm(q.transpose(1, 2)).transpose(1, 2), attn.k_norm(k.transpose(1, 2)).transpose(1, 2)
        ctx = _attend(q, k, v, _key_bias(size, valid, state.prop_attn, B, N, x.device), attn.scale, state.backend)
        if hasattr(attn, "norm"):
            ctx = attn.norm(ctx)
        x = x + blk.drop_path1(blk.ls1(attn.proj_drop(attn.proj(ctx))))
        x, size, valid = _merge_step(state, i, x, k, size, valid, matchings)
        x = x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
        state.tokens_per_layer.append(x.shape[1])
    return _unmerge_all(state, x, matchings)


def _timm_forward_features(self, x, *args, **kwargs):
    x = self.patch_embed(x)
    x = self._pos_embed(x)
    x = self.patch_drop(x)
    x = self.norm_pre(x)
    x = _timm_blocks_forward(self, x)
    return self.norm(x)


# --------------------------------------------------------------------------- entry point
def _vit_layers(model):
    layers = getattr(getattr(model, "encoder", None), "layer", None) or getattr(model, "layers", None)
    if layers is not None and len(layers) and hasattr(layers[0], "layernorm_before"):
        return layers
    return None


def _kind(model) -> str:
    enc = getattr(model, "encoder", None)
    layers = getattr(enc, "layer", None)
    if layers is not None and len(layers):
        first = layers[0]
        if hasattr(first, "attention") and hasattr(getattr(first.attention, "self", None), "query"):
            return "bert"
    vit_layers = _vit_layers(model)
    if vit_layers is not None:
        return "vit"
    blocks = getattr(model, "blocks", None)
    if blocks is not None and len(blocks) and hasattr(blocks[0], "attn") and hasattr(blocks[0].attn, "qkv"):
        return "timm"
    for name in ("bert", "roberta", "vit", "model", "base_model"):  # task heads wrap the encoder
        inner = getattr(model, name, None)
        if isinstance(inner, torch.nn.Module) and inner is not model:
            try:
                return _kind(inner)
            except TypeError:
                pass
    raise TypeError(f"tokops.patch.tome: unsupported model {type(model).__name__}: expected a transformers "
                    "BERT-style encoder or ViT (model.encoder.layer) or a timm VisionTransformer (model.blocks)")


def _target(model, kind: str):
    """The module whose forward is replaced (the encoder, the ViT model, or the timm model itself)."""
    if kind == "timm":
        return model if hasattr(model, "blocks") else _target_inner(model, kind)
    if kind == "vit":
        return model if _vit_layers(model) is not None else _target_inner(model, kind)
    return model.encoder if hasattr(model, "encoder") and hasattr(model.encoder, "layer") \
        else _target_inner(model, kind)


def _target_inner(model, kind):
    for name in ("bert", "roberta", "vit", "model", "base_model"):
        inner = getattr(model, name, None)
        if isinstance(inner, torch.nn.Module) and inner is not model:
            return _target(inner, kind)
    raise TypeError(f"tokops.patch.tome: cannot find the encoder of {type(model).__name__}")


def _check_tome_args(r, class_token, prop_attn, unmerge_output, backend) -> None:
    """Validate :func:`tome`'s arguments when patching (not at the first forward)."""
    from ..merge.ops import _check_r

    for i, ri in enumerate(r if isinstance(r, (list, tuple)) else [r]):
        try:
            _check_r(ri)
        except (TypeError, ValueError) as e:
            if not isinstance(r, (list, tuple)):
                raise
            raise type(e)(f"r[{i}]: {e}") from None
    for name, v in (("class_token", class_token), ("prop_attn", prop_attn), ("unmerge_output", unmerge_output)):
        if not isinstance(v, bool):
            raise TypeError(f"{name} must be a bool, got {type(v).__name__}")
    from .._registry import BACKENDS

    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")


def tome(model: torch.nn.Module, r: int | float | list = 8, *, class_token: bool = True, prop_attn: bool = True,
         unmerge_output: bool = True, backend: str = "auto") -> torch.nn.Module:
    """Apply ToMe to ``model`` in place (and return it).

    ``r``: tokens merged per layer (int), a fraction of each row's valid tokens (float), or a list
    with one entry per layer. ``r=0`` keeps the model's output (up to the attention kernel's
    rounding). ``class_token``: never merge token 0 (CLS). ``prop_attn``: add ``log(size)`` to the
    attention logits. ``unmerge_output``: restore the input length at the encoder output.
    Call :func:`unpatch_tome` to restore the original forward.
    """
    kind = _kind(model)
    target = _target(model, kind)
    if isinstance(r, bool) or not isinstance(r, (int, float, list, tuple)):
        raise TypeError(f"r must be an int, a float fraction or a list per layer, got {type(r).__name__}")
    layers = {"timm": lambda: target.blocks, "vit": lambda: _vit_layers(target), "bert": lambda: target.layer}[kind]()
    n_layers = len(layers)
    if isinstance(r, (list, tuple)) and len(r) != n_layers:
        raise ValueError(f"r: a list needs one entry per layer ({n_layers}), got {len(r)}")
    _check_tome_args(r, class_token, prop_attn, unmerge_output, backend)
    target._tome_state = ToMeState(r=r, class_token=class_token, prop_attn=prop_attn, unmerge_output=unmerge_output,
                                   backend=backend)
    model._tome_state = target._tome_state
    if hasattr(target, "_tome_original_forward"):
        unpatch_tome(model)
    if kind == "vit":
        originals = [layer.forward for layer in layers]
        for i, layer in enumerate(layers):
            layer.forward = _vit_layer_forward(layer, target._tome_state, i)
        hook = target.register_forward_hook(_vit_unmerge_hook, with_kwargs=True)
        target._tome_original_forward = ("vit", (layers, originals, hook))
    else:
        attr = "forward_features" if kind == "timm" else "forward"
        target._tome_original_forward = (attr, getattr(target, attr))
        fn = {"bert": _bert_encoder_forward, "timm": _timm_forward_features}[kind]
        setattr(target, attr, types.MethodType(fn, target))
    return model


def unpatch_tome(model: torch.nn.Module) -> torch.nn.Module:
    """Undo :func:`tome`."""
    target = _target(model, _kind(model))
    if hasattr(target, "_tome_original_forward"):
        attr, fn = target._tome_original_forward
        if attr == "vit":
            layers, originals, hook = fn
            for layer, f in zip(layers, originals):
                layer.forward = f
            hook.remove()
        else:
            setattr(target, attr, fn)
        del target._tome_original_forward
    return model
