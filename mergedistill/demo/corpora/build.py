"""`build_corpora`: the whole stage, cached, parallel, idempotent and atomic.

1. If `manifest.json` lists every requested language with matching checksums: say so and stop.
2. Otherwise resolve package versions (every missing package is reported at once), delete the
   manifest (the corpus is now "in progress"), extract each package in a small process pool
   (download + unpack + extract, cached per package version), and build each language as soon as
   its packages are ready.
3. Write the manifest last, atomically, only if everything succeeded.
"""
from __future__ import annotations

import logging
import shutil
import tempfile
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

from mergedistill.errors import UserError
from mergedistill.fsutil import read_json_or_none, write_json_atomic, write_text_atomic

from . import cache
from .extract import extract_documents, groff_problem
from .language import build_language, fingerprint
from .manifest import (
    FORMAT,
    LANG_META,
    MANIFEST,
    REPORT,
    format_markdown,
    format_table,
    manifest_document,
    verify_language,
)
from .sources import (
    LANGUAGES,
    AptSource,
    LanguageSpec,
    PackageError,
    PackageSource,
    PackageSpec,
)

logger = logging.getLogger(__name__)


@dataclass
class BuildResult:
    """What a run did."""

    skipped: bool
    """True when everything requested was already complete and nothing was written."""
    manifest: dict
    built: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)


def _short_version(version: str) -> str:
    return version.split(":", 1)[-1]


def extract_package(source: PackageSource, spec: PackageSpec, version: str, cache_dir: Path) -> dict:
    """Worker task: fetch and unpack one package into a scratch folder, extract its documents into
    the text cache, remove the scratch folder. Returns the cache summary plus the time taken."""
    t0 = time.monotonic()
    scratch_root = cache_dir / "unpack"
    scratch_root.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f"{spec.name}-", dir=scratch_root))
    try:
        source.unpack(spec.name, version, scratch)
        summary = cache.write_documents(cache_dir, spec.name, version, extract_documents(scratch, spec),
                                        {"name": spec.name, "version": version, "kind": spec.kind})
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return dict(summary, seconds=round(time.monotonic() - t0, 1))


class _InlineExecutor:
    """`-j 1`: run each task at submit time in this process (simple to debug; what tests use)."""

    def submit(self, fn, *args, **kwargs) -> Future:
        fut: Future = Future()
        try:
            fut.set_result(fn(*args, **kwargs))
        except Exception as e:  # noqa: BLE001 - handed to the caller through the future
            fut.set_exception(e)
        return fut

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        pass


def _retry_command(out: Path, langs: Sequence[str]) -> str:
    return f"python -m mergedistill.demo.corpora --out {out} --langs {','.join(langs)}"


def _remove_leftovers(out: Path) -> None:
    """Scratch of killed runs: half-written (`.<lang>.*.partial`) and replaced (`.<lang>.old-*`) language
    folders, unpack and download dirs, stale extracted text. (One build per output folder at a time.)"""
    scratch = [*out.glob(".*.partial"), *out.glob(".*.old-*"), out / ".cache" / "unpack", *out.glob(".cache/debs/.dl-*")]
    for p in scratch:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
    n = cache.prune_stale(out / ".cache")
    if n:
        logger.info("removed %d stale extracted-text cache file(s)", n)


def _log_language(lang: str, out: Path, entry: dict) -> None:
    unit = entry["unit"]
    parts = [f"{s} {entry['files'][f'{s}.txt']['documents']:,} docs / {entry['files'][f'{s}.txt']['lines']:,} lines"
             f" / {entry['files'][f'{s}.txt'][unit]:,} {unit}" for s in ("train", "valid", "test")]
    d = entry["dropped"]
    logger.info("[%s] wrote %s: %s; dropped %s tiny, %s English, %s duplicate (%.0f s)", lang, out / lang,
                "; ".join(parts), f"{d['tiny']:,}", f"{d['english']:,}", f"{d['duplicate']:,}", entry["build_time_s"])


def build_corpora(out: Path | str = "corpora", langs: Sequence[str] | None = None, jobs: int = 2,
                  source: PackageSource | None = None, force: bool = False,
                  languages: Mapping[str, LanguageSpec] = LANGUAGES) -> BuildResult:
    """Build (or verify and skip) `out/<lang>/{train,valid,test}.{txt,jsonl}` and `out/manifest.json`.

    `source` defaults to the Debian archive through apt (`AptSource`); tests pass a `TreeSource`.
    `languages` is the recipe (sources.LANGUAGES). Raises UserError (exit 2) for unknown languages,
    missing tools and missing packages (before any work), and for failed downloads (after finishing
    the languages that do not need them); the manifest is then not written."""
    t0 = time.monotonic()
    out = Path(out)
    langs = list(langs) if langs else [lang for lang in languages]
    unknown = [lang for lang in langs if lang not in languages]
    if unknown:
        raise UserError(f"unknown language(s) {', '.join(unknown)}; known: {', '.join(languages)}")
    if jobs < 1:
        raise UserError(f"-j {jobs}: need at least one worker")
    out.mkdir(parents=True, exist_ok=True)
    cache_dir = out / ".cache"
    source = source if source is not None else AptSource(cache_dir / "debs")

    old = read_json_or_none(out / MANIFEST) or {}
    old_entries: dict = old.get("languages", {}) if old.get("format") == FORMAT else {}
    if not force and old_entries:
        reasons = {lang: verify_language(out / lang, old_entries.get(lang), fingerprint(languages[lang]))
                   for lang in langs}
        if all(r is None for r in reasons.values()):
            if not (out / REPORT).is_file():  # corpora built before report.md existed
                write_text_atomic(out / REPORT, format_markdown(old))
            n_files = sum(len(old_entries[lang]["files"]) for lang in langs)
            logger.info("corpora in %s are complete: %s (%d files, checksums match); skipped (%.1f s). "
                        "Use --force to rebuild.", out, ", ".join(langs), n_files, time.monotonic() - t0)
            return BuildResult(skipped=True, manifest=old, reused=list(langs))
    _remove_leftovers(out)

    # Finished languages are reused: from the manifest, or from their own meta.json (an interrupted run).
    entries: dict[str, dict] = {}
    for lang, entry in old_entries.items():
        if lang in languages and lang not in langs:
            if verify_language(out / lang, entry, fingerprint(languages[lang])) is None:
                entries[lang] = entry
    reused, todo = [], []
    for lang in langs:
        reason = "--force" if force else "not built yet"
        for candidate in ([] if force else [old_entries.get(lang), read_json_or_none(out / lang / LANG_META)]):
            if candidate:
                reason = verify_language(out / lang, candidate, fingerprint(languages[lang]))
                if reason is None:
                    entries[lang] = candidate
                    break
        if lang in entries:
            reused.append(lang)
            logger.info("[%s] already built and verified; kept", lang)
        else:
            todo.append(lang)
            logger.info("[%s] to build: %s", lang, reason)

    if todo:
        _build_languages(out, cache_dir, [languages[lang] for lang in todo], source, jobs, entries)
    elapsed = time.monotonic() - t0
    manifest = manifest_document(entries, elapsed, jobs)
    write_text_atomic(out / REPORT, format_markdown(manifest))
    write_json_atomic(out / MANIFEST, manifest)  # last: its presence says the corpus is complete
    logger.info("corpora:\n%s", format_table({lang: entries[lang] for lang in langs}))
    logger.info("corpora: built %s, kept %s in %.0f s; manifest %s", ", ".join(todo) or "nothing",
                ", ".join(reused) or "nothing", elapsed, out / MANIFEST)
    return BuildResult(skipped=False, manifest=manifest, built=todo, reused=reused)


def _build_languages(out: Path, cache_dir: Path, specs: list[LanguageSpec], source: PackageSource,
                     jobs: int, entries: dict[str, dict]) -> None:
    """Extract the packages of `specs` and build those languages, adding their entries to `entries`.
    Raises PackageError listing every package that failed (the languages that could be finished are)."""
    todo = [s.code for s in specs]
    problems = list(source.preflight())
    if any(p.kind == "man" for s in specs for p in s.packages) and groff_problem():
        problems.append(groff_problem())
    if problems:
        raise UserError(problems, header="cannot build the corpora:")

    names = list(dict.fromkeys(p.name for s in specs for p in s.packages))
    try:
        versions = source.versions(names)
    except PackageError as e:
        raise PackageError(e.problems + [f"then retry: {_retry_command(out, todo)}"], header=e.header) from None
    (out / MANIFEST).unlink(missing_ok=True)  # from here on the corpus is in progress, not complete

    owner = {p.name: s.code for s in reversed(specs) for p in s.packages}
    by_name = {p.name: p for s in specs for p in s.packages}
    summaries: dict[str, dict] = {}
    failed: dict[str, str] = {}
    executor = ProcessPoolExecutor(max_workers=jobs) if jobs > 1 else _InlineExecutor()
    pending: dict[Future, tuple[str, str]] = {}
    try:
        # Longest first (man pages: one groff run per page), so that the pool drains evenly.
        order = sorted(names, key=lambda n: {"man": 0, "help": 1, "fortune": 2}[by_name[n].kind])
        for name in order:
            cached = cache.read_summary(cache_dir, name, versions[name])
            if cached is not None:
                summaries[name] = cached
                logger.info("[%s] %s %s: %s docs, %s paragraphs (cached)", owner[name], name,
                            _short_version(versions[name]), f"{cached['documents']:,}", f"{cached['paragraphs']:,}")
            else:
                fut = executor.submit(extract_package, source, by_name[name], versions[name], cache_dir)
                pending[fut] = ("pkg", name)
        started: set[str] = set()

        def submit_ready() -> None:
            for spec in specs:
                if spec.code in started or any(p.name in failed for p in spec.packages):
                    continue
                if all(p.name in summaries for p in spec.packages):
                    started.add(spec.code)
                    pkgs = [(p, versions[p.name], summaries[p.name]) for p in spec.packages]
                    pending[executor.submit(build_language, spec, pkgs, cache_dir, out)] = ("lang", spec.code)

        submit_ready()
        while pending:
            done, _ = wait(list(pending), return_when=FIRST_COMPLETED)
            for fut in done:
                what, name = pending.pop(fut)
                try:
                    result = fut.result()
                except UserError as e:
                    failed[name] = str(e)
                    logger.error("[%s] %s failed: %s", owner.get(name, name), name, e)
                    continue
                if what == "pkg":
                    summaries[name] = result
                    logger.info("[%s] %s %s: %s docs, %s paragraphs (%.0f s)", owner[name], name,
                                _short_version(versions[name]), f"{result['documents']:,}",
                                f"{result['paragraphs']:,}", result["seconds"])
                else:
                    entries[name] = result
                    _log_language(name, out, result)
            submit_ready()
    finally:
        executor.shutdown(wait=True, cancel_futures=True)
        try:
            (cache_dir / "unpack").rmdir()  # empty once every worker has cleaned up after itself
        except OSError:
            pass
    if failed:
        unfinished = [s.code for s in specs if s.code not in entries]
        raise PackageError(
            [msg if msg.startswith(name) else f"{name}: {msg}" for name, msg in failed.items()]
            + [f"not built: {', '.join(unfinished)}; the manifest was not written",
               f"retry (finished downloads, extractions and languages are kept): {_retry_command(out, unfinished)}"],
            header="corpora incomplete:",
        )
