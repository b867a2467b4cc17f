#!/usr/bin/env python3
"""Step time of online training with MiniLMv2 relation distillation (train.relation_weight > 0) against
the same step without it, side by side in one run.

A step is what the train stage runs in online mode: DistillModule._step (the teachers mask afresh and
predict their top-k inside the step; with relations they also hand over their last layer's Q/K/V, and
the student's are read by hooks from its own forward), backward, and an AdamW step. Two teachers and the
student: 2 layers x hidden 128, 4 heads, FFN 512, 2,000-token vocabularies (the joint one ~4,000); a
batch of 16 sequences x 64 tokens, half of the rows per teacher, some padding; R = 8 relation heads.
The two variants alternate step by step, so that load from other processes hits them alike; figures
are medians.

usage: python benchmarks/bench_relations.py [--steps 30] [--warmup 5] [--threads 1]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from transformers import BertConfig, BertForMaskedLM  # noqa: E402

from mergedistill.config import load_config  # noqa: E402
from mergedistill.models.student import build_student  # noqa: E402
from mergedistill.train.batches import Batch  # noqa: E402
from mergedistill.train.module import DistillModule  # noqa: E402
from mergedistill.train.online import OnlineTeachers  # noqa: E402
from mergedistill.vocab.joint import build_joint_vocab  # noqa: E402

TEACHERS, LANGS, TOKENS = ("a", "b"), ["xa", "xb"], 2000
SPECIALS = {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}
BODY = dict(hidden=128, layers=2, heads=4, intermediate=512)


def setup(tmp: Path, relation_weight: float, teachers: dict) -> DistillModule:
    (tmp / "x.txt").write_text("a b\n")
    for t in TEACHERS:
        (tmp / t).mkdir(exist_ok=True)
    data = {"run": "r", "teachers": {t: {"path": str(tmp / t)} for t in TEACHERS},
            "languages": {lang: {"train": str(tmp / "x.txt"), "teacher": t} for lang, t in zip(LANGS, TEACHERS)},
            "student": {**BODY, "max_position": 64, "init": "random", "embeddings_from_teachers": False},
            "data": {"seq_len": 64},
            "train": {"mode": "online", "alpha": 0.5, "relation_weight": relation_weight, "relation_heads": 8}}
    cfg = load_config(None, data=data)
    vocab = vocab_of()
    torch.manual_seed(0)
    student = build_student(cfg, vocab, lambda name: None)[0]
    online = OnlineTeachers(vocab, teachers, dict(zip(LANGS, TEACHERS)), LANGS, 0.15, 8, 0, {t: SPECIALS for t in TEACHERS})
    m = DistillModule(cfg, student, LANGS, online=online)
    m.log = lambda *a, **k: None  # no trainer
    return m.train()


def vocab_of():
    roles = ["S[PAD]", "S[UNK]", "S[CLS]", "S[SEP]", "S[MASK]"]
    # half of each teacher's tokens are shared with the other
    return build_joint_vocab({t: roles + [f"Wtok{i + j * TOKENS // 2}" for i in range(TOKENS - 5)]
                              for j, t in enumerate(TEACHERS)})


def teacher(seed: int) -> BertForMaskedLM:
    torch.manual_seed(seed)
    return BertForMaskedLM(BertConfig(vocab_size=TOKENS, hidden_size=BODY["hidden"], num_hidden_layers=BODY["layers"],
                                      num_attention_heads=BODY["heads"], intermediate_size=BODY["intermediate"],
                                      max_position_embeddings=64, pad_token_id=0))


def batch(vocab, B: int, L: int, seed: int) -> Batch:
    """A batch as the shards give it (masked positions, gold labels; the online teachers redo both)."""
    g = torch.Generator().manual_seed(seed)
    seq_lang = torch.arange(B) % 2
    ids = torch.zeros(B, L, dtype=torch.long)
    att = torch.zeros(B, L, dtype=torch.long)
    for b in range(B):
        n = int(torch.randint(L // 2, L + 1, (1,), generator=g))
        sids = torch.from_numpy(vocab.idmaps[TEACHERS[int(seq_lang[b])]][5:]).long()
        ids[b, :n] = sids[torch.randint(len(sids), (n,), generator=g)]
        ids[b, 0], ids[b, n - 1] = 2, 3  # [CLS] ... [SEP]
        att[b, :n] = 1
    sel = torch.zeros(B, L, dtype=torch.bool)  # nothing masked: the online teachers mask afresh
    none = torch.zeros(0, dtype=torch.long)
    return Batch(ids, att, sel, ids[sel], torch.zeros(0, 8, dtype=torch.long), torch.zeros(0, 8), none, seq_lang)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=64)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    teachers = {t: teacher(10 + i) for i, t in enumerate(TEACHERS)}
    with tempfile.TemporaryDirectory() as tmp:
        modules = {"without relations": setup(Path(tmp), 0.0, teachers), "relations (R=8)": setup(Path(tmp), 1.0, teachers)}
    vocab = vocab_of()
    opts = {k: torch.optim.AdamW(m.student.parameters(), lr=1e-4) for k, m in modules.items()}
    times: dict[str, list[float]] = {k: [] for k in modules}
    for s in range(args.warmup + args.steps):
        b = batch(vocab, args.batch, args.seq, s)
        for k, m in modules.items():
            t0 = time.perf_counter()
            loss = m._step(b, "train")
            loss.backward()
            opts[k].step()
            opts[k].zero_grad(set_to_none=True)
            if s >= args.warmup:
                times[k].append(time.perf_counter() - t0)
    base = statistics.median(times["without relations"])
    print(f"online step, {args.batch} x {args.seq} tokens, {args.threads} thread(s), medians of {args.steps} steps:")
    for k, v in times.items():
        med = statistics.median(v)
        print(f"  {k:20s} {med * 1000:7.1f} ms  {med / base:5.2f}x")


if __name__ == "__main__":
    main()
