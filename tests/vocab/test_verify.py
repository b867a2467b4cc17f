"""vocab checks every student tokenizer against its teacher (AutoTokenizer + id map) and refuses
tokenizers it cannot reproduce, with advice that works."""
from __future__ import annotations

import json

import numpy as np
import pytest
from transformers import AutoTokenizer

from conftest import MORE_SENTENCES, PROBE_TEXTS, SENTENCES, make_config
from mergedistill.cli import main
from mergedistill.config import load_config
from mergedistill.vocab.stage import load_vocab

ROUTING = {"en": "wp", "pl": "albert", "es": "camembert", "ja": "jachar"}


def _teachers(tiny_teachers, hub_teachers, names=("wp", "albert", "camembert", "jachar")):
    both = {**tiny_teachers, **hub_teachers}
    return {n: both[n] for n in names}


def test_a_student_tokenizer_that_differs_stops_the_stage(workdir, tiny_teachers, hub_teachers, tiny_corpora, monkeypatch, capsys):
    """As mergedistill did before: ALBERT's student tokenizer built from the raw tokenizer.json, whose
    normalizer lacks the lowercasing and accent stripping AlbertTokenizer adds when it loads."""
    import mergedistill.vocab.tokenizers as toks

    raw = json.loads((hub_teachers["albert"] / "tokenizer.json").read_text(encoding="utf-8"))
    real = toks.student_tokenizer_json

    def from_raw_file(t, idmap, size):
        tj = real(t, idmap, size)
        if t.name == "albert":
            tj["normalizer"] = raw["normalizer"]
        return tj

    monkeypatch.setattr(toks, "student_tokenizer_json", from_raw_file)
    cfg = make_config(workdir / "c.yaml", _teachers(tiny_teachers, hub_teachers), tiny_corpora, ROUTING)
    assert main(["vocab", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "teachers.albert: its student tokenizer does not tokenize languages.pl.train text #" in err
    first = next(line for line in MORE_SENTENCES["pl"] if line in err)  # the first differing text, quoted
    assert "teacher: " in err and "student: " in err and first
    assert "camembert" not in err and "jachar" not in err  # the others are right
    assert not (workdir / "vocab" / "t").exists()


def test_check_can_be_turned_off(workdir, tiny_teachers, hub_teachers, tiny_corpora, monkeypatch, caplog):
    """With vocab.verify_lines: 0 the same wrong tokenizer is written (the check was skipped, not passed) and
    the log says it was not compared."""
    import mergedistill.vocab.tokenizers as toks

    caplog.set_level("INFO")
    raw = json.loads((hub_teachers["albert"] / "tokenizer.json").read_text(encoding="utf-8"))
    real = toks.student_tokenizer_json
    monkeypatch.setattr(toks, "student_tokenizer_json", lambda t, m, n: {**real(t, m, n), "normalizer": raw["normalizer"]})
    cfg = make_config(workdir / "c.yaml", _teachers(tiny_teachers, hub_teachers, ("albert",)), tiny_corpora, {"pl": "albert"},
                      vocab={"verify_lines": 0})
    assert main(["vocab", "--config", str(cfg)]) == 0
    assert "albert's student tokenizer has the student's" in caplog.text and "not compared with the teacher's" in caplog.text
    assert "equals the teacher's" not in caplog.text
    vocab, _ = load_vocab(load_config(cfg))
    teacher = AutoTokenizer.from_pretrained(str(hub_teachers["albert"]))
    student = AutoTokenizer.from_pretrained(str(workdir / "vocab" / "t" / "tokenizers" / "albert"))
    differs = [t for t in MORE_SENTENCES["pl"]
               if student(t)["input_ids"] != vocab.student_ids("albert", np.array(teacher(t)["input_ids"])).tolist()]
    assert differs  # the written tokenizer is the wrong one the check would have refused


def test_verified_texts_are_logged(workdir, tiny_teachers, hub_teachers, tiny_corpora, caplog):
    caplog.set_level("INFO")
    cfg = make_config(workdir / "c.yaml", _teachers(tiny_teachers, hub_teachers), tiny_corpora, ROUTING, vocab={"verify_lines": 2})
    assert main(["vocab", "--config", str(cfg)]) == 0
    size = load_vocab(load_config(cfg))[0].size
    for name in ROUTING.values():  # one language each: 2 texts
        assert f"vocab: {name}'s student tokenizer has the student's {size:,} ids and equals the teacher's on 2 sample texts" in caplog.text


def test_slow_tokenizer_outside_the_family_is_refused_with_advice(workdir, tiny_teachers, tiny_corpora, capsys):
    """PhoBERT's tokenizer is slow-only (BPE over a fairseq vocabulary): not of the vocab-file
    WordPiece family, and transformers has no converter for it."""
    pho = workdir / "phobert"
    pho.mkdir()
    (pho / "vocab.txt").write_text("the 9\nqu@@ 3\nick 2\nfox 2\n", encoding="utf-8")
    (pho / "bpe.codes").write_text("t h 9\nth e 8\n", encoding="utf-8")
    (pho / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PhobertTokenizer"}))
    cfg = make_config(workdir / "c.yaml", {"wp": tiny_teachers["wp"], "pho": pho}, tiny_corpora, {"en": "wp", "de": "pho"})
    assert main(["vocab", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "teachers.pho: the tokenizer at" in err and "PhobertTokenizer, a slow (Python-only) tokenizer" in err
    assert "route this teacher's languages to a teacher with a fast tokenizer" in err
    assert "convert it with transformers" not in err  # the old advice, which raised when followed


def _mecab_teacher(folder):
    pytest.importorskip("fugashi")
    pytest.importorskip("unidic_lite")
    from transformers import BertConfig, BertForMaskedLM, BertJapaneseTokenizer

    from conftest import TINY_MODEL

    folder.mkdir()
    kwargs = {"word_tokenizer_type": "mecab", "mecab_kwargs": {"mecab_dic": "unidic_lite"}}
    (folder / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\n", encoding="utf-8")
    words = BertJapaneseTokenizer(str(folder / "vocab.txt"), **kwargs).word_tokenizer
    pieces = sorted({w for line in SENTENCES["ja"] for w in words.tokenize(line)} | {ch for line in SENTENCES["ja"] for ch in line})
    pieces += ["##" + ch for ch in sorted({ch for line in SENTENCES["ja"] for ch in line})]
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + pieces) + "\n", encoding="utf-8")
    tok = BertJapaneseTokenizer(str(folder / "vocab.txt"), model_max_length=512, **kwargs)
    tok.save_pretrained(str(folder))
    t = TINY_MODEL
    BertForMaskedLM(BertConfig(vocab_size=len(tok), hidden_size=t["hidden"], num_hidden_layers=t["layers"], num_attention_heads=t["heads"],
                               intermediate_size=t["intermediate"], max_position_embeddings=t["max_position"])).save_pretrained(str(folder))
    return folder


def test_mecab_teacher_round_trip(workdir, tiny_teachers, tiny_corpora):
    """A Japanese BERT as on the hub: MeCab words, WordPiece subwords (needs fugashi and unidic-lite)."""
    mecab = _mecab_teacher(workdir / "mecab")
    cfg_path = make_config(workdir / "c.yaml", {"wp": tiny_teachers["wp"], "mecab": mecab}, tiny_corpora, {"en": "wp", "ja": "mecab"},
                           vocab={"prune": True, "keep_single_chars": False})
    assert main(["vocab", "--config", str(cfg_path)]) == 0
    vocab, _ = load_vocab(load_config(cfg_path))
    teacher = AutoTokenizer.from_pretrained(str(mecab))
    student = AutoTokenizer.from_pretrained(str(workdir / "vocab/t/tokenizers/mecab"))
    assert type(student).__name__ == "BertJapaneseTokenizer" and student.word_tokenizer_type == "mecab"
    assert len(student) == vocab.size
    for text in SENTENCES["ja"]:
        assert student(text)["input_ids"] == vocab.student_ids("mecab", np.array(teacher(text)["input_ids"])).tolist()
    assert all(max(student(t)["input_ids"] or [0]) < vocab.size for t in PROBE_TEXTS)


def test_the_check_reads_only_the_lines_a_capped_teachers_pruning_scan_read(workdir, tiny_teachers, tiny_corpora, caplog):
    """teachers.<name>.max_lines caps that teacher's pruning scan (the vocabulary keeps what it labels):
    a pruned SentencePiece student tokenizer cannot segment text beyond those lines as the teacher does,
    so the check samples only the lines the scan read (the demo's e5 teacher failed on de line 3500)."""
    caplog.set_level("INFO")
    cfg = make_config(workdir / "c.yaml", tiny_teachers, tiny_corpora, {"ru": "uni"},
                      vocab={"prune": True, "keep_single_chars": False})
    assert main(["vocab", "--config", str(cfg), "--teachers.uni.max_lines=2"]) == 0
    assert "uni's student tokenizer has the student's" in caplog.text and "on 2 sample texts" in caplog.text
