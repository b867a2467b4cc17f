#!/usr/bin/env python3
"""What checking each shard's content hash costs, next to building and opening the shards.

Shards are built by the real data stage for a few MB of the demo's corpora (`make corpora`), each
language served by a teacher of the demo teachers' shape (2 layers x 128; random weights and a
tokenizer trained on the language, which do not change the cost). Then, side by side:
  build   `mergedistill data` (tokenize, pack, mask, teacher pass, write; the hash is taken here once)
  open    opening every shard as the train stage does, without the hash check (memory-mapped)
  hash    sha256 of every shard's content, i.e. the check that `open_shard` (train), the data stage's
          skip / reuse test and `data --verify` add; page cache warm, as right after a build (`--cold`
          drops the page cache first: root only, and it slows the whole machine for a while)
Prints MB/s, seconds per GB of shards, and the hash as a share of the build; that share is what decides
where the check runs (see data/shards.py).

usage: python benchmarks/bench_shard_hash.py [--mb 3] [--corpora corpora] [--languages de,fr,ru]
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402

from mergedistill.cli import main as cli  # noqa: E402
from mergedistill.fsutil import sha256_file  # noqa: E402


def _drop_caches() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
        return True
    except OSError:
        return False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=float, default=3.0, help="MB of corpus text, spread over the languages")
    ap.add_argument("--corpora", type=Path, default=ROOT / "corpora")
    ap.add_argument("--languages", default="de,fr,ru")
    ap.add_argument("--cold", action="store_true", help="also hash with a cold page cache (drops the whole machine's cache: root only)")
    args = ap.parse_args()
    langs = args.languages.split(",")
    if not all((args.corpora / lang / "train.txt").is_file() for lang in langs):
        sys.exit(f"bench_shard_hash: no {args.corpora}/<lang>/train.txt; build the corpora first (make corpora) or pass --corpora")
    logging.basicConfig(level=logging.WARNING)
    import torch
    from transformers.utils import logging as hf_logging

    from mergedistill.models.mlm import build_mlm
    from mergedistill.tokenizer_train import train_tokenizer

    hf_logging.disable_progress_bar()
    torch.set_num_threads(os.cpu_count() or 1)
    work = Path(tempfile.mkdtemp(prefix="bench-shard-hash-"))
    per_lang = int(args.mb * 1e6 / len(langs))
    cfg = {"run": "bench", "teachers": {}, "languages": {},
           "data": {"seq_len": 128, "top_k": 8, "mask_prob": 0.15, "shard_lines": 3000, "batch_size": 64, "splits": ["train"]}}
    text_bytes = 0
    for lang in langs:
        lines, size = [], 0
        with open(args.corpora / lang / "train.txt", encoding="utf-8") as f:
            for line in f:
                if size >= per_lang:
                    break
                lines.append(line.rstrip("\n"))
                size += len(line.encode())
        text_bytes += size
        (work / f"{lang}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        tok = train_tokenizer("wordpiece", lines[:20000], vocab_size=8000)
        tok.save_pretrained(str(work / f"t-{lang}"))
        build_mlm("wordpiece", tok, hidden=128, layers=2, heads=2, intermediate=512, max_position=512).save_pretrained(str(work / f"t-{lang}"))
        cfg["teachers"][lang] = {"path": str(work / f"t-{lang}")}
        cfg["languages"][lang] = {"train": str(work / f"{lang}.txt"), "teacher": lang}
    (work / "c.yaml").write_text(yaml.safe_dump(cfg))
    os.chdir(work)
    assert cli(["vocab", "--config", "c.yaml"]) == 0
    t0 = time.perf_counter()
    assert cli(["data", "--config", "c.yaml"]) == 0
    build_s = time.perf_counter() - t0
    paths = sorted((work / "runs/bench/data").rglob("shard-*.arrow"))
    total = sum(p.stat().st_size for p in paths)

    import datasets

    t0 = time.perf_counter()
    for p in paths:
        len(datasets.Dataset.from_file(str(p)))
    open_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for p in paths:
        sha256_file(p)
    warm_s = time.perf_counter() - t0
    cold = args.cold and _drop_caches()
    if cold:
        t0 = time.perf_counter()
        for p in paths:
            sha256_file(p)
        cold_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    assert cli(["data", "--config", "c.yaml", "--verify"]) == 0
    verify_s = time.perf_counter() - t0

    mb = total / 1e6
    print("\n== shard content hashes: what the check costs ==")
    print(f"  {text_bytes / 1e6:.1f} MB of text ({', '.join(langs)}) -> {len(paths)} shards, {mb:.1f} MB; "
          f"teachers 2 x 128; {os.cpu_count()} CPU threads, load average {os.getloadavg()[0]:.1f}")
    print(f"  build (mergedistill data)      {build_s:8.2f} s")
    print(f"  open every shard, no hash      {open_s:8.3f} s")
    print(f"  sha256 of every shard, warm    {warm_s:8.3f} s   {mb / warm_s:7.0f} MB/s   {warm_s / mb * 1000:5.2f} s per GB   "
          f"{100 * warm_s / build_s:.2f}% of the build")
    if cold:
        print(f"  sha256 of every shard, cold    {cold_s:8.3f} s   {mb / cold_s:7.0f} MB/s   {cold_s / mb * 1000:5.2f} s per GB")
    else:
        print("  (cold cache not measured: pass --cold, as root, to drop the page cache first)")
    print(f"  mergedistill data --verify     {verify_s:8.2f} s   (process start, config, vocabulary, planning, hashes)")
    print(f"  the check costs {warm_s / max(open_s, 1e-9):.2f}x of opening the shards and {100 * warm_s / build_s:.3f}% of building them; "
          f"{warm_s / mb * 1000:.1f} s per GB of shards for each process that opens them")


if __name__ == "__main__":
    main()
