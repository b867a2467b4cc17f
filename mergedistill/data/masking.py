"""BERT-style masked-LM corruption as pure tensor functions.

Used by the data stage (masked corpora for distillation), by the intrinsic metrics (`eval/metrics.py`,
a fixed-seed mask: `fixed_masked_set`) and by the demo's pre-training (dynamic masking per batch:
`MLMCollator`).

Selection follows BERT's `create_pretraining_data`: per sequence, a fixed number of positions
(`round(mask_prob * eligible)`, at least one when anything is eligible) is drawn without replacement
among the non-special positions, so the rate is exact per sequence rather than Bernoulli-noisy. Of the
selected positions 80% become the mask token, 10% a random non-special token, 10% stay unchanged
(each decided per token, as BERT does, also under whole-word masking).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Sequence

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from mergedistill.data.packing import Packed

IGNORE_INDEX = -100
"""Label value ignored by `torch.nn.functional.cross_entropy` (and by the transformers MLM heads)."""


@dataclass
class MaskedBatch:
    input_ids: torch.Tensor
    """(B, L) long: the corrupted ids the model sees."""
    selected: torch.Tensor
    """(B, L) bool: positions chosen for prediction (whether replaced, randomised or kept)."""
    labels: torch.Tensor
    """(B, L) long: the original id at selected positions, IGNORE_INDEX (-100) elsewhere."""


def special_positions(input_ids: torch.Tensor, special_ids: Iterable[int] | torch.Tensor) -> torch.Tensor:
    """(B, L) bool: True where `input_ids` holds one of `special_ids` (CLS, SEP, PAD, UNK, MASK ...)."""
    special = torch.as_tensor(list(special_ids) if not isinstance(special_ids, torch.Tensor) else special_ids,
                              dtype=input_ids.dtype, device=input_ids.device)
    return torch.isin(input_ids, special)


def random_candidates(vocab_size: int, special_ids: Iterable[int]) -> torch.Tensor:
    """(C,) long: the ids a 'random token' replacement draws from: the whole vocabulary minus specials."""
    keep = torch.ones(vocab_size, dtype=torch.bool)
    specials = [i for i in special_ids if 0 <= i < vocab_size]
    keep[torch.tensor(specials, dtype=torch.long)] = False
    return keep.nonzero().squeeze(1)


def _rank_within_rows(scores: torch.Tensor) -> torch.Tensor:
    """(B, N) float -> (B, N) long: 0 for the smallest score of each row, 1 for the next, ..."""
    order = scores.argsort(dim=1)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(scores.shape[1], device=scores.device).expand_as(order))
    return ranks


def _counts(eligible: torch.Tensor, mask_prob: float) -> torch.Tensor:
    """(B,) long: how many units to select per row: round(mask_prob * eligible), at least 1 if any."""
    n = eligible.sum(dim=1)
    k = torch.round(n.to(torch.float64) * mask_prob).long()
    return torch.minimum(torch.clamp(k, min=1), n)


def select_positions(
    special_mask: torch.Tensor,
    mask_prob: float,
    generator: torch.Generator | None = None,
    word_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B, L) bool: the positions to predict.

    special_mask: (B, L) bool, True at positions never to select (specials, padding).
    word_ids: optional (B, L) long, the word each token belongs to (any non-negative ids, equal within
      a word; -1 for no word). Given it, whole words are selected: round(mask_prob * words) per row,
      so a token is selected with probability ~mask_prob, and all pieces of a word go together.
    """
    if not 0.0 < mask_prob <= 1.0:
        raise ValueError(f"mask_prob must be in (0, 1], got {mask_prob}")
    device = special_mask.device
    eligible = ~special_mask  # (B, L)
    if word_ids is None:
        scores = torch.rand(special_mask.shape, generator=generator, device=device)  # (B, L)
        scores = scores.masked_fill(~eligible, 2.0)  # ineligible rank last
        return (_rank_within_rows(scores) < _counts(eligible, mask_prob)[:, None]) & eligible

    if word_ids.shape != special_mask.shape:
        raise ValueError(f"word_ids has shape {tuple(word_ids.shape)}, expected {tuple(special_mask.shape)}")
    has_word = eligible & (word_ids >= 0)  # (B, L)
    # Re-number words densely per row so the per-word table stays small: (B, L) -> dense ids in [0, W).
    wid = torch.where(has_word, word_ids, torch.full_like(word_ids, -1))
    uniq, dense = torch.unique(wid, return_inverse=True)  # dense: (B, L) indexes `uniq`
    n_words = uniq.numel()
    # A word is present in a row if one of its tokens is eligible (-1 tokens are never eligible here).
    hits = torch.zeros(special_mask.shape[0], n_words, dtype=torch.long, device=device)  # (B, W)
    present = hits.scatter_add_(1, dense, has_word.long()) > 0  # (B, W) bool
    scores = torch.rand(present.shape, generator=generator, device=device).masked_fill(~present, 2.0)  # (B, W)
    chosen_words = (_rank_within_rows(scores) < _counts(present, mask_prob)[:, None]) & present  # (B, W)
    return chosen_words.gather(1, dense) & has_word


def corrupt(
    input_ids: torch.Tensor,
    selected: torch.Tensor,
    mask_token_id: int,
    candidates: torch.Tensor,
    generator: torch.Generator | None = None,
    replace_prob: float = 0.8,
    random_prob: float = 0.1,
) -> MaskedBatch:
    """Apply the 80/10/10 rule at `selected` (B, L) positions of `input_ids` (B, L).

    candidates: (C,) ids a random replacement draws from (`random_candidates`).
    replace_prob / random_prob: shares of selected positions turned into the mask token / a random
    token; the rest keep their id. Use replace_prob=1, random_prob=0 for evaluation-style masking.
    """
    if replace_prob < 0 or random_prob < 0 or replace_prob + random_prob > 1 + 1e-9:
        raise ValueError(f"replace_prob ({replace_prob}) and random_prob ({random_prob}) must be >= 0 and sum to <= 1")
    device = input_ids.device
    u = torch.rand(input_ids.shape, generator=generator, device=device)  # (B, L) one draw decides the branch
    to_mask = selected & (u < replace_prob)
    to_random = selected & (u >= replace_prob) & (u < replace_prob + random_prob)
    pick = torch.randint(len(candidates), input_ids.shape, generator=generator, device=device)  # (B, L)
    random_ids = candidates.to(device)[pick].to(input_ids.dtype)
    out = torch.where(to_mask, torch.full_like(input_ids, mask_token_id), input_ids)
    out = torch.where(to_random, random_ids, out)
    labels = torch.where(selected, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    return MaskedBatch(input_ids=out, selected=selected, labels=labels)


def mask_tokens(
    input_ids: torch.Tensor,
    special_mask: torch.Tensor,
    mask_token_id: int,
    candidates: torch.Tensor,
    mask_prob: float = 0.15,
    generator: torch.Generator | None = None,
    word_ids: torch.Tensor | None = None,
    replace_prob: float = 0.8,
    random_prob: float = 0.1,
) -> MaskedBatch:
    """BERT MLM masking: select `mask_prob` of the non-special positions, then 80/10/10.

    input_ids: (B, L) long; special_mask: (B, L) bool (True = never select: CLS, SEP, PAD, ...);
    candidates: (C,) long ids for random replacements; word_ids: optional (B, L) long for whole-word
    masking (-1 = no word). Deterministic given `generator` (and the same device).
    Returns MaskedBatch(input_ids (B, L), selected (B, L) bool, labels (B, L) with -100 elsewhere).
    """
    if input_ids.shape != special_mask.shape:
        raise ValueError(f"special_mask has shape {tuple(special_mask.shape)}, expected {tuple(input_ids.shape)}")
    selected = select_positions(special_mask, mask_prob, generator=generator, word_ids=word_ids)
    return corrupt(input_ids, selected, mask_token_id, candidates, generator=generator,
                   replace_prob=replace_prob, random_prob=random_prob)


class MLMCollator:
    """Gathers rows of a Packed set and masks them afresh (dynamic masking): each call draws from one
    generator, so a run's masks are reproducible given its seed and data order."""

    def __init__(self, packed: Packed, tokenizer: PreTrainedTokenizerBase, mask_prob: float, seed: int = 0,
                 whole_word_mask: bool = False, replace_prob: float = 0.8, random_prob: float = 0.1,
                 generator: torch.Generator | None = None):
        if whole_word_mask and packed.word_ids is None:
            raise ValueError("whole_word_mask needs word ids: tokenize with with_words=True")
        self.packed = packed
        self.special_ids = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)
        self.mask_id = tokenizer.mask_token_id
        self.candidates = random_candidates(len(tokenizer), tokenizer.all_special_ids)
        self.mask_prob = mask_prob
        self.whole_word_mask = whole_word_mask
        self.replace_prob, self.random_prob = replace_prob, random_prob
        self.generator = generator if generator is not None else torch.Generator().manual_seed(seed)

    def __call__(self, index: Sequence[int] | torch.Tensor) -> dict[str, torch.Tensor]:
        idx = torch.as_tensor(index, dtype=torch.long)
        ids = self.packed.input_ids[idx].long()  # (B, L)
        att = self.packed.attention_mask[idx]  # (B, L)
        special = special_positions(ids, self.special_ids) | ~att
        words = self.packed.word_ids[idx].long() if self.whole_word_mask else None  # type: ignore[index]
        m = mask_tokens(ids, special, self.mask_id, self.candidates, self.mask_prob, self.generator, words,
                        self.replace_prob, self.random_prob)
        return {"input_ids": m.input_ids, "attention_mask": att.long(), "labels": m.labels}


def fixed_masked_set(packed: Packed, tokenizer: PreTrainedTokenizerBase, mask_prob: float, seed: int,
                     limit: int | None = None, replace_prob: float = 0.8, random_prob: float = 0.1) -> dict[str, torch.Tensor]:
    """The first `limit` sequences of `packed`, masked once with `seed`: an evaluation set whose masks
    do not change between evaluations. Returns input_ids, attention_mask, labels, each (N, L)."""
    n = len(packed) if limit is None else min(limit, len(packed))
    collate = MLMCollator(packed, tokenizer, mask_prob, seed, replace_prob=replace_prob, random_prob=random_prob)
    return collate(list(range(n)))
