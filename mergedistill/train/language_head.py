"""The language softmax (train.softmax: language): each labelled position predicts among its language's ids.

A language's ids are the student ids its student tokenizer can write, `JointVocab.producible_ids` of its
routed teacher (the routed teacher's kept tokens, specials excluded), and the unknown token. They are what the
teacher's stored top-k and log-normaliser range over (the data stage's `allowed` ids), what every gold label
is (of the specials only the unknown token is ever masked), and, less the unknown token, what `evaluate`
and `load_student` score the student on. Computing the decoder on those rows only
skips the rest of the joint vocabulary, which a language's text never reaches.

Positions of several languages share a batch, so the logits come back padded: (N, S) with S the largest
language's size, language l's row holding its ids' logits in the order of `columns[l]`, then `FILL`, a finite
logit low enough that its probability is exactly 0 (a finite one, so that no -inf * 0 meets the loss).
Labels and teacher ids are moved into that column space by `LanguageColumns.localise`; predictions come
back to student ids with `LanguageColumns.globalise`. The loss itself (train/losses.py) is unchanged: on
these logits it equals the joint-vocabulary loss of logits set to FILL outside the language's ids.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F

from mergedistill.tokens import UNK_ID

FILL = -1.0e4
"""Logit of a padding column: exp(FILL - logsumexp) underflows to exactly 0 in float32 and bfloat16."""


class LanguageColumns:
    """Per language (in the run's language order) its student ids, and the maps between the two id spaces.
    Plain tensors, not module buffers: derived from the vocabulary, they stay out of checkpoints and out of
    DDP's per-step buffer broadcast; `to(device)` moves them where the batch is."""

    def __init__(self, id_sets: list[np.ndarray], vocab_size: int, languages: list[str] | None = None):
        if not id_sets:
            raise ValueError("LanguageColumns: no languages")
        self.languages = list(languages) if languages is not None else [str(i) for i in range(len(id_sets))]
        sizes = [len(s) for s in id_sets]
        if min(sizes) == 0:
            empty = [lang for lang, n in zip(self.languages, sizes) if n == 0]
            raise ValueError(f"train.softmax language: no ids for {', '.join(empty)} (its teacher keeps no token)")
        width = max(sizes)
        table = torch.full((len(id_sets), width), -1, dtype=torch.long)
        local = torch.full((len(id_sets), vocab_size), -1, dtype=torch.long)
        for li, ids in enumerate(id_sets):
            ids_t = torch.as_tensor(np.asarray(ids, dtype=np.int64))
            if int(ids_t.min()) < 0 or int(ids_t.max()) >= vocab_size:
                raise ValueError(f"train.softmax language: {self.languages[li]}'s ids fall outside the vocabulary of {vocab_size}")
            table[li, : len(ids_t)] = ids_t
            local[li, ids_t] = torch.arange(len(ids_t))
        self.table = table  # (L, S): language l's ids, padded with -1
        self.local = local  # (L, V): student id -> its column in l's row, -1 where absent
        self.sizes = sizes

    def to(self, device) -> "LanguageColumns":
        """These tables on `device` (moved once, then kept there)."""
        if self.table.device != torch.device(device):
            self.table, self.local = self.table.to(device), self.local.to(device)
        return self

    def logits(self, features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lang: torch.Tensor) -> torch.Tensor:
        """(N, S) padded logits: row i holds the decoder's logits of language lang[i]'s ids, then FILL.
        features (N, H): what the head feeds its decoder; weight (V, H), bias (V,) or None: the decoder's."""
        n, width = features.shape[0], self.table.shape[1]
        blocks, order = [], []
        for li, size in enumerate(self.sizes):
            rows = (lang == li).nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            cols = self.table[li, :size]
            block = F.linear(features[rows], weight[cols], bias[cols] if bias is not None else None)  # (n_l, S_l)
            blocks.append(F.pad(block, (0, width - size), value=FILL))
            order.append(rows)
        if not blocks:
            return features.new_full((n, width), FILL) + 0.0 * features.sum()  # keeps the graph for an empty batch
        stacked = torch.cat(blocks)  # rows grouped by language
        where = torch.empty(n, dtype=torch.long, device=features.device)
        where[torch.cat(order)] = torch.arange(n, device=features.device)
        return stacked[where]  # (N, S) back in the batch's row order

    def to_local(self, ids: torch.Tensor, lang: torch.Tensor) -> torch.Tensor:
        """Student ids (N,) or (N, k) of positions of languages `lang` (N,) -> their columns (-1: not the language's)."""
        rows = lang if ids.dim() == 1 else lang[:, None].expand_as(ids)
        return self.local[rows, ids.clamp(min=0)].masked_fill(ids < 0, -1)

    def globalise(self, columns: torch.Tensor, lang: torch.Tensor) -> torch.Tensor:
        """Columns (N,) of positions of languages `lang` (N,) -> student ids (-1 for a padding column)."""
        return self.table[lang, columns]

    def localise(self, batch):
        """The batch with its labels and teacher ids as columns of each position's language. A gold label
        outside its language's ids, or a teacher id with a finite logit outside them, is an error (shards of
        another vocabulary or routing); teacher ids at -inf (no prediction) become column 0, still at -inf."""
        labels = self.to_local(batch.labels, batch.lang)
        bad = labels < 0
        if bool(bad.any()):
            self._refuse("gold token", batch.labels[bad], batch.lang[bad])
        topk = self.to_local(batch.topk_ids, batch.lang)
        missing = topk < 0
        if bool(missing.any()):
            real = missing & torch.isfinite(batch.topk_logits)
            if bool(real.any()):
                self._refuse("teacher prediction", batch.topk_ids[real], batch.lang[:, None].expand_as(real)[real])
            topk = topk.masked_fill(missing, 0)
        return replace(batch, labels=labels, topk_ids=topk)

    def _refuse(self, what: str, ids: torch.Tensor, lang: torch.Tensor) -> None:
        lang_name = self.languages[int(lang[0])]
        raise RuntimeError(
            f"train.softmax language: a {what} (student id {int(ids[0])}) is not among {lang_name}'s ids: the shards "
            "do not match this vocabulary and routing; rerun `mergedistill data`, or set train.softmax: all")


def language_id_sets(vocab, cfg, languages: list[str]) -> list[np.ndarray]:
    """Each language's ids in `languages` order: its routed teacher's producible ids and the unknown token
    (a text's unknown piece is masked and predicted like any other: the teachers' allowed ids include it)."""
    return [np.union1d(vocab.producible_ids(cfg.teacher_of(lang)), [UNK_ID]) for lang in languages]
