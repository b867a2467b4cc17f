"""The evaluation's math, apart from any file or config: top-1 predictions at masked positions, the
student's view of a teacher-tokenized evaluation set, accuracy / agreement, per-unit PLL figures and
mean pooling.

Definitions (what `evaluate` reports):

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
from typing import Sequence

import numpy as np
import torch
from transformers import PreTrainedModel

from mergedistill.mlm_models import masked_logits
from mergedistill.vocab.joint import UNK_ID


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
        top.append(logits.argmax(-1).cpu())
        if allowed is not None:
            assert allowed.shape == logits.shape[1:], f"allowed has {allowed.shape[0]} ids, the model {logits.shape[1]}"
            top_ok.append(logits.masked_fill(~allowed.to(device), float("-inf")).argmax(-1).cpu())
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
