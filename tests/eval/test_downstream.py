"""Downstream fine-tuning: reading labelled data, word-to-token alignment, learning separable tasks,
and zero-shot rows."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import SingleModelPool, patterned_texts, tiny_model, tiny_tokenizer
from mergedistill.config import DownstreamTask, load_config
from mergedistill.errors import UserError
from mergedistill.eval.downstream import (
    IGNORE,
    Example,
    encode,
    fine_tune,
    read_conll,
    read_examples,
    task_accuracy,
)
from mergedistill.eval.stage import downstream

pytestmark = pytest.mark.usefixtures("one_thread")


TAGS = {"the": "DET", "near": "ADP", "cat": "N", "dog": "N", "bird": "N", "fish": "N", "horse": "N", "mouse": "N",
        "mat": "N", "yard": "N", "tree": "N", "pond": "N", "field": "N", "wall": "N"}


def subject_task(n: int, seed: int) -> list[Example]:
    """Is the sentence about a cat or a dog? (the word is right there: trivially separable)"""
    return [Example(t, t.split()[1]) for t in patterned_texts(n * 8, seed) if t.split()[1] in ("cat", "dog")][:n]


def tag_task(n: int, seed: int) -> list[Example]:
    out = []
    for t in patterned_texts(n, seed):
        words = t.split()
        out.append(Example(words, [TAGS.get(w, "V") for w in words]))
    return out


# ---- reading -------------------------------------------------------------------------------------------
def test_read_conll_u_and_two_column_files(tmp_path):
    u = tmp_path / "a.conllu"
    u.write_text("# sent_id = 1\n1-2\tvámonos\t_\t_\t_\t_\t_\t_\t_\t_\n1\tvamos\tir\tVERB\t_\t_\t0\troot\t_\t_\n"
                 "2\tnos\tnosotros\tPRON\t_\t_\t1\tobj\t_\t_\n2.1\tx\tx\tX\t_\t_\t_\t_\t_\t_\n\n"
                 "1\tya\tya\tADV\t_\t_\t0\troot\t_\t_\n", encoding="utf-8")
    got = read_conll(str(u), "t")
    assert [(e.text, e.label) for e in got] == [(["vamos", "nos"], ["VERB", "PRON"]), (["ya"], ["ADV"])]
    c = tmp_path / "b.conll"
    c.write_text("EU B-ORG\nrejects O\n\n\nGerman B-MISC\n", encoding="utf-8")
    assert [(e.text, e.label) for e in read_conll(str(c), "t")] == [(["EU", "rejects"], ["B-ORG", "O"]), (["German"], ["B-MISC"])]
    assert len(read_conll(str(c), "t", limit=1)) == 1


def test_read_json_lines_and_their_problems(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text('{"sentence": "a b", "y": 1}\n{"sentence": "", "y": 0}\n\n{"sentence": "c", "y": 0}\n')
    task = DownstreamTask(train={}, test={}, text_field="sentence", label_field="y")
    assert [(e.text, e.label) for e in read_examples(str(p), task, "t")] == [("a b", "1"), ("c", "0")]
    with pytest.raises(UserError, match="lacks the field `text`"):
        read_examples(str(p), DownstreamTask(train={}, test={}), "eval.downstream.x.train.de")
    tags = tmp_path / "t.jsonl"
    tags.write_text('{"text": ["a", "b"], "label": ["X", "Y"]}\n{"text": ["a"], "label": ["X", "Y"]}\n')
    with pytest.raises(UserError, match="lists of equal length"):
        read_examples(str(tags), DownstreamTask(train={}, test={}, kind="tag"), "t")


def test_datasets_class_labels_become_names(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict({"text": ["good", "bad", "fine"], "label": [1, 0, 1]},
                                    features=datasets.Features({"text": datasets.Value("string"),
                                                                "label": datasets.ClassLabel(names=["neg", "pos"])}))
    datasets.DatasetDict({"test": ds}).save_to_disk(str(tmp_path / "ds"))
    got = read_examples(f"datasets:{tmp_path / 'ds'}:test", DownstreamTask(train={}, test={}), "t", limit=2)
    assert [(e.text, e.label) for e in got] == [("good", "pos"), ("bad", "neg")]


# ---- encoding ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["wordpiece", "byte-bpe", "unigram", "sp-bpe"])
def test_tags_sit_on_the_first_token_of_each_word(kind):
    tok = tiny_tokenizer(kind)
    ex = Example(["the", "horse", "runs", "near", "the", "field"], ["DET", "N", "V", "ADP", "DET", "N"])
    labels = {"DET": 0, "N": 1, "V": 2, "ADP": 3}
    enc = encode(tok, [ex], "tag", labels, max_len=64)
    ids, targets = enc.ids[0], enc.targets[0]
    tagged = [(i, t) for i, t in enumerate(targets) if t != IGNORE]
    assert [t for _, t in tagged] == [0, 1, 2, 3, 0, 1] and enc.words == 6
    # each tagged token is where its word starts (decoding it gives the word's beginning)
    for (i, _), word in zip(tagged, ex.text):
        piece = tok.decode([ids[i]]).strip()
        assert piece and word.startswith(piece), (kind, piece, word)
    # truncation: words cut off get no token (and count as wrong in the accuracy)
    short = encode(tok, [ex], "tag", labels, max_len=4)
    assert sum(t != IGNORE for t in short.targets[0]) < 6 and short.words == 6


# ---- learning ------------------------------------------------------------------------------------------
def test_a_classifier_learns_a_separable_task():
    tok, mlm = tiny_tokenizer("wordpiece"), tiny_model("wordpiece")
    before = {k: v.clone() for k, v in mlm.state_dict().items()}
    train, test = subject_task(64, seed=1), subject_task(40, seed=2)
    model = fine_tune(mlm, tok, train, ["cat", "dog"], "classify", epochs=4, lr=3e-3, batch_size=8, max_len=32, seed=0)
    acc, n = task_accuracy(model, tok, test, ["cat", "dog"], max_len=32)
    assert n == 40 and acc >= 0.9
    assert all((before[k] == v).all() for k, v in mlm.state_dict().items())  # the evaluated model is untouched


def test_a_tagger_learns_word_classes():
    tok, mlm = tiny_tokenizer("byte-bpe"), tiny_model("byte-bpe")
    labels = ["ADP", "DET", "N", "V"]
    model = fine_tune(mlm, tok, tag_task(60, seed=1), labels, "tag", epochs=5, lr=3e-3, batch_size=8, max_len=32, seed=0)
    acc, n = task_accuracy(model, tok, tag_task(20, seed=2), labels, max_len=32)
    assert n == 120 and acc >= 0.9  # the most frequent tag alone gets 1/3


@pytest.mark.parametrize("kind", ["classify", "tag"])
def test_a_linear_probe_trains_the_head_only_and_learns(kind):
    tok, mlm = tiny_tokenizer("wordpiece"), tiny_model("wordpiece")
    if kind == "classify":
        labels, train, test = ["cat", "dog"], subject_task(64, seed=1), subject_task(40, seed=2)
    else:
        labels, train, test = ["ADP", "DET", "N", "V"], tag_task(60, seed=1), tag_task(20, seed=2)
    probe = fine_tune(mlm, tok, train, labels, kind, epochs=30, lr=3e-2, batch_size=8, max_len=32, seed=0, tune="head")
    # the encoder is the model's, untouched; only the head moved away from its initialisation
    enc, ref = probe.encoder.state_dict(), mlm.base_model.state_dict()
    assert enc.keys() == ref.keys() and all(torch.equal(enc[k], ref[k]) for k in enc)
    fresh = fine_tune(mlm, tok, train, labels, kind, epochs=1, lr=1e-12, batch_size=8, max_len=32, seed=0, tune="head")
    assert not torch.allclose(probe.head.weight, fresh.head.weight)
    acc, _ = task_accuracy(probe, tok, test, labels, max_len=32)
    majority = 0.5 if kind == "classify" else 1 / 3
    assert acc >= 0.8 > majority + 0.1, acc
    with pytest.raises(ValueError, match="tune"):
        fine_tune(mlm, tok, train, labels, kind, epochs=1, lr=1e-3, batch_size=8, max_len=32, tune="partial")


def test_zero_shot_rows_for_every_other_language(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    files = {}
    for lang, seed in (("xa", 1), ("xb", 2), ("xc", 3)):
        for split, n in (("train", 64), ("test", 30)):
            p = tmp_path / f"{lang}.{split}.jsonl"
            examples = subject_task(n, seed + 10 * (split == "test"))
            p.write_text("".join(json.dumps({"text": e.text, "label": e.label}) + "\n" for e in examples))
            files.setdefault(split, {})[lang] = str(p)
    task = {**files, "epochs": 4, "lr": 0.003, "zero_shot_from": ["xa"]}
    del task["train"]["xc"]  # xc has a test set only: reached by zero-shot transfer alone
    cfg = load_config(None, data={"run": "t", "teachers": {"m": {"path": "some/hub-model"}},
                                  "languages": {lang: {"train": files["train"].get(lang, files["test"][lang]), "teacher": "m"}
                                                for lang in ("xa", "xb", "xc")},
                                  "eval": {"batch_size": 8, "downstream": {"subj": task}}})
    rows = downstream(cfg, SingleModelPool(tiny_model("wordpiece"), tiny_tokenizer("wordpiece")), "subj")
    got = {(r.language, r.metric): r.value for r in rows}
    assert set(got) == {("xa", "subj/acc"), ("xb", "subj/acc"), ("xb", "subj/acc_from_xa"), ("xc", "subj/acc_from_xa")}
    assert got[("xc", "subj/acc_from_xa")] >= 0.9  # same task, same words: transfer works
    assert all(r.n == 30 and r.section == "downstream" for r in rows)
