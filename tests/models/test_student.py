"""Student initialisation: teacher layers (every other one) and embedding rows through the id maps."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForMaskedLM

from conftest import make_config
from mergedistill.cli import main
from mergedistill.config import load_config
from mergedistill.errors import UserError
from mergedistill.models.init import layer_map
from mergedistill.models.student import build_student
from mergedistill.vocab.stage import load_vocab


def test_layer_map_takes_every_other_layer_or_spreads():
    assert layer_map(6, 12) == [0, 2, 4, 6, 8, 10]
    assert layer_map(2, 2) == [0, 1]
    assert layer_map(3, 4) == [0, 2, 3]


@pytest.fixture
def built(workdir, tiny_teachers, tiny_corpora):
    cfg_path = make_config(workdir / "c.yaml", tiny_teachers, tiny_corpora, {"de": "wp", "ru": "uni", "fr": "bbpe"},
                           student={"hidden": 32, "heads": 2, "layers": 1, "intermediate": 64, "max_position": 64},
                           data={"seq_len": 64})  # the student's positions cover the sequences (checked by the config)
    assert main(["vocab", "--config", str(cfg_path)]) == 0
    cfg = load_config(cfg_path)
    return cfg, load_vocab(cfg)[0], {n: AutoModelForMaskedLM.from_pretrained(str(p)) for n, p in tiny_teachers.items()}


def test_embedding_rows_are_the_teachers_rows_averaged_where_shared(built):
    cfg, vocab, teachers = built
    student, info = build_student(cfg, vocab, teachers.__getitem__)
    emb = student.get_input_embeddings().weight.detach()
    sums = torch.zeros_like(emb)
    counts = torch.zeros(vocab.size)
    for name, m in teachers.items():
        idmap = vocab.idmaps[name]
        for tid, sid in enumerate(idmap.tolist()):
            if sid >= 0:
                sums[sid] += m.get_input_embeddings().weight[tid].detach()
                counts[sid] += 1
    shared = int(np.flatnonzero(vocab.provenance == vocab.provenance.max())[0])  # a token of several teachers
    assert counts[shared] > 1
    have = counts > 0
    torch.testing.assert_close(emb[have], sums[have] / counts[have, None])
    assert info["embedding_rows"]["wp"] == len(vocab.idmaps["wp"])


def test_init_from_a_teacher_copies_its_layers(built):
    cfg, vocab, teachers = built
    cfg.student.init = "teacher:wp"
    cfg.student.embeddings_from_teachers = False
    student, info = build_student(cfg, vocab, teachers.__getitem__)
    assert info["layers_from"] == {"wp": [0]}
    s = student.base_model.encoder.layer[0].state_dict()
    t = teachers["wp"].base_model.encoder.layer[0].state_dict()
    assert all(torch.equal(s[k], t[k]) for k in s)
    # a RoBERTa-family teacher's layers fit a BERT student too
    cfg.student.init = "teacher:bbpe"
    student, _ = build_student(cfg, vocab, teachers.__getitem__)
    t = teachers["bbpe"].base_model.encoder.layer[0].state_dict()
    assert all(torch.equal(student.base_model.encoder.layer[0].state_dict()[k], t[k]) for k in t)


def test_init_from_a_teacher_of_another_size_is_refused(built):
    cfg, vocab, teachers = built
    cfg.student.init = "teacher:wp"
    cfg.student.hidden, cfg.student.intermediate = 64, 128
    with pytest.raises(UserError, match="hidden_size"):
        build_student(cfg, vocab, teachers.__getitem__)
