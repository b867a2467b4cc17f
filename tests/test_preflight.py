"""Settings checked against the teachers' model configs before a stage starts."""
from __future__ import annotations

import pytest

from conftest import make_config
from mergedistill.config import load_config
from mergedistill.errors import UserError
from mergedistill.preflight import preflight

STUDENT = {"hidden": 32, "heads": 2, "layers": 2, "intermediate": 64, "max_position": 128}


def _cfg(workdir, teachers, corpora, routing, overrides=(), **sections):
    return load_config(make_config(workdir / "c.yaml", teachers, corpora, routing, **sections), list(overrides))


def test_a_config_that_fits_passes_and_vocab_checks_nothing_here(workdir, tiny_teachers, tiny_corpora):
    cfg = _cfg(workdir, tiny_teachers, tiny_corpora, {"de": "wp"}, data={"seq_len": 64}, student={**STUDENT, "init": "teacher:wp"})
    for stage in ("vocab", "data", "train", "run", "ablate", "evaluate"):
        preflight(cfg, stage)
    bad = _cfg(workdir, tiny_teachers, tiny_corpora, {"de": "wp"}, data={"seq_len": 65}, student=STUDENT)
    preflight(bad, "vocab")  # the vocabulary does not depend on positions
    with pytest.raises(UserError, match="data.seq_len: 65 tokens per sequence, but teacher wp accepts at most 64"):
        preflight(bad, "data")


def test_roberta_style_positions_count_from_the_padding_id(workdir, tiny_teachers, hub_teachers, tiny_corpora):
    """CamemBERT's table has 66 rows, numbered from pad + 1 = 2: 64 usable positions."""
    cfg = _cfg(workdir, {**tiny_teachers, **hub_teachers}, tiny_corpora, {"fr": "camembert"}, data={"seq_len": 64}, student=STUDENT)
    preflight(cfg, "run")
    with pytest.raises(UserError, match="teacher camembert accepts at most 64 .max_position_embeddings 66."):
        preflight(_cfg(workdir, {**tiny_teachers, **hub_teachers}, tiny_corpora, {"fr": "camembert"}, data={"seq_len": 65},
                       student=STUDENT), "run")


def test_init_from_a_teacher_whose_layers_do_not_load_is_refused(workdir, tiny_teachers, hub_teachers, tiny_corpora):
    cfg = _cfg(workdir, {**tiny_teachers, **hub_teachers}, tiny_corpora, {"pl": "albert"}, data={"seq_len": 32},
               student={**STUDENT, "init": "teacher:albert"})
    with pytest.raises(UserError) as e:
        preflight(cfg, "train")
    assert "student.init: teacher:albert is a albert model, whose layers do not load into the BERT student" in e.value.render()


def test_embedding_widths_that_differ_are_named(workdir, tiny_teachers, hub_teachers, tiny_corpora, caplog):
    caplog.set_level("WARNING")
    teachers = {"wp": tiny_teachers["wp"], "albert": hub_teachers["albert"]}
    preflight(_cfg(workdir, teachers, tiny_corpora, {"de": "wp"}, data={"seq_len": 32}, student=STUDENT), "train")
    assert "student.embeddings_from_teachers: albert embedding rows are 16 wide, the student's 32: not copied" in caplog.text
    caplog.clear()
    preflight(_cfg(workdir, teachers, tiny_corpora, {"de": "wp"}, data={"seq_len": 32}, student={**STUDENT, "hidden": 64}), "train")
    assert "albert, wp embedding rows are 16/32 wide, the student's 64" in caplog.text and "every row starts random" in caplog.text
    caplog.clear()
    preflight(_cfg(workdir, teachers, tiny_corpora, {"de": "wp"}, data={"seq_len": 32},
                   student={**STUDENT, "embeddings_from_teachers": False}), "train")
    assert "embedding rows" not in caplog.text
