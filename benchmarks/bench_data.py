#!/usr/bin/env python3
"""Benchmark of the data stage's teacher pass on a real-size vocabulary.

Teacher: the real bert-base-uncased WordPiece tokenizer (30,522 tokens, from ../shared/tools) with
masked LMs of Google's published small-BERT shapes (tiny 2x128, mini 4x256 (the demo teachers' shape),
small 4x512; random weights, which do not change the cost). Text: the first lines of the English
corpus (`make corpora`). The gain comes from the vocabulary projection, so it shrinks as the encoder
grows relative to it: all three shapes are reported.

Side by side, in one run, on the same sequences and masks:
  stage  the data stage's own shard builder (length-sorted batches, MLM head at masked positions
         only, top-k there), including mapping to student ids and writing the Arrow shard;
  naive  sequences padded to seq_len, full (B, L, V) logits, top-k at every position, then the
         masked ones picked out (no writing).
Prints teacher tokens/s of each and their ratio (target: stage >= 3x naive), and the stage's bytes
on disk per corpus token at k=8 and 15% masking, input ids included (target <= 12 B/token).

usage: python benchmarks/bench_data.py [--lines 2000] [--repeats 2] [--shapes 2x128,4x256,4x512]
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mergedistill.config import load_config  # noqa: E402
from mergedistill.data.masking import mask_tokens  # noqa: E402
from mergedistill.data.packing import pack_documents  # noqa: E402
from mergedistill.data.stage import Shard, ShardBuilder  # noqa: E402
from mergedistill.data.topk import topk_naive  # noqa: E402
from mergedistill.progress import Progress  # noqa: E402
from mergedistill.teachers import load_all_tokenizers  # noqa: E402
from mergedistill.vocab.stage import load_vocab  # noqa: E402


def naive_pass(builder: ShardBuilder, lines: list[str], cfg) -> int:
    """The baseline on the same packed sequences and the same masks; returns corpus tokens."""
    from mergedistill.data.stage import _seed

    d = cfg.data
    enc = builder.t.backend.encode_batch(lines, add_special_tokens=False)
    packed = pack_documents([e.ids for e in enc], d.seq_len, builder.layout, builder.pad)
    ids = packed.input_ids.long()  # (S, seq_len): padded to max length
    special = torch.isin(ids, builder.special_ids) | ~packed.attention_mask
    gen = torch.Generator().manual_seed(_seed(d.seed, "bench", "train", 0, 0))
    mb = mask_tokens(ids, special, builder.mask, builder.candidates, d.mask_prob, gen)
    att = packed.attention_mask.long()
    for b in range(0, len(packed), d.batch_size):
        sl = slice(b, b + d.batch_size)
        t_ids, _ = topk_naive(builder.model, mb.input_ids[sl], att[sl], mb.selected[sl], d.top_k, builder.allowed)
        builder.idmap[t_ids.numpy()]  # the same mapping to student ids
    return sum(len(e.ids) for e in enc)


def measure(work: Path, cfg, vocab, vrec, t, lines, layers: int, hidden: int, repeats: int, vocab_size: int) -> dict:
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                                       num_attention_heads=max(1, hidden // 64), intermediate_size=4 * hidden)).eval()
    builder = ShardBuilder(cfg, vocab, vrec, t, model, "cpu")
    quiet = logging.getLogger("bench")
    stage_s, naive_s, rec, n_tok = [], [], None, 0
    for r in range(repeats):
        shard = Shard("en", "train", r, work / f"shard-{layers}x{hidden}-{r}.arrow", "bench")
        t0 = time.perf_counter()
        rec = builder.build(shard, lines, Progress("stage", quiet, every=1e9))
        stage_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        n_tok = naive_pass(builder, lines, cfg)
        naive_s.append(time.perf_counter() - t0)
    assert rec is not None and rec["corpus_tokens"] == n_tok
    return {"shape": f"{layers}x{hidden}", "stage": n_tok / min(stage_s), "naive": n_tok / min(naive_s), "rec": rec, "tokens": n_tok}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lines", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--shapes", default="2x128,4x256,4x512", help="teacher shapes, layers x hidden")
    ap.add_argument("--corpus", type=Path, default=ROOT / "corpora" / "en" / "train.txt")
    ap.add_argument("--assets", type=Path, default=ROOT / "benchmarks" / ".assets")
    args = ap.parse_args()
    if not args.corpus.is_file():
        sys.exit(f"bench_data: {args.corpus} not found; build the corpora first (make corpora)")
    tok_dir = args.assets / "bert-base-uncased"
    if not (tok_dir / "tokenizer.json").is_file():
        subprocess.run([sys.executable, str(ROOT.parent / "shared/tools/real_tokenizers.py"), str(args.assets), "bert-base-uncased"], check=True)

    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    work = Path(tempfile.mkdtemp(prefix="bench-data-"))
    teacher = work / "teacher"
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    tok.save_pretrained(str(teacher))
    BertForMaskedLM(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=1,
                               intermediate_size=32)).save_pretrained(str(teacher))  # the folder the vocab stage reads
    lines = [x.strip() for x, _ in zip(args.corpus.open(encoding="utf-8"), range(args.lines)) if x.strip()]
    (work / "en.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    cfg_data = {"run": "bench", "teachers": {"bert": {"path": str(teacher)}},
                "languages": {"en": {"train": str(work / "en.txt"), "teacher": "bert"}},
                "data": {"seq_len": 128, "top_k": 8, "mask_prob": 0.15, "batch_size": 32, "shard_lines": len(lines)}}
    os.chdir(work)
    from mergedistill.cli import main as cli

    (work / "c.yaml").write_text(json.dumps(cfg_data))
    assert cli(["vocab", "--config", "c.yaml"]) == 0
    cfg = load_config("c.yaml")
    vocab, vrec = load_vocab(cfg)
    t = load_all_tokenizers(cfg)["bert"]
    torch.set_num_threads(os.cpu_count() or 1)
    results = []
    for shape in args.shapes.split(","):
        layers, hidden = map(int, shape.lower().split("x"))
        results.append(measure(work, cfg, vocab, vrec, t, lines, layers, hidden, args.repeats, len(tok)))

    rec = results[0]["rec"]
    print("\n== data stage: teacher pass on a real-size vocabulary ==")
    print(f"  bert-base-uncased tokenizer ({len(tok):,} tokens); {len(lines):,} lines of {args.corpus.parent.name} text = "
          f"{results[0]['tokens']:,} corpus tokens in {rec['sequences']:,} sequences of <= 128; k=8, 15% masked; "
          f"best of {args.repeats}; {os.cpu_count()} CPU threads; load average {os.getloadavg()[0]:.1f}")
    print(f"  {'teacher (layers x hidden)':26s} {'stage tok/s':>12s} {'naive tok/s':>12s} {'speed-up':>9s}  target >= 3x")
    for r in results:
        ratio = r["stage"] / r["naive"]
        print(f"  {r['shape']:26s} {r['stage']:>12,.0f} {r['naive']:>12,.0f} {ratio:>8.2f}x  {'met' if ratio >= 3 else 'NOT met'}")
    bpt = rec["bytes"] / rec["corpus_tokens"]
    size = np.dtype(rec["id_dtype"]).itemsize
    print(f"  bytes on disk per corpus token, input ids included, ids {rec['id_dtype']}: {bpt:.2f} (target <= 12: {'met' if bpt <= 12 else 'NOT met'})")
    per_masked = (rec["bytes"] - rec["tokens"] * size) / max(rec["masked"], 1)
    print(f"    = input ids {rec['tokens'] * size / rec['corpus_tokens']:.2f} B ({rec['tokens'] / rec['corpus_tokens']:.3f} sequence tokens "
          f"per corpus token, specials included) + {per_masked:.1f} B per masked position x {rec['masked'] / rec['corpus_tokens']:.3f}")
    int32_bpt = (rec["tokens"] * 4 + rec["masked"] * (2 + 4 + 8 * 4 + 8 * 2)) / rec["corpus_tokens"]
    print(f"    with int32 ids (student vocabularies over 65,536 tokens) the same shard would take ~{int32_bpt:.2f} B/token")


if __name__ == "__main__":
    main()
