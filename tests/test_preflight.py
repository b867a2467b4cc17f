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


def test_a_top_k_beyond_a_teachers_vocabulary_is_refused_before_any_work(workdir, tiny_teachers, tiny_corpora, capsys):
    """`mergedistill data --data.top_k=10000000` was killed by the kernel (exit 137) while labelling: refused
    at once, naming the field, the teacher and its limit."""
    from transformers import AutoConfig

    from mergedistill.cli import main

    v = AutoConfig.from_pretrained(str(tiny_teachers["wp"])).vocab_size
    cfg = _cfg(workdir, tiny_teachers, tiny_corpora, {"de": "wp"}, ["--data.top_k=10000000"], data={"seq_len": 32})
    preflight(cfg, "vocab")  # the vocabulary does not depend on k
    for stage in ("data", "train", "run"):
        with pytest.raises(UserError, match=rf"data.top_k: 10,000,000 predictions per labelled position, but teacher wp has "
                                            rf"{v:,} ids \(vocab_size\); set data.top_k to at most {v:,}"):
            preflight(cfg, stage)
    preflight(_cfg(workdir, tiny_teachers, tiny_corpora, {"de": "wp"}, [f"--data.top_k={v}"], data={"seq_len": 32}), "data")
    assert main(["data", "--config", str(workdir / "c.yaml"), "--data.top_k=10000000"]) == 2
    err = capsys.readouterr().err
    assert "data.top_k: 10,000,000 predictions" in err and "nothing was run" in err and "Traceback" not in err
    assert not (workdir / "runs").exists() and not (workdir / "vocab").exists()


def test_a_top_k_whose_shards_would_not_fit_in_memory_is_refused(workdir, tiny_teachers, tiny_corpora, monkeypatch):
    """Below the vocabulary's size, k still multiplies every labelled position of a shard: estimated from the
    corpus against the machine's memory (here a machine of 1 kB, and the check on from k = 1)."""
    import mergedistill.preflight as pf

    cfg = _cfg(workdir, tiny_teachers, tiny_corpora, {"de": "wp"}, ["--data.top_k=8", "--data.workers=2"], data={"seq_len": 32})
    preflight(cfg, "data")  # k = 8 is below MEMORY_CHECK_K: not estimated
    monkeypatch.setattr(pf, "MEMORY_CHECK_K", 1)
    preflight(cfg, "data")  # this machine has the memory
    monkeypatch.setattr(pf, "physical_memory", lambda: 1000)
    with pytest.raises(UserError) as e:
        preflight(cfg, "data")
    msg = e.value.render()
    assert "data.top_k: 8 predictions per labelled position need more memory than this machine has: a shard of" in msg
    assert "lines of languages.de.train (data.shard_lines)" in msg and "x 2 workers (data.workers)" in msg
    assert "against 0.0 GB of RAM; lower data.top_k" in msg
    preflight(cfg, "vocab")


def test_relation_settings_are_checked_against_every_routed_teacher(workdir, tiny_teachers, tiny_corpora):
    """train.relation_teacher_layer was checked only once training started (after vocab and data in a `run`)."""
    from transformers import AutoConfig

    n = AutoConfig.from_pretrained(str(tiny_teachers["wp"])).num_hidden_layers
    online = ["--train.relation_weight=1", "--train.mode=online"]
    cfg = _cfg(workdir, tiny_teachers, tiny_corpora, {"de": "wp", "ru": "uni"}, [*online, f"--train.relation_teacher_layer={n}"],
               data={"seq_len": 32}, student=STUDENT)
    preflight(cfg, "data")  # a training setting
    with pytest.raises(UserError) as e:
        preflight(cfg, "run")
    msg = e.value.render()
    assert f"train.relation_teacher_layer: {n} is not a layer of teacher wp ({n} layers); allowed -{n} to {n - 1}" in msg
    assert "teacher uni" in msg
    preflight(_cfg(workdir, tiny_teachers, tiny_corpora, {"de": "wp"}, [*online, "--train.relation_teacher_layer=-1"],
                   data={"seq_len": 32}, student=STUDENT), "train")
    with pytest.raises(UserError, match=r"train.relation_heads: 64 does not divide teacher wp's attention width 32 \(hidden_size\)"):
        preflight(_cfg(workdir, tiny_teachers, tiny_corpora, {"de": "wp"}, [*online, "--train.relation_heads=64"],
                       data={"seq_len": 32}, student={**STUDENT, "hidden": 64, "intermediate": 128}), "train")
