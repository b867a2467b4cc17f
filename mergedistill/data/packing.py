"""Packing tokenized lines into training sequences, as the teacher expects them: `[CLS] a [SEP] b [SEP]`.

Lines (documents or paragraphs) are kept whole: a sequence takes lines while they fit, and a line is
split only when it alone is longer than a sequence. Sequences never cross a shard's line block."""
from __future__ import annotations

import numpy as np


def pack_lines(
    lines: list[list[int]],
    words: list[list[int | None]] | None,
    seq_len: int,
    cls_id: int,
    sep_id: int,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Greedy packing. lines: teacher ids per line (no specials); words: the word index of each token
    within its line (None for tokens outside words), or None.
    Returns (ids, word_ids) per sequence: int64 arrays of equal length <= seq_len; word_ids are unique
    within a sequence, -1 at [CLS]/[SEP] and tokens outside words."""
    if seq_len < 3:
        raise ValueError(f"seq_len must be at least 3, got {seq_len}")
    room = seq_len - 2  # [CLS] and the final [SEP]
    out: list[tuple[np.ndarray, np.ndarray]] = []
    cur_ids: list[int] = []
    cur_words: list[int] = []
    next_word = 0

    def flush() -> None:
        nonlocal cur_ids, cur_words, next_word
        if cur_ids:
            ids = np.array([cls_id] + cur_ids + [sep_id], dtype=np.int64)
            wid = np.array([-1] + cur_words + [-1], dtype=np.int64)
            out.append((ids, wid))
        cur_ids, cur_words, next_word = [], [], 0

    for li, ids in enumerate(lines):
        if not ids:
            continue
        w = words[li] if words is not None else [None] * len(ids)
        # split a line longer than a whole sequence into chunks that each fill one
        chunks = [(ids[i:i + room], w[i:i + room]) for i in range(0, len(ids), room)] if len(ids) > room else [(ids, w)]
        for c_ids, c_w in chunks:
            need = len(c_ids) + (1 if cur_ids else 0)  # a [SEP] between lines
            if cur_ids and len(cur_ids) + need > room:
                flush()
                need = len(c_ids)
            if cur_ids:
                cur_ids.append(sep_id)
                cur_words.append(-1)
            base = next_word
            top = -1
            for tok, wi in zip(c_ids, c_w):
                cur_ids.append(tok)
                if wi is None:
                    cur_words.append(-1)
                else:
                    cur_words.append(base + wi)
                    top = max(top, base + wi)
            next_word = top + 1 if top >= 0 else next_word
            if len(c_ids) == room:
                flush()
    flush()
    return out
