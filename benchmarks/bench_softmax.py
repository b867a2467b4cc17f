#!/usr/bin/env python3
"""Benchmark of the demo student's training step, side by side in one run: `train.softmax: all` (the whole
joint vocabulary, 46.8k ids on the demo) against `language` (each position among its language's ids: ~8k for
the toy teachers' languages, ~31k for e5's), on each k of shards found (the demo's top-128 and, after
`make study`, its top-8 variant), each labelled by the k its manifest records. Reads the demo's vocabulary
and shards: run `make demo` (and `make study` for the top-8 shards) first.

usage: python benchmarks/bench_softmax.py [--steps 40] [--config configs/demo.yaml]
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
RUNS = ("demo", "demo-top_k8", "demo-top_k128-softmaxall")
"""Runs whose shards are timed: the demo's own (top-128), and the top-8 variant of `make study`'s top-k sweep
(an earlier study's top-128 variant too, if present)."""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.chdir(ROOT)

    from bench_train import time_steps

    from mergedistill.config import load_config
    from mergedistill.data.stage import load_manifest
    from mergedistill.errors import UserError
    from mergedistill.vocab.stage import load_vocab

    rows, seen = [], set()
    for run in RUNS:  # labelled by the k their manifest records, each k timed once
        over = [f"--run={run}", "--vocab_run=demo"]
        try:
            base = load_config(args.config, over)
            k = load_manifest(base, load_vocab(base)[1]["vocab"])["k"]
        except (UserError, FileNotFoundError) as e:
            print(f"bench_softmax: no shards in runs/{run} ({str(e).splitlines()[0]}); skipped")
            continue
        if k in seen:
            continue
        seen.add(k)
        for softmax in ("all", "language"):
            cfg = load_config(args.config, over + [f"--data.top_k={k}", f"--train.softmax={softmax}", "--train.precision=32-true"])
            rows.append((k, softmax, time_steps(cfg, args.steps)))
    if not rows:
        sys.exit("bench_softmax: no demo shards; run `make demo` first")
    print(f"\n== demo student (2 x 128, joint vocabulary of the demo), seconds per optimizer step, median of steps 6..{args.steps};"
          f" {os.cpu_count()} CPU threads, load average {os.getloadavg()[0]:.1f} ==")
    print("| top-k | train.softmax | s/step | language / all |")
    print("|---:|---|---:|---:|")
    by = {(k, s): t for k, s, t in rows}
    for k, s, t in rows:
        ratio = f"{t / by[(k, 'all')]:.2f}x" if s == "language" and (k, "all") in by else ""
        print(f"| {k} | {s} | {t:.3f} | {ratio} |")


if __name__ == "__main__":
    main()
