"""Reading corpora: plain text (one document or paragraph per line), JSON lines (field `text`), or a
`datasets` spec `datasets:<id or local dir>[:<config>]:<split>[:<column>]`.

Problems (missing, empty, not UTF-8, no `text` field) raise UserError naming the field and file."""
from __future__ import annotations

import codecs
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from mergedistill.config import DATASETS_PREFIX
from mergedistill.errors import UserError
from mergedistill.fsutil import sha256_file


@dataclass(frozen=True)
class DatasetsSpec:
    """`datasets:<id or local dir>[:<config>]:<split>[:<column>]`, parsed."""

    name: str
    config: str | None
    split: str
    column: str | None


def parse_datasets_spec(spec: str, where: str) -> DatasetsSpec:
    parts = spec[len(DATASETS_PREFIX):].split(":")
    if len(parts) == 2:
        return DatasetsSpec(parts[0], None, parts[1], None)
    if len(parts) in (3, 4):
        return DatasetsSpec(parts[0], parts[1] or None, parts[2], (parts[3] or None) if len(parts) == 4 else None)
    raise UserError(f"{where}: {spec!r} is not a datasets spec `datasets:<id or dir>[:<config>]:<split>[:<column>]`")


def load_datasets_split(spec: str, where: str, columns: list[str]):
    """The split a datasets spec names (a folder saved with `save_to_disk`, or a hub dataset), checked
    to hold `columns`; errors name `where` and the spec."""
    import datasets

    s = parse_datasets_spec(spec, where)
    try:
        if Path(s.name).is_dir() and ((Path(s.name) / "dataset_dict.json").exists() or (Path(s.name) / "state.json").exists()):
            ds = datasets.load_from_disk(s.name)
            if isinstance(ds, datasets.DatasetDict):
                ds = ds[s.split]
        else:
            ds = datasets.load_dataset(s.name, s.config, split=s.split)
    except Exception as e:
        raise UserError(f"{where}: cannot load {spec!r}: {type(e).__name__}: {str(e).splitlines()[0][:300]}") from None
    for col in columns:
        if col not in ds.column_names:
            raise UserError(f"{where}: {spec!r} has no column {col!r} (columns: {', '.join(ds.column_names)})")
    return ds


def iter_lines(spec: str, where: str, max_lines: int | None = None) -> Iterator[str]:
    """Non-blank texts of a corpus, stripped, at most `max_lines` of them."""
    n = 0
    for text in _iter_raw(spec, where):
        text = text.strip()
        if not text:
            continue
        yield text
        n += 1
        if max_lines is not None and n >= max_lines:
            return


SAMPLE_POOL = 200_000
"""Lines `sample_lines` reads at most before drawing its subset (bounds memory on huge splits)."""


def spread_subset(items: list, n: int | None, seed: int = 0) -> list:
    """`n` items drawn at random (fixed `seed`), kept in their order; all of them when `n` is None or
    there are no more than `n`."""
    if n is None or len(items) <= n:
        return items
    keep = sorted(random.Random(seed).sample(range(len(items)), n))
    return [items[i] for i in keep]


def sample_lines(spec: str, where: str, n: int | None, seed: int = 0) -> list[str]:
    """`n` non-blank texts drawn at random (fixed `seed`) from the whole corpus (its first SAMPLE_POOL
    lines), kept in corpus order; all of them when `n` is None or the corpus is smaller.

    Held-out splits are cut by document, so their first lines are often one document (in the demo's
    zh test split, a file of classical poems): a spread sample scores the split, not its opening."""
    return spread_subset(list(iter_lines(spec, where, SAMPLE_POOL)), n, seed)


def iter_json_lines(spec: str, where: str) -> Iterator[tuple[int, object]]:
    """(line number, parsed object) of each non-blank line of a JSON-lines file; a line that is not
    UTF-8 or not JSON raises UserError naming the file and the line."""
    with open(spec, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"{where}: {spec} is not UTF-8 (line {lineno}, byte {e.start}); convert it, "
                                f"e.g. `iconv -f latin1 -t utf-8 {spec} > fixed.jsonl`") from None
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{where}: {spec} line {lineno} is not JSON ({e.msg})") from None


def _iter_raw(spec: str, where: str) -> Iterator[str]:
    if spec.startswith(DATASETS_PREFIX):
        yield from _iter_datasets(spec, where)
        return
    path = Path(spec)
    if not path.is_file():
        raise UserError(f"{where}: no file {spec!r}")
    if path.suffix in (".jsonl", ".json"):
        for lineno, obj in iter_json_lines(spec, where):
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise UserError(f"{where}: {spec} line {lineno} has no string field `text`")
            yield obj["text"]
        return
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                yield raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError(
                    f"{where}: {spec} is not UTF-8 (line {lineno}, byte {e.start}); convert it, "
                    f"e.g. `iconv -f latin1 -t utf-8 {spec} > fixed.txt`"
                ) from None


def _iter_datasets(spec: str, where: str) -> Iterator[str]:
    column = parse_datasets_spec(spec, where).column or "text"
    for row in load_datasets_split(spec, where, [column]):
        yield row[column]


def check_corpus(spec: str, where: str) -> str | None:
    """A problem with a corpus (missing, empty, not UTF-8, bad JSON), or None. Reads plain files in
    blocks with an incremental decoder, so a large corpus is checked at disk speed."""
    if spec.startswith(DATASETS_PREFIX):
        try:
            next(iter_lines(spec, where), None)
        except UserError as e:
            return str(e)
        return None
    path = Path(spec)
    if not path.is_file():
        return f"{where}: no file {spec!r}"
    if path.suffix in (".jsonl", ".json"):
        try:
            for _ in iter_lines(spec, where):
                return None
        except UserError as e:
            return str(e)
        return f"{where}: {spec} is empty (no non-blank lines); point it at a corpus with text"
    decoder = codecs.getincrementaldecoder("utf-8")()
    nonblank = False
    offset = 0
    with open(path, "rb") as f:
        while True:
            block = f.read(1 << 22)
            try:
                text = decoder.decode(block, final=not block)
            except UnicodeDecodeError as e:
                return (f"{where}: {spec} is not UTF-8 (byte {offset + e.start}); convert it, "
                        f"e.g. `iconv -f latin1 -t utf-8 {spec} > fixed.txt`")
            nonblank = nonblank or bool(text.strip())
            offset += len(block)
            if not block:
                break
    if not nonblank:
        return f"{where}: {spec} is empty (no non-blank lines); point it at a corpus with text"
    return None


def split_problems(languages: dict, split: str, need: str) -> list[str]:
    """One problem per language whose `split` corpus (`train`, `valid` or `test`) is not set (saying
    `need`) or cannot be read (check_corpus)."""
    problems = []
    for lang, lc in languages.items():
        spec = getattr(lc, split)
        if not spec:
            problems.append(f"languages.{lang}.{split}: {need}")
        else:
            p = check_corpus(spec, f"languages.{lang}.{split}")
            if p:
                problems.append(p)
    return problems


def corpus_fingerprint(spec: str) -> str:
    """Identity of a corpus for artifact fingerprints: a hash of a file's bytes (so an identical
    rebuild keeps it), or the spec itself for datasets."""
    if spec.startswith(DATASETS_PREFIX):
        return spec
    return sha256_file(spec)
