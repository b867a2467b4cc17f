"""The student's size from its settings alone, by formula (no model built, no torch import): what the
vocabulary stage reports and warns about. tests/vocab checks it against the built model."""
from __future__ import annotations

from mergedistill.config import RunConfig


def parameter_counts(cfg: RunConfig, vocab_size: int) -> dict[str, int]:
    """The student's parameters, by formula (no model built, no heavy import: the vocabulary stage calls
    it; tests check it against the model): `embeddings` (token embeddings, tied with the output layer,
    and the output bias: (hidden + 1) x vocabulary), `body` (everything else) and `total`."""
    s = cfg.student
    h, i = s.hidden, s.intermediate
    layer = 4 * (h * h + h) + 2 * h + (h * i + i) + (i * h + h) + 2 * h  # q, k, v, out; LN; FF in, out; LN
    body = s.max_position * h + h + 2 * h + s.layers * layer + (h * h + h) + 2 * h  # positions, 1 type, LN; head transform
    emb = vocab_size * (h + 1)
    return {"total": body + emb, "embeddings": emb, "body": body}
