"""The extracted-text cache: one gzipped JSON-lines file per package version, plus a small summary.

`corpora/.cache/text/<pkg>_<version>.x<N>.jsonl.gz` holds one line per document,
`{"source", "doc", "paras": [[key, text], ...]}`, exactly as the extractor produced it (before
cleaning), so that changing the cleaning never re-downloads or re-renders anything. The summary
(`.json` beside it) is written after the data, atomically, and is what marks an entry complete.
"""
from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Iterable, Iterator

from mergedistill.fsutil import atomic_path, read_json_or_none, write_json_atomic

from .extract import EXTRACT_VERSION, Document


def text_paths(cache_dir: Path, name: str, version: str) -> tuple[Path, Path]:
    """(data, summary) paths of a package version's extracted text."""
    stem = f"{name}_{version.replace(':', '%3a')}.x{EXTRACT_VERSION}"
    text_dir = cache_dir / "text"
    return text_dir / f"{stem}.jsonl.gz", text_dir / f"{stem}.json"


def prune_stale(cache_dir: Path) -> int:
    """Delete extracted text written by another EXTRACT_VERSION (it can never be read again) and
    half-written temporary files; returns how many files went."""
    text_dir = cache_dir / "text"
    if not text_dir.is_dir():
        return 0
    stale = [p for p in text_dir.iterdir()
             if p.is_file() and (p.name.startswith(".") or f".x{EXTRACT_VERSION}." not in p.name)]
    for p in stale:
        p.unlink(missing_ok=True)
    return len(stale)


def read_summary(cache_dir: Path, name: str, version: str) -> dict | None:
    """The summary of a complete cache entry, or None if the entry is missing or half-written."""
    data, summary = text_paths(cache_dir, name, version)
    info = read_json_or_none(summary)
    return info if info is not None and data.is_file() else None


def write_documents(cache_dir: Path, name: str, version: str, docs: Iterable[Document], summary: dict) -> dict:
    """Store documents (streamed) and then the summary, with counts added; returns the summary."""
    data, summary_path = text_paths(cache_dir, name, version)
    data.parent.mkdir(parents=True, exist_ok=True)
    n_docs = n_paras = 0
    with atomic_path(data) as tmp, open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=4, mtime=0) as gz:
        for d in docs:
            line = json.dumps({"source": d.source, "doc": d.doc, "paras": d.paras}, ensure_ascii=False)
            gz.write(line.encode("utf-8") + b"\n")
            n_docs += 1
            n_paras += len(d.paras)
    summary = dict(summary, documents=n_docs, paragraphs=n_paras)
    write_json_atomic(summary_path, summary)
    return summary


def read_documents(cache_dir: Path, name: str, version: str) -> Iterator[Document]:
    """The cached documents of a package version, in extraction order."""
    data, _ = text_paths(cache_dir, name, version)
    with gzip.open(data, "rt", encoding="utf-8") as f:
        for line in f:
            obj = json.loads(line)
            yield Document(obj["source"], obj["doc"], [(k, t) for k, t in obj["paras"]])
