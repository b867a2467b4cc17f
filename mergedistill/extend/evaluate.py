"""What the report measures, with eval.metrics' functions: on the new language's test split, masked
accuracy (among its own tokens, and among all ids), PLL, agreement with its teacher; on each old
language's test split, how much the extended student differs from the original one.

"Its own tokens" are the ids its tokenizer emits (specials aside): each language of the student reads
and is scored through its own tokenizer, and over those ids the old languages' predictions cannot move
when only new rows were added (their hidden states and logits at old ids are the original's). Among
all ids a new row may outscore an old language's prediction; the report counts how often.
"""
from __future__ import annotations

import numpy as np
import torch

from mergedistill.data.masking import IGNORE_INDEX
from mergedistill.eval.metrics import (
    bits_per_char,
    count_units,
    hit_rate,
    masked_eval_set,
    masked_top1,
    pll_per_unit,
    pseudo_log_likelihoods,
    pseudo_perplexity,
)
from mergedistill.extend.surgery import is_xmod, outputs_restricted
from mergedistill.models.mlm import masked_logits, top1


def new_language_metrics(model, tokenizer, acc_texts: list[str], pll_texts: list[str], own: torch.Tensor, *, seq_len: int,
                         mask_prob: float, seed: int, batch_size: int, unit: str, restrict_pll: bool,
                         teacher=None) -> dict:
    """Masked accuracy among the language's own ids (`own`, (V,) bool) and among all ids, PLL per
    word (or bits per char), and with `teacher` = (model, student->teacher id map, teacher's allowed ids,
    teacher->student id map) the agreement of the student's top-1 with the teacher's top-1."""
    eset = masked_eval_set(tokenizer, acc_texts, seq_len, mask_prob, seed)
    sel = eset["labels"] != IGNORE_INDEX
    gold = eset["labels"][sel]
    top_all, top_own = masked_top1(model, eset["input_ids"], eset["attention_mask"], sel, batch_size, allowed=own)
    out = {"acc_own": hit_rate(top_own, gold), "acc_all": hit_rate(top_all, gold), "masked": int(gold.numel())}
    with outputs_restricted(model, own if restrict_pll else None):
        pll = sum(pseudo_log_likelihoods(model, tokenizer, pll_texts, max_len=seq_len, batch_size=batch_size * 4))
    units = sum(count_units(t, unit) for t in pll_texts)
    out["pll_per_word" if unit == "word" else "bits_per_char"] = pll_per_unit(pll, units) if unit == "word" else bits_per_char(pll, units)
    try:
        out["pppl"] = pseudo_perplexity(pll, units)
    except OverflowError:
        out["pppl"] = float("inf")
    if teacher is not None:
        t_model, to_teacher, t_allowed, to_student = teacher
        t_in = torch.from_numpy(to_teacher)[eset["input_ids"].long()]
        lacking = eset["input_ids"][eset["attention_mask"].bool() & (t_in < 0)]
        if lacking.numel():  # the language's tokenizer is its teacher's (+ id map): every id it writes has a teacher id
            raise RuntimeError(f"extend evaluate: {lacking.numel()} test-split positions hold ids the language's teacher lacks "
                               f"(first: {sorted(set(lacking.tolist()))[:5]}); the new tokenizer and its teacher's id map disagree")
        _, t_top = masked_top1(t_model, t_in.clamp(min=0), eset["attention_mask"], sel, batch_size, allowed=t_allowed)
        out["agreement"] = hit_rate(top_own, torch.from_numpy(to_student)[t_top])
    return out


@torch.no_grad()
def old_language_change(original, extended, tokenizer, texts: list[str], own: torch.Tensor, *, seq_len: int, mask_prob: float,
                        seed: int, batch_size: int) -> dict:
    """The extended student against the original on one old language's masked test set: the largest
    |logit difference| at the original's ids, how many top-1 predictions changed among the language's
    own ids and among all ids, the mean increase of the gold token's cross-entropy among all ids (nats;
    what the new rows take), and the accuracy before and after."""
    eset = masked_eval_set(tokenizer, texts, seq_len, mask_prob, seed)
    v0 = original.get_input_embeddings().weight.shape[0]
    own_dev = own.to(next(original.parameters()).device)
    worst, changed_own, changed_all, ce_up, hits = 0.0, 0, 0, 0.0, np.zeros(4, dtype=np.int64)
    total = 0
    for start in range(0, eset["input_ids"].shape[0], batch_size):
        ids = eset["input_ids"][start:start + batch_size]
        att = eset["attention_mask"][start:start + batch_size]
        labels = eset["labels"][start:start + batch_size]
        sel = labels != IGNORE_INDEX
        if not sel.any():
            continue
        dev = next(original.parameters()).device
        a = masked_logits(original, ids.to(dev), att.to(dev), sel.to(dev)).float()  # (n, V0)
        b = masked_logits(extended, ids.to(dev), att.to(dev), sel.to(dev)).float()  # (n, V1)
        gold = labels[sel].to(dev)
        worst = max(worst, float((a - b[:, :v0]).abs().max()))
        a_own, b_own = _argmax_among(a, own_dev[:v0]), _argmax_among(b[:, :v0], own_dev[:v0])
        a_all, b_all = top1(a), top1(b)
        ce_up += float((torch.logsumexp(b, -1) - torch.logsumexp(a, -1)).sum())  # gold logit unchanged: CE grows by this
        changed_own += int((a_own != b_own).sum())
        changed_all += int((a_all != b_all).sum())
        hits += np.array([int((p == gold).sum()) for p in (a_own, b_own, a_all, b_all)])
        total += int(gold.numel())
    acc = hits / max(total, 1)
    return {"max_abs_logit_diff": worst, "top1_changed_own": changed_own / max(total, 1), "top1_changed_all": changed_all / max(total, 1),
            "ce_increase_all": ce_up / max(total, 1),
            "acc_own_before": acc[0], "acc_own_after": acc[1], "acc_all_before": acc[2], "acc_all_after": acc[3], "masked": total}


def _argmax_among(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    return top1(logits.masked_fill(~allowed, float("-inf")))


def with_language(model, lang: str):
    """An X-Mod model set to `lang`'s module (calls without lang_ids use it); other models as they are."""
    if is_xmod(model):
        from mergedistill.models.xmod import use_language

        use_language(model, lang)
    return model
