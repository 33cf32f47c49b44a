"""``tokops.patch.tome(model, r)``: Token Merging for HuggingFace BERT-style encoders and ViTs.

Bolya et al., "Token Merging: Your ViT But Faster" (ICLR 2023). In every layer, after attention
and before the MLP, ``r`` tokens are merged by bipartite soft matching on the keys averaged over
heads (:func:`tokops.merge.bipartite_soft_matching`), with size-weighted averaging
(:func:`tokops.merge.merge_wavg`) and *proportional attention*: the next attention adds
``log(size)`` to every key's logits (``key_bias`` of :func:`tokops.attention.block_sparse_attention`).
The class token (position 0) and a distillation token (position 1, DeiT) are never merged; both
are detected from the model (:func:`detect_tokens`).

Drop-in for facebookresearch/ToMe (``tome.patch.timm(model); model.r = 16``):

* ``r`` takes ToMe's forms (:func:`parse_r`): an int per layer, a list per layer (padded with zeros
  when shorter, as ToMe does), or ToMe's ``(r, inflect)`` schedule -- plus tokops' float fraction of
  each row's valid tokens.  ``model.r`` may be set between calls (read at the start of every forward).
* ``unmerge_output`` -- restore the input length at the encoder output (each token gets the value of
  the merged token that holds it) -- defaults per model kind: ``False`` for timm models (the
  classifier sees the merged tokens, exactly as with ToMe: the class token, or the plain mean over
  the merged tokens for ``global_pool="avg"``), ``True`` for transformers encoders (their outputs
  keep the input length, for token-level heads and attention masks).  For ``global_pool="avg"``,
  ``unmerge_output=True`` turns the plain mean over merged tokens into the size-weighted mean.

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
(the default for transformers models) the encoder's output is unmerged back to the input length
(each token gets the value of the merged token that holds it), so pooling and token-level heads
work unchanged; mean pooling over the unmerged tokens equals size-weighted pooling over the merged
ones.

Length safety (per row, at merge time; :func:`_length_safety`): a floor ``min_tokens`` of valid
tokens per row, a cap ``max_merged`` on the fraction of each row's valid input tokens merged over
all layers together, and optionally a similarity ``threshold`` (only pairs with cosine >= tau merge,
so the count adapts per row). The floor and cap are on by default for text encoders, where one batch
mixes 10-token queries and 300-token documents (see ``TEXT_DEFAULTS`` and the README's demo section
for how they were chosen); ViTs keep ToMe's plain fixed-r behaviour by default.

What ``r`` means: an int is tokens merged per layer (per row); a float is, with ``r_mode="layer"``
(default), the fraction of each row's *current* valid tokens merged in every layer (it compounds:
``r=0.25`` over 6 layers leaves ``0.75**6 = 18%``), and with ``r_mode="total"`` the fraction of each
row's valid *input* tokens merged over all layers together, spread evenly (``r=0.25`` leaves 75%;
an int ``r`` with ``r_mode="total"`` is a total count per row).

Inference only: the patched forward skips attention-probability dropout and does not return
attention weights or per-layer hidden states.

Host syncs (issue 12): the per-layer path of an unpadded batch (no attention mask, or a timm / ViT
model) has none -- attention, matching, merge and unmerge stay on the device, and the whole layer
compiles with ``torch.compile(fullgraph=True)`` (tests/test_host_sync.py).  A transformers text batch
with an ``attention_mask`` costs one sync per forward (:func:`key_padding_valid`: is anything padded?
if not, the unpadded path runs), and a padded batch one per layer: the merged length of a padded
batch is the longest row's, which depends on the data (see :func:`tokops.merge.bipartite_soft_matching`).
"""

from __future__ import annotations

import math
import types
from dataclasses import dataclass, field

import torch

from .. import attention as tka
from .. import merge as tkm
from .hf_attention import key_padding_valid


@dataclass
class ToMeState:
    """Per-forward bookkeeping (exposed as ``model._tome_state`` after each forward)."""

    r: int | float | list | tuple
    class_token: bool = True
    distill_token: bool = False
    prop_attn: bool = True
    unmerge_output: bool = True
    backend: str = "auto"
    tokens_per_layer: list[int] = field(default_factory=list)
    # running state of a layer-by-layer (ViT) forward
    size: torch.Tensor | None = None
    valid: torch.Tensor | None = None
    matchings: list = field(default_factory=list)
    # r schedule (ToMe's forms): re-read from ``owner.r`` at the start of every forward
    owner: object = field(default=None, repr=False)  # the patched model (its ``r`` attribute)
    schedule: list = field(default_factory=list)
    # length safety (see _length_safety)
    min_tokens: int = 0
    max_merged: float | None = None
    threshold: float | None = None
    r_mode: str = "layer"
    n_layers: int = 0
    n_input: torch.Tensor | int | None = None  # valid input tokens per row of the current forward
    row_tokens: list = field(default_factory=list)  # (B,) valid tokens per row after each layer

    def r_for(self, layer: int):
        if self.schedule:
            return self.schedule[layer]
        return self.r[layer] if isinstance(self.r, (list, tuple)) else self.r


# --------------------------------------------------------------------------- r schedule (ToMe's forms)
def parse_r(num_layers: int, r) -> list:
    """``r`` in any of ToMe's forms -> one entry per layer (ToMe ``tome/utils.py parse_r`` semantics).

    * int ``r``: ``r`` tokens in every layer; a float: tokops' fraction of each row's valid tokens,
      in every layer;
    * list: one entry per layer; a shorter list is padded with zeros (as ToMe); a longer one is a
      ``ValueError`` (ToMe silently ignores the extra entries);
    * tuple ``(r, inflect)`` (int ``r``, ``inflect`` in [-1, 1]): ToMe's schedule, ``min = int(r * (1 -
      inflect))``, ``max = 2 r - min``, layer ``i`` merges ``int(min + (max - min) / (L - 1) * i)``;
      ``(r, 0)`` is the constant ``r``, ``(r, -1)`` the paper's decreasing schedule.
    """
    if isinstance(r, bool) or not isinstance(r, (int, float, list, tuple)):
        raise TypeError(f"r must be an int, a float fraction, a list per layer or an (r, inflect) tuple, "
                        f"got {type(r).__name__}")
    if isinstance(r, list):
        if len(r) > num_layers:
            raise ValueError(f"r: a list has at most one entry per layer ({num_layers}), got {len(r)}")
        for i, v in enumerate(r):
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise TypeError(f"r[{i}] must be an int or a float fraction, got {type(v).__name__} ({v!r})")
            _check_r_entry(f"r[{i}]", v)
        return list(r) + [0] * (num_layers - len(r))
    if isinstance(r, tuple):
        if len(r) != 2:
            raise ValueError(f"r as a tuple must be ToMe's (r, inflect) schedule, got {len(r)} entries: {r!r}")
        base, inflect = r
        if isinstance(base, bool) or not isinstance(base, int) or base < 0:
            raise TypeError(f"r: in an (r, inflect) schedule r must be an int >= 0, got {base!r}")
        if isinstance(inflect, bool) or not isinstance(inflect, (int, float)) or not -1.0 <= inflect <= 1.0:
            raise ValueError(f"r: in an (r, inflect) schedule inflect must be a number in [-1, 1], got {inflect!r}")
        lo = int(base * (1.0 - inflect))
        hi = 2 * base - lo
        step = (hi - lo) / (num_layers - 1) if num_layers > 1 else 0.0
        return [int(lo + step * i) for i in range(num_layers)]
    _check_r_entry("r", r)
    return [r] * num_layers


def _check_r_entry(name: str, v) -> None:
    """One layer's r: an int >= 0 or a float fraction in [0, 1] (checked when patching and whenever
    ``model.r`` is read, not at the first merge)."""
    from ..merge.ops import _check_r

    try:
        _check_r(v)
    except (TypeError, ValueError) as e:
        if name == "r":
            raise
        raise type(e)(f"{name}: {e}") from None


def _start_forward(state: ToMeState) -> None:
    """At the start of every patched forward: read ``r`` from the patched model (``model.r``, settable
    between calls as with ToMe) and expand it to the per-layer schedule."""
    owner = state.owner
    r = getattr(owner, "r", state.r) if owner is not None else state.r
    state.schedule = parse_r(state.n_layers, r)
    if state.r_mode == "total" and (isinstance(r, bool) or not isinstance(r, (int, float))):
        raise ValueError(f"model.r: with r_mode='total' r must be one int (tokens per row) or float (fraction of "
                         f"each row), got {type(r).__name__}")
    state.r = r


# --------------------------------------------------------------------------- token detection
def detect_tokens(model: torch.nn.Module, kind: str | None = None) -> tuple[bool, bool]:
    """``(class_token, distill_token)`` of ``model``, read from the model as ToMe does.

    timm: ``model.cls_token is not None`` and ``model.dist_token`` (``VisionTransformerDistilled``);
    other prefix tokens (``num_prefix_tokens`` above those two, e.g. register tokens) are not
    supported (``ValueError``).  transformers: ``embeddings.cls_token`` (ViT; BERT-style encoders have
    ``[CLS]`` at position 0) and ``embeddings.distillation_token`` (DeiT).
    """
    kind = kind or _kind(model)
    if kind == "timm":
        target = _target(model, kind)
        cls = getattr(target, "cls_token", None) is not None
        dist = getattr(target, "dist_token", None) is not None
        npt = getattr(target, "num_prefix_tokens", int(cls) + int(dist))
        if npt != int(cls) + int(dist):
            raise ValueError(f"tokops.patch.tome: the model has {npt} prefix tokens (num_prefix_tokens) but only "
                             f"a class token ({cls}) and a distillation token ({dist}) can be protected; register "
                             f"tokens are not supported")
        return cls, dist
    if kind == "vit":
        target = _target(model, kind)
        emb = getattr(target, "embeddings", None)
        if emb is None:
            return True, False
        cls = getattr(emb, "cls_token", None) is not None
        dist = getattr(emb, "distillation_token", None) is not None
        return cls, dist and cls
    return True, False  # BERT-style: [CLS] at position 0


def default_unmerge_output(kind: str) -> bool:
    """``unmerge_output`` default per model kind: ``False`` for timm (classifier heads see the merged
    tokens, as with ToMe), ``True`` for transformers encoders (outputs keep the input length)."""
    return kind != "timm"


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
    # strided (B, H, N, D) views: the attention op reads them in place (no transpose copies)
    out = tka.block_sparse_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, scale=scale,
                                     key_bias=bias, backend=backend)
    return out.transpose(1, 2).reshape(B, N, H * D)


def _length_safety(state: ToMeState, layer: int, r, x, valid):
    """The length-safety layer, per row at merge time: returns ``(r, min_keep)`` for this layer.

    ``min_keep`` (an int without padding, else a ``(B,)`` tensor; None when no floor applies) is the
    largest of: ``min_tokens``; ``ceil((1 - max_merged) * n_input)``; and with ``r_mode="total"``
    the even schedule ``n_input - floor(r_total_b * (layer + 1) / n_layers)`` (``r_total_b = r *
    n_input`` for a float ``r``), for which ``r`` becomes "as many as the schedule asks" (the op
    still caps it at half of the row).  ``n_input``: the row's valid tokens entering layer 0.
    """
    if layer == 0:
        state.n_input = valid.sum(1) if valid is not None else x.shape[1]
        state.row_tokens = []
    n0 = state.n_input
    is_t = isinstance(n0, torch.Tensor)
    n0f = n0.double() if is_t else float(n0)
    floor = (lambda t: torch.floor(t).to(torch.int64)) if is_t else math.floor  # noqa: E731
    ceil = (lambda t: torch.ceil(t).to(torch.int64)) if is_t else math.ceil  # noqa: E731
    floors = []
    if state.r_mode == "total":
        total = n0f * state.r if isinstance(state.r, float) else n0f * 0.0 + state.r
        floors.append(n0 - floor(total * (layer + 1) / state.n_layers))
        r = 1.0 if state.r else 0
    if state.min_tokens:
        floors.append(state.min_tokens)
    if state.max_merged is not None:
        floors.append(ceil((1.0 - state.max_merged) * n0f))
    if not floors:
        return r, None
    min_keep = floors[0]
    for f in floors[1:]:
        min_keep = torch.maximum(torch.as_tensor(min_keep), torch.as_tensor(f)) if is_t else max(min_keep, f)
    if is_t:  # a (B,) device tensor, made on the device (a Python int copied host-to-device would sync)
        if isinstance(min_keep, torch.Tensor):
            min_keep = min_keep.to(device=x.device, dtype=torch.int64).expand(x.shape[0]).contiguous()
        else:
            min_keep = torch.full((x.shape[0],), min_keep, dtype=torch.int64, device=x.device)
    return r, min_keep


def _record_rows(state: ToMeState, x, valid) -> None:
    """Valid tokens per row after this layer (``state.row_tokens``; no host sync)."""
    B, N = x.shape[:2]
    state.row_tokens.append(valid.sum(1) if valid is not None else torch.full((B,), N, device=x.device))


def _merge_step(state: ToMeState, layer: int, x, k_heads, size, valid, matchings):
    """Merge ``x`` after attention; ``k_heads: (B, N, H, D)``; returns (x, size, valid)."""
    r = state.r_for(layer)
    r, min_keep = _length_safety(state, layer, r, x, valid)
    if r:
        metric = k_heads.mean(2)
        m = tkm.bipartite_soft_matching(metric, r, class_token=state.class_token,
                                        distill_token=state.distill_token, valid=valid, backend=state.backend,
                                        min_keep=min_keep, threshold=state.threshold)
        if not m.is_identity:
            x, size = tkm.merge_wavg(m, x, size, backend=state.backend)
            matchings.append(m)
            valid = m.valid if m.valid is not None else valid
    _record_rows(state, x, valid)
    return x, size, valid


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
    _start_forward(state)
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
            _start_forward(state)
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
    _start_forward(state)
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


def _timm_forward_features(self, x, attn_mask=None, is_causal=False, *args, **kwargs):
    if attn_mask is not None or is_causal:
        raise ValueError("tokops.patch.tome: a timm forward with attn_mask / is_causal is not supported "
                         "(token merging changes the sequence length)")
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


# Defaults for text encoders (BERT-style), chosen on the short-query / long-document retrieval task of
# ``python -m tokops.demo`` (README "Demo and defaults"): merge 30% of each row's valid tokens in total,
# spread evenly over the layers; rows never drop below 32 tokens (short queries stay unmerged: merging
# them cost 3 points of top-1 on the demo) and never lose more than 50% of their tokens; no
# proportional attention (with it the same merges cost 6 points on the demo; without it none).
TEXT_DEFAULTS = {"r": 0.3, "r_mode": "total", "min_tokens": 32, "max_merged": 0.5, "prop_attn": False}
VISION_DEFAULTS = {"r": 8, "r_mode": "layer", "min_tokens": 0, "max_merged": None, "prop_attn": True}
R_MODES = ("layer", "total")


def _length_safety_args(kind: str, r, r_mode, min_tokens, max_merged, threshold, n_layers: int) -> dict:
    """Resolve and check the length-safety arguments of :func:`tome` ("auto" = the kind's default)."""
    d = TEXT_DEFAULTS if kind == "bert" else VISION_DEFAULTS
    r_mode = d["r_mode"] if r_mode == "auto" and r is None else ("layer" if r_mode == "auto" else r_mode)
    r = d["r"] if r is None else r
    min_tokens = d["min_tokens"] if isinstance(min_tokens, str) and min_tokens == "auto" else min_tokens
    max_merged = d["max_merged"] if isinstance(max_merged, str) and max_merged == "auto" else max_merged
    if r_mode not in R_MODES:
        raise ValueError(f"r_mode must be one of {R_MODES} or 'auto', got {r_mode!r}")
    if r_mode == "total" and (isinstance(r, bool) or not isinstance(r, (int, float))):
        raise ValueError(f"r_mode='total' needs r as one int (tokens per row) or float (fraction of each row), "
                         f"got {type(r).__name__}")
    if min_tokens is None:
        min_tokens = 0
    if isinstance(min_tokens, bool) or not isinstance(min_tokens, int) or min_tokens < 0:
        raise ValueError(f"min_tokens must be an int >= 0 (or 'auto'), got {min_tokens!r}")
    if max_merged is not None and (isinstance(max_merged, bool) or not isinstance(max_merged, (int, float))
                                   or not 0.0 <= max_merged <= 1.0):
        raise ValueError(f"max_merged must be a fraction in [0, 1], None or 'auto', got {max_merged!r}")
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))
                                  or not -1.0 <= threshold <= 1.0):
        raise ValueError(f"threshold must be a cosine similarity in [-1, 1] or None, got {threshold!r}")
    return {"r": r, "r_mode": r_mode, "min_tokens": min_tokens,
            "max_merged": None if max_merged is None else float(max_merged),
            "threshold": None if threshold is None else float(threshold), "n_layers": n_layers}


def tome(model: torch.nn.Module, r: int | float | list | tuple | None = None, *, class_token: bool | None = None,
         distill_token: bool | None = None, prop_attn: bool | str = "auto", unmerge_output: bool | None = None,
         backend: str = "auto", r_mode: str = "auto", min_tokens: int | str | None = "auto",
         max_merged: float | str | None = "auto", threshold: float | None = None) -> torch.nn.Module:
    """Apply ToMe to ``model`` in place (and return it).

    ``r``: tokens merged per layer, in any of ToMe's forms (:func:`parse_r`): an int, a list per
    layer (padded with zeros when shorter), an ``(r, inflect)`` schedule; or a float fraction;
    ``None``: the model kind's default (text encoders ``TEXT_DEFAULTS``: 30% of each row in total;
    ViTs: ``r=8`` per layer, ToMe's default). ``model.r`` is set to ``r`` and may be changed between
    calls, as with ToMe. ``r=0`` keeps the model's output (up to the attention kernel's rounding).
    ``r_mode`` (what a float ``r`` means): ``"layer"`` — the fraction of each row's *current* valid
    tokens merged in every layer (compounds over layers); ``"total"`` — the fraction (int: the
    count) of each row's valid *input* tokens merged over all layers together, spread evenly;
    ``"auto"``: ``"layer"``, or the kind's default when ``r`` is None.
    Length safety, per row (``"auto"``: on for text encoders, off for ViTs): ``min_tokens``: a row
    never drops below this many valid tokens; ``max_merged``: at most this fraction of a row's valid
    input tokens is merged over all layers; ``threshold``: merge only pairs whose cosine similarity
    (of the mean keys) is at least this, so each row merges as many as are that similar (``r`` is
    then the most per layer, e.g. ``r=1.0`` with ``r_mode="layer"``). Pass ``min_tokens=0,
    max_merged=None`` for plain ToMe.
    ``class_token`` / ``distill_token``: never merge token 0 (CLS) / token 1 (DeiT's distillation
    token); ``None`` (default) detects them from the model (:func:`detect_tokens`: timm ``cls_token``,
    ``dist_token``, ``num_prefix_tokens``; transformers ``embeddings.cls_token`` /
    ``distillation_token``).  ``prop_attn``: add ``log(size)`` to the attention logits
    (``"auto"``: on for ViTs, as in ToMe; off for text encoders, where it cost accuracy on the demo
    task). ``unmerge_output``: restore the input length at the encoder output; ``None`` (default)
    picks :func:`default_unmerge_output` (timm: ``False``, as ToMe; transformers: ``True``).
    Per-row valid token counts after each layer are in ``model._tome_state.row_tokens`` after a forward.
    Call :func:`unpatch_tome` to restore the original forward.
    """
    kind = _kind(model)
    target = _target(model, kind)
    layers = {"timm": lambda: target.blocks, "vit": lambda: _vit_layers(target), "bert": lambda: target.layer}[kind]()
    n_layers = len(layers)
    safety = _length_safety_args(kind, r, r_mode, min_tokens, max_merged, threshold, n_layers)
    r = safety.pop("r")
    parse_r(n_layers, r)  # fail at patch time on a bad r
    if isinstance(prop_attn, str) and prop_attn == "auto":
        prop_attn = (TEXT_DEFAULTS if kind == "bert" else VISION_DEFAULTS)["prop_attn"]
    cls_found, dist_found = detect_tokens(model, kind)
    class_token = cls_found if class_token is None else class_token
    distill_token = (dist_found and class_token) if distill_token is None else distill_token
    for name, v in (("class_token", class_token), ("distill_token", distill_token), ("prop_attn", prop_attn)):
        if not isinstance(v, bool):
            raise TypeError(f"{name} must be a bool (or None to detect it; prop_attn: 'auto'), got {v!r}")
    if distill_token and not class_token:
        raise ValueError("distill_token=True needs class_token=True (the distillation token follows the class token)")
    unmerge_output = default_unmerge_output(kind) if unmerge_output is None else unmerge_output
    if not isinstance(unmerge_output, bool):
        raise TypeError(f"unmerge_output must be a bool or None, got {type(unmerge_output).__name__}")
    from .._registry import BACKENDS

    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
    if hasattr(target, "_tome_original_forward"):
        unpatch_tome(model)
    target._tome_state = ToMeState(r=r, class_token=class_token, distill_token=distill_token, prop_attn=prop_attn,
                                   unmerge_output=unmerge_output, backend=backend, owner=model, **safety)
    model._tome_state = target._tome_state
    model.r = r  # settable between calls, as ToMe's model.r
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
