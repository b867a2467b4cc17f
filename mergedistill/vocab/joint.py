"""The joint student vocabulary: the union of the teachers' vocabularies by canonical key (tokens.py),
with one id map per teacher (teacher id -> student id, int32, -1 where the token was pruned).

Student ids 0..4 are [PAD] [UNK] [CLS] [SEP] [MASK]; the teachers' own special tokens map onto them.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mergedistill.tokens import ROLES, UNK_ID, display, key_payload_len

VOCAB_FORMAT = 1


@dataclass
class JointVocab:
    keys: list[str]
    """Student id -> canonical key."""
    teachers: list[str]
    """Teacher names, in config order (bit t of `provenance` is teacher t)."""
    idmaps: dict[str, np.ndarray]
    """Teacher -> int32 array over teacher ids: student id, or -1 where the token was pruned."""
    provenance: np.ndarray = field(repr=False)
    """int64 bitmask per student token: which teachers map a token onto it."""

    @property
    def size(self) -> int:
        return len(self.keys)

    def student_ids(self, teacher: str, teacher_ids: np.ndarray) -> np.ndarray:
        """Teacher ids -> student ids, pruned tokens becoming [UNK]."""
        out = self.idmaps[teacher][np.asarray(teacher_ids)]
        return np.where(out < 0, UNK_ID, out).astype(np.int64)

    def producible_ids(self, teacher: str) -> np.ndarray:
        """Student ids that `teacher`'s student tokenizer can write for a text, sorted (int32): the tokens
        it keeps, specials excluded. A language read with that tokenizer predicts among these: the other
        ids are other teachers' tokens, placeholders no text reaches, or specials."""
        m = self.idmaps[teacher]
        ids = np.unique(m[m >= 0])
        special = np.fromiter((k[0] == "S" for k in self.keys), dtype=bool, count=self.size)
        return ids[~special[ids]].astype(np.int32)

    def tokens(self) -> list[str]:
        return [display(k) for k in self.keys]

    def teachers_of(self, sid: int) -> list[str]:
        bits = int(self.provenance[sid])
        return [t for i, t in enumerate(self.teachers) if bits >> i & 1]

    def overlap(self) -> np.ndarray:
        """(T, T) token counts shared by each pair of teachers (diagonal: each teacher's own)."""
        n = len(self.teachers)
        out = np.zeros((n, n), dtype=np.int64)
        bits = [(self.provenance >> i) & 1 for i in range(n)]
        for i in range(n):
            for j in range(n):
                out[i, j] = int(np.count_nonzero(bits[i] & bits[j]))
        return out

    def fingerprint(self) -> str:
        h = hashlib.sha256(f"mergedistill-vocab-{VOCAB_FORMAT}".encode())
        h.update("\x00".join(self.keys).encode("utf-8", "surrogatepass"))
        for name in self.teachers:
            h.update(name.encode())
            h.update(np.ascontiguousarray(self.idmaps[name], dtype=np.int32).tobytes())
        return h.hexdigest()[:16]

    # ---- storage ----------------------------------------------------------------------------------
    def save(self, folder: str | Path) -> None:
        """vocab.parquet (id, token, key, teachers), vocab.txt (display tokens, line = id),
        idmaps/<teacher>.npy (int32)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        folder = Path(folder)
        (folder / "idmaps").mkdir(parents=True, exist_ok=True)
        tokens = self.tokens()
        names: dict[int, str] = {}  # few distinct bitmasks: name each once
        for bits in np.unique(self.provenance).tolist():
            names[bits] = ",".join(t for i, t in enumerate(self.teachers) if bits >> i & 1)
        prov_str = [names[b] for b in self.provenance.tolist()]
        table = pa.table({
            "id": pa.array(np.arange(self.size, dtype=np.int32)),
            "token": pa.array(tokens, pa.string()),
            "key": pa.array(self.keys, pa.string()),
            "teachers": pa.array(prov_str, pa.string()),
        })
        pq.write_table(table, folder / "vocab.parquet")
        with open(folder / "vocab.txt", "w", encoding="utf-8", errors="surrogatepass") as f:
            f.write("\n".join(_escape_line(t) for t in tokens))
            f.write("\n")
        for name, m in self.idmaps.items():
            np.save(folder / "idmaps" / f"{name}.npy", m.astype(np.int32))

    @classmethod
    def load(cls, folder: str | Path, teachers: list[str]) -> "JointVocab":
        import pyarrow.parquet as pq

        folder = Path(folder)
        table = pq.read_table(folder / "vocab.parquet", columns=["key"])
        keys = table.column("key").to_pylist()
        idmaps = {t: np.load(folder / "idmaps" / f"{t}.npy") for t in teachers}
        return cls(keys=keys, teachers=list(teachers), idmaps=idmaps, provenance=_provenance(len(keys), teachers, idmaps))


def _escape_line(token: str) -> str:
    if token.isprintable():
        return token
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in token)


def _provenance(size: int, teachers: list[str], idmaps: dict[str, np.ndarray]) -> np.ndarray:
    prov = np.zeros(size, dtype=np.int64)
    for t, name in enumerate(teachers):
        m = idmaps[name]
        prov[m[m >= 0]] |= 1 << t
    return prov


def build_joint_vocab(teacher_keys: dict[str, list[str]], kept: dict[str, np.ndarray] | None = None) -> JointVocab:
    """Union of the teachers' tokens by canonical key. `kept[t]` (bool per teacher id) restricts
    teacher t to the tokens it keeps; the others get -1 in its id map."""
    index: dict[str, int] = {"S" + r: i for i, r in enumerate(ROLES)}  # insertion order = student id
    idmaps: dict[str, np.ndarray] = {}
    for name, tkeys in teacher_keys.items():
        mask = kept[name] if kept is not None else None
        if mask is None:
            sids = [index.setdefault(k, len(index)) for k in tkeys]
        else:
            sids = [index.setdefault(k, len(index)) if keep else -1 for k, keep in zip(tkeys, mask.tolist())]
        idmaps[name] = np.array(sids, dtype=np.int32)
    keys = list(index)
    teachers = list(teacher_keys)
    return JointVocab(keys=keys, teachers=teachers, idmaps=idmaps, provenance=_provenance(len(keys), teachers, idmaps))


def kept_tokens(
    keys: list[str], counts: np.ndarray | None, keep_single_chars: bool, merges: list[tuple[int, int, int]] | None
) -> np.ndarray:
    """Which of a teacher's tokens survive pruning: specials and added tokens, those it produced on
    its corpora (`counts` > 0), optionally every single-character piece, and, for BPE, every piece
    a kept piece is merged from (so the restricted tokenizer reproduces the teacher's merges).
    `merges`: BPE merges as (left, right, result) teacher ids; `keys` are indexed by teacher id."""
    n = len(keys)
    kept = np.zeros(n, dtype=bool)
    if counts is not None:
        kept[: len(counts)] |= counts[:n] > 0
    for i, k in enumerate(keys):
        if k[0] in "SA" or (keep_single_chars and key_payload_len(k) <= 1):
            kept[i] = True
    return kept if not merges else _merge_closure(kept, merges)


def _merge_closure(kept: np.ndarray, merges_ids: list[tuple[int, int, int]]) -> np.ndarray:
    """Add the parts of every kept BPE piece, transitively. merges_ids: (left, right, result) ids."""
    parts: dict[int, tuple[int, int]] = {}
    for a, b, r in merges_ids:
        parts.setdefault(r, (a, b))
    stack = [i for i in np.flatnonzero(kept).tolist() if i in parts]
    kept = kept.copy()
    while stack:
        a, b = parts[stack.pop()]
        for p in (a, b):
            if not kept[p]:
                kept[p] = True
                if p in parts:
                    stack.append(p)
    return kept
