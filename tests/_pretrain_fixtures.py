"""Tiny fixtures for the masking / model / pre-training / metrics tests: tokenizers trained on a few
sentences and models of hidden 32, built in code and cached once per session."""
from __future__ import annotations

from functools import lru_cache

import torch

from mergedistill.mlm_models import build_mlm
from mergedistill.tokenizer_train import train_tokenizer

SENTENCES = [
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
    return train_tokenizer(kind, SENTENCES + patterned_texts(50), vocab_size={"sp-bpe": 300, "byte-bpe": 400}.get(kind, 120))


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
