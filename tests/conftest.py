"""Shared fixtures: tiny teachers of every tokenizer family, built in code once per session."""
from __future__ import annotations

import contextlib
import os
from functools import lru_cache
from pathlib import Path

import pytest
import torch
import yaml

from mergedistill.models.mlm import build_mlm
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
    """One small train corpus per language (the sentences, repeated), MORE_SENTENCES' languages too."""
    root = tmp_path_factory.mktemp("corpora")
    out = {}
    for lang, sents in {**SENTENCES, **MORE_SENTENCES}.items():
        p = root / f"{lang}.txt"
        p.write_text("\n".join(sents * 3) + "\n", encoding="utf-8")
        out[lang] = p
    return out


# ---- teachers as users bring them from the hub ------------------------------------------------------
# Folders for which transformers' AutoTokenizer does more than read a tokenizer.json, as with real hub
# models: the reference for "tokenizes as the teacher does" is what AutoTokenizer returns.
#   albert     ALBERT (IndicBERT-style): tokenizer_config.json asks for lowercasing and accent stripping
#              (do_lower_case, keep_accents: false) that its tokenizer.json lacks; AlbertTokenizer
#              rebuilds the normalizer when it loads. Factorised embeddings (16 wide, hidden 32).
#   camembert  CamemBERT: <s>NOTUSED, </s>NOTUSED as added tokens, <unk>NOTUSED only among the pieces
#              and named as an additional special token (as in camembert-base).
#   jachar     BertJapaneseTokenizer (slow only: vocab.txt), basic word splitting, character subwords.
#   jawp       BertJapaneseTokenizer, basic word splitting, WordPiece subwords.
HUB_TEACHERS = ("albert", "camembert", "jachar", "jawp")

MORE_SENTENCES = {
    "pl": [
        "Zażółć gęślą jaźń, powiedział Łukasz w Łodzi.",
        "Uczniowie uczą się języka polskiego w szkole.",
        "Dzień dobry, jak się masz? Wszystko w porządku.",
    ],
    "es": [
        "El rápido zorro marrón salta sobre el perro perezoso.",
        "Los niños aprenden español en la escuela.",
        "¿Qué tal? Muy bien, gracias, y hasta mañana.",
    ],
}


def _strip_accents_lower(text: str) -> str:
    import unicodedata

    return "".join(ch for ch in unicodedata.normalize("NFKD", text) if not unicodedata.combining(ch)).lower()


def _unigram_pieces(texts: list[str], specials: list[str], unk: str, vocab_size: int) -> tuple[list, object]:
    """A SentencePiece-style unigram model trained on `texts`: (pieces [[piece, score]...], tokenizer)."""
    import json

    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.train_from_iterator(texts, trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=specials, unk_token=unk,
                                                           show_progress=False))
    return json.loads(tok.to_str())["model"]["vocab"], tok


def build_hub_teacher(name: str, folder: Path, seed: int = 0) -> Path:
    """One of HUB_TEACHERS (tokenizer files as the hub has them, and a tiny masked LM) in `folder`."""
    import json

    from transformers import (
        AlbertConfig,
        AlbertForMaskedLM,
        BertConfig,
        BertForMaskedLM,
        BertJapaneseTokenizer,
        CamembertConfig,
        CamembertForMaskedLM,
        CamembertTokenizer,
    )

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    t = TINY_MODEL
    if name == "albert":
        texts = [_strip_accents_lower(s) for s in corpus_lines(["en", "de", "fr"]) + MORE_SENTENCES["pl"] * 6]
        _, tok = _unigram_pieces(texts, ["<pad>", "<unk>", "[CLS]", "[SEP]", "[MASK]"], "<unk>", 300)
        tok.save(str(folder / "tokenizer.json"))  # NFKC only: the lowercasing lives in tokenizer_config.json
        (folder / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "AlbertTokenizer", "do_lower_case": True, "remove_space": True, "keep_accents": False,
            "bos_token": "[CLS]", "eos_token": "[SEP]", "cls_token": "[CLS]", "sep_token": "[SEP]", "unk_token": "<unk>",
            "pad_token": "<pad>", "mask_token": "[MASK]", "model_max_length": 512}))
        config = AlbertConfig(vocab_size=tok.get_vocab_size(), embedding_size=16, hidden_size=t["hidden"],
                              num_hidden_layers=t["layers"], num_attention_heads=t["heads"], intermediate_size=t["intermediate"],
                              max_position_embeddings=t["max_position"], pad_token_id=0, bos_token_id=2, eos_token_id=3)
        AlbertForMaskedLM(config).save_pretrained(str(folder))
    elif name == "camembert":
        pieces, _ = _unigram_pieces(corpus_lines(["fr", "en"]) + MORE_SENTENCES["es"] * 6, ["<unk>", "<s>", "</s>"], "<unk>", 300)
        vocab = [("<s>NOTUSED", 0.0), ("<pad>", 0.0), ("</s>NOTUSED", 0.0), ("<unk>", 0.0), ("<unk>NOTUSED", -100.0)]
        vocab += [tuple(p) for p in pieces[1:]] + [("<mask>", 0.0)]
        tok = CamembertTokenizer(vocab=vocab, model_max_length=512)
        tok.save_pretrained(str(folder))
        # as camembert-base: <unk>NOTUSED is a piece, not an added token; the config names all three
        tj = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
        tj["added_tokens"] = [a for a in tj["added_tokens"] if a["content"] != "<unk>NOTUSED"]
        (folder / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False), encoding="utf-8")
        conf = json.loads((folder / "tokenizer_config.json").read_text())
        conf["additional_special_tokens"] = conf.pop("extra_special_tokens")
        (folder / "tokenizer_config.json").write_text(json.dumps(conf))
        config = CamembertConfig(vocab_size=len(vocab), hidden_size=t["hidden"], num_hidden_layers=t["layers"],
                                 num_attention_heads=t["heads"], intermediate_size=t["intermediate"],
                                 max_position_embeddings=t["max_position"] + 2, pad_token_id=1, bos_token_id=5, eos_token_id=6,
                                 type_vocab_size=1)
        CamembertForMaskedLM(config).save_pretrained(str(folder))
    elif name in ("jachar", "jawp"):
        lines = corpus_lines(["ja", "zh", "en"])
        if name == "jachar":
            import unicodedata

            pieces = sorted({ch for line in lines for ch in unicodedata.normalize("NFKC", line) if not ch.isspace()})
        else:
            from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

            # the basic word tokenizer keeps runs of kana and kanji together (tokenize_chinese_chars=False)
            wp = Tokenizer(models.WordPiece(unk_token="[UNK]"))
            wp.normalizer = normalizers.BertNormalizer(handle_chinese_chars=False, lowercase=False, strip_accents=False)
            wp.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
            wp.train_from_iterator(lines, trainers.WordPieceTrainer(vocab_size=300, special_tokens=["[UNK]"], show_progress=False))
            pieces = [p for p, _ in sorted(wp.get_vocab().items(), key=lambda kv: kv[1]) if p != "[UNK]"]
        (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + pieces) + "\n", encoding="utf-8")
        tok = BertJapaneseTokenizer(vocab_file=str(folder / "vocab.txt"), word_tokenizer_type="basic", model_max_length=512,
                                    subword_tokenizer_type="character" if name == "jachar" else "wordpiece")
        tok.save_pretrained(str(folder))
        config = BertConfig(vocab_size=len(tok), hidden_size=t["hidden"], num_hidden_layers=t["layers"], num_attention_heads=t["heads"],
                            intermediate_size=t["intermediate"], max_position_embeddings=t["max_position"], pad_token_id=0)
        BertForMaskedLM(config).save_pretrained(str(folder))
    else:
        raise ValueError(f"no hub-style teacher {name!r}; one of {', '.join(HUB_TEACHERS)}")
    return folder


@pytest.fixture(scope="session")
def hub_teachers(tmp_path_factory) -> dict[str, Path]:
    """HUB_TEACHERS' folders by name (built once per session)."""
    root = tmp_path_factory.mktemp("hub-teachers")
    return {name: build_hub_teacher(name, root / name, seed=10 + i) for i, name in enumerate(HUB_TEACHERS)}


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
