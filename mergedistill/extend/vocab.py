"""The new language's vocabulary: which tokens of its tokenizer the student already has and which get new
rows, the grown joint vocabulary, the ids each language predicts, and the tokenizer folders.

The tokenizer is a teacher's or one trained on the language's corpus; either way it is read as a
`TeacherTokenizer` (canonical keys, tokens.py) and turned into a standard HF folder that emits student
ids by the vocabulary stage's own code (`vocab.tokenizers.save_student_tokenizer`). Old ids never move:
new tokens take ids from the old vocabulary size on, and the old languages' tokenizers are copied with
placeholders for the new ids only, so they tokenize exactly as before.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from mergedistill.tokens import CLS_ID, MASK_ID, PAD_ID, SEP_ID
from mergedistill.vocab.joint import JointVocab, _provenance
from mergedistill.vocab.tokenizers import placeholder


def grow_idmap(vocab: JointVocab, keys: list[str], kept: np.ndarray, existing: np.ndarray | None,
               share: bool) -> tuple[np.ndarray, list[str]]:
    """The new language's tokenizer on the student vocabulary.

    keys: canonical key of each of its ids; kept: (len(keys),) bool, the tokens it needs; existing: its
    id map in `vocab` when it is already one of the vocabulary's teachers (those ids stay); share: a kept
    token whose key the vocabulary has maps onto that token. Specials always map onto the student's.
    Returns (id map: its id -> student id, -1 where not kept; the keys of the new student ids, which
    follow the old ones in this order)."""
    index = {k: i for i, k in enumerate(vocab.keys)}
    new: dict[str, int] = {}
    idmap = np.full(len(keys), -1, dtype=np.int32)
    for i, (key, keep) in enumerate(zip(keys, kept.tolist())):
        if existing is not None and i < len(existing) and existing[i] >= 0:
            idmap[i] = existing[i]
        elif not keep:
            continue
        elif key in index and (share or key[0] == "S"):
            idmap[i] = index[key]
        else:
            idmap[i] = new.setdefault(key, vocab.size + len(new))
    return idmap, list(new)


def grown_vocab(vocab: JointVocab, source: str, idmap: np.ndarray, new_keys: list[str]) -> JointVocab:
    """`vocab` with `new_keys` appended and `source` (the new language's tokenizer) among its teachers
    with `idmap` (replacing its old map when it was one already)."""
    keys = list(vocab.keys) + list(new_keys)
    teachers = list(vocab.teachers) + ([source] if source not in vocab.teachers else [])
    idmaps = {**vocab.idmaps, source: idmap.astype(np.int32)}
    return JointVocab(keys=keys, teachers=teachers, idmaps=idmaps, provenance=_provenance(len(keys), teachers, idmaps))


def emitted_ids(idmap: np.ndarray, size: int) -> torch.Tensor:
    """(size,) bool: the student ids a tokenizer with this id map can emit (its kept tokens)."""
    ok = torch.zeros(size, dtype=torch.bool)
    ids = idmap[idmap >= 0]
    ok[torch.from_numpy(ids.astype(np.int64))] = True
    return ok


def predicted_ids(idmap: np.ndarray, size: int) -> torch.Tensor:
    """(size,) bool: what the language's predictions range over: its tokens, without [PAD] [CLS] [SEP]
    [MASK] (never a masked token; [UNK] stays, the tokenizer emits it)."""
    ok = emitted_ids(idmap, size)
    ok[[PAD_ID, CLS_ID, SEP_ID, MASK_ID]] = False
    return ok


def inverse_idmap(idmap: np.ndarray, size: int) -> np.ndarray:
    """(size,) int64: student id -> the tokenizer's id (-1 where it has none); where several of its ids
    map onto one student id (specials), the first."""
    inv = np.full(size, -1, dtype=np.int64)
    for tid in range(len(idmap) - 1, -1, -1):
        if idmap[tid] >= 0:
            inv[idmap[tid]] = tid
    return inv


def pad_tokenizer_json(tj: dict, new_size: int) -> dict:
    """A student tokenizer.json (one that emits student ids, with placeholders for the ids it lacks)
    for a vocabulary grown to `new_size`: placeholders for the new ids, nothing else touched, so it
    tokenizes exactly as before."""
    tj = json.loads(json.dumps(tj))
    vocab = tj["model"]["vocab"]
    if isinstance(vocab, dict):
        top = max(vocab.values()) + 1
        for sid in range(top, new_size):
            vocab[placeholder(sid)] = sid
    else:  # Unigram: position = id; placeholders at the lowest score never match
        low = min(score for _, score in vocab)
        vocab += [[placeholder(sid), low] for sid in range(len(vocab), new_size)]
    return tj


def pad_tokenizer_folder(src: Path, dst: Path, new_size: int) -> None:
    """Copy a student tokenizer folder, its tokenizer.json padded to `new_size` ids."""
    import shutil

    shutil.copytree(src, dst)
    tj = json.loads((src / "tokenizer.json").read_text(encoding="utf-8"))
    (dst / "tokenizer.json").write_text(json.dumps(pad_tokenizer_json(tj, new_size), ensure_ascii=False), encoding="utf-8")
    meta_path = dst / "mergedistill.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        meta["student_vocab_size"] = new_size
        meta_path.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def unigram_bias(counts: np.ndarray, idmap: np.ndarray, new_ids: np.ndarray, old_bias: torch.Tensor) -> torch.Tensor:
    """Starting output bias of new ids: the log frequency of their token in the new language's corpus
    (add-one smoothed over its tokens), shifted so that the new tokens' mean equals the old bias's mean,
    so they start at the unigram model rather than all equal. counts: per id of the tokenizer."""
    n_tok = len(idmap)
    logp = np.log((counts[:n_tok].astype(np.float64) + 1.0) / (counts[:n_tok].sum() + n_tok))
    inv = {int(s): t for t, s in enumerate(idmap.tolist()) if s >= 0}
    vals = np.array([logp[inv[int(s)]] for s in new_ids.tolist()], dtype=np.float64)
    if len(vals) == 0:
        return old_bias.new_zeros(0)
    vals = vals - vals.mean() + float(old_bias.float().mean())
    return torch.tensor(vals, dtype=old_bias.dtype)
