"""vocab on real, widely used vocabularies (slow): XLM-R's 250k SentencePiece unigram, bert-base-uncased's
WordPiece and a 500k cased Romanian WordPiece, materialized from packages by the shared tool
real_tokenizers.py (see ../shared/ASSETS.md). Set MERGEDISTILL_REAL_TOKENIZERS to a folder holding them
(or to where they may be materialized); benchmarks/.assets is used when the benchmark made them."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from conftest import PROBE_TEXTS, make_config
from mergedistill.cli import main
from mergedistill.config import load_config
from mergedistill.vocab.stage import load_vocab

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT.parent / "shared" / "tools" / "real_tokenizers.py"
NAMES = {"xlmr": "xlm-roberta", "bert": "bert-base-uncased", "ro": "romanian-wordpiece"}
TEXTS = {
    "en": ["The committee approved the new budget after a long debate.", "Tokenizers split words into smaller pieces.",
           "UNBELIEVABLE results: naïve café owners didn't expect it!"],
    "ro": ["Comitetul a aprobat noul buget după o dezbatere lungă.", "Școala își deschide porțile în septembrie.",
           "Bună ziua, ce mai faceți? ășțâî ĂȘȚÂÎ"],
    "de": ["Der Ausschuss hat den neuen Haushalt nach langer Debatte gebilligt.", "Grüße aus Köln!", "Straße, Maß und Fuß."],
    "xx": [t for t in PROBE_TEXTS if t.strip()],  # every script, routed to XLM-R
}


@pytest.fixture(scope="module")
def real(tmp_path_factory) -> dict[str, Path]:
    folder = Path(os.environ.get("MERGEDISTILL_REAL_TOKENIZERS") or ROOT / "benchmarks" / ".assets")
    missing = [d for d in NAMES.values() if not (folder / d / "tokenizer.json").is_file()]
    if missing:
        if not TOOL.is_file():
            pytest.skip(f"real tokenizers not in {folder} and no {TOOL} to materialize them")
        done = subprocess.run([sys.executable, str(TOOL), str(folder), *missing], capture_output=True, text=True)
        if done.returncode:
            pytest.skip(f"could not materialize the real tokenizers (no package index?): {done.stderr[-300:]}")
    return {n: folder / d for n, d in NAMES.items()}


@pytest.mark.slow
@pytest.mark.parametrize("prune", [False, True])
def test_real_vocabularies_round_trip(real, workdir, prune):
    corpora = {}
    for lang, lines in TEXTS.items():
        corpora[lang] = workdir / f"{lang}.txt"
        corpora[lang].write_text("\n".join(lines) + "\n", encoding="utf-8")
    routing = {"en": "bert", "ro": "ro", "de": "xlmr", "xx": "xlmr"}
    cfg_path = make_config(workdir / "c.yaml", real, corpora, routing, vocab={"prune": prune, "keep_single_chars": False})
    assert main(["vocab", "--config", str(cfg_path)]) == 0  # includes the check on every routed text
    vocab, _ = load_vocab(load_config(cfg_path))
    for name, folder in real.items():
        teacher = AutoTokenizer.from_pretrained(str(folder))
        student = AutoTokenizer.from_pretrained(str(workdir / "vocab/t/tokenizers" / name))
        assert len(student) == vocab.size
        # pruned: exact on the corpus lines pruning scanned (a text with a newline is two lines there)
        texts = ([line for lang in TEXTS if routing[lang] == name for line in corpora[lang].read_text(encoding="utf-8").splitlines()]
                 if prune else sum(TEXTS.values(), []))
        for text in texts:
            expected = vocab.student_ids(name, np.array(teacher(text)["input_ids"])).tolist()
            assert student(text)["input_ids"] == expected, (name, text)
