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
                 positions as the teacher, and both predict among the same pieces (`masked_scores` with
                 `columns`); a gold token the student vocabulary pruned counts as a miss.
  agreement      share of masked positions where the student's top-1 equals the routed teacher's top-1
                 among the tokens the student vocabulary keeps (what distillation taught it).
  pll_per_word   PLL / words, in nats (a negative number; nearer 0 is better); comparable across
                 tokenizers because every model scores the same words.
  bits_per_char  -PLL / (characters x ln 2) for languages written without spaces (eval.char_languages);
                 characters exclude whitespace.
  pppl           pseudo-perplexity per word (or char): exp(-PLL / units).
  masked_ce      mean -log p(original token) over the masked positions, in nats, each model's distribution
                 renormalised over the same pieces (`masked_scores` with `columns`).

Paired differences between two models scored on the same units (lines), with a percentile bootstrap
interval over the units (`per_unit_sums`, `paired_bootstrap`), are plain numpy functions.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from mergedistill.data.masking import IGNORE_INDEX, fixed_masked_set
from mergedistill.data.packing import SpecialLayout, pack_documents, tokenize_documents
from mergedistill.models.mlm import masked_logits, top1, usable_positions
from mergedistill.tokens import UNK_ID

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
    by the mask token. Returns input_ids, attention_mask, labels and line: each (N, seq_len); line is
    the index in `texts` of the text each token comes from (-1 at specials and padding)."""
    docs, _ = tokenize_documents(tokenizer, texts)
    # one "word" per text: packing numbers a sequence's pieces from 0 and leaves -1 at specials and padding,
    # which marks the content positions; the ids are what pack_texts gives
    packed = pack_documents(docs, seq_len, SpecialLayout.of(tokenizer), tokenizer.pad_token_id, [[0] * len(d) for d in docs])
    out = fixed_masked_set(packed, tokenizer, mask_prob, seed, limit=max_sequences, replace_prob=1.0, random_prob=0.0)
    content = packed.word_ids >= 0  # type: ignore[operator]  # (N, L)
    line = line_index(content, [len(d) for d in docs])
    if not torch.equal(packed.input_ids[content].long(), torch.tensor([t for d in docs for t in d], dtype=torch.long)):
        raise RuntimeError("packing no longer keeps the texts whole and in order: line_index cannot attribute positions to texts")
    out["line"] = line[:out["input_ids"].shape[0]]
    return out


def line_index(content: torch.Tensor, lengths: Sequence[int]) -> torch.Tensor:
    """(N, L) long: which text each content position holds, -1 elsewhere. content: (N, L) bool, True at
    the tokens of the texts (not specials, not padding); lengths: tokens of each text. Packing keeps texts
    in order (a text longer than a sequence continues in the next ones), so the k-th content position in
    row-major order belongs to the text whose cumulative length first exceeds k."""
    ends = torch.cumsum(torch.tensor(list(lengths), dtype=torch.long), 0)  # (T,)
    total = int(ends[-1]) if len(ends) else 0
    if int(content.sum()) != total:
        raise ValueError(f"{int(content.sum())} content positions for {total} tokens of text")
    out = torch.full(content.shape, -1, dtype=torch.long)
    out[content] = torch.searchsorted(ends, torch.arange(total), right=True)
    return out


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
    allowed: torch.Tensor | None = None,
) -> list[float]:
    """PLL of each text: the sum over its tokens of log p(true token | the text with it masked).

    Every token of the text is scored (specials added by the post-processor are not). A text longer
    than `max_len` tokens (default: what the model's position table allows) is scored in consecutive
    windows, each wrapped in the tokenizer's specials. The masked copies of all texts are batched
    together, `batch_size` copies per forward pass, shortest windows first to limit padding.
    allowed: optional (V,) bool over the model's outputs: p is the softmax over those ids only (the head
    computes just their logits), as a student restricted to its language's ids is used; a true token
    outside them scores -inf."""
    model.eval()
    columns = where = None
    if allowed is not None:
        columns = allowed.nonzero().squeeze(1)  # (S,)
        where = _column_of(columns, allowed.shape[0])
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
        if columns is None:
            logits = masked_logits(model, input_ids.to(device), attention.to(device), selected.to(device)).float()  # (R, V)
            scores = torch.log_softmax(logits, dim=-1).cpu()[rows, true_ids].tolist()
        else:
            logits = logits_of_columns(model, input_ids.to(device), attention.to(device), selected.to(device), columns)  # (R, S)
            col = where[true_ids]  # type: ignore[index]  # (R,)
            logp = torch.log_softmax(logits, dim=-1).cpu()[rows, col.clamp(min=0)]
            scores = logp.masked_fill(col < 0, float("-inf")).tolist()
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
    # the tokens the scoring windowed, counted as it tokenized them: through the backend, not the wrapper,
    # whose "Token indices sequence length is longer than the specified maximum" would be noise here
    tokens = sum(len(d) for d in tokenize_documents(tokenizer, texts)[0])
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
            if allowed.shape != logits.shape[1:]:
                raise ValueError(f"allowed has {allowed.shape[0]} ids, the model {logits.shape[1]}")
            top_ok.append(top1(logits.masked_fill(~allowed.to(device), float("-inf"))).cpu())
    empty = torch.zeros(0, dtype=torch.long)
    return (torch.cat(top) if top else empty), ((torch.cat(top_ok) if top_ok else empty) if allowed is not None else None)


def logits_of_columns(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, selected: torch.Tensor,
                      columns: torch.Tensor) -> torch.Tensor:
    """(n, S) float32 logits of the `columns` (S,) ids at the n selected positions (`masked_logits`): the
    decoder computes only those rows where it is a plain linear map, else (e.g. int8 weights) all of them,
    indexed."""
    decoder = model.get_output_embeddings()
    if isinstance(getattr(decoder, "weight", None), torch.Tensor):
        return masked_logits(model, input_ids, attention_mask, selected, columns=columns.to(input_ids.device)).float()
    return masked_logits(model, input_ids, attention_mask, selected)[:, columns.to(input_ids.device)].float()


def _column_of(columns: torch.Tensor, size: int) -> torch.Tensor:
    """(size,) long: the column of each id among `columns` (S,), -1 for ids outside them."""
    where = torch.full((size,), -1, dtype=torch.long)
    where[columns.long()] = torch.arange(columns.numel())
    return where


@dataclass
class MaskedScores:
    """A model's predictions at the masked positions, among a set of its output ids (`masked_scores`)."""

    top: torch.Tensor
    """(M,) long: the top-1 id among the columns (an id of the model's head)."""
    gold_logp: torch.Tensor
    """(M,) float64: log p(gold) with the softmax over the columns only; nan where no gold was given
    (gold < 0) or the gold id is not a column."""


@torch.inference_mode()
def masked_scores(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    selected: torch.Tensor,
    columns: torch.Tensor,
    gold: torch.Tensor | None = None,
    batch_size: int = 32,
) -> MaskedScores:
    """Top-1 and log-probability of the gold token at the selected positions (row-major order of
    `selected`), the distribution renormalised over `columns`: a masked LM restricted to those ids.

    input_ids, attention_mask, selected: (N, L); columns: (S,) long ids of the model's head (the head
    computes only these logits); gold: optional (M,) long head ids, M = selected.sum(), -1 for positions not
    to score. Rows are processed `batch_size` at a time, each batch cut to its longest row; CPU results."""
    model.eval()
    device = next(model.parameters()).device
    columns = columns.long()
    m = int(selected.sum())
    if gold is None or gold.numel() == 0 or int(gold.max()) < 0:
        gold_col = torch.full((m,), -1, dtype=torch.long)
    else:
        where = _column_of(columns, max(int(columns.max()), int(gold.max())) + 1)
        gold_col = where[gold.long().clamp(min=0)].masked_fill(gold < 0, -1)
    if gold_col.shape != (m,):
        raise ValueError(f"gold has {tuple(gold_col.shape)} ids for {m} selected positions")
    lengths = attention_mask.long().sum(1)
    top, logp = [], []
    done = 0
    for start in range(0, input_ids.shape[0], batch_size):
        sl = slice(start, start + batch_size)
        width = int(lengths[sl].max()) if lengths[sl].numel() else 0
        sel = selected[sl, :width]
        k = int(sel.sum())
        if k != int(selected[sl].sum()):
            raise ValueError("a selected position beyond the attention mask")
        if k == 0:
            continue
        logits = logits_of_columns(model, input_ids[sl, :width].long().to(device), attention_mask[sl, :width].long().to(device),
                                   sel.to(device), columns)  # (k, S)
        top.append(columns[top1(logits).cpu()])
        g = gold_col[done:done + k]  # (k,)
        lp = torch.log_softmax(logits, dim=-1).cpu().gather(1, g.clamp(min=0)[:, None]).squeeze(1).double()
        logp.append(lp.masked_fill(g < 0, float("nan")))
        done += k
    empty = torch.zeros(0, dtype=torch.long)
    return MaskedScores(torch.cat(top) if top else empty, torch.cat(logp) if logp else empty.double())


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


# ---------------------------------------------------------------------------------------------------
# Paired differences with bootstrap intervals


def per_unit_sums(values: torch.Tensor | np.ndarray, units: torch.Tensor | np.ndarray, n_units: int) -> np.ndarray:
    """Sum of `values` (M,) per unit: units (M,) ints in [0, n_units) -> (n_units,) float64 (0 for a unit
    with no values)."""
    return np.bincount(np.asarray(units, dtype=np.int64), weights=np.asarray(values, dtype=np.float64), minlength=n_units)


def paired_bootstrap(a_sums: np.ndarray, b_sums: np.ndarray, counts: np.ndarray, n: int, seed: int,
                     level: float = 0.95) -> tuple[float, float, float]:
    """The difference of two models' means over the same positions, grouped in units (lines), with a
    paired percentile bootstrap interval over the units.

    a_sums, b_sums: (U,) per-unit sums of each model's per-position values (hits, nats); counts: (U,)
    positions per unit. diff = sum(a) / sum(counts) - sum(b) / sum(counts). Units with no positions are left
    out; each of the `n` resamples draws the U' remaining units with replacement, the same draw for both
    models (`np.random.default_rng(seed).integers(0, U', U')`, one call per resample, in order), and the
    interval is the (1 - level) / 2 and (1 + level) / 2 percentiles of the resampled differences (numpy's
    linear interpolation). Returns (diff, lo, hi); nan's when no unit has a position."""
    a, b, c = (np.asarray(x, dtype=np.float64) for x in (a_sums, b_sums, counts))
    if not (a.shape == b.shape == c.shape and a.ndim == 1):
        raise ValueError(f"per-unit arrays of shapes {a.shape}, {b.shape}, {c.shape}")
    keep = c > 0
    d, c = (a - b)[keep], c[keep]  # (U',) paired per-unit differences
    units = d.shape[0]
    if units == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    diffs = np.empty(n, dtype=np.float64)
    chunk = max(1, (1 << 22) // units)  # resamples per vectorised step: ~4M drawn indices at a time
    for start in range(0, n, chunk):
        idx = np.stack([rng.integers(0, units, units) for _ in range(min(chunk, n - start))])  # (k, U')
        diffs[start:start + idx.shape[0]] = d[idx].sum(1) / c[idx].sum(1)
    lo, hi = np.percentile(diffs, [50 * (1 - level), 50 * (1 + level)])
    return float(d.sum() / c.sum()), float(lo), float(hi)

