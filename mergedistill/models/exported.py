"""Using an exported student (runs/<run>/train/export/) for one language: the model, the language's
tokenizer, and predictions restricted to the ids that tokenizer can write (token_ids/<lang>.npy). The
joint vocabulary holds every teacher's tokens; without the restriction a fill-mask for Polish may answer
with a Chinese teacher's token or with a placeholder no text produces.

    from mergedistill.models.exported import load_student
    pl = load_student("runs/demo/train/export", "pl")
    pl.fill_mask("Warszawa jest stolicą <mask>.")   # [[{"token_str": "Polski", "score": 0.41, "token": 1234}, ...]]

Plain transformers code that does the same is in the exported folder's README.md.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mergedistill.errors import UserError


@dataclass
class LanguageStudent:
    """An exported student as one language uses it."""

    language: str
    model: object
    """The masked LM (AutoModelForMaskedLM), in eval mode."""
    tokenizer: object
    """The language's tokenizer (its teacher's, emitting student ids)."""
    allowed: torch.Tensor
    """(n,) long: the student ids this language's tokenizer can write."""

    def restrict(self, logits: torch.Tensor) -> torch.Tensor:
        """`logits` (..., V) with every id outside the language's set at -inf."""
        keep = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
        keep[self.allowed.to(logits.device)] = True
        return logits.masked_fill(~keep, float("-inf"))

    def token_str(self, token_id: int) -> str:
        """What a prediction writes: the decoded token, or the token itself when it decodes to nothing (a
        lone word-boundary mark such as `▁`)."""
        return self.tokenizer.decode([token_id]).strip() or self.tokenizer.convert_ids_to_tokens(token_id)

    @torch.no_grad()
    def fill_mask(self, text: str, top_k: int = 5) -> list[list[dict]]:
        """For each mask token in `text` (write it as `tokenizer.mask_token`), the `top_k` predictions
        among the language's ids: dicts with token (id), token_str (see `token_str`) and score (probability
        among the language's ids)."""
        device = next(self.model.parameters()).device
        inputs = self.tokenizer(text, return_tensors="pt").to(device)
        where = (inputs["input_ids"][0] == self.tokenizer.mask_token_id).nonzero().squeeze(1)
        if where.numel() == 0:
            raise ValueError(f"no mask token ({self.tokenizer.mask_token}) in {text!r}")
        logits = self.model(**inputs).logits[0, where]  # (masks, V)
        probs = self.restrict(logits.float()).softmax(-1)
        out = []
        for row in probs:
            p, ids = row.topk(min(top_k, len(self.allowed)))
            out.append([{"token": int(i), "token_str": self.token_str(int(i)), "score": float(v)} for v, i in zip(p.tolist(), ids.tolist())])
        return out


def load_student(folder: str | Path, language: str, device: str | torch.device = "cpu") -> LanguageStudent:
    """The exported student in `folder` with `language`'s tokenizer and id set."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    folder = Path(folder)
    langs_file = folder / "languages.json"
    if not langs_file.is_file():
        raise UserError(f"{folder}: no languages.json; is it a folder exported by `mergedistill train`?")
    langs = json.loads(langs_file.read_text(encoding="utf-8"))
    if language not in langs:
        raise UserError(f"{folder}: no language {language!r}; it has {', '.join(langs)}")
    ids_file = folder / "token_ids" / f"{language}.npy"
    if not ids_file.is_file():
        raise UserError(f"{folder}: no {ids_file.relative_to(folder)} (exported by an older mergedistill); retrain or re-export it")
    model = AutoModelForMaskedLM.from_pretrained(str(folder)).eval().to(device)
    tokenizer = AutoTokenizer.from_pretrained(str(folder / langs[language]))
    return LanguageStudent(language, model, tokenizer, torch.from_numpy(np.load(ids_file).astype(np.int64)))
