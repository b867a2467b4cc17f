"""`mergedistill vocab`: the joint student vocabulary, teacher->student id maps, per-teacher
tokenizers that emit student ids, and a report. Output: vocab/<run>/ (see DESIGN.md).

The stage is idempotent (a rerun with the same inputs skips), its output folder appears only when
complete (built in a temporary sibling, renamed into place), and the corpus scans of pruning are
cached per teacher and corpus so a killed run resumes where it was.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import yaml

from mergedistill import __version__
from mergedistill.config import RunConfig
from mergedistill.configlib import to_dict
from mergedistill.corpus import check_corpus, corpus_fingerprint, iter_lines
from mergedistill.errors import UserError
from mergedistill.fsutil import (
    atomic_dir,
    atomic_path,
    read_json,
    read_json_record,
    remove_leftovers,
    sha256_file,
    write_json_atomic,
    write_text_atomic,
)
from mergedistill.lock import exclusive
from mergedistill.models.size import parameter_counts
from mergedistill.parallel import run_tasks
from mergedistill.progress import Progress
from mergedistill.teachers import TeacherTokenizer, load_all_tokenizers
from mergedistill.vocab.joint import (
    VOCAB_FORMAT,
    JointVocab,
    build_joint_vocab,
    kept_tokens,
)
from mergedistill.vocab.report import write_report
from mergedistill.vocab.tokenizers import (
    bpe_merges,
    check_spaces_unreachable,
    save_student_tokenizer,
)
from mergedistill.vocab.verify import check_student_tokenizer, samples

log = logging.getLogger(__name__)
BATCH_LINES = 2000


# ---- preflight ---------------------------------------------------------------------------------
def _corpora_to_check(cfg: RunConfig) -> list[tuple[str, str]]:
    """(config field, spec) of every corpus this stage reads."""
    splits = ["train"] + (cfg.vocab.prune_splits if cfg.vocab.prune else [])
    out = []
    for lang, lc in cfg.languages.items():
        for split in dict.fromkeys(splits):
            spec = getattr(lc, split)
            if spec:
                out.append((f"languages.{lang}.{split}", spec))
            elif cfg.vocab.prune and split in cfg.vocab.prune_splits:
                out.append((f"languages.{lang}.{split}", ""))
    return out


def preflight(cfg: RunConfig) -> dict[str, TeacherTokenizer]:
    """Load every teacher tokenizer and check every corpus; raise all problems together."""
    problems: list[str] = []
    try:
        teachers = load_all_tokenizers(cfg)
    except UserError as e:
        problems += e.problems
        teachers = {}
    for t in teachers.values():
        try:
            check_spaces_unreachable(t)
        except UserError as e:
            problems += e.problems
    for where, spec in _corpora_to_check(cfg):
        if not spec:
            problems.append(f"{where}: vocab.prune_splits asks for this split, but the language has none; add it or drop the split")
            continue
        p = check_corpus(spec, where)
        if p:
            problems.append(p)
    if problems:
        raise UserError(problems, header=f"vocab: {len(problems)} problem(s); nothing was written:")
    return teachers


def inputs_fingerprint(cfg: RunConfig, teachers: dict[str, TeacherTokenizer]) -> str:
    """Everything the stage's output depends on."""
    inputs = {
        "format": VOCAB_FORMAT,
        "teachers": {n: t.fingerprint for n, t in teachers.items()},
        "routing": {lang: cfg.teacher_of(lang) for lang in cfg.languages},
        "candidates": {lang: lc.candidates for lang, lc in cfg.languages.items()} if cfg.vocab.prune_candidates else None,
        "vocab": to_dict(cfg.vocab),
        "hidden": cfg.student.hidden,
        "corpora": {lang: corpus_fingerprint(lc.train) for lang, lc in cfg.languages.items()},
    }
    if cfg.vocab.prune:
        inputs["prune_corpora"] = {
            f"{lang}.{s}": corpus_fingerprint(getattr(lc, s)) for lang, lc in cfg.languages.items() for s in cfg.vocab.prune_splits
        }
        capped = {n: t.max_lines for n, t in cfg.teachers.items() if t.max_lines is not None}
        if capped:
            inputs["prune_teacher_lines"] = capped
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


# ---- corpus scans (run in forked workers) ------------------------------------------------------
def _scan(t: TeacherTokenizer, spec: str, label: str, max_lines: int | None) -> tuple[np.ndarray, dict]:
    """Token counts of `t` over a corpus, and fertility figures (lines, words, chars, tokens, unk)."""
    counts = np.zeros(t.size, dtype=np.int64)
    stats = {"lines": 0, "words": 0, "chars": 0, "tokens": 0}
    prog = Progress(label, log)
    buf: list[str] = []

    def flush() -> None:
        ids = t.encode_batch(buf)
        flat = np.fromiter((i for seq in ids for i in seq), dtype=np.int64)
        counts[:] += np.bincount(flat, minlength=t.size)[: t.size]
        stats["lines"] += len(buf)
        stats["words"] += sum(len(x.split()) for x in buf)
        stats["chars"] += sum(len(x) - x.count(" ") for x in buf)
        stats["tokens"] += int(flat.size)
        prog.update(len(buf), int(flat.size))
        buf.clear()

    for line in iter_lines(spec, label, max_lines):
        buf.append(line)
        if len(buf) >= BATCH_LINES:
            flush()
    if buf:
        flush()
    unk = t.specials.get("unk_token")
    unk_id = next((a["id"] for a in t.tj.get("added_tokens", []) if a["content"] == unk), None)
    stats["unk"] = int(counts[unk_id]) if unk_id is not None else 0
    log.info("%s", prog.line())
    return counts, stats


def _prune_counts(cfg: RunConfig, teachers: dict[str, TeacherTokenizer]) -> dict[str, np.ndarray]:
    """Per teacher: how often it produced each of its tokens on the corpora routed to it (and, with
    vocab.prune_candidates, on those of languages naming it as a candidate). Each (teacher, corpus)
    count is cached under vocab/.cache/<run>/ so a killed run resumes."""
    cache = Path("vocab") / ".cache" / cfg.run
    jobs = []
    for lang, lc in cfg.languages.items():
        names = [cfg.teacher_of(lang)] + (lc.candidates if cfg.vocab.prune_candidates else [])
        for t, split in ((teachers[n], split) for n in dict.fromkeys(names) for split in cfg.vocab.prune_splits):
            spec = getattr(lc, split)
            key = hashlib.sha256(f"{t.fingerprint}|{corpus_fingerprint(spec)}|{cfg.prune_lines_of(t.name)}".encode()).hexdigest()[:16]
            jobs.append((t, spec, f"prune scan {lang}/{split} ({t.name})", cache / f"counts-{t.name}-{lang}-{split}-{key}.npy"))

    def task(t, spec, label, path):
        def run():
            if path.exists():
                if _readable_counts(path, t.size):
                    log.info("%s: cached", label)
                    return None
                log.warning("%s: the cached counts %s are unreadable; scanning again", label, path)
            counts, _ = _scan(t, spec, label, cfg.prune_lines_of(t.name))
            with atomic_path(path) as tmp, open(tmp, "wb") as f:
                np.save(f, counts)
            return None
        return run

    run_tasks([task(*j) for j in jobs])
    totals = {name: np.zeros(t.size, dtype=np.int64) for name, t in teachers.items()}
    for t, _, _, path in jobs:
        totals[t.name] += np.load(path)
    return totals


def _readable_counts(path: Path, size: int) -> bool:
    try:
        counts = np.load(path)
    except (OSError, ValueError, EOFError):
        return False
    return counts.shape == (size,)


def _fertility_task(cfg: RunConfig, teachers: dict[str, TeacherTokenizer], lang: str):
    t = teachers[cfg.teacher_of(lang)]
    n = cfg.vocab.report_lines or None

    def run() -> dict:
        stats = _scan(t, cfg.languages[lang].train, f"fertility {lang} ({t.name})", n)[1]
        return {"language": lang, "teacher": t.name, **stats}
    return run


# ---- the student's size --------------------------------------------------------------------------
EMBEDDING_WARN = 0.8
"""Share of the student's parameters in its embeddings above which `vocab` warns."""


def student_size(cfg: RunConfig, vocab_size: int) -> dict:
    """Parameters of the student this vocabulary makes (body / embeddings), and what they weigh on disk:
    float32 exported weights (4 bytes each) and training checkpoints (weights + AdamW's two moments)."""
    c = parameter_counts(cfg, vocab_size)
    return {**c, "share": c["embeddings"] / c["total"], "vocabulary": vocab_size, "hidden": cfg.student.hidden,
            "layers": cfg.student.layers, "export_mb": 4 * c["total"] / 1e6, "export_body_mb": 4 * c["body"] / 1e6,
            "export_embeddings_mb": 4 * c["embeddings"] / 1e6, "checkpoint_mb": 12 * c["total"] / 1e6}


def log_student_size(cfg: RunConfig, sz: dict) -> None:
    log.info("vocab: the student (%d layers x %d) has %.1fM parameters: body %.2fM, embeddings %.1fM (%.0f%%: vocabulary %s x "
             "(hidden %d + output bias)); exported weights %.1f MB (body %.1f MB, embeddings %.1f MB), training checkpoints "
             "~%.0f MB each (weights + AdamW state)", sz["layers"], sz["hidden"], sz["total"] / 1e6, sz["body"] / 1e6,
             sz["embeddings"] / 1e6, 100 * sz["share"], f"{sz['vocabulary']:,}", sz["hidden"], sz["export_mb"], sz["export_body_mb"],
             sz["export_embeddings_mb"], sz["checkpoint_mb"])
    if sz["share"] > EMBEDDING_WARN:
        advice = ("set `vocab.prune: true` to keep only the tokens each teacher produces on the corpora routed to it "
                  "(report.md compares the sizes)") if not cfg.vocab.prune else (
                  "pruning is on: `vocab.keep_single_chars: false` drops the single characters kept for unseen text, "
                  "or fewer corpora lines (`vocab.max_lines`) keep fewer tokens")
        log.warning("vocab: embeddings are %.0f%% of the student's parameters (more than %.0f%%); %s",
                    100 * sz["share"], 100 * EMBEDDING_WARN, advice)


# ---- the stage ---------------------------------------------------------------------------------
COVERED = ("vocab.parquet", "vocab.txt", "config.yaml", "idmaps", "tokenizers")
"""What later stages and users read from vocab/<run>/: fingerprint.json holds the sha256 of every file
of these (the report is for reading only)."""


def file_hashes(folder: Path) -> dict[str, str]:
    files = [p for name in COVERED for p in ([folder / name] if (folder / name).is_file() else sorted((folder / name).rglob("*")))]
    return {p.relative_to(folder).as_posix(): sha256_file(p) for p in files if p.is_file()}


def changed_files(folder: Path, record: dict) -> list[str]:
    """Files of `folder` whose content differs from the hashes in its fingerprint record (or that are
    missing); every file when the record holds no hashes (written by an older mergedistill)."""
    files = record.get("files")
    if not isinstance(files, dict) or not files:
        return ["(fingerprint.json holds no file hashes: written by an older mergedistill)"]
    return [rel for rel, digest in files.items() if not (folder / rel).is_file() or sha256_file(folder / rel) != digest]


@exclusive("vocab", lambda cfg, **_: cfg.vocab_dir)
def run_vocab(cfg: RunConfig, *, force: bool = False) -> Path:
    """Build vocab/<run>/, or skip if it is complete for the same inputs. Returns the folder."""
    start = time.monotonic()
    out = cfg.vocab_dir
    remove_leftovers(Path("vocab") / ".cache" / cfg.run, log)  # the corpus scans' cache of killed runs
    teachers = preflight(cfg)
    inputs = inputs_fingerprint(cfg, teachers)
    fp_path = out / "fingerprint.json"
    if fp_path.is_file() and not force:
        try:
            done = read_json(fp_path)
        except (OSError, ValueError):
            done = {}
        done = done if isinstance(done, dict) else {}
        changed = changed_files(out, done) if done.get("inputs") == inputs else []
        if changed:
            log.warning("vocab: %s: %s changed since it was built; rebuilding", out, ", ".join(changed[:5]))
        elif done.get("inputs") == inputs:
            log.info("vocab: %s is complete for these inputs (vocabulary %s, %s tokens); skipping (--force rebuilds)",
                     out, done.get("vocab"), f"{done.get('size', 0):,}")
            log_student_size(cfg, student_size(cfg, done.get("size", 0)))
            return out
        else:
            log.info("vocab: inputs changed since %s was built; rebuilding", out)

    log.info("vocab: %d teachers (%s)", len(teachers), ", ".join(f"{n}: {t.family.name}, {t.size:,}" for n, t in teachers.items()))
    counts = _prune_counts(cfg, teachers) if cfg.vocab.prune else None

    keys = {name: t.keys() for name, t in teachers.items()}
    full = build_joint_vocab(keys)
    if counts is not None:
        kept = {
            name: kept_tokens(keys[name], counts[name], cfg.vocab.keep_single_chars, bpe_merges(t.tj))
            for name, t in teachers.items()
        }
        joint = build_joint_vocab(keys, kept)
    else:
        joint = full
    vfp = joint.fingerprint()
    log.info("vocab: joint vocabulary of %s tokens%s", f"{joint.size:,}",
             f" ({full.size:,} before pruning)" if counts is not None else "")
    size = student_size(cfg, joint.size)
    log_student_size(cfg, size)

    with atomic_dir(out) as tmp:
        def tok_task(name):
            t = teachers[name]
            meta = {"teacher": name, "teacher_source": t.source, "teacher_tokenizer": t.fingerprint, "vocab": vfp,
                    "student_vocab_size": joint.size, "tokenizer": t.family.name, "mergedistill": __version__}
            def run() -> tuple[str | None, int]:  # write it, then load it as a user would and compare with the teacher
                folder = tmp / "tokenizers" / name
                save_student_tokenizer(t, joint.idmaps[name], joint.size, folder, meta)
                lines = samples(cfg, name)
                return check_student_tokenizer(t, folder, joint.idmaps[name], joint.size, lines), len(lines)
            return run

        # forked workers: writing (and checking) files and scanning corpora for the report, both cores busy
        writes = [lambda: joint.save(tmp)] + [tok_task(n) for n in teachers]
        results = run_tasks(writes + [_fertility_task(cfg, teachers, lang) for lang in cfg.languages])
        problems = [p for p, _ in results[1:len(writes)] if p]
        for name, (_, n) in zip(teachers, results[1:len(writes)]):
            if n:
                log.info("vocab: %s's student tokenizer has the student's %s ids and equals the teacher's on %d sample texts",
                         name, f"{joint.size:,}", n)
            elif cfg.vocab.verify_lines == 0:
                log.warning("vocab: %s's student tokenizer has the student's %s ids; not compared with the teacher's "
                            "(vocab.verify_lines: 0)", name, f"{joint.size:,}")
            else:
                log.info("vocab: %s's student tokenizer has the student's %s ids; no language's train text to compare it "
                         "with the teacher's on (no language is routed to it)", name, f"{joint.size:,}")
        if problems:
            raise UserError(problems, header=f"vocab: {len(problems)} student tokenizer(s) differ from their teacher; nothing was written:")
        fertility = results[len(writes):]
        hidden = cfg.student.hidden
        stats = {
            "run": cfg.run, "fingerprint": vfp, "pruned": cfg.vocab.prune, "keep_single_chars": cfg.vocab.keep_single_chars,
            "joint_size": joint.size, "joint_size_unpruned": full.size, "report_lines": cfg.vocab.report_lines,
            "teachers": [
                {"name": n, "tokenizer": t.family.name, "source": t.source, "size": t.size,
                 "kept": int((joint.idmaps[n] >= 0).sum()), "languages": cfg.languages_of(n)}
                for n, t in teachers.items()
            ],
            "overlap": full.overlap().tolist(),
            "fertility": fertility,
            "embedding_params": {"hidden": hidden, "before": full.size * (hidden + 1), "after": joint.size * (hidden + 1)},
            "student_size": size,
            "seconds": time.monotonic() - start,
        }
        write_report(stats, tmp)
        write_text_atomic(tmp / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True))
        write_json_atomic(tmp / "fingerprint.json", {  # written last: marks the folder complete
            "format": VOCAB_FORMAT, "vocab": vfp, "size": joint.size, "inputs": inputs, "files": file_hashes(tmp),
            "teachers": {n: {"tokenizer": t.fingerprint, "size": t.size, "source": t.source} for n, t in teachers.items()},
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "mergedistill": __version__,
        })
    log.info("vocab: wrote %s in %.1f s (report: %s)", out, time.monotonic() - start, out / "report.md")
    return out


def load_vocab(cfg: RunConfig) -> tuple[JointVocab, dict]:
    """The built vocabulary of this run and its fingerprint record, for the later stages. Refuses files
    that differ from the hashes in fingerprint.json (edited, truncated or half-copied)."""
    fp_path = cfg.vocab_dir / "fingerprint.json"
    rerun = cfg.command("vocab") + " --force"
    if not fp_path.is_file():
        raise UserError(f"{cfg.vocab_dir}: no complete vocabulary; run `{cfg.command('vocab')}` first")
    record = read_json_record(fp_path, rerun)
    if not isinstance(record.get("teachers"), dict) or not isinstance(record.get("vocab"), str):
        raise UserError(f"{fp_path}: incomplete fingerprint (no teachers or vocab); rerun `{rerun}`")
    missing = [t for t in cfg.teachers if t not in record["teachers"]]
    if missing:
        raise UserError(f"{cfg.vocab_dir}: built without teacher(s) {', '.join(missing)}; rerun `mergedistill vocab`")
    changed = changed_files(cfg.vocab_dir, record)
    if changed:
        raise UserError(f"{cfg.vocab_dir}: files do not match its fingerprint.json ({', '.join(changed[:5])}; edited or "
                        f"half-copied?); rerun `{rerun}`")
    try:
        vocab = JointVocab.load(cfg.vocab_dir, list(record["teachers"]))
    except (OSError, ValueError, EOFError) as e:
        raise UserError(f"{cfg.vocab_dir}: unreadable vocabulary ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
                        f"rerun `{rerun}`") from None
    if vocab.fingerprint() != record["vocab"]:
        raise UserError(f"{cfg.vocab_dir}: files do not match its fingerprint.json (edited or half-copied?); rerun `{rerun}`")
    return vocab, record
