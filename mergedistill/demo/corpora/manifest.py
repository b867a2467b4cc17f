"""The corpus manifest: what was built from which package versions, file counts and checksums.

`corpora/manifest.json` is written last and atomically; its presence, with every checksum matching,
is what "complete" means. Each language folder also carries its own entry (`<lang>/meta.json`,
renamed into place with the folder), so an interrupted run can reuse finished languages.
"""
from __future__ import annotations

import logging
from pathlib import Path

from mergedistill.fsutil import sha256_file
from mergedistill.tables import markdown_table

logger = logging.getLogger(__name__)

FORMAT = "mergedistill.demo.corpora/1"
MANIFEST = "manifest.json"
REPORT = "report.md"
LANG_META = "meta.json"


def verify_language(lang_dir: Path, entry: dict | None, fingerprint: dict) -> str | None:
    """Why the built language in `lang_dir` is not complete according to `entry` (a manifest entry);
    None when every listed file exists with the recorded sha256 and the recipe is unchanged."""
    if not entry:
        return "not built yet"
    if entry.get("fingerprint") != fingerprint:
        return "its recipe changed (packages or pipeline version)"
    files = entry.get("files") or {}
    if not files:
        return "its manifest entry lists no files"
    for name, info in files.items():
        path = lang_dir / name
        if not path.is_file():
            return f"{path} is missing"
        if sha256_file(path) != info.get("sha256"):
            return f"{path} does not match its recorded sha256"
    return None


def manifest_document(languages: dict[str, dict], wall_time_s: float, jobs: int) -> dict:
    """The top-level manifest: per-language entries plus how this run went."""
    import datetime

    return {
        "format": FORMAT,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "wall_time_s": round(wall_time_s, 1),
        "jobs": jobs,
        "languages": {lang: languages[lang] for lang in sorted(languages)},
    }


def _human(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1_000_000 else f"{n / 1e3:.1f}k" if n >= 10_000 else f"{n:,}"


def format_table(languages: dict[str, dict]) -> str:
    """A plain-text table: per language and split, documents / lines / words (chars for ja, zh)."""
    rows = [("lang", "unit", "train docs/lines/size", "valid docs/lines/size", "test docs/lines/size")]
    for lang in sorted(languages):
        entry = languages[lang]
        unit = entry.get("unit", "words")
        cells = []
        for split in ("train", "valid", "test"):
            f = entry["files"][f"{split}.txt"]
            cells.append(f"{f['documents']:,} / {f['lines']:,} / {_human(f[unit])}")
        rows.append((lang, unit, *cells))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def format_markdown(manifest: dict) -> str:
    """report.md: the corpus table a person reads (the manifest is what programs read)."""
    langs = manifest["languages"]
    lines = ["# Corpora", "",
             f"Built {manifest['created']} in {manifest['wall_time_s']:.0f} s with {manifest['jobs']} jobs. Split by source "
             "document (no document in two splits); sizes in words, or characters for languages written without spaces. "
             "Checksums: manifest.json.", ""]
    body = []
    for lang in sorted(langs):
        entry = langs[lang]
        files, unit = entry["files"], entry.get("unit", "words")
        packages = ", ".join(f"{p['name']} {p['version']}" for p in entry.get("packages", []))
        docs = " / ".join(f"{files[f'{s}.txt']['documents']:,}" for s in ("train", "valid", "test"))
        lines_ = " / ".join(f"{files[f'{s}.txt']['lines']:,}" for s in ("train", "valid", "test"))
        d = entry.get("dropped", {})
        body.append([lang, packages, docs, lines_, f"{files['train.txt'][unit]:,} {unit}",
                     f"{d.get('tiny', 0):,} / {d.get('english', 0):,} / {d.get('duplicate', 0):,}"])
    lines.append(markdown_table(["lang", "packages (version)", "documents train / valid / test", "lines train / valid / test",
                                 "train size", "dropped: tiny / English / duplicate"], body))
    return "\n".join(lines) + "\n"
