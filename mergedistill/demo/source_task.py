"""The demo's labelled task, built from its corpora: which source (LibreOffice help, man page, fortune)
a paragraph comes from. Written as JSON lines under runs/<run>/tasks/source/ for `eval.downstream`
(`make demo` builds it before the run; `evaluate` only reads task files):

    python -m mergedistill.demo.source_task --config configs/demo.yaml
"""
from __future__ import annotations

import argparse
import hashlib
import heapq
import json
import logging
import sys
from pathlib import Path

from mergedistill.config import RunConfig
from mergedistill.errors import UserError
from mergedistill.eval.retrieval import jsonl_twin
from mergedistill.fsutil import atomic_dir, read_json, sha256_file

log = logging.getLogger(__name__)

SOURCE_TASK = "source"
SOURCE_TASK_FORMAT = 1


def source_task_dir(cfg: RunConfig) -> Path:
    return cfg.run_dir / "tasks" / SOURCE_TASK


def _pick(path: Path, per_class: int, seed: int) -> dict[str, list[str]]:
    """Up to `per_class` paragraphs per `source`: those with the smallest seeded hashes, so the choice
    is spread over the whole file and the same on every run."""
    heaps: dict[str, list[tuple[int, str]]] = {}  # per source: a min-heap of -hash, its top the largest hash kept
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            obj = json.loads(line)
            text, source = (obj.get("text") or "").strip(), obj.get("source")
            if not text or not isinstance(source, str):
                continue
            item = (-_hash(seed, text), text)
            heap = heaps.setdefault(source, [])
            if len(heap) < per_class:
                heapq.heappush(heap, item)
            elif item > heap[0]:
                heapq.heapreplace(heap, item)
    return {s: [t for _, t in sorted(heap, reverse=True)] for s, heap in heaps.items()}


def _hash(seed: int, text: str) -> int:
    return int.from_bytes(hashlib.sha1(f"{seed}\x00{text}".encode()).digest()[:8], "big")


def build_source_task(cfg: RunConfig, train_per_class: int = 300, test_per_class: int = 100, min_per_class: int = 10,
                      seed: int = 0, force: bool = False) -> dict[str, dict[str, str]]:
    """Write runs/<run>/eval/tasks/source/<lang>.{train,test}.jsonl ({"text", "label"}): for each language
    whose train and test corpora have JSON-lines twins with a `source` field, up to `train_per_class` /
    `test_per_class` paragraphs per source, keeping the sources with at least `min_per_class` in both
    splits; languages left with fewer than two sources are skipped. Returns {"train": {lang: path},
    "test": {lang: path}}, ready for eval.downstream. Idempotent: skips when built from the same inputs."""
    out = source_task_dir(cfg)
    inputs: dict = {"format": SOURCE_TASK_FORMAT, "caps": [train_per_class, test_per_class, min_per_class], "seed": seed,
                    "corpora": {}}
    sources: dict[str, tuple[Path, Path]] = {}
    for lang, lc in cfg.languages.items():
        tr, te = jsonl_twin(lc.train), jsonl_twin(lc.test)
        if tr is not None and te is not None:
            sources[lang] = (tr, te)
            inputs["corpora"][lang] = [sha256_file(tr), sha256_file(te)]
    meta_path = out / "task.json"
    if not force and meta_path.is_file() and read_json(meta_path).get("inputs") == inputs:
        meta = read_json(meta_path)
        log.info("source task: %s is complete for these corpora; skipping", out)
        return {"train": meta["train"], "test": meta["test"]}
    train_files: dict[str, str] = {}
    test_files: dict[str, str] = {}
    counts: dict[str, dict] = {}
    with atomic_dir(out) as tmp:
        for lang, (tr, te) in sources.items():
            a, b = _pick(tr, train_per_class, seed), _pick(te, test_per_class, seed)
            classes = sorted(s for s in a if len(a[s]) >= min_per_class and len(b.get(s, [])) >= min_per_class)
            if len(classes) < 2:
                log.info("source task: %s skipped (sources with >= %d paragraphs in train and test: %s)",
                         lang, min_per_class, ", ".join(classes) or "none")
                continue
            for split, picked, files in (("train", a, train_files), ("test", b, test_files)):
                rows = [(_hash(seed + 1, t), t, s) for s in classes for t in picked[s]]
                rows.sort()  # mixed order, the same every run
                name = f"{lang}.{split}.jsonl"
                (tmp / name).write_text("".join(json.dumps({"text": t, "label": s}, ensure_ascii=False) + "\n" for _, t, s in rows),
                                        encoding="utf-8")
                files[lang] = str(out / name)
            counts[lang] = {s: [len(a[s]), len(b[s])] for s in classes}
            log.info("source task: %s: %s (train, test)", lang, ", ".join(f"{s} {n[0]}/{n[1]}" for s, n in counts[lang].items()))
        (tmp / "task.json").write_text(json.dumps({"inputs": inputs, "counts": counts, "train": train_files, "test": test_files},
                                                  indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return {"train": train_files, "test": test_files}


def main(argv: list[str] | None = None) -> int:
    """`python -m mergedistill.demo.source_task --config C`: build the source task and print its config block."""
    import yaml

    from mergedistill.config import load_config

    p = argparse.ArgumentParser(prog="python -m mergedistill.demo.source_task", description=build_source_task.__doc__)
    p.add_argument("--config", "-c", required=True)
    p.add_argument("--train-per-class", type=int, default=300)
    p.add_argument("--test-per-class", type=int, default=100)
    p.add_argument("--force", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        cfg = load_config(args.config)
        files = build_source_task(cfg, args.train_per_class, args.test_per_class, force=args.force)
    except UserError as e:
        print(f"error: {e.render()}", file=sys.stderr)
        return 2
    block = {"eval": {"downstream": {SOURCE_TASK: {**files, "zero_shot_from": list(files["train"])[:1]}}}}
    print(yaml.safe_dump(block, sort_keys=False, allow_unicode=True), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
