"""Checking each student tokenizer against its teacher, loaded the way a user loads both: the teacher's
AutoTokenizer (the reference) followed by the id map must give exactly the ids that AutoTokenizer of the
student folder gives, on a sample of every corpus routed to the teacher; and the student tokenizer must
have exactly the student's vocabulary size, no added token outside it."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from mergedistill.config import RunConfig
from mergedistill.corpus import SAMPLE_POOL, iter_lines, spread_subset
from mergedistill.teachers import TeacherTokenizer
from mergedistill.tokens import UNK_ID


def samples(cfg: RunConfig, teacher: str) -> list[tuple[str, int, str]]:
    """(corpus field, position among its non-blank texts, text) drawn from the train split of every language
    whose corpora the teacher's tokens were kept for: the routed ones (and, with vocab.prune_candidates,
    those naming it as a candidate). With pruning, only from the lines the pruning scan of this teacher
    read (vocab.max_lines, capped by the teacher's max_lines)."""
    n = cfg.vocab.verify_lines
    if n <= 0:
        return []
    cap = (cfg.prune_lines_of(teacher) if cfg.vocab.prune else None) or SAMPLE_POOL
    out = []
    for lang, lc in cfg.languages.items():
        uses = cfg.teacher_of(lang) == teacher or (cfg.vocab.prune_candidates and teacher in lc.candidates)
        if not uses:
            continue
        where = f"languages.{lang}.train"
        texts = list(enumerate(iter_lines(lc.train, where, cap), 1))
        out += [(where, i, text) for i, text in spread_subset(texts, n, seed=0)]
    return out


def _window(tokens: list[str], at: int) -> str:
    lo = max(0, at - 4)
    return ("... " if lo else "") + " ".join(tokens[lo:at + 6]) + (" ..." if at + 6 < len(tokens) else "")


def check_student_tokenizer(t: TeacherTokenizer, folder: Path, idmap: np.ndarray, size: int,
                            lines: list[tuple[str, int, str]]) -> str | None:
    """The first way the student tokenizer in `folder` differs from teacher `t` + `idmap`, or None."""
    from transformers import AutoTokenizer

    student = AutoTokenizer.from_pretrained(str(folder))
    where = f"teachers.{t.name}"
    if len(student) != size:
        extra = sorted(i for i in student.get_added_vocab().values() if i >= size)
        return (f"{where}: its student tokenizer has {len(student):,} tokens, the student vocabulary {size:,}"
                + (f" (added tokens outside it: {student.convert_ids_to_tokens(extra[:5])})" if extra else ""))
    ref = t.reference
    for field, k, text in lines:
        # one text per call: batch calls start the tokenizers thread pool, which a later fork must not inherit
        t_ids = np.asarray(ref(text, verbose=False)["input_ids"], dtype=np.int64)
        mapped = idmap[t_ids] if len(t_ids) else t_ids
        expected = np.where(mapped < 0, UNK_ID, mapped).tolist()
        got = student(text, verbose=False)["input_ids"]
        if got != expected:
            at = next((i for i, (a, b) in enumerate(zip(expected, got)) if a != b), min(len(expected), len(got)))
            return (f"{where}: its student tokenizer does not tokenize {field} text #{k} as the teacher does "
                    f"(AutoTokenizer of {t.source!r} + the id map), from token {at} on:\n"
                    f"      text:    {text[:300]!r}\n"
                    f"      teacher: {_window(student.convert_ids_to_tokens(expected), at)}\n"
                    f"      student: {_window(student.convert_ids_to_tokens(got), at)}\n"
                    f"    mergedistill cannot yet reproduce this {type(ref).__name__} ({t.family.name}) exactly; "
                    "please report it with the teacher's tokenizer files, and route its languages to another teacher meanwhile")
    return None
