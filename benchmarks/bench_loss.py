#!/usr/bin/env python3
"""Benchmark of a training step's loss, optimizer and C allocator, side by side in one run.
Loss:
  plain   log_softmax over the (N, V) logits, gathers at the gold token and the teacher's k ids,
          autograd through all of it, and argmax for the accuracy the module logs (what the train
          stage did before `train.losses.distill_loss` was fused);
  fused   `train.losses.distill_loss`: one soft cross-entropy whose backward writes the gradient once;
          its pass over the logits also gives the top-1.
Optimizer:
  loop    torch's AdamW default on the CPU: a Python loop over the parameter tensors;
  fused   `train.optim.adamw`: torch's fused AdamW kernel (one pass over every tensor).
Allocator (mergedistill/cpu_memory.py):
  system  glibc's defaults (MERGEDISTILL_MALLOC=system): every block above ~32 MB is a fresh mmap;
  keep    what mergedistill's entry points set: freed blocks stay in the heap for reuse.
The step is the train stage's: the student's logits at the masked positions (`masked_logits`), the loss
(alpha 0.5, T = 1), backward, AdamW. Student: the demo's, 2 layers x 128 over a vocabulary of 54,669
(configs/demo.yaml's joint vocabulary) and, for contrast, 8,000; batch 32 x 128, 15% masked, k = 8;
random weights and tokens (the cost is what is measured). bf16 autocast where the CPU computes it
natively (as train.precision: auto), else float32. Within a process the repeats alternate between
plain loss + loop AdamW, fused loss + loop AdamW and fused loss + fused AdamW; the allocator needs a
process of its own, so the two run one after the other, twice.

usage: python benchmarks/bench_loss.py [--steps 12] [--repeats 2]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def plain_distill_loss(logits, labels, teacher_ids, teacher_logits, alpha):
    """The log-softmax formulation at T = 1 (one log-softmax shared by both parts)."""
    log_p = torch.log_softmax(logits.float(), dim=-1)  # (N, V)
    mlm = -log_p.gather(1, labels[:, None]).mean()
    p = torch.softmax(teacher_logits.float(), dim=-1)  # (N, k)
    kd = -(p * log_p.gather(1, teacher_ids)).nansum(-1).mean()
    return alpha * kd + (1 - alpha) * mlm


def measure(steps: int, repeats: int) -> list[dict]:
    """Median seconds per step of each loss, for each vocabulary, in this process."""
    from transformers import BertConfig, BertForMaskedLM

    from mergedistill.models.mlm import masked_logits
    from mergedistill.precision import cpu_has_fast_bf16
    from mergedistill.train.losses import distill_loss
    from mergedistill.train.optim import adamw

    torch.set_num_threads(os.cpu_count() or 1)
    bf16 = cpu_has_fast_bf16()
    g = torch.Generator().manual_seed(0)

    def plain(z, b):  # the loss and the top-1 the module logs accuracy with
        return plain_distill_loss(z, b["labels"], b["ids"], b["vals"], 0.5), z.detach().argmax(-1)

    def fused(z, b):
        out = distill_loss(z, b["labels"], b["ids"], b["vals"], 0.5, 1.0)
        return out["loss"], out["top1"]

    variants = {"plain": (plain, "loop"), "fused": (fused, "loop"), "fused+adamw": (fused, "fused")}
    rows = []
    for vocab in (54_669, 8_000):
        torch.manual_seed(0)
        model = BertForMaskedLM(BertConfig(vocab_size=vocab, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                                           intermediate_size=512, type_vocab_size=1))
        opts = {"loop": torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=False),
                "fused": adamw(model.named_parameters(), lr=1e-4, weight_decay=0.0)}
        assert opts["fused"].defaults["fused"], "train.optim.adamw did not pick the fused kernel"
        ids = torch.randint(5, vocab, (32, 128), generator=g)
        sel = torch.rand(32, 128, generator=g) < 0.15
        n = int(sel.sum())
        batch = {"labels": torch.randint(5, vocab, (n,), generator=g), "ids": torch.randint(5, vocab, (n, 8), generator=g),
                 "vals": torch.randn(n, 8, generator=g)}

        def step(loss_fn, opt):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                z = masked_logits(model, ids, torch.ones_like(ids), sel)  # (N, V)
            loss, _top1 = loss_fn(z, batch)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        times = {k: [] for k in variants}
        for _ in range(repeats):
            for name, (fn, kind) in variants.items():
                for _ in range(2):
                    step(fn, opts[kind])
                for _ in range(steps):
                    t0 = time.perf_counter()
                    step(fn, opts[kind])
                    times[name].append(time.perf_counter() - t0)
        rows.append({"vocab": vocab, "masked": n, **{k: statistics.median(v) for k, v in times.items()}})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=12, help="timed steps per repeat (after 2 warm-up steps)")
    ap.add_argument("--repeats", type=int, default=2, help="repeats per process (each process measures every variant)")
    ap.add_argument("--child", choices=["system", "keep"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        from mergedistill.cpu_memory import keep_freed_memory

        applied = keep_freed_memory()  # a no-op under MERGEDISTILL_MALLOC=system
        assert applied == (args.child == "keep"), f"allocator setting {args.child} not in effect"
        print(json.dumps(measure(args.steps, args.repeats)))
        return
    from mergedistill.precision import cpu_has_fast_bf16

    runs: dict[str, list[list[dict]]] = {"system": [], "keep": []}
    for _ in range(2):
        for alloc in runs:
            env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
            env["MERGEDISTILL_MALLOC"] = alloc
            out = subprocess.run([sys.executable, __file__, "--child", alloc, "--steps", str(args.steps), "--repeats",
                                  str(args.repeats)], env=env, check=True, capture_output=True, text=True).stdout
            runs[alloc].append(json.loads(out.strip().splitlines()[-1]))
    print(f"\n== a training step: seconds per step (median over processes of the median of {args.repeats} x {args.steps} "
          "interleaved steps) ==")
    print(f"  student 2 x 128, batch 32 x 128, k = 8, {'bf16 autocast' if cpu_has_fast_bf16() else 'float32'}; "
          f"{os.cpu_count()} CPU threads; load average {os.getloadavg()[0]:.1f}")
    print("  | vocabulary | masked | plain, system | fused, system | plain, keep | fused, keep | fused + fused AdamW, keep "
          "| before / after |")
    print("  |---:|---:|---:|---:|---:|---:|---:|---:|")
    names = ("plain", "fused", "fused+adamw")
    for i, row in enumerate(runs["system"][0]):
        med = {(v, alloc): statistics.median(r[i][v] for r in runs[alloc]) for alloc in runs for v in names}
        before, after = med[("plain", "system")], med[("fused+adamw", "keep")]
        print(f"  | {row['vocab']:,} | {row['masked']} | {before:.3f} | {med[('fused', 'system')]:.3f} | "
              f"{med[('plain', 'keep')]:.3f} | {med[('fused', 'keep')]:.3f} | {after:.3f} | x{before / after:.2f} |")
    print("  plain/fused: the loss, with torch's default (loop) AdamW; before = plain loss, loop AdamW, system allocator;\n"
          "  after = fused loss, fused AdamW, keep (the train stage now)")


if __name__ == "__main__":
    main()
