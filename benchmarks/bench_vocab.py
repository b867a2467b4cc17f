#!/usr/bin/env python3
"""Benchmark of `mergedistill vocab` on real tokenizers: XLM-R's 250k SentencePiece unigram,
bert-base-uncased's 30k WordPiece and a 500k Romanian WordPiece (materialized from packages by
../shared/tools/real_tokenizers.py into benchmarks/.assets/).

Runs the real command (a fresh process each time, imports included) --runs times, samples the memory
of its whole process tree (parent + forked workers, summed), and prints joint size, overlaps, time
and peak memory against the targets (10 s, 2 GB). Then checks on real multilingual text that each
student tokenizer's ids equal its teacher's ids through the id map.

usage: python benchmarks/bench_vocab.py [--runs 3] [--assets benchmarks/.assets]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parent.parent
TOOLS = ROOT.parent / "shared" / "tools" / "real_tokenizers.py"
TEACHERS = {"xlmr": "xlm-roberta", "bert": "bert-base-uncased", "ro": "romanian-wordpiece"}
SAMPLES = {
    "en": ["The committee approved the new budget after a long debate.", "Tokenizers split words into smaller pieces."],
    "ro": ["Comitetul a aprobat noul buget după o dezbatere lungă.", "Școala își deschide porțile în septembrie."],
    "de": ["Der Ausschuss hat den neuen Haushalt nach langer Debatte gebilligt.", "Grüße aus Köln!"],
}
PROBES = [
    "Hello world! Ça va très bien.", "Привет, мир! Ёжик", "你好世界，こんにちは", "Emoji 😀🤖 and © ™",
    "Bună ziua, ce mai faceți? ășțâî ĂȘȚÂÎ", "unbelievably [MASK] <mask> tokenization", "  spaces\tand\nlines  ",
]
TARGET_S, TARGET_MB = 10.0, 2048.0


def materialize(assets: Path) -> None:
    missing = [n for n in TEACHERS.values() if not (assets / n / "tokenizer.json").is_file()]
    if missing:
        if not TOOLS.is_file():
            sys.exit(f"bench_vocab: {TOOLS} not found; it materializes the real tokenizers (see ../shared/ASSETS.md)")
        print(f"materializing {', '.join(missing)} into {assets} (downloads packages once)", flush=True)
        subprocess.run([sys.executable, str(TOOLS), str(assets), *missing], check=True)


def run_once(workdir: Path, config: Path) -> tuple[float, float]:
    """Wall seconds and peak summed RSS (MB) of the process tree of one `mergedistill vocab --force`."""
    cmd = [sys.executable, "-m", "mergedistill", "vocab", "--config", str(config), "--force"]
    start = time.perf_counter()
    proc = psutil.Popen(cmd, cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = 0
    while proc.poll() is None:
        try:
            procs = [proc] + proc.children(recursive=True)
            peak = max(peak, sum(p.memory_info().rss for p in procs if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.02)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"bench_vocab: mergedistill vocab failed ({proc.returncode}):\n{proc.stderr.read().decode()}")
    return wall, peak / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--assets", type=Path, default=ROOT / "benchmarks" / ".assets")
    args = ap.parse_args()
    materialize(args.assets)

    work = Path(tempfile.mkdtemp(prefix="bench-vocab-"))
    for lang, lines in SAMPLES.items():
        (work / f"{lang}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    routing = {"en": "bert", "ro": "ro", "de": "xlmr"}
    cfg = {
        "run": "bench",
        "teachers": {n: {"path": str((args.assets / d).resolve())} for n, d in TEACHERS.items()},
        "languages": {lang: {"train": f"{lang}.txt", "teacher": t} for lang, t in routing.items()},
    }
    config = work / "bench.yaml"
    config.write_text(json.dumps(cfg), encoding="utf-8")  # JSON is YAML

    runs = [run_once(work, config) for _ in range(args.runs)]
    walls, peaks = [r[0] for r in runs], [r[1] for r in runs]
    report = json.loads((work / "vocab" / "bench" / "report.json").read_text())

    print("\n== mergedistill vocab on real tokenizers ==")
    for t in report["teachers"]:
        print(f"  {t['name']:5s} {t['tokenizer']:22s} {t['size']:>9,} tokens")
    print(f"  joint vocabulary: {report['joint_size']:,} tokens (sum of teachers: {sum(t['size'] for t in report['teachers']):,})")
    names = [t["name"] for t in report["teachers"]]
    m = report["overlap"]
    print("  pairwise overlap (shared tokens, % of the smaller vocabulary):")
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            print(f"    {names[i]:5s} & {names[j]:5s}: {m[i][j]:>7,} ({100 * m[i][j] / min(m[i][i], m[j][j]):.1f}%)")
    print(f"  wall time per run (s): {', '.join(f'{w:.2f}' for w in walls)}; median {statistics.median(walls):.2f}, "
          f"target < {TARGET_S:.0f}: {'met' if max(walls) < TARGET_S else 'NOT met'}")
    print(f"  peak memory, process tree summed (MB): {', '.join(f'{p:.0f}' for p in peaks)}; max {max(peaks):.0f}, "
          f"target < {TARGET_MB:.0f}: {'met' if max(peaks) < TARGET_MB else 'NOT met'}")
    print(f"  (machine: {os.cpu_count()} cores; load average at the end {os.getloadavg()[0]:.2f})")

    # exactness on the real tokenizers: student ids == teacher ids through the id map
    from transformers import AutoTokenizer

    bad = 0
    for name, d in TEACHERS.items():
        teacher = AutoTokenizer.from_pretrained(str(args.assets / d))
        student = AutoTokenizer.from_pretrained(str(work / "vocab" / "bench" / "tokenizers" / name))
        idmap = np.load(work / "vocab" / "bench" / "idmaps" / f"{name}.npy")
        for text in PROBES:
            if student(text)["input_ids"] != idmap[teacher(text)["input_ids"]].tolist():
                bad += 1
                print(f"  MISMATCH {name}: {text!r}")
    print(f"  round trip on {len(PROBES)} multilingual probes x {len(TEACHERS)} teachers: {'exact' if not bad else f'{bad} mismatches'}")
    if bad:
        sys.exit(1)


if __name__ == "__main__":
    main()
