"""Cross-lingual retrieval of translations on aligned paragraphs.

Test corpora in JSON lines may carry a `key` (the LibreOffice help gives every paragraph an id shared by
its translations). Two languages sharing at least `min_shared` keys form a pair; each side's paragraph
is embedded as the mean of the last hidden layer over its tokens (specials and padding excluded), and
for every source paragraph the nearest target paragraph by cosine similarity is retrieved.

  retrieval_acc@1  share of source paragraphs whose nearest target paragraph is their translation,
                   among the pair's aligned paragraphs (both directions reported). Each side's
                   embeddings are first centred (their mean subtracted): the mean carries the language,
                   not the meaning, and would otherwise dominate the cosine (Libovicky et al., 2020).
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from mergedistill.config import DATASETS_PREFIX
from mergedistill.corpus import iter_json_lines
from mergedistill.eval.metrics import mean_pool

MIN_SHARED = 20
"""Aligned paragraphs two languages need in common to form a retrieval pair."""


# ---- pure ------------------------------------------------------------------------------------------
def retrieval_accuracy(src: torch.Tensor, tgt: torch.Tensor, center: bool = True) -> float:
    """accuracy@1 of retrieving tgt[i] for src[i]: (N, H), (N, H) -> share of rows i whose most
    cosine-similar row of `tgt` is row i (ties go to the lowest index)."""
    if src.shape[0] != tgt.shape[0] or src.shape[0] == 0:
        raise ValueError(f"need the same positive number of rows, got {src.shape[0]} and {tgt.shape[0]}")
    src, tgt = src.double(), tgt.double()
    if center:
        src, tgt = src - src.mean(0, keepdim=True), tgt - tgt.mean(0, keepdim=True)
    sim = F.normalize(src, dim=1) @ F.normalize(tgt, dim=1).T  # (N, N)
    return float((sim.argmax(1) == torch.arange(src.shape[0])).double().mean())


def _order(key: str, seed: int) -> str:
    return hashlib.sha1(f"{seed}\x00{key}".encode()).hexdigest()


def aligned_pairs(keyed: dict[str, dict[str, str]], max_pairs: int, seed: int = 0,
                  min_shared: int = MIN_SHARED) -> dict[tuple[str, str], list[str]]:
    """Language pairs (in the order of `keyed`) with at least `min_shared` keys in common, each with at
    most `max_pairs` of them. All pairs draw from one seeded order of keys, so a language's sample
    overlaps across its pairs (fewer paragraphs to embed)."""
    langs = list(keyed)
    out: dict[tuple[str, str], list[str]] = {}
    for i, a in enumerate(langs):
        for b in langs[i + 1:]:
            shared = keyed[a].keys() & keyed[b].keys()
            if len(shared) >= min_shared:
                out[(a, b)] = sorted(shared, key=lambda k: _order(k, seed))[:max_pairs]
    return out


# ---- reading ---------------------------------------------------------------------------------------
def jsonl_twin(spec: str | None) -> Path | None:
    """The JSON-lines version of a corpus file: itself, or corpora/<lang>/test.txt -> test.jsonl when
    that exists (the corpus builder writes both); None for datasets specs and files without one."""
    if not spec or spec.startswith(DATASETS_PREFIX):
        return None
    p = Path(spec)
    twin = p if p.suffix in (".jsonl", ".json") else p.with_suffix(".jsonl")
    return twin if twin.is_file() else None


def read_keyed(spec: str | None, where: str) -> dict[str, str]:
    """key -> paragraph of a JSON-lines test corpus (fields `text`, `key`), or of its JSON-lines twin
    (see `jsonl_twin`); {} for corpora without keys. A key seen twice keeps its first paragraph."""
    twin = jsonl_twin(spec)
    if twin is None:
        return {}
    out: dict[str, str] = {}
    for _, obj in iter_json_lines(str(twin), where):
        key, text = (obj.get("key"), obj.get("text")) if isinstance(obj, dict) else (None, None)
        if isinstance(key, str) and isinstance(text, str) and text.strip() and key not in out:
            out[key] = text.strip()
    return out


# ---- embedding -------------------------------------------------------------------------------------
@torch.inference_mode()
def embed_texts(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str],
                max_len: int, batch_size: int = 32) -> torch.Tensor:
    """(N, H) float32: each text's mean-pooled last hidden layer (specials and padding excluded),
    truncated to `max_len` tokens. Texts are batched shortest first to limit padding."""
    model.eval()
    device = next(model.parameters()).device
    enc = tokenizer(list(texts), truncation=True, max_length=max_len, return_special_tokens_mask=True,
                    return_attention_mask=False, return_token_type_ids=False)
    ids, special = enc["input_ids"], enc["special_tokens_mask"]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out = torch.zeros(len(ids), model.config.hidden_size)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        width = max(len(ids[r]) for r in rows)
        x = torch.full((len(rows), width), pad, dtype=torch.long)  # (B, W)
        att = torch.zeros((len(rows), width), dtype=torch.long)
        keep = torch.zeros((len(rows), width), dtype=torch.bool)
        for j, r in enumerate(rows):
            n = len(ids[r])
            x[j, :n] = torch.tensor(ids[r])
            att[j, :n] = 1
            keep[j, :n] = ~torch.tensor(special[r], dtype=torch.bool)
        hidden = model.base_model(input_ids=x.to(device), attention_mask=att.to(device)).last_hidden_state  # (B, W, H)
        out[torch.tensor(rows)] = mean_pool(hidden.float(), keep.to(device)).cpu()
    return out
