#!/usr/bin/env python3
"""Benchmark of the demo student's training step, side by side in one run: `train.softmax: all` (the whole
joint vocabulary, 46.8k ids on the demo) against `language` (each position among its language's ids: ~8k for
the toy teachers' languages, ~31k for e5's), with the data stage's top-8 and, where the demo's sweep built
them, its top-128 shards (`data.top_k` 128). Reads the demo's vocabulary and shards: run `make demo` (and
`make study` for the top-128 shards) first.

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

    rows = []
    for k, run in ((8, None), (128, "demo-top_k128-softmaxall")):
        over = [f"--data.top_k={k}"] + ([f"--run={run}", "--vocab_run=demo"] if run else [])
        base = load_config(args.config, over)
        try:
            from mergedistill.vocab.stage import load_vocab

            load_manifest(base, load_vocab(base)[1]["vocab"])
        except (UserError, FileNotFoundError) as e:
            print(f"bench_softmax: no top-{k} shards ({str(e).splitlines()[0]}); skipped")
            continue
        for softmax in ("all", "language"):
            cfg = load_config(args.config, over + [f"--train.softmax={softmax}", "--train.precision=32-true"])
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
