#!/usr/bin/env python3
"""Benchmark of the train stage's step time, side by side in one run:
  offline KD  the teacher's top-k comes from the data stage's shards (alpha 0.5);
  MLM-only    the baseline (alpha 0): no teacher at all;
  online KD   the teacher runs inside each step with dynamic masking (train.mode=online).
Student: 4 layers x hidden 256 (5.4M parameters with the 8k vocabulary); teacher: 4 layers x hidden
384, twice the student's parameters (10.5M; random weights: the cost is what is measured). Real German
text (`make corpora`), a WordPiece vocabulary trained on it (8k). Targets: offline <= 1.3x MLM-only;
online >= 2x offline. For context it also times online KD with a larger teacher (4 x 512, ~3x the
student's parameters): a teacher's forward pass costs about a third of a training step of a model its
size, so online/offline grows with the teacher's share of compute.

usage: python benchmarks/bench_train.py [--steps 30] [--lines 3000]
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


class StepTimer(L.Callback):
    def __init__(self):
        self.times: list[float] = []
        self.t0 = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.times.append(time.perf_counter() - self.t0)


def time_steps(cfg, steps: int) -> float:
    """Median seconds per optimizer step (the first 5 steps are warm-up and not counted)."""
    from mergedistill.data.stage import load_manifest
    from mergedistill.train.stage import ShardDataModule, make_module
    from mergedistill.vocab.stage import load_vocab

    vocab, vrec = load_vocab(cfg)
    manifest = load_manifest(cfg, vrec["vocab"])
    langs = list(cfg.languages)
    module, _ = make_module(cfg, vocab, langs)
    module.log = lambda *a, **k: None  # logging costs the same in every mode; keep it out
    timer = StepTimer()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                        callbacks=[timer], use_distributed_sampler=False)
    trainer.fit(module, datamodule=ShardDataModule(cfg, manifest, vrec["vocab"], langs))
    return statistics.median(timer.times[5:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--lines", type=int, default=3000)
    ap.add_argument("--corpus", type=Path, default=ROOT / "corpora" / "de" / "train.txt")
    args = ap.parse_args()
    if not args.corpus.is_file():
        sys.exit(f"bench_train: {args.corpus} not found; build the corpora first (make corpora)")
    logging.basicConfig(level=logging.WARNING)
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)

    from transformers import BertConfig, BertForMaskedLM

    from mergedistill.cli import main as cli
    from mergedistill.config import load_config
    from mergedistill.tokenizer_train import train_tokenizer

    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    os.chdir(work)
    lines = [x.strip() for x, _ in zip(args.corpus.open(encoding="utf-8"), range(args.lines)) if x.strip()]
    (work / "de.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    tok = train_tokenizer("wordpiece", lines, vocab_size=8000)
    tok.save_pretrained(str(work / "teacher"))
    sizes = {}
    for folder, hidden, heads in (("teacher", 384, 6), ("teacher-large", 512, 8)):
        tok.save_pretrained(str(work / folder))
        teacher = BertForMaskedLM(BertConfig(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=4,
                                             num_attention_heads=heads, intermediate_size=4 * hidden))
        teacher.save_pretrained(str(work / folder))
        sizes[folder] = sum(p.numel() for p in teacher.parameters())
    n_teacher = sizes["teacher"]
    for run, folder in (("bench", "teacher"), ("bench-large", "teacher-large")):
        cfg_data = {
            "run": run, "teachers": {"t": {"path": str(work / folder)}},
            "languages": {"de": {"train": str(work / "de.txt"), "teacher": "t"}},
            "data": {"seq_len": 128, "top_k": 8, "splits": ["train"], "shard_lines": 5000},
            "student": {"layers": 4, "hidden": 256, "heads": 4, "intermediate": 1024, "embeddings_from_teachers": False},
            "train": {"batch_size": 32, "max_steps": args.steps, "warmup_steps": 5, "accelerator": "cpu"},
        }
        (work / f"{run}.yaml").write_text(json.dumps(cfg_data))
        assert cli(["vocab", "--config", f"{run}.yaml"]) == 0 and cli(["data", "--config", f"{run}.yaml"]) == 0
    torch.set_num_threads(os.cpu_count() or 1)
    results = {}
    for label, conf, over in (("offline KD", "bench", []), ("MLM-only", "bench", ["--train.alpha=0"]),
                              ("online KD", "bench", ["--train.mode=online"]),
                              ("online KD, larger teacher", "bench-large", ["--train.mode=online"])):
        results[label] = time_steps(load_config(f"{conf}.yaml", over), args.steps)
    off, mlm, onl = results["offline KD"], results["MLM-only"], results["online KD"]
    print("\n== train stage: seconds per optimizer step (median of steps 6..N) ==")
    n_student = sum(p.numel() for p in BertForMaskedLM(BertConfig(vocab_size=len(tok), hidden_size=256, num_hidden_layers=4,
                                                                  num_attention_heads=4, intermediate_size=1024)).parameters())
    print(f"  student 4 x 256 ({n_student / 1e6:.1f}M parameters), batch 32 x <=128 tokens; teacher 4 x 384 "
          f"({n_teacher / 1e6:.1f}M, {n_teacher / n_student:.2f}x); {os.cpu_count()} CPU threads; load average {os.getloadavg()[0]:.1f}")
    for k, v in results.items():
        print(f"  {k:26s} {v:7.3f} s/step")
    print(f"  offline KD / MLM-only: {off / mlm:.2f}x (target <= 1.3x: {'met' if off / mlm <= 1.3 else 'NOT met'})")
    print(f"  online KD / offline KD: {onl / off:.2f}x (target >= 2x: {'met' if onl / off >= 2 else 'NOT met'})")
    large = results["online KD, larger teacher"]
    print(f"  for context, online KD with a 4 x 512 teacher ({sizes['teacher-large'] / 1e6:.1f}M, "
          f"{sizes['teacher-large'] / n_student:.2f}x the student) / offline KD: {large / off:.2f}x")


if __name__ == "__main__":
    main()
