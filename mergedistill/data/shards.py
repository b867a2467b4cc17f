"""Arrow shards of the data stage: what the student needs at masked positions, and nothing else.

One shard = one Arrow stream file (memory-mapped by `datasets.Dataset.from_file`) plus a JSON record
written after it, which marks it complete. Columns, one row per sequence:
  input_ids    (L,)    student ids the student sees (masked), [CLS]/[SEP] included
  positions    (M,)    int16, the masked positions (sorted)
  labels       (M,)    gold student ids at those positions
  kd_positions (E,)    int16, unmasked positions also labelled by the teacher (data.unmasked_kd_prob;
                       sorted, disjoint from `positions`): distillation only, no MLM target
  topk_ids     ((M+E)*k,)  the teacher's top-k at each labelled position (masked and kd_positions, in
                       position order), as student ids, best first
  topk_logits  ((M+E)*k,)  float16, the teacher's logits for them (pruned/special ids excluded before
                       the top-k; -inf pads when fewer than k ids are allowed)
  topk_lse     ((M+E)*T,)  float32, the teacher's logsumexp(logits / t) over the allowed ids at each of the
                       record's `lse_temperatures` t: exp(logit / t - lse) is its exact probability
Ids are uint16 when the student vocabulary fits (<= 65,536 tokens), else int32.

The record holds the shard's byte size and the sha256 of its content. A shard is complete when both
exist and the size matches; it is intact when its content still has that hash, which `open_shard`
checks before the train stage reads it (and the data stage before it trusts or reuses a shard), so
a shard changed after it was written is refused, naming the file, instead of training on it.
Hashing reads the file once (~650 MB/s per core here; `benchmarks/bench_shard_hash.py` measures it
against building and opening the shards).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa

from mergedistill.errors import UserError
from mergedistill.fsutil import atomic_path, sha256_file, write_json_atomic

SHARD_FORMAT = 3
"""2: the record holds the shard's sha256; 3: kd_positions and topk_lse (the teacher's exact probabilities)."""
COLUMNS = ("input_ids", "positions", "labels", "kd_positions", "topk_ids", "topk_logits", "topk_lse")


def id_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.int32)


def _list_column(arrays: list[np.ndarray], dtype) -> pa.ListArray:
    lengths = np.fromiter((len(a) for a in arrays), dtype=np.int64, count=len(arrays))
    offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    if offsets[-1] > np.iinfo(np.int32).max:
        raise ValueError("shard too large for 32-bit offsets: lower data.shard_lines")
    values = np.concatenate(arrays).astype(dtype, copy=False) if arrays else np.zeros(0, dtype)
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values))


def write_shard(path: Path, rows: dict[str, list[np.ndarray]], ids: np.dtype, record: dict) -> int:
    """Write `path` (.arrow) and its record (.json) atomically, the record last. Returns bytes written."""
    dtypes = {"input_ids": ids, "positions": np.int16, "labels": ids, "kd_positions": np.int16, "topk_ids": ids,
              "topk_logits": np.float16, "topk_lse": np.float32}
    table = pa.table({c: _list_column(rows[c], dtypes[c]) for c in COLUMNS})
    with atomic_path(path) as tmp:
        with pa.OSFile(str(tmp), "wb") as f, pa.ipc.new_stream(f, table.schema) as w:
            w.write_table(table)
        size = tmp.stat().st_size
        digest = content_hash(tmp)
    write_json_atomic(path.with_suffix(".json"), {**record, "bytes": size, "sha256": digest, "format": SHARD_FORMAT})
    return size


_HASHES: dict[tuple, str] = {}  # (device, inode, size, mtime) -> sha256: a file is hashed once per process


def content_hash(path: Path) -> str:
    st = os.stat(path)
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        _HASHES[key] = sha256_file(path)
    return _HASHES[key]


def read_record(path: Path) -> dict | None:
    """The record of a complete shard (record and file present, sizes matching, this format), or None."""
    rec_path = path.with_suffix(".json")
    if not rec_path.is_file() or not path.is_file():
        return None
    try:
        rec = json.loads(rec_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(rec, dict) or rec.get("format") != SHARD_FORMAT or rec.get("bytes") != path.stat().st_size:
        return None
    return rec


def _format_of(path: Path):
    """The `format` a shard's record states, whatever it is (None when there is no readable record)."""
    try:
        rec = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return rec.get("format") if isinstance(rec, dict) else None


def is_intact(path: Path, rec: dict) -> bool:
    """Whether the shard's content still has the hash its record was written with."""
    return content_hash(path) == rec.get("sha256")


def shard_record(path: Path) -> dict | None:
    """The record of a complete, intact shard, or None (missing, half-written, of another format, or
    changed since it was written)."""
    rec = read_record(path)
    return rec if rec is not None and is_intact(path, rec) else None


def corrupt_message(path: Path) -> str:
    return (f"{path}: corrupt shard: its content does not match the sha256 in {path.with_suffix('.json').name} "
            "(changed after it was written); rerun `mergedistill data` to rebuild it")


def open_shard(path: Path, expect_vocab: str | None = None):
    """A complete, intact shard as a memory-mapped `datasets.Dataset`; refuses one built for another
    vocabulary or changed since it was written."""
    import datasets

    rec = read_record(path)
    if rec is None:
        old = _format_of(path)
        if old is not None and old != SHARD_FORMAT:
            raise UserError(f"{path}: shard format {old}, written by an older mergedistill; this version reads format "
                            f"{SHARD_FORMAT} (the teacher's exact probabilities): rerun `mergedistill data` to rebuild the shards")
        raise UserError(f"{path}: not a complete shard; rerun `mergedistill data`")
    if expect_vocab is not None and rec.get("vocab") != expect_vocab:
        raise UserError(f"{path}: built for vocabulary {rec.get('vocab')}, but this run's vocabulary is {expect_vocab}; "
                        "rerun `mergedistill data` to rebuild the shards")
    if not is_intact(path, rec):
        raise UserError(corrupt_message(path))
    return datasets.Dataset.from_file(str(path))
