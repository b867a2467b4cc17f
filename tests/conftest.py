"""Shared fixtures: tiny teachers of every tokenizer family, built in code once per session."""
from __future__ import annotations

import contextlib
import os
from functools import lru_cache
from pathlib import Path

import pytest
import torch
import yaml

from mergedistill.mlm_models import build_mlm
from mergedistill.tokenizer_train import train_tokenizer

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SENTENCES = {
    "en": [
        "The quick brown fox jumps over the lazy dog.",
        "The student learns from the teachers, and the teachers know their languages.",
        "Distillation merges several models into one smaller model.",
        "This is the house that the builder built in the spring.",
    ],
    "de": [
        "Über den Wolken muss die Freiheit wohl grenzenlos sein.",
        "Die Schüler lernen schöne Wörter in der Schule.",
        "Grüße aus München, wo das Bier und die Brezeln gut sind.",
        "Der Lehrer erklärt die Aufgabe mit großer Geduld.",
    ],
    "fr": [
        "Le renard brun rapide saute par-dessus le chien paresseux.",
        "Ça va très bien, merci beaucoup et à bientôt.",
        "Les élèves apprennent le français à l'école.",
    ],
    "ru": [
        "Съешь же ещё этих мягких французских булок, да выпей чаю.",
        "Ученики изучают русский язык в школе.",
        "Привет мир, это простой тест для токенизатора.",
    ],
    "zh": [
        "敏捷的棕色狐狸跳过了懒狗。",
        "学生们在学校学习中文。",
        "你好世界，这是一个简单的测试。",
    ],
    "ja": [
        "素早い茶色の狐がのろまな犬を飛び越える。",
        "学生は学校で日本語を勉強します。",
        "こんにちは世界、これは簡単なテストです。",
    ],
}

# teacher name -> (tokenizer family, languages it is trained on, lowercase)
TINY_TEACHERS = {
    "wp": ("wordpiece", ["en", "de"], False),
    "uni": ("unigram", ["en", "ru", "fr"], False),
    "spbpe": ("sp-bpe", ["zh", "ja", "en"], False),
    "bbpe": ("byte-bpe", ["en", "fr", "de"], False),
    "multi": ("unigram", list(SENTENCES), False),
}

# Text in several scripts, including some that no tiny teacher saw (Greek, Arabic, Devanagari, emoji)
PROBE_TEXTS = [
    "The quick brown fox.",
    "Grüße aus Köln: Äpfel, Öl und Übermut!",
    "Ça va très bien, à bientôt.",
    "Привет, мир! Ёжик в тумане.",
    "你好世界，学生们。",
    "こんにちは、世界。",
    "Emoji 😀🤖👍🏽 and symbols © ™ ∑",
    "Ελληνικά κείμενα και العربية और हिन्दी",
    "MiXeD   spacing\tand\nnewlines",
    "the [MASK] of <mask> tokens",
    "",
]


def corpus_lines(langs: list[str], repeat: int = 6) -> list[str]:
    return [s for lang in langs for s in SENTENCES[lang]] * repeat


TINY_MODEL = dict(hidden=32, layers=2, heads=2, intermediate=64, max_position=64)


@pytest.fixture(scope="session")
def tiny_teachers(tmp_path_factory) -> dict[str, Path]:
    """Teacher folders by name: a tokenizer trained on its languages and a tiny, randomly initialised
    masked LM of its family (BERT, XLM-R or RoBERTa), saved with save_pretrained."""
    root = tmp_path_factory.mktemp("teachers")
    out = {}
    for i, (name, (kind, langs, lower)) in enumerate(TINY_TEACHERS.items()):
        tok = train_tokenizer(kind, corpus_lines(langs), vocab_size=400 if kind != "byte-bpe" else 420, lowercase=lower)
        tok.save_pretrained(str(root / name))
        torch.manual_seed(i)
        build_mlm(kind, tok, **TINY_MODEL).save_pretrained(str(root / name))
        out[name] = root / name
    return out


@pytest.fixture(scope="session")
def tiny_corpora(tmp_path_factory) -> dict[str, Path]:
    """One small train corpus per language (the sentences, repeated)."""
    root = tmp_path_factory.mktemp("corpora")
    out = {}
    for lang, sents in SENTENCES.items():
        p = root / f"{lang}.txt"
        p.write_text("\n".join(sents * 3) + "\n", encoding="utf-8")
        out[lang] = p
    return out


def make_config(path: Path, teachers: dict[str, Path], corpora: dict[str, Path], routing: dict[str, str], **sections) -> Path:
    """Write a run config routing each language of `routing` to its teacher."""
    cfg = {
        "run": sections.pop("run", "t"),
        "teachers": {n: {"path": str(p)} for n, p in teachers.items()},
        "languages": {lang: {"train": str(corpora[lang]), "teacher": t} for lang, t in routing.items()},
        **sections,
    }
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
    return path


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """Run in a fresh folder: outputs go to vocab/ and runs/ under the current directory."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@contextlib.contextmanager
def in_dir(path: Path):
    """Run the block with `path` as the working directory (module-scoped fixtures cannot use
    monkeypatch.chdir); the previous one is restored whatever happens."""
    cwd = os.getcwd()
    os.chdir(path)
    try:
        yield path
    finally:
        os.chdir(cwd)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread (and the shared cores stay free for others). Modules
    opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---- tiny models for the masking / model / pre-training / metrics tests -----------------------------

PATTERN_SENTENCES = [
    "the cat sat on the mat",
    "the dog sat on the log",
    "a cat and a dog play in the garden",
    "the bird sings in the tree",
    "a dog runs after the cat",
    "the cat sleeps on the warm mat",
    "birds fly over the garden and the tree",
    "the small dog barks at the bird",
]

# A corpus with some structure to learn: the word after "the" predicts the rest of the sentence.
_SUBJECTS = ["cat", "dog", "bird", "fish", "horse", "mouse"]
_VERBS = {"cat": "sleeps", "dog": "barks", "bird": "sings", "fish": "swims", "horse": "runs", "mouse": "hides"}
_PLACES = {"cat": "mat", "dog": "yard", "bird": "tree", "fish": "pond", "horse": "field", "mouse": "wall"}


def patterned_texts(n: int, seed: int = 0) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        s = _SUBJECTS[int(torch.randint(len(_SUBJECTS), (1,), generator=g))]
        out.append(f"the {s} {_VERBS[s]} near the {_PLACES[s]}")
    return out


@lru_cache(maxsize=None)
def tiny_tokenizer(kind: str):
    return train_tokenizer(kind, PATTERN_SENTENCES + patterned_texts(50), vocab_size={"sp-bpe": 300, "byte-bpe": 400}.get(kind, 120))


def tiny_model(kind: str, max_position: int = 32, seed: int = 0):
    torch.manual_seed(seed)
    model = build_mlm(kind, tiny_tokenizer(kind), hidden=32, layers=2, heads=2, intermediate=64, max_position=max_position)
    return model.eval()


class SingleModelPool:
    """What evaluate's model pool offers (`evaluate_stage.Models`), for one student model that reads
    every language with one tokenizer."""

    baseline = None

    def __init__(self, model, tokenizer, max_len: int = 32):
        self.m, self.t, self.n = model, tokenizer, max_len

    def for_language(self, lang):
        return ["student"]

    def model(self, key):
        return self.m

    def tokenizer(self, key, lang):
        return self.t

    def max_len(self, key):
        return self.n

    def knows(self, key, lang):
        return True

    def role(self, key, lang):
        return "student"
