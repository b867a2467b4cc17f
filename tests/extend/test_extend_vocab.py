"""The new language's vocabulary: id maps grown after the old ids, shared keys, padded old tokenizers that
tokenize exactly as before, the ids a language predicts."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from conftest import PROBE_TEXTS, SENTENCES
from mergedistill.config import TeacherConfig
from mergedistill.extend.vocab import (
    emitted_ids,
    grow_idmap,
    grown_vocab,
    inverse_idmap,
    pad_tokenizer_folder,
    predicted_ids,
    unigram_bias,
)
from mergedistill.teachers import load_teacher_tokenizer
from mergedistill.vocab.joint import build_joint_vocab
from mergedistill.vocab.tokenizers import save_student_tokenizer


def test_grow_idmap_keeps_old_ids_shares_keys_and_appends_new_ones():
    old = build_joint_vocab({"a": ["S[PAD]", "S[UNK]", "S[CLS]", "S[SEP]", "S[MASK]", "Wthe", "Cing"]})
    assert old.size == 7
    keys = ["S[CLS]", "S[SEP]", "S[MASK]", "S[PAD]", "S[UNK]", "Wthe", "Wla", "Cing", "Czione", "Wrare"]
    kept = np.array([True] * 9 + [False])
    idmap, new = grow_idmap(old, keys, kept, None, share=True)
    assert idmap.tolist() == [2, 3, 4, 0, 1, 5, 7, 6, 8, -1]  # shared keys map onto their ids; new ones follow, in order
    assert new == ["Wla", "Czione"]
    idmap_ns, new_ns = grow_idmap(old, keys, kept, None, share=False)
    assert idmap_ns[:5].tolist() == [2, 3, 4, 0, 1]  # specials always map onto the student's
    assert idmap_ns[5:9].tolist() == [7, 8, 9, 10] and new_ns == ["Wthe", "Wla", "Cing", "Czione"]
    # a teacher already in the vocabulary keeps the ids it has; what it newly needs is appended
    existing = np.array([2, 3, 4, 0, 1, 5, -1, -1, -1, -1], dtype=np.int32)
    idmap_ex, new_ex = grow_idmap(old, keys, kept, existing, share=True)
    assert idmap_ex.tolist() == [2, 3, 4, 0, 1, 5, 7, 6, 8, -1] and new_ex == ["Wla", "Czione"]
    grown = grown_vocab(old, "src", idmap, new)
    assert grown.size == 9 and grown.keys[:7] == old.keys and grown.teachers == ["a", "src"]
    assert grown.teachers_of(5) == ["a", "src"] and grown.teachers_of(7) == ["src"]


def test_ids_a_language_emits_and_predicts():
    idmap = np.array([2, 3, 4, 0, 1, 9, -1, 7], dtype=np.int32)
    emitted = emitted_ids(idmap, 11)
    assert emitted.nonzero().squeeze(1).tolist() == [0, 1, 2, 3, 4, 7, 9]
    assert predicted_ids(idmap, 11).nonzero().squeeze(1).tolist() == [1, 7, 9]  # [UNK] stays, the other specials go
    inv = inverse_idmap(idmap, 11)
    assert inv[9] == 5 and inv[7] == 7 and inv[2] == 0 and inv[5] == -1


def test_unigram_bias_follows_the_corpus_frequencies_at_the_old_mean():
    idmap = np.array([0, 1, 5, 6, 7], dtype=np.int32)
    counts = np.array([0, 0, 100, 10, 1])
    old_bias = torch.tensor([-2.0, -1.0, 0.0, 1.0, 2.0])
    b = unigram_bias(counts, idmap, np.array([5, 6, 7]), old_bias)
    assert b[0] > b[1] > b[2]
    assert float(b.mean()) == pytest.approx(float(old_bias.mean()), abs=1e-6)


@pytest.mark.parametrize("name", ["wp", "uni", "bbpe", "spbpe"])
def test_padded_old_tokenizers_tokenize_exactly_as_before(tiny_teachers, tmp_path, name):
    t = load_teacher_tokenizer(name, TeacherConfig(path=str(tiny_teachers[name])))
    vocab = build_joint_vocab({name: t.keys()})
    save_student_tokenizer(t, vocab.idmaps[name], vocab.size, tmp_path / "old", {"teacher": name, "student_vocab_size": vocab.size})
    pad_tokenizer_folder(tmp_path / "old", tmp_path / "new", vocab.size + 37)
    old, new = AutoTokenizer.from_pretrained(str(tmp_path / "old")), AutoTokenizer.from_pretrained(str(tmp_path / "new"))
    assert len(new) == len(old) + 37 == vocab.size + 37
    texts = PROBE_TEXTS + [s for sents in SENTENCES.values() for s in sents]
    assert [new(x)["input_ids"] for x in texts] == [old(x)["input_ids"] for x in texts]
    assert json.loads((tmp_path / "new" / "mergedistill.json").read_text())["student_vocab_size"] == vocab.size + 37
