#!/usr/bin/env python3
"""Step time of an X-Mod student against the dense student of the same shared body, side by side in
one run. Body: 2 layers x hidden 128 (2 heads, FFN 512, the demo's size) over a 22k vocabulary; X-Mod
adds one module per language (6) at reduction factor 2 and 4. A step is forward + backward of the
training loss path: every layer but the last everywhere, the last layer and the MLM head at the masked
positions only (models.mlm.masked_logits), cross-entropy there, in
train mode (dropout on). The batch: 32 sequences x 128 tokens, 15% masked, languages mixed at random.

X-Mod routing variants:
  loop     transformers' XmodOutput: for every module, a boolean-mask gather, the module, a scatter
  grouped  models.xmod.GroupedXmodOutput: one stable sort by language, each module on its slice
  sorted   grouped, with the batch's sequences already sorted by language (no gather at all)
Variants run interleaved (round robin, a few steps each) so that load from other processes hits them
alike; figures are medians. `--full` also times the full-logits path (head on every position).

usage: python benchmarks/bench_xmod.py [--rounds 6] [--steps 3] [--threads 1] [--full]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from transformers import BertConfig, BertForMaskedLM, XmodForMaskedLM  # noqa: E402

from mergedistill.config import StudentConfig  # noqa: E402
from mergedistill.models.mlm import masked_logits  # noqa: E402
from mergedistill.models.xmod import (  # noqa: E402
    grouped_routing,
    parameter_counts,
    xmod_config,
)

LANGS = ["de", "fr", "es", "ru", "ja", "zh"]
BODY = dict(hidden=128, layers=2, heads=2, intermediate=512, max_position=128)


def dense(vocab: int) -> BertForMaskedLM:
    b = BODY
    return BertForMaskedLM(BertConfig(vocab_size=vocab, hidden_size=b["hidden"], num_hidden_layers=b["layers"],
                                      num_attention_heads=b["heads"], intermediate_size=b["intermediate"],
                                      max_position_embeddings=b["max_position"], type_vocab_size=1, pad_token_id=0))


def xmod(vocab: int, r: int) -> XmodForMaskedLM:
    return XmodForMaskedLM(xmod_config(vocab_size=vocab, languages=LANGS, student=StudentConfig(adapter_reduction_factor=r, **BODY)))


def batch(vocab: int, B: int, L: int, mask: float, seed: int, sort: bool):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (B, L), generator=g)
    att = torch.ones(B, L, dtype=torch.long)
    lens = torch.randint(L // 2, L + 1, (B,), generator=g)  # some padding, as packed shards have at the end
    for b, n in enumerate(lens.tolist()):
        ids[b, n:], att[b, n:] = 0, 0
    sel = (torch.rand(B, L, generator=g) < mask) & att.bool()
    sel[:, 1] = True
    labels = torch.randint(5, vocab, (int(sel.sum()),), generator=g)
    lang = torch.randint(0, len(LANGS), (B,), generator=g)
    if sort:  # the same sequences, grouped by language (the loss does not depend on the batch order)
        order = torch.argsort(lang, stable=True)
        ids, att, sel, lang = ids[order], att[order], sel[order], lang[order]
        labels = torch.randint(5, vocab, (int(sel.sum()),), generator=g)
    return ids, att, sel, labels, lang


def step(model, data, full: bool) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one forward + backward."""
    ids, att, sel, labels, lang = data
    t0, c0 = time.perf_counter(), time.process_time()
    model.zero_grad(set_to_none=True)
    is_xmod = isinstance(model, XmodForMaskedLM)
    if full:
        kw = {"lang_ids": lang} if is_xmod else {}
        logits = model(input_ids=ids, attention_mask=att, **kw).logits[sel]
    elif is_xmod:
        logits = masked_logits(model, ids, att, sel, lang)
    else:
        logits = masked_logits(model, ids, att, sel)
    F.cross_entropy(logits.float(), labels).backward()
    return time.perf_counter() - t0, time.process_time() - c0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--steps", type=int, default=3, help="steps per variant per round")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--vocab", type=int, default=22000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--full", action="store_true", help="also time the full-logits path")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    body = dense(args.vocab).train()
    variants: dict[str, tuple] = {"dense": (body, False)}
    for r in (2, 4):
        m = xmod(args.vocab, r).train()
        g = grouped_routing(xmod(args.vocab, r).train())
        g.load_state_dict(m.state_dict())
        variants[f"xmod r={r} loop"] = (m, False)
        variants[f"xmod r={r} grouped"] = (g, False)
        variants[f"xmod r={r} sorted"] = (g, True)
    modes = [False, True] if args.full else [False]

    # the grouped routing computes what transformers' loop computes
    m, g = variants["xmod r=2 loop"][0], variants["xmod r=2 grouped"][0]
    d = batch(args.vocab, 8, 32, 0.15, 1, False)
    m.eval(), g.eval()
    with torch.no_grad():
        a, b = m(input_ids=d[0], attention_mask=d[1], lang_ids=d[4]).logits, g(input_ids=d[0], attention_mask=d[1], lang_ids=d[4]).logits
    m.train(), g.train()
    print(f"grouped vs loop routing, max |logit difference|: {(a - b).abs().max().item():.2e}")

    data = {s: batch(args.vocab, args.batch, args.seq, 0.15, 0, s) for s in (False, True)}
    times: dict[tuple[str, bool], list[tuple[float, float]]] = {(v, f): [] for v in variants for f in modes}
    for name, (model, sort) in variants.items():  # warm-up
        for f in modes:
            step(model, data[sort], f)
    for _ in range(args.rounds):
        for name, (model, sort) in variants.items():
            for f in modes:
                times[(name, f)] += [step(model, data[sort], f) for _ in range(args.steps)]

    n_dense = sum(p.numel() for p in body.parameters())
    print(f"\nbatch {args.batch} x {args.seq}, vocabulary {args.vocab:,}, {len(LANGS)} languages mixed, "
          f"{int(data[False][2].sum())} masked positions, {args.threads} thread(s), "
          f"{args.rounds * args.steps} steps per variant (median)")
    for f in modes:
        path = "full logits" if f else "masked positions only (the training path)"
        print(f"\n{path}")
        print(f"{'variant':<20} {'params total':>13} {'active/lang':>12} {'wall ms':>8} {'vs dense':>9} {'CPU ms':>8} {'vs dense':>9}")
        wall0 = statistics.median(t[0] for t in times[("dense", f)])
        cpu0 = statistics.median(t[1] for t in times[("dense", f)])
        for name, (model, _) in variants.items():
            if isinstance(model, XmodForMaskedLM):
                c = parameter_counts(model)
                total, active = c["total"], c["active"][LANGS[0]]
            else:
                total = active = n_dense
            wall = statistics.median(t[0] for t in times[(name, f)])
            cpu = statistics.median(t[1] for t in times[(name, f)])
            print(f"{name:<20} {total:>13,} {active:>12,} {wall * 1e3:>8.1f} {wall / wall0:>8.2f}x {cpu * 1e3:>8.1f} {cpu / cpu0:>8.2f}x")
    print("\nCPU ms: this process's CPU time (with 1 thread, what the step costs whatever else runs on the machine)")

    # the routing alone: one layer's modules (LayerNorm, 6 modules, residual), forward + backward
    print(f"\nmodule routing alone, one layer, {args.batch} x {args.seq} x {BODY['hidden']}, CPU ms (median):")
    for r in (2, 4):
        row = []
        for name in ("loop", "grouped", "sorted"):
            model = variants[f"xmod r={r} {name}"][0]
            out = model.base_model.encoder.layer[0].output
            lang = data[name == "sorted"][4]
            x = torch.randn(args.batch, args.seq, BODY["hidden"], requires_grad=True)
            ts = []
            for i in range(3 + args.rounds * args.steps):
                c0 = time.process_time()
                out.lang_adapter(lang, x).sum().backward()
                ts.append(time.process_time() - c0)
            row.append(f"{name} {statistics.median(ts[3:]) * 1e3:.1f}")
        print(f"  r={r}: " + ", ".join(row))

if __name__ == "__main__":
    main()
