"""Metrics of a masked LM on held-out text, and a unigram baseline for each: what `evaluate` reports
(and the demo's teacher report uses).

  masked-token accuracy   fixed-seed BERT mask (every selected token replaced by the mask token),
                          argmax at each masked position vs the true token.
  pseudo-perplexity       PLL(text) = sum_i log p(token_i | text with token_i masked) (Salazar et al.,
                          2020); reported per word, exp(-PLL / words), so that models with different
                          tokenizers are comparable. The unit is a parameter: whitespace words, or
                          characters for languages written without spaces (ja, zh).
  unigram baseline        token frequencies of the training split with add-one smoothing over the
                          vocabulary: its accuracy predicts the most frequent token everywhere; its
                          per-word perplexity uses log p_unigram(token) in place of the PLL terms.

Per-token accuracies are only comparable between models sharing a tokenizer; per-word (or per-char)
pseudo-perplexities are comparable across tokenizers.

The student's view of a teacher-tokenized evaluation set (`to_student_ids`), top-1 predictions at masked
positions (`masked_top1`), accuracy / agreement (`hit_rate`), per-unit PLL figures and mean pooling are
plain functions of tensors, apart from any file or config. What `evaluate` reports:

  mlm_acc        share of masked positions whose top-1 prediction is the original token. The student
                 reads the routed teacher's tokenization mapped to student ids, with the same masked
                 positions as the teacher; a gold token the student vocabulary pruned counts as a miss.
  agreement      share of masked positions where the student's top-1 equals the routed teacher's top-1
                 among the tokens the student vocabulary keeps (what distillation taught it).
  pll_per_word   PLL / words, in nats (a negative number; nearer 0 is better); comparable across
                 tokenizers because every model scores the same words.
  bits_per_char  -PLL / (characters x ln 2) for languages written without spaces (eval.char_languages);
                 characters exclude whitespace.
  pppl           pseudo-perplexity per word (or char): exp(-PLL / units).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from mergedistill.data.masking import IGNORE_INDEX, fixed_masked_set
from mergedistill.data.packing import SpecialLayout, pack_texts, tokenize_documents
from mergedistill.mlm_models import masked_logits, top1, usable_positions
from mergedistill.vocab.joint import UNK_ID

Unit = Literal["word", "char"]


def count_units(text: str, unit: Unit) -> int:
    """Words (whitespace-separated) or characters (whitespace excluded) in `text`."""
    if unit == "word":
        return len(text.split())
    if unit == "char":
        return sum(1 for ch in text if not ch.isspace())
    raise ValueError(f"unit must be 'word' or 'char', got {unit!r}")


def pseudo_perplexity(log_likelihood: float, units: int) -> float:
    """exp(-LL / units): perplexity per word (or char) from a summed (pseudo-)log-likelihood."""
    if units <= 0:
        raise ValueError("no words to normalise by")
    return math.exp(-log_likelihood / units)


# ---------------------------------------------------------------------------------------------------
# Masked-token accuracy


def masked_eval_set(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], seq_len: int,
                    mask_prob: float = 0.15, seed: int = 0, max_sequences: int | None = None) -> dict[str, torch.Tensor]:
    """Held-out texts packed as in training, masked once with `seed`, every selected token replaced
    by the mask token. Returns input_ids, attention_mask, labels: each (N, seq_len)."""
    packed = pack_texts(tokenizer, texts, seq_len)
    return fixed_masked_set(packed, tokenizer, mask_prob, seed, limit=max_sequences, replace_prob=1.0, random_prob=0.0)


@dataclass
class Score:
    value: float
    count: int
    """Masked positions (accuracy) the value is computed over."""


@torch.inference_mode()
def masked_token_accuracy(model: PreTrainedModel, eval_set: dict[str, torch.Tensor], batch_size: int = 64) -> Score:
    """Share of masked positions where the model's top prediction is the original token."""
    model.eval()
    hits = total = 0
    for start in range(0, eval_set["input_ids"].shape[0], batch_size):
        ids = eval_set["input_ids"][start:start + batch_size]  # (b, L)
        att = eval_set["attention_mask"][start:start + batch_size]
        labels = eval_set["labels"][start:start + batch_size]
        selected = labels != IGNORE_INDEX  # (b, L)
        if not selected.any():
            continue
        device = next(model.parameters()).device
        pred = top1(masked_logits(model, ids.to(device), att.to(device), selected.to(device))).cpu()  # (n,)
        hits += int((pred == labels[selected]).sum())
        total += int(selected.sum())
    return Score(hits / total if total else float("nan"), total)


# ---------------------------------------------------------------------------------------------------
# Pseudo-log-likelihood


@torch.inference_mode()
def pseudo_log_likelihoods(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    max_len: int | None = None,
    batch_size: int = 128,
) -> list[float]:
    """PLL of each text: the sum over its tokens of log p(true token | the text with it masked).

    Every token of the text is scored (specials added by the post-processor are not). A text longer
    than `max_len` tokens (default: what the model's position table allows) is scored in consecutive
    windows, each wrapped in the tokenizer's specials. The masked copies of all texts are batched
    together, `batch_size` copies per forward pass, shortest windows first to limit padding."""
    model.eval()
    layout = SpecialLayout.of(tokenizer)
    max_len = max_len or min(usable_positions(model), tokenizer.model_max_length)
    room = max_len - len(layout.prefix) - len(layout.suffix)
    if room < 1:
        raise ValueError(f"max_len {max_len} leaves no room beside the special tokens")
    docs, _ = tokenize_documents(tokenizer, texts)
    windows = [(t, layout.prefix + doc[s:s + room] + layout.suffix)
               for t, doc in enumerate(docs) for s in range(0, len(doc), room)]
    windows.sort(key=lambda w: len(w[1]))
    # One masked copy per content position of each window: (text index, window ids, position).
    copies = [(t, ids, pos) for t, ids in windows for pos in range(len(layout.prefix), len(ids) - len(layout.suffix))]
    totals = [0.0] * len(texts)
    mask_id, pad_id = tokenizer.mask_token_id, tokenizer.pad_token_id
    for start in range(0, len(copies), batch_size):
        chunk = copies[start:start + batch_size]
        width = max(len(ids) for _, ids, _ in chunk)
        input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)  # (R, W)
        attention = torch.zeros((len(chunk), width), dtype=torch.long)
        for r, (_, ids, _) in enumerate(chunk):
            input_ids[r, :len(ids)] = torch.tensor(ids)
            attention[r, :len(ids)] = 1
        rows = torch.arange(len(chunk))
        positions = torch.tensor([pos for _, _, pos in chunk])
        true_ids = input_ids[rows, positions].clone()  # (R,)
        input_ids[rows, positions] = mask_id
        selected = torch.zeros_like(input_ids, dtype=torch.bool)
        selected[rows, positions] = True  # one position per row, so row-major order = row order
        device = next(model.parameters()).device
        logits = masked_logits(model, input_ids.to(device), attention.to(device), selected.to(device)).float()  # (R, V)
        scores = torch.log_softmax(logits, dim=-1).cpu()[rows, true_ids].tolist()
        for (t, _, _), s in zip(chunk, scores):
            totals[t] += s
    return totals


# ---------------------------------------------------------------------------------------------------
# Unigram baseline


@dataclass
class UnigramBaseline:
    """Add-one-smoothed token frequencies of a tokenizer's output on a training text."""

    log_probs: torch.Tensor
    """(V,) float64: log((count + 1) / (total + V)) over the tokenizer's whole vocabulary."""
    top_id: int
    """The most frequent token: the unigram model's prediction at every masked position."""
    total: int
    """Tokens counted."""

    @classmethod
    def from_texts(cls, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> "UnigramBaseline":
        docs, _ = tokenize_documents(tokenizer, texts)
        vocab = len(tokenizer)
        counts = torch.zeros(vocab, dtype=torch.float64)
        for doc in docs:
            if doc:
                counts += torch.bincount(torch.tensor(doc), minlength=vocab).double()
        total = int(counts.sum())
        log_probs = torch.log((counts + 1.0) / (total + vocab))
        return cls(log_probs=log_probs, top_id=int(counts.argmax()), total=total)

    def accuracy(self, eval_set: dict[str, torch.Tensor]) -> Score:
        """Masked-token accuracy of always predicting `top_id`, on the same masked positions."""
        labels = eval_set["labels"]
        target = labels[labels != IGNORE_INDEX]
        n = int(target.numel())
        return Score(float((target == self.top_id).sum()) / n if n else float("nan"), n)

    def log_likelihoods(self, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> list[float]:
        """Sum of unigram log-probabilities of each text's tokens (the same tokens the PLL scores)."""
        docs, _ = tokenize_documents(tokenizer, texts)
        return [float(self.log_probs[torch.tensor(doc, dtype=torch.long)].sum()) if doc else 0.0 for doc in docs]


def score_pll(model, tokenizer, texts: list[str], unit: str) -> dict:
    """Pseudo-perplexity per unit (word or char) of a masked LM on `texts`, with what it was computed
    from: PLL (nats), units, tokens and lines. `select` ranks teachers by it, `ablate` students."""
    pll = sum(pseudo_log_likelihoods(model, tokenizer, texts))
    units = sum(count_units(t, unit) for t in texts)
    tokens = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)
    return {"ppl": pseudo_perplexity(pll, units), "pll": pll, "units": units, "tokens": tokens, "lines": len(texts)}


# ---------------------------------------------------------------------------------------------------
# Scoring helpers


def to_student_ids(idmap: np.ndarray, teacher_ids: torch.Tensor, pruned: int | None = UNK_ID) -> torch.Tensor:
    """Teacher ids (any shape) -> student ids through a vocabulary id map (-1 = pruned).

    pruned: the id a pruned token becomes (UNK for model inputs), or None to keep -1 (for gold labels
    and teacher predictions: -1 never equals a student prediction, so a pruned token is a miss)."""
    table = torch.from_numpy(np.asarray(idmap, dtype=np.int64))
    out = table[teacher_ids.long()]
    if pruned is not None:
        out = torch.where(out < 0, torch.full_like(out, pruned), out)
    return out


@torch.inference_mode()
def masked_top1(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    selected: torch.Tensor,
    batch_size: int = 32,
    allowed: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Top-1 ids at the selected positions, in row-major order of `selected`.

    input_ids, attention_mask, selected: (N, L); allowed: optional (V,) bool, the ids an argmax may
    pick (one per output of the model's head). Returns (top1 (M,), top1 among `allowed` (M,) or None), M = selected.sum(), on the CPU.
    Rows are processed `batch_size` at a time, each batch cut to its longest row."""
    model.eval()
    device = next(model.parameters()).device
    lengths = attention_mask.long().sum(1)
    top, top_ok = [], []
    for start in range(0, input_ids.shape[0], batch_size):
        sl = slice(start, start + batch_size)
        width = int(lengths[sl].max()) if lengths[sl].numel() else 0
        sel = selected[sl, :width]
        if width == 0 or not sel.any():
            continue
        logits = masked_logits(model, input_ids[sl, :width].long().to(device),
                               attention_mask[sl, :width].long().to(device), sel.to(device)).float()  # (m, V)
        top.append(top1(logits).cpu())
        if allowed is not None:
            assert allowed.shape == logits.shape[1:], f"allowed has {allowed.shape[0]} ids, the model {logits.shape[1]}"
            top_ok.append(top1(logits.masked_fill(~allowed.to(device), float("-inf"))).cpu())
    empty = torch.zeros(0, dtype=torch.long)
    return (torch.cat(top) if top else empty), ((torch.cat(top_ok) if top_ok else empty) if allowed is not None else None)


def hit_rate(pred: torch.Tensor, gold: torch.Tensor) -> float:
    """Share of positions where pred == gold: (M,) and (M,) -> float (nan when M = 0). Used for both
    accuracy (gold = the original tokens) and agreement (gold = the teacher's predictions)."""
    if pred.shape != gold.shape:
        raise ValueError(f"pred has shape {tuple(pred.shape)}, gold {tuple(gold.shape)}")
    n = pred.numel()
    return float((pred == gold).sum()) / n if n else float("nan")


def pll_per_unit(pll: float, units: int) -> float:
    """Summed PLL (nats) divided by the words (or characters) it covers."""
    if units <= 0:
        raise ValueError("no units to normalise by")
    return pll / units


def bits_per_char(pll: float, chars: int) -> float:
    """-PLL / (chars * ln 2): the PLL in bits per (non-whitespace) character."""
    if chars <= 0:
        raise ValueError("no characters to normalise by")
    return -pll / (chars * math.log(2))


def mean_pool(hidden: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Mean of the hidden states where `keep` is True: (B, L, H), (B, L) bool -> (B, H).
    A row with nothing kept pools to zeros."""
    w = keep.to(hidden.dtype).unsqueeze(-1)  # (B, L, 1)
    return (hidden * w).sum(1) / w.sum(1).clamp(min=1.0)


def summarize(values: Sequence[float]) -> float:
    """Mean of the finite values (nan if none)."""
    ok = [v for v in values if v == v and not math.isinf(v)]
    return sum(ok) / len(ok) if ok else float("nan")
