"""Train/valid/test by source document, never by line: a deterministic hash of the document's path.

The path is relative to the language root (`text/swriter/guide/autocorr.html`), so one help page
lands in the same split in every language, which later gives an aligned test set across languages.
"""
from __future__ import annotations

import hashlib
import logging
from typing import Mapping

from mergedistill.errors import UserError

logger = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")
VALID_FRACTION = 0.05
TEST_FRACTION = 0.05


def doc_position(doc: str) -> float:
    """A stable pseudo-random number in [0, 1) for a document path (sha256, independent of language,
    machine and Python's hash seed)."""
    return int.from_bytes(hashlib.sha256(doc.encode("utf-8")).digest()[:8], "big") / 2**64


def split_of(doc: str) -> str:
    """The split a document belongs to: test below TEST_FRACTION, then valid, then train (~90/5/5)."""
    u = doc_position(doc)
    if u < TEST_FRACTION:
        return "test"
    if u < TEST_FRACTION + VALID_FRACTION:
        return "valid"
    return "train"


def fill_empty_splits(assignment: dict[str, str], nonempty: Mapping[str, bool], lang: str) -> dict[str, str]:
    """Make sure valid and test each hold a document with text.

    `assignment` maps doc -> split; `nonempty[doc]` says whether the doc still has paragraphs after
    cleaning. A held-out split without text takes the train document nearest to the held-out range
    (the smallest hash position): deterministic, and the same choice in every language that has the
    same documents. Only tiny corpora ever need this. Raises when there are fewer than
    three documents with text (UserError)."""
    with_text = [d for d in assignment if nonempty.get(d)]
    if len(with_text) < len(SPLITS):
        raise UserError(f"[{lang}] only {len(with_text)} document(s) with text after cleaning; "
                        f"train/valid/test need at least {len(SPLITS)}: add packages for it in "
                        f"mergedistill/corpora/sources.py or leave the language out")
    out = dict(assignment)
    for split in ("valid", "test"):
        if any(out[d] == split for d in with_text):
            continue
        train = sorted((d for d in with_text if out[d] == "train"), key=doc_position)
        if len(train) < 2:  # leave train its own document: take one from the other held-out split
            donors = sorted((d for d in with_text if out[d] != split), key=doc_position)
            counts = {s: sum(out[d] == s for d in with_text) for s in SPLITS}
            train = [d for d in donors if counts[out[d]] > 1]
        moved = train[0]
        logger.warning("[%s] the %s split had no document with text; moved %s there from %s",
                       lang, split, moved, out[moved])
        out[moved] = split
    return out
