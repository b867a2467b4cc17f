"""The vocabulary stage on tiny teachers of all four tokenizer families."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from transformers import AutoTokenizer

from conftest import HUB_TEACHERS, MORE_SENTENCES, PROBE_TEXTS, SENTENCES, in_dir, make_config
from mergedistill.cli import main
from mergedistill.config import load_config
from mergedistill.errors import UserError
from mergedistill.tokens import CLS_ID, MASK_ID, PAD_ID, SEP_ID, UNK_ID
from mergedistill.vocab.joint import JointVocab
from mergedistill.vocab.stage import load_vocab

ROUTING = {"en": "wp", "de": "wp", "ru": "uni", "fr": "bbpe", "zh": "spbpe", "ja": "multi"}
# teachers as users bring them (conftest.HUB_TEACHERS): transformers rebuilds or adds parts when it loads them
HUB_ROUTING = {"en": "wp", "pl": "albert", "es": "camembert", "ja": "jachar", "zh": "jawp"}
ALL_TEACHERS = ["wp", "uni", "spbpe", "bbpe", "multi", *HUB_TEACHERS]
TEXTS = {**SENTENCES, **MORE_SENTENCES}


def build(workdir, tiny_teachers, tiny_corpora, routing=ROUTING, extra=(), **sections):
    cfg_path = make_config(workdir / "c.yaml", tiny_teachers, tiny_corpora, routing, **sections)
    assert main(["vocab", "--config", str(cfg_path), *extra]) == 0
    cfg = load_config(cfg_path)
    vocab, record = load_vocab(cfg)
    return cfg, vocab, record


@pytest.fixture(scope="module")
def all_teachers(tiny_teachers, hub_teachers):
    """Every tiny teacher: one of each tokenizer family, and the hub-style ones."""
    return {**tiny_teachers, **hub_teachers}


@pytest.fixture(scope="module")
def built(tmp_path_factory, all_teachers, tiny_corpora):
    """One unpruned build over every teacher, shared by the read-only tests of this module."""
    work = tmp_path_factory.mktemp("vocab-build")
    with in_dir(work):
        cfg, vocab, record = build(work, all_teachers, tiny_corpora)
    return work, cfg, vocab, record


def _student_tok(work, name):
    return AutoTokenizer.from_pretrained(str(work / "vocab" / "t" / "tokenizers" / name))


@pytest.mark.parametrize("name", ALL_TEACHERS)
def test_student_tokenizer_equals_teacher_through_id_map(built, all_teachers, name):
    work, _, vocab, _ = built
    teacher = AutoTokenizer.from_pretrained(str(all_teachers[name]))
    student = _student_tok(work, name)
    assert len(student) == vocab.size
    for text in PROBE_TEXTS:
        for specials in (True, False):
            t_ids = teacher(text, add_special_tokens=specials)["input_ids"]
            s_ids = student(text, add_special_tokens=specials)["input_ids"]
            assert s_ids == vocab.student_ids(name, np.array(t_ids, dtype=np.int64)).tolist(), (name, text)
    # pairs, batches with padding, and decoding survive too
    t_pair = teacher("Hallo Welt", "Привет", add_special_tokens=True)["input_ids"]
    assert student("Hallo Welt", "Привет")["input_ids"] == vocab.student_ids(name, np.array(t_pair)).tolist()
    batch = student(PROBE_TEXTS[:3], padding=True)["input_ids"]
    assert all(len(row) == len(batch[0]) for row in batch) and PAD_ID in sum(batch, [])
    ids = student(PROBE_TEXTS[2])["input_ids"]
    assert student.decode(ids, skip_special_tokens=True) == teacher.decode(teacher(PROBE_TEXTS[2])["input_ids"], skip_special_tokens=True)


def test_every_teacher_token_has_a_student_id_when_not_pruned(built, all_teachers):
    _, _, vocab, _ = built
    for name in all_teachers:
        m = vocab.idmaps[name]
        assert m.dtype == np.int32 and (m >= 0).all() and m.max() < vocab.size
        assert len(np.unique(m)) == len(m), "two tokens of one teacher share a student id"


@pytest.mark.parametrize("name", ALL_TEACHERS)
def test_special_tokens_are_unified(built, all_teachers, name):
    work, _, vocab, _ = built
    teacher = AutoTokenizer.from_pretrained(str(all_teachers[name]))
    m = vocab.idmaps[name]
    assert m[teacher.pad_token_id] == PAD_ID
    assert m[teacher.unk_token_id] == UNK_ID
    assert m[teacher.cls_token_id] == CLS_ID
    assert m[teacher.sep_token_id] == SEP_ID
    assert m[teacher.mask_token_id] == MASK_ID
    student = _student_tok(work, name)
    assert student.mask_token == teacher.mask_token and student.mask_token_id == MASK_ID
    assert student.cls_token_id == CLS_ID and student.pad_token_id == PAD_ID


def _sid(vocab, teachers, name, token):
    teacher = AutoTokenizer.from_pretrained(str(teachers[name]))
    tid = teacher.convert_tokens_to_ids(token)
    assert tid is not None and tid != teacher.unk_token_id, f"{name} has no token {token!r}"
    return int(vocab.idmaps[name][tid])


def test_same_meaning_is_one_student_token_across_families(built, all_teachers):
    _, _, vocab, _ = built
    t = all_teachers
    # 'the' as a whole word: WordPiece `the`, Unigram `▁the`, byte-level `Ġthe`, and the hub-style teachers'
    the = {_sid(vocab, t, "wp", "the"), _sid(vocab, t, "uni", "▁the"), _sid(vocab, t, "multi", "▁the"),
           _sid(vocab, t, "spbpe", "▁the"), _sid(vocab, t, "bbpe", "Ġthe"), _sid(vocab, t, "albert", "▁the"),
           _sid(vocab, t, "camembert", "▁the"), _sid(vocab, t, "jawp", "the")}
    assert len(the) == 1
    # a continuation: WordPiece `##s`, SentencePiece `s`, byte-level `s`
    assert _sid(vocab, t, "wp", "##s") == _sid(vocab, t, "uni", "s") == _sid(vocab, t, "bbpe", "s") == _sid(vocab, t, "jawp", "##s")
    # ...and a word-initial piece is not a continuation
    assert _sid(vocab, t, "uni", "▁s") != _sid(vocab, t, "uni", "s")
    assert set(vocab.teachers_of(next(iter(the)))) == {"wp", "uni", "spbpe", "bbpe", "multi", "albert", "camembert", "jawp"}
    # a slow character tokenizer's pieces are single characters, word-initial: the same as a WordPiece word `学`
    assert _sid(vocab, t, "jachar", "学") == _sid(vocab, t, "jawp", "学")


@pytest.mark.parametrize("name", ALL_TEACHERS)
def test_every_added_token_is_in_the_joint_vocabulary(built, pruned_hub, all_teachers, name):
    """Added tokens (CamemBERT's <s>NOTUSED, ...) are student tokens with an id-map entry, pruned or not:
    the student tokenizer has none beyond the student vocabulary."""
    teacher = AutoTokenizer.from_pretrained(str(all_teachers[name]))
    added = teacher.get_added_vocab()
    assert added
    for work, _, vocab, _ in (built, pruned_hub):
        student = _student_tok(work, name)
        assert len(student) == vocab.size
        for tok, tid in added.items():
            sid = int(vocab.idmaps[name][tid])
            assert 0 <= sid < vocab.size and student.convert_tokens_to_ids(tok) == sid, (name, tok)
            text = f"un {tok} deux"
            expected = vocab.student_ids(name, np.array(teacher(text)["input_ids"])).tolist()
            got = student(text)["input_ids"]
            assert max(got) < vocab.size and (got == expected or work == pruned_hub[0]), (name, tok)
            assert sid in got


def test_joint_size_is_the_union(built, tiny_teachers):
    _, _, vocab, record = built
    keys = set(vocab.keys)
    assert len(keys) == vocab.size == record["size"]
    total = sum(len(m) for m in vocab.idmaps.values())
    assert vocab.size < total  # sharing happened
    overlap = vocab.overlap()
    assert (overlap.diagonal() == [len(vocab.idmaps[t]) for t in vocab.teachers]).all()


def test_artifacts_and_report(built):
    work, _, vocab, record = built
    out = work / "vocab" / "t"
    for f in ["vocab.parquet", "vocab.txt", "report.md", "report.json", "overlap.csv", "fertility.csv", "teachers.csv", "config.yaml"]:
        assert (out / f).is_file(), f
    lines = (out / "vocab.txt").read_text(encoding="utf-8").split("\n")
    assert lines[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] and len(lines) == vocab.size + 1
    report = (out / "report.md").read_text(encoding="utf-8")
    assert "Pairwise overlap" in report and "tokens/word" in report and "Embedding parameters" in report
    fert = json.loads((out / "report.json").read_text())["fertility"]
    de = next(f for f in fert if f["language"] == "de")
    assert de["teacher"] == "wp" and de["tokens"] >= de["words"] > 0
    meta = json.loads((out / "tokenizers" / "wp" / "mergedistill.json").read_text())
    assert meta["vocab"] == record["vocab"] == vocab.fingerprint() and meta["student_vocab_size"] == vocab.size


def test_rerun_skips_and_changed_inputs_rebuild(workdir, tiny_teachers, tiny_corpora, caplog):
    caplog.set_level("INFO")
    _, v1, r1 = build(workdir, tiny_teachers, tiny_corpora)
    stamp = (workdir / "vocab/t/fingerprint.json").stat().st_mtime_ns
    build(workdir, tiny_teachers, tiny_corpora)
    assert "skipping" in caplog.text
    assert (workdir / "vocab/t/fingerprint.json").stat().st_mtime_ns == stamp
    # a different routing with pruning changes the inputs: rebuilt, a different vocabulary
    _, v2, r2 = build(workdir, tiny_teachers, tiny_corpora, vocab={"prune": True})
    assert r2["inputs"] != r1["inputs"] and r2["vocab"] != r1["vocab"] and v2.size < v1.size


def test_load_refuses_files_that_do_not_match_the_fingerprint(workdir, tiny_teachers, tiny_corpora):
    cfg, vocab, _ = build(workdir, tiny_teachers, tiny_corpora)
    m = np.load(workdir / "vocab/t/idmaps/wp.npy")
    m[10], m[11] = m[11], m[10]
    np.save(workdir / "vocab/t/idmaps/wp.npy", m)
    with pytest.raises(UserError, match="do not match its fingerprint"):
        load_vocab(cfg)


# ---- pruning -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pruned(tmp_path_factory, tiny_teachers, tiny_corpora):
    work = tmp_path_factory.mktemp("vocab-pruned")
    with in_dir(work):
        cfg, vocab, record = build(work, tiny_teachers, tiny_corpora, vocab={"prune": True, "keep_single_chars": False})
    return work, cfg, vocab, record


@pytest.fixture(scope="module")
def pruned_hub(tmp_path_factory, all_teachers, tiny_corpora):
    """A pruned build routing languages to the hub-style teachers."""
    work = tmp_path_factory.mktemp("vocab-pruned-hub")
    with in_dir(work):
        cfg, vocab, record = build(work, all_teachers, tiny_corpora, routing=HUB_ROUTING,
                                   vocab={"prune": True, "keep_single_chars": False})
    return work, cfg, vocab, record


@pytest.mark.parametrize("build_name,lang", [("pruned", lang) for lang in ROUTING] + [("pruned_hub", lang) for lang in HUB_ROUTING])
def test_pruned_tokenizer_is_exact_on_the_scanned_corpora(request, all_teachers, build_name, lang):
    work, cfg, vocab, _ = request.getfixturevalue(build_name)
    name = cfg.teacher_of(lang)
    teacher = AutoTokenizer.from_pretrained(str(all_teachers[name]))
    student = _student_tok(work, name)
    assert len(student) == vocab.size
    for line in TEXTS[lang]:
        t_ids = teacher(line)["input_ids"]
        assert (vocab.idmaps[name][t_ids] >= 0).all(), "a token the teacher produced on its corpus was pruned"
        assert student(line)["input_ids"] == vocab.student_ids(name, np.array(t_ids)).tolist()


def test_pruning_keeps_only_produced_tokens_and_specials(pruned, tiny_teachers):
    _, _, vocab, _ = pruned
    name = "wp"
    teacher = AutoTokenizer.from_pretrained(str(tiny_teachers[name]))
    produced = {i for lang in ("en", "de") for line in SENTENCES[lang] for i in teacher(line, add_special_tokens=False)["input_ids"]}
    kept = set(np.flatnonzero(vocab.idmaps[name] >= 0).tolist())
    specials = set(teacher.all_special_ids)
    assert kept == produced | specials
    # a token of this teacher that its corpora never produce is gone, and maps to [UNK]
    gone = sorted(set(range(len(teacher))) - kept)[0]
    assert vocab.idmaps[name][gone] == -1 and vocab.student_ids(name, np.array([gone]))[0] == UNK_ID


def test_pruned_bpe_keeps_the_merge_parts(pruned, tiny_teachers):
    _, _, vocab, _ = pruned
    tj = json.loads((tiny_teachers["bbpe"] / "tokenizer.json").read_text())
    kept_tokens = {t for t, i in tj["model"]["vocab"].items() if vocab.idmaps["bbpe"][i] >= 0}
    for a, b in (m.split(" ") if isinstance(m, str) else m for m in tj["model"]["merges"]):
        if a + b in kept_tokens:
            assert a in kept_tokens and b in kept_tokens, (a, b)


def test_unseen_text_still_tokenizes_after_pruning(pruned, tiny_teachers):
    work, *_ = pruned
    student = _student_tok(work, "bbpe")
    ids = student("Ελληνικά 😀 unseen words")["input_ids"]
    assert ids[0] == CLS_ID and ids[-1] == SEP_ID and len(ids) > 3


def test_pruning_report_counts_saved_parameters(pruned):
    work, cfg, vocab, _ = pruned
    stats = json.loads((work / "vocab/t/report.json").read_text())
    emb = stats["embedding_params"]
    assert stats["joint_size"] == vocab.size < stats["joint_size_unpruned"]
    assert emb["before"] - emb["after"] == (stats["joint_size_unpruned"] - vocab.size) * (cfg.student.hidden + 1)
    assert "after pruning" in (work / "vocab/t/report.md").read_text()


def test_prune_scans_are_cached_for_resumption(workdir, tiny_teachers, tiny_corpora):
    build(workdir, tiny_teachers, tiny_corpora, vocab={"prune": True})
    cached = sorted((workdir / "vocab/.cache/t").glob("counts-*.npy"))
    assert len(cached) == len(ROUTING)
    stamps = {p: p.stat().st_mtime_ns for p in cached}
    # as after a kill: one scan's result is missing; a rerun recomputes only that one
    cached[0].unlink()
    _, vocab, _ = build(workdir, tiny_teachers, tiny_corpora, extra=["--force"], vocab={"prune": True})
    assert cached[0].exists()
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items() if p != cached[0])


# ---- bad input ---------------------------------------------------------------------------------
def _run_bad(workdir, tiny_teachers, tiny_corpora, capsys, teachers=None, corpora=None, routing=None, **sections):
    cfg_path = make_config(workdir / "c.yaml", teachers or tiny_teachers, corpora or tiny_corpora, routing or ROUTING, **sections)
    code = main(["vocab", "--config", str(cfg_path)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert not (workdir / "vocab" / "t").exists(), "a failed run left an output folder"
    assert not list((workdir / "vocab").glob(".t.*")) if (workdir / "vocab").exists() else True
    return err


def test_missing_teacher_folder(workdir, tiny_teachers, tiny_corpora, capsys):
    teachers = dict(tiny_teachers, wp=workdir / "nowhere")
    err = _run_bad(workdir, tiny_teachers, tiny_corpora, capsys, teachers=teachers)
    assert "teachers.wp.path: no folder" in err and "make teachers" in err


def test_folder_without_tokenizer(workdir, tiny_teachers, tiny_corpora, capsys):
    empty = workdir / "empty_teacher"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    err = _run_bad(workdir, tiny_teachers, tiny_corpora, capsys, teachers=dict(tiny_teachers, uni=empty))
    assert "teachers.uni: folder" in err and "has no tokenizer" in err


def test_tokenizer_without_mask_token(workdir, tiny_teachers, tiny_corpora, capsys):
    nomask = workdir / "nomask"
    shutil.copytree(tiny_teachers["wp"], nomask)
    cfg = json.loads((nomask / "tokenizer_config.json").read_text())
    cfg.pop("mask_token")
    (nomask / "tokenizer_config.json").write_text(json.dumps(cfg))
    err = _run_bad(workdir, tiny_teachers, tiny_corpora, capsys, teachers=dict(tiny_teachers, wp=nomask))
    assert "teachers.wp" in err and "has no mask token" in err


def test_empty_corpus(workdir, tiny_teachers, tiny_corpora, capsys):
    empty = workdir / "empty.txt"
    empty.write_text("\n  \n", encoding="utf-8")
    err = _run_bad(workdir, tiny_teachers, tiny_corpora, capsys, corpora=dict(tiny_corpora, de=empty))
    assert "languages.de.train" in err and "is empty" in err


def test_non_utf8_corpus(workdir, tiny_teachers, tiny_corpora, capsys):
    latin = workdir / "latin1.txt"
    latin.write_bytes("Grüße aus Köln\n".encode("latin-1"))
    err = _run_bad(workdir, tiny_teachers, tiny_corpora, capsys, corpora=dict(tiny_corpora, fr=latin))
    assert "languages.fr.train" in err and "is not UTF-8" in err and "iconv" in err


def test_unknown_config_key(workdir, tiny_teachers, tiny_corpora, capsys):
    err = _run_bad(workdir, tiny_teachers, tiny_corpora, capsys, vocab={"prun": True})
    assert "vocab.prun: unknown key; did you mean 'prune'?" in err


def test_several_bad_inputs_reported_together(workdir, tiny_teachers, tiny_corpora, capsys):
    empty = workdir / "empty.txt"
    empty.write_text("")
    nomask = workdir / "nomask2"
    shutil.copytree(tiny_teachers["uni"], nomask)
    cfg = json.loads((nomask / "tokenizer_config.json").read_text())
    cfg.pop("mask_token")
    (nomask / "tokenizer_config.json").write_text(json.dumps(cfg))
    err = _run_bad(workdir, tiny_teachers, tiny_corpora, capsys, teachers=dict(tiny_teachers, uni=nomask), corpora=dict(tiny_corpora, zh=empty))
    assert "has no mask token" in err and "languages.zh.train" in err


def test_failure_while_writing_leaves_no_output(workdir, tiny_teachers, tiny_corpora, monkeypatch, capsys):
    import mergedistill.vocab.stage as stage

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(stage, "write_report", boom)
    cfg_path = make_config(workdir / "c.yaml", tiny_teachers, tiny_corpora, ROUTING)
    assert main(["vocab", "--config", str(cfg_path)]) == 1
    assert not (workdir / "vocab" / "t").exists()
    assert not [p for p in (workdir / "vocab").iterdir() if p.name.startswith(".t.")]


def test_joint_vocab_save_load_round_trip(built, tmp_path):
    _, _, vocab, _ = built
    vocab.save(tmp_path)
    again = JointVocab.load(tmp_path, vocab.teachers)
    assert again.keys == vocab.keys and again.fingerprint() == vocab.fingerprint()
    assert (again.provenance == vocab.provenance).all()


# ---- the student's size --------------------------------------------------------------------------
def test_vocab_prints_the_student_size_and_warns_when_embeddings_dominate(workdir, tiny_teachers, tiny_corpora, caplog):
    from transformers import BertForMaskedLM

    from mergedistill.models.student import student_config

    caplog.set_level("INFO")
    small = {"hidden": 8, "heads": 1, "layers": 1, "intermediate": 8, "max_position": 128}
    cfg, vocab, _ = build(workdir, tiny_teachers, tiny_corpora, student=small)
    model = BertForMaskedLM(student_config(cfg, vocab.size))
    total = sum(p.numel() for p in model.parameters())
    emb = vocab.size * (8 + 1)
    assert f"has {total / 1e6:.1f}M parameters: body {(total - emb) / 1e6:.2f}M, embeddings {emb / 1e6:.1f}M" in caplog.text
    share = 100 * emb / total
    assert share > 80
    assert f"vocab: embeddings are {share:.0f}% of the student's parameters (more than 80%); set `vocab.prune: true`" in caplog.text
    stats = json.loads((workdir / "vocab/t/report.json").read_text())["student_size"]
    assert stats["total"] == total and stats["embeddings"] == emb and stats["export_mb"] == pytest.approx(4 * total / 1e6)
    assert "## Student size" in (workdir / "vocab/t/report.md").read_text()
    # a rerun that skips still says it; a student with a larger body does not warn
    caplog.clear()
    build(workdir, tiny_teachers, tiny_corpora, student=small)
    assert "skipping" in caplog.text and "embeddings are" in caplog.text
    caplog.clear()
    build(workdir, tiny_teachers, tiny_corpora, student={**small, "hidden": 64, "heads": 2, "intermediate": 256, "layers": 4})
    assert "parameters: body" in caplog.text and "embeddings are" not in caplog.text


def test_a_teacher_line_cap_limits_its_pruning_scan(workdir, tiny_teachers, tiny_corpora):
    """teachers.<name>.max_lines: the vocabulary keeps what that teacher produces on the lines the data
    stage lets it label (the first max_lines of each corpus), and the vocabulary's inputs change with it."""
    n = 2
    sections = {"vocab": {"prune": True, "keep_single_chars": False}}
    _, _, full = build(workdir, tiny_teachers, tiny_corpora, **sections)
    _, vocab, capped = build(workdir, tiny_teachers, tiny_corpora, extra=[f"--teachers.wp.max_lines={n}"], **sections)
    assert capped["inputs"] != full["inputs"]
    teacher = AutoTokenizer.from_pretrained(str(tiny_teachers["wp"]))
    first = {i for lang in ("en", "de") for line in SENTENCES[lang][:n] for i in teacher(line, add_special_tokens=False)["input_ids"]}
    every = {i for lang in ("en", "de") for line in SENTENCES[lang] for i in teacher(line, add_special_tokens=False)["input_ids"]}
    assert first < every
    assert set(np.flatnonzero(vocab.idmaps["wp"] >= 0).tolist()) == first | set(teacher.all_special_ids)
    other = AutoTokenizer.from_pretrained(str(tiny_teachers["uni"]))  # uncapped: every line of ru
    ru = {i for line in SENTENCES["ru"] for i in other(line, add_special_tokens=False)["input_ids"]}
    assert ru <= set(np.flatnonzero(vocab.idmaps["uni"] >= 0).tolist())
