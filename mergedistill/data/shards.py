"""Arrow shards of the data stage: what the student needs at masked positions, and nothing else.

One shard = one Arrow stream file (memory-mapped by `datasets.Dataset.from_file`) plus a JSON record
written after it, which marks it complete. Columns, one row per sequence:
  input_ids    (L,)    student ids the student sees (masked), [CLS]/[SEP] included
  positions    (M,)    int16, the masked positions (sorted)
  labels       (M,)    gold student ids at those positions
  topk_ids     (M*k,)  the teacher's top-k at each masked position, as student ids, best first
  topk_logits  (M*k,)  float16, the teacher's logits for them (pruned/special ids excluded before
                       the top-k; -inf pads when fewer than k ids are allowed)
Ids are uint16 when the student vocabulary fits (<= 65,536 tokens), else int32.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa

from mergedistill.errors import UserError
from mergedistill.fsutil import atomic_path, write_json_atomic

SHARD_FORMAT = 1
COLUMNS = ("input_ids", "positions", "labels", "topk_ids", "topk_logits")


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
    dtypes = {"input_ids": ids, "positions": np.int16, "labels": ids, "topk_ids": ids, "topk_logits": np.float16}
    table = pa.table({c: _list_column(rows[c], dtypes[c]) for c in COLUMNS})
    with atomic_path(path) as tmp:
        with pa.OSFile(str(tmp), "wb") as f, pa.ipc.new_stream(f, table.schema) as w:
            w.write_table(table)
        size = tmp.stat().st_size
    write_json_atomic(path.with_suffix(".json"), {**record, "bytes": size, "format": SHARD_FORMAT})
    return size


def shard_record(path: Path) -> dict | None:
    """The record of a complete shard, or None (missing, half-written, or of another format)."""
    rec_path = path.with_suffix(".json")
    if not rec_path.is_file() or not path.is_file():
        return None
    try:
        rec = json.loads(rec_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if rec.get("format") != SHARD_FORMAT or rec.get("bytes") != path.stat().st_size:
        return None
    return rec


def open_shard(path: Path, expect_vocab: str | None = None):
    """A complete shard as a memory-mapped `datasets.Dataset`; refuses one built for another vocabulary."""
    import datasets

    rec = shard_record(path)
    if rec is None:
        raise UserError(f"{path}: not a complete shard; rerun `mergedistill data`")
    if expect_vocab is not None and rec.get("vocab") != expect_vocab:
        raise UserError(f"{path}: built for vocabulary {rec.get('vocab')}, but this run's vocabulary is {expect_vocab}; "
                        "rerun `mergedistill data` to rebuild the shards")
    return datasets.Dataset.from_file(str(path))
