"""One language's corpus from its packages' extracted text: clean, split by document, write atomically.

The folder is written under a temporary name (`fsutil.atomic_dir`) with its own manifest entry
(`meta.json`) and renamed to `<lang>/` only when every file is complete.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from collections import Counter
from pathlib import Path

from mergedistill.fsutil import atomic_dir, write_json_atomic

from .cache import read_documents
from .clean import Deduplicator, EnglishFilter, clean_paragraphs, size
from .extract import Document
from .manifest import LANG_META
from .sources import LanguageSpec, PackageSpec
from .split import SPLITS, fill_empty_splits, split_of

PIPELINE_VERSION = 1
"""Bump when cleaning, splitting or the output format changes: finished corpora then count as stale."""


def fingerprint(spec: LanguageSpec) -> dict:
    """What a finished language was built from, compared on every run to decide whether to rebuild."""
    from .extract import EXTRACT_VERSION

    return {"pipeline": PIPELINE_VERSION, "extract": EXTRACT_VERSION,
            "packages": [p.name for p in spec.packages], "langid": spec.langid}


def clean_documents(spec: LanguageSpec, docs: list[Document], dropped: Counter) -> dict[str, list[Document]]:
    """Cleaned, deduplicated documents grouped by split. Deduplication runs over train first, then
    valid, then test, so a paragraph repeated across splits stays in train only and the held-out
    splits contain nothing the training data has."""
    english = EnglishFilter(spec.langid)
    cleaned = [Document(d.source, d.doc, clean_paragraphs(d.paras, spec.cjk, english, dropped)) for d in docs]
    by_split: dict[str, list[Document]] = {s: [] for s in SPLITS}
    for d in sorted(cleaned, key=lambda d: (d.source, d.doc)):
        by_split[split_of(d.doc)].append(d)
    dedup = Deduplicator()
    for split in SPLITS:
        for d in by_split[split]:
            kept = [(k, t) for k, t in d.paras if dedup.first(t)]
            dropped["duplicate"] += len(d.paras) - len(kept)
            d.paras = kept
    # Tiny corpora (tests) can end with an empty held-out split: move whole documents, never lines.
    assignment = {d.doc: s for s in SPLITS for d in by_split[s]}
    nonempty: dict[str, bool] = {}
    for s in SPLITS:
        for d in by_split[s]:
            nonempty[d.doc] = nonempty.get(d.doc, False) or bool(d.paras)
    final = fill_empty_splits(assignment, nonempty, spec.code)
    out: dict[str, list[Document]] = {s: [] for s in SPLITS}
    for s in SPLITS:
        for d in by_split[s]:
            out[final[d.doc]].append(d)
    for s in SPLITS:
        out[s].sort(key=lambda d: (d.source, d.doc))
    return out


class _CountingWriter:
    """Writes lines to a file while counting documents, lines and size and hashing the bytes."""

    def __init__(self, path: Path, unit: str, cjk: bool):
        self.f = open(path, "wb")
        self.sha = hashlib.sha256()
        self.unit, self.cjk = unit, cjk
        self.docs: set[str] = set()
        self.lines = self.size = 0

    def write(self, doc: str, text: str, line: str) -> None:
        data = line.encode("utf-8") + b"\n"
        self.f.write(data)
        self.sha.update(data)
        self.docs.add(doc)
        self.lines += 1
        self.size += size(text, self.cjk)

    def close(self) -> dict:
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        return {"documents": len(self.docs), "lines": self.lines, self.unit: self.size, "sha256": self.sha.hexdigest()}


def write_splits(folder: Path, by_split: dict[str, list[Document]], unit: str, cjk: bool) -> dict[str, dict]:
    """`{split}.txt` (one paragraph per line) and `{split}.jsonl` ({text, source, doc, key}); returns
    per-file counts and sha256."""
    files: dict[str, dict] = {}
    for split in SPLITS:
        txt = _CountingWriter(folder / f"{split}.txt", unit, cjk)
        jsl = _CountingWriter(folder / f"{split}.jsonl", unit, cjk)
        for d in by_split[split]:
            for key, text in d.paras:
                record = {"text": text, "source": d.source, "doc": d.doc,
                          "key": f"{d.doc}#{key}" if (key and d.source == "help") else None}
                txt.write(d.doc, text, text)
                jsl.write(d.doc, text, json.dumps(record, ensure_ascii=False))
        files[f"{split}.txt"] = txt.close()
        files[f"{split}.jsonl"] = jsl.close()
    return files


def build_language(spec: LanguageSpec, packages: list[tuple[PackageSpec, str, dict]], cache_dir: Path,
                   out: Path) -> dict:
    """Build `out/<lang>/` from the cached text of `packages` ([(spec, version, extraction summary)]);
    returns its manifest entry (also stored as `out/<lang>/meta.json`)."""
    t0 = time.monotonic()
    docs = [d for p, version, _ in packages for d in read_documents(cache_dir, p.name, version)]
    dropped: Counter = Counter()
    by_split = clean_documents(spec, docs, dropped)
    unit = "chars" if spec.cjk else "words"
    with atomic_dir(out / spec.code) as tmp:
        files = write_splits(tmp, by_split, unit, spec.cjk)
        entry = {
            "fingerprint": fingerprint(spec),
            "unit": unit,
            "packages": [{"name": p.name, "version": v, "source": p.kind,
                          "documents": s.get("documents"), "paragraphs": s.get("paragraphs")}
                         for p, v, s in packages],
            "dropped": {k: dropped.get(k, 0) for k in ("tiny", "english", "duplicate")},
            "files": files,
            "build_time_s": round(time.monotonic() - t0, 1),
        }
        write_json_atomic(tmp / LANG_META, entry)
    return entry
