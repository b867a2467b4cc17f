"""Per-teacher tokenizers that tokenize exactly as the teacher does but emit student ids.

The teacher's tokenizer.json is rewritten: every model piece the teacher keeps sits at its student
id, special/added tokens and post-processor ids are remapped, and the student ids this teacher does
not have are filled with placeholders (`<unused 123>`, with spaces, which no input can reach: the
teacher's normalizer and pre-tokenizer never pass a space to its model; checked per teacher). So
the vocabulary has exactly the student's size, `len(tokenizer)` is right, and the folder is a plain
Hugging Face tokenizer: `AutoTokenizer.from_pretrained(folder)` needs no mergedistill code.

Slow (Python-only) teachers of the vocab-file WordPiece family (BertJapaneseTokenizer) get a tokenizer of
their own class whose vocab.txt lists the student's tokens in student-id order (line = id), the teacher's
pieces at their student ids and placeholders elsewhere; its word splitting never yields a space, so the
placeholders are unreachable too.

With pruning, the pieces a teacher does not keep are removed; the tokenizer is then the teacher's
restricted to its kept pieces. On text the teacher splits into kept pieces only (by construction,
all of the corpora pruning scanned) the ids equal the teacher's ids through the id map; other text
falls back to shorter kept pieces, where the teacher+id map would give [UNK] (a BPE or Unigram
model needs one id per distinct piece, so a pruned piece cannot both stay in and emit [UNK]).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from mergedistill.errors import UserError
from mergedistill.teachers import TeacherTokenizer

log = logging.getLogger(__name__)

def placeholder(sid: int) -> str:
    return f"<unused {sid}>"


def check_spaces_unreachable(t: TeacherTokenizer) -> None:
    """Placeholders carry a space; make sure this teacher's model never sees one. Runs the teacher's
    normalizer and pre-tokenizer (in a tokenizer with a one-word model: cheap to build) on a probe."""
    from tokenizers import Tokenizer

    if t.slow:  # whitespace-split words, then pieces of a word: never a space (and vocab.verify checks)
        return
    probe_tj = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "post_processor": None,
        "decoder": None, "normalizer": t.tj.get("normalizer"), "pre_tokenizer": t.tj.get("pre_tokenizer"),
        "model": {"type": "WordLevel", "vocab": {"x": 0}, "unk_token": "x"},
    }
    probe_tok = Tokenizer.from_str(json.dumps(probe_tj))
    probe = "a b\tc  d\u3000e\nf"
    text = probe_tok.normalizer.normalize_str(probe) if probe_tok.normalizer is not None else probe
    pieces = [p for p, _ in probe_tok.pre_tokenizer.pre_tokenize_str(text)] if probe_tok.pre_tokenizer is not None else [text]
    if any(" " in p for p in pieces):
        raise UserError(
            f"teachers.{t.name}: its tokenizer passes spaces to its {t.family.model} model (no whitespace "
            "pre-tokenizer or space replacement), which mergedistill cannot map to student ids yet"
        )


def bpe_merges(tj: dict) -> list[tuple[int, int, int]]:
    """A BPE tokenizer's merges as (left, right, result) teacher ids; [] for other models."""
    model = tj["model"]
    if model["type"] != "BPE":
        return []
    vocab = model["vocab"]
    prefix = model.get("continuing_subword_prefix") or ""
    out = []
    for m in model.get("merges", []):
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        r = _merge_result(a, b, prefix)
        ia, ib, ir = vocab.get(a), vocab.get(b), vocab.get(r)
        if ia is not None and ib is not None and ir is not None:
            out.append((ia, ib, ir))
    return out


def _remap_processor(node, sid: list[int]) -> None:
    """Rewrite special-token ids inside a post-processor tree (Template, Bert, Roberta, Sequence)."""
    if not isinstance(node, dict):
        return
    kind = node.get("type")
    if kind == "TemplateProcessing":
        for spec in node.get("special_tokens", {}).values():
            spec["ids"] = [sid[i] for i in spec["ids"]]
    elif kind in ("BertProcessing", "RobertaProcessing"):
        for key in ("sep", "cls"):
            if key in node:
                node[key] = [node[key][0], sid[node[key][1]]]
    for child in node.get("processors") or []:
        _remap_processor(child, sid)


def _merge_result(a: str, b: str, prefix: str) -> str:
    return a + (b[len(prefix):] if prefix and b.startswith(prefix) else b)


def student_tokenizer_json(t: TeacherTokenizer, idmap: np.ndarray, student_size: int) -> dict:
    """The teacher's tokenizer.json rewritten to emit student ids (see the module docstring)."""
    old_model = t.tj["model"]
    tj = json.loads(json.dumps({k: v for k, v in t.tj.items() if k != "model"}))  # a private copy of the small parts
    model = {k: v for k, v in old_model.items() if k not in ("vocab", "merges")}
    tj["model"] = model
    sid = idmap.tolist()  # teacher id -> student id, -1 if not kept
    if isinstance(old_model["vocab"], dict):  # WordPiece, BPE: token -> id
        vocab = {tok: sid[tid] for tok, tid in old_model["vocab"].items() if sid[tid] >= 0}
        used = np.zeros(student_size, dtype=bool)
        used[list(vocab.values())] = True
        for s in np.flatnonzero(~used).tolist():
            vocab[placeholder(s)] = s
        model["vocab"] = vocab
        if "merges" in old_model:
            prefix = model.get("continuing_subword_prefix") or ""
            merges = []
            for m in old_model["merges"]:
                a, b = m.split(" ", 1) if isinstance(m, str) else m
                if a in vocab and b in vocab and _merge_result(a, b, prefix) in vocab:  # pruning drops the rest
                    merges.append(m)
            model["merges"] = merges
    else:  # Unigram: the position in the list is the id
        pieces = old_model["vocab"]
        # placeholders never match; at the minimum score they also leave the [UNK] score (min - 10) as it was
        min_score = min(score for _, score in pieces)
        new = [[placeholder(s), min_score] for s in range(student_size)]
        for tid, piece in enumerate(pieces):
            if sid[tid] >= 0:
                new[sid[tid]] = piece
        model["vocab"] = new
        if model.get("unk_id") is not None:
            model["unk_id"] = sid[model["unk_id"]]
    for added in tj.get("added_tokens", []):
        added["id"] = sid[added["id"]]
    _remap_processor(tj.get("post_processor"), sid)
    if tj.get("padding"):
        tj["padding"]["pad_id"] = max(sid[tj["padding"].get("pad_id", 0)], 0)
    return tj


def save_student_tokenizer(t: TeacherTokenizer, idmap: np.ndarray, student_size: int, folder: Path, meta: dict) -> None:
    """(Call `check_spaces_unreachable(t)` first.) Write a standard HF tokenizer folder for teacher `t` that emits student ids: tokenizer.json,
    tokenizer_config.json (the generic fast class, so any transformers version loads it without
    mergedistill) and mergedistill.json (provenance: teacher, vocabulary fingerprint, sizes)."""
    if t.slow:
        save_slow_student_tokenizer(t, idmap, student_size, folder, meta)
        return
    tj = student_tokenizer_json(t, idmap, student_size)
    folder.mkdir(parents=True, exist_ok=True)
    # dumps (the C encoder), not dump (pure-Python chunks): several times faster on big vocabularies
    (folder / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False), encoding="utf-8")
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": t.model_max_length,
        "clean_up_tokenization_spaces": False,
        **t.specials,
    }
    if t.extra_specials:
        config["additional_special_tokens"] = t.extra_specials
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (folder / "mergedistill.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def save_slow_student_tokenizer(t: TeacherTokenizer, idmap: np.ndarray, student_size: int, folder: Path, meta: dict) -> None:
    """A slow vocab-file WordPiece teacher's student tokenizer: the teacher's class and settings, with a
    vocab.txt in student ids (the teacher's tokens at their student ids, placeholders elsewhere) and its
    added tokens at their student ids, written by the class's own save_pretrained."""
    import tempfile

    from mergedistill.slow_tokenizers import settings

    hf = t.reference
    sid = idmap.tolist()
    lines = [placeholder(s) for s in range(student_size)]
    for tok, tid in hf.vocab.items():
        if sid[tid] >= 0:
            lines[sid[tid]] = tok
    added = {}
    for tid, tok in hf.added_tokens_decoder.items():
        if tid < len(sid) and sid[tid] >= 0:
            lines[sid[tid]] = str(tok)
            added[sid[tid]] = tok
    kwargs = {k: v for k, v in hf.init_kwargs.items() if k in settings(hf) and k != "backend"}
    kwargs.update({a: getattr(hf, a) for a in ("unk_token", "sep_token", "pad_token", "cls_token", "mask_token", "bos_token",
                                               "eos_token") if getattr(hf, a, None) is not None})
    kwargs["model_max_length"] = t.model_max_length
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        vocab_file = Path(tmp) / "vocab.txt"
        vocab_file.write_text("\n".join(lines) + "\n", encoding="utf-8")
        student = type(hf)(vocab_file=str(vocab_file), added_tokens_decoder=added, **kwargs)
        student.save_pretrained(str(folder))
    (folder / "mergedistill.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
