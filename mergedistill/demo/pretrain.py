"""Plain masked-LM pre-training with PyTorch Lightning: any fast tokenizer, any masked LM.

Used to train the demo's teachers (`teachers_build.py`) and, later, the MLM-only student baseline.
Reads top to bottom:

  texts --tokenize_corpus--> Documents: token ids per document (no specials), a group (language) each
        --pack_documents---> (N, L) sequences laid out as the tokenizer's post-processor lays out a pair:
                             [CLS] d1 [SEP] d2 [SEP] ... (RoBERTa, XLM-R: <s> d1 </s></s> d2 </s>)
        --PhasedBatches----> batches, optionally a curriculum of short sequences first, groups drawn
                             with given probabilities; a fresh BERT mask per batch (`masking.py`)
        --MLMModule--------> cross-entropy at the masked positions, AdamW, linear warmup + decay
        --pretrain()-------> Lightning fit with CSV logs and periodic held-out evaluation, then
                             save_pretrained (safetensors + tokenizer) into a temp folder renamed into place.
"""
from __future__ import annotations

import json
import logging
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from tokenizers import Tokenizer
from torch.utils.data import DataLoader, Dataset, IterableDataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from mergedistill.fsutil import atomic_dir, write_json_atomic
from mergedistill.data.masking import IGNORE_INDEX, mask_tokens, random_candidates, special_positions
from mergedistill.mlm_models import masked_logits
from mergedistill.train.batches import log_unigram_prior
from mergedistill.train.batches import sampling_probs as language_sampling_probs

log = logging.getLogger(__name__)


@dataclass
class PretrainConfig:
    seq_len: int = 128
    """Tokens per training sequence, specials included (the model must accept this many positions)."""
    batch_size: int = 32
    """Sequences of `seq_len` per optimizer step (shorter curriculum sequences come in proportionally
    larger batches, so every step sees the same number of tokens)."""
    max_steps: int = 1000
    """Optimizer steps to train for (the data is cycled or sampled as often as needed)."""
    short_seq_lens: list[int] = field(default_factory=list)
    """Curriculum: shorter sequence lengths trained on before `seq_len`, shortest first, e.g. [16, 32, 64].
    Attention over a few tokens is easy to learn, so a small model picks up local context early
    instead of sitting at unigram level for thousands of steps, as BERT trained most steps at 128
    before a last phase at 512. Empty: `seq_len` throughout."""
    short_seq_fraction: float = 0.0
    """Share of `max_steps` spent on `short_seq_lens`, in equal parts; the rest uses `seq_len`."""
    lr: float = 1e-3
    """Peak learning rate of AdamW, reached after `warmup_steps` and decayed linearly to 0 at `max_steps`."""
    warmup_steps: int = 0
    """Steps of linear warmup from 0 to `lr` (0: use `warmup_ratio`)."""
    warmup_ratio: float = 0.1
    """Warmup as a share of `max_steps`, when `warmup_steps` is 0."""
    weight_decay: float = 0.01
    """AdamW weight decay, applied to matrices only (not to biases, LayerNorm weights)."""
    adam_beta2: float = 0.98
    """AdamW's second-moment decay; RoBERTa's 0.98 is steadier than 0.999 with large learning rates."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0: no clipping)."""
    mask_prob: float = 0.15
    """Fraction of non-special tokens selected for prediction in each sequence."""
    whole_word_mask: bool = False
    """Select whole words (all their pieces) rather than single pieces. Words are the tokenizer's
    pre-tokenizer units, so for text without spaces (ja, zh) a word can be a whole clause."""
    init_output_bias: bool = False
    """Set the MLM head's output bias to the log unigram frequencies of the training tokens before
    training, so that a model trained from scratch starts at the unigram baseline instead of spending
    its first hundreds of steps learning token frequencies (Adam moves a bias by ~lr per step). Only
    for fresh models: it overwrites what a pretrained head knows."""
    eval_every: int = 200
    """Run the held-out evaluation every this many steps (and once at the end)."""
    eval_sequences: int = 256
    """Held-out sequences of `seq_len` per evaluation (split equally among groups), masked once with
    `seed` so that every evaluation sees the same mask."""
    log_every: int = 50
    """Write a progress line (step, loss, tokens/s, ETA) and CSV metrics every this many steps."""
    seed: int = 0
    """Seed for data order and masks (the caller seeds the model's initialisation)."""
    num_threads: int | None = None
    """CPU threads for torch (null: every core this process may use)."""
    accelerator: str = "auto"
    """Lightning accelerator: auto, cpu, gpu, ..."""
    devices: int | str = 1
    """Lightning devices (a count or 'auto')."""
    precision: str = "32-true"
    """Lightning precision, e.g. 32-true or bf16-mixed (on CPUs with AVX512-BF16 about 1.7x faster)."""

    def problems(self) -> list[str]:
        """Every problem with the settings, each naming its field."""
        out = []
        for name in ("seq_len", "batch_size", "max_steps", "eval_every", "log_every", "eval_sequences"):
            if getattr(self, name) < 1:
                out.append(f"{name}: must be at least 1, got {getattr(self, name)}")
        if self.seq_len < 8:
            out.append(f"seq_len: {self.seq_len} leaves no room for text beside the special tokens; use >= 8")
        if any(n < 8 or n >= self.seq_len for n in self.short_seq_lens) or self.short_seq_lens != sorted(self.short_seq_lens):
            out.append(f"short_seq_lens: {self.short_seq_lens} must rise from >= 8 to below seq_len ({self.seq_len})")
        if not 0 <= self.short_seq_fraction < 1:
            out.append(f"short_seq_fraction: must be in [0, 1), got {self.short_seq_fraction}")
        if self.short_seq_fraction > 0 and not self.short_seq_lens:
            out.append("short_seq_fraction: is set but short_seq_lens is empty; list the curriculum lengths, e.g. [16, 32, 64]")
        if not 0 < self.mask_prob < 1:
            out.append(f"mask_prob: must be in (0, 1), got {self.mask_prob}")
        if self.warmup_steps < 0 or self.warmup_steps > self.max_steps:
            out.append(f"warmup_steps: must be in [0, max_steps={self.max_steps}], got {self.warmup_steps}")
        if not 0 <= self.warmup_ratio < 1:
            out.append(f"warmup_ratio: must be in [0, 1), got {self.warmup_ratio}")
        if self.lr <= 0:
            out.append(f"lr: must be positive, got {self.lr}")
        return out

    @property
    def warmup(self) -> int:
        """Warmup steps in effect."""
        return self.warmup_steps or int(round(self.warmup_ratio * self.max_steps))

    def phases(self) -> list[tuple[int, int, int]]:
        """(seq_len, batch_size, steps) of each curriculum phase, in order; the steps add up to max_steps."""
        short_steps = int(round(self.max_steps * self.short_seq_fraction)) if self.short_seq_lens else 0
        out = []
        for i, n in enumerate(self.short_seq_lens):
            steps = short_steps // len(self.short_seq_lens)
            if steps:
                out.append((n, max(1, self.batch_size * self.seq_len // n), steps))
        out.append((self.seq_len, self.batch_size, self.max_steps - sum(p[2] for p in out)))
        return out


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


# ---------------------------------------------------------------------------------------------------
# Tokenizing and packing


@dataclass
class SpecialLayout:
    """Special ids the tokenizer's post-processor puts around one text (prefix ... suffix) and between
    the two texts of a pair (mid). BERT: [CLS] / [SEP] / [SEP]; RoBERTa, XLM-R: <s> / </s></s> / </s>."""

    prefix: list[int]
    mid: list[int]
    suffix: list[int]

    @classmethod
    def of(cls, tokenizer: PreTrainedTokenizerBase) -> "SpecialLayout":
        # Encode a pair and read the added tokens off the encoding itself, so any template works.
        enc = plain_backend(tokenizer).encode("a", "b", add_special_tokens=True)
        seq = enc.sequence_ids
        first_a, first_b = seq.index(0), seq.index(1)
        last_a = max(i for i, s in enumerate(seq) if s == 0)
        last_b = max(i for i, s in enumerate(seq) if s == 1)
        ids = enc.ids
        return cls(prefix=ids[:first_a], mid=ids[last_a + 1:first_b], suffix=ids[last_b + 1:])


def plain_backend(tokenizer: PreTrainedTokenizerBase):
    """The tokenizer's Rust backend with no truncation or padding. transformers leaves the backend
    truncating after a call with `truncation=True`; a copy keeps the caller's tokenizer as it was."""
    backend = tokenizer.backend_tokenizer
    if backend.truncation is None and backend.padding is None:
        return backend
    copy = Tokenizer.from_str(backend.to_str())
    copy.no_truncation()
    copy.no_padding()
    return copy


def tokenize_documents(
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    batch_size: int = 1000,
    with_words: bool = False,
) -> tuple[list[list[int]], list[list[int]] | None]:
    """Token ids of each text without specials (batched through the fast tokenizer), and with
    `with_words` the word index of each token (-1 where the tokenizer gives none)."""
    # The backend (Rust) tokenizer directly: documents longer than model_max_length are the point
    # here (packing cuts them), so the wrapper's "sequence too long" warning would be noise.
    backend = plain_backend(tokenizer)
    ids: list[list[int]] = []
    words: list[list[int]] | None = [] if with_words else None
    for start in range(0, len(texts), batch_size):
        for enc in backend.encode_batch(list(texts[start:start + batch_size]), add_special_tokens=False):
            ids.append(enc.ids)
            if words is not None:
                words.append([-1 if w is None else w for w in enc.word_ids])
    return ids, words


@dataclass
class Documents:
    """A tokenized corpus: documents (no specials) in groups, e.g. one group per language."""

    ids: list[list[int]]
    """Token ids of each document."""
    groups: list[int]
    """Group index of each document (0 .. n_groups - 1)."""
    words: list[list[int]] | None = None
    """Word index of each token (-1: none), for whole-word masking."""

    @property
    def n_groups(self) -> int:
        return max(self.groups, default=-1) + 1

    def group(self, g: int) -> tuple[list[list[int]], list[list[int]] | None]:
        keep = [i for i, gi in enumerate(self.groups) if gi == g]
        return [self.ids[i] for i in keep], ([self.words[i] for i in keep] if self.words is not None else None)


def tokenize_corpus(tokenizer: PreTrainedTokenizerBase, texts_by_group: Sequence[Sequence[str]],
                    with_words: bool = False) -> Documents:
    """Tokenize texts given per group (one group: `[texts]`)."""
    ids: list[list[int]] = []
    groups: list[int] = []
    words: list[list[int]] | None = [] if with_words else None
    for g, texts in enumerate(texts_by_group):
        gi, gw = tokenize_documents(tokenizer, texts, with_words=with_words)
        ids += gi
        groups += [g] * len(gi)
        if words is not None:
            words += gw  # type: ignore[operator]
    return Documents(ids, groups, words)


@dataclass
class Packed:
    """Fixed-length sequences ready for masking."""

    input_ids: torch.Tensor
    """(N, L) int32 ids, padded with the pad id."""
    attention_mask: torch.Tensor
    """(N, L) bool, False on padding."""
    word_ids: torch.Tensor | None = None
    """(N, L) int32 word index within the sequence (-1: special or padding), for whole-word masking."""
    groups: torch.Tensor | None = None
    """(N,) long group (language) of each sequence; None: all one group."""

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def tokens(self) -> int:
        return int(self.attention_mask.sum())

    @staticmethod
    def concat(parts: Sequence["Packed"]) -> "Packed":
        words = torch.cat([p.word_ids for p in parts]) if all(p.word_ids is not None for p in parts) else None  # type: ignore[misc]
        groups = torch.cat([p.groups if p.groups is not None else torch.zeros(len(p), dtype=torch.long) for p in parts])
        return Packed(torch.cat([p.input_ids for p in parts]), torch.cat([p.attention_mask for p in parts]), words, groups)

    def head(self, n: int) -> "Packed":
        return Packed(self.input_ids[:n], self.attention_mask[:n],
                      None if self.word_ids is None else self.word_ids[:n], None if self.groups is None else self.groups[:n])


def pack_documents(
    docs: Sequence[Sequence[int]],
    seq_len: int,
    layout: SpecialLayout,
    pad_id: int,
    words: Sequence[Sequence[int]] | None = None,
) -> Packed:
    """Greedily pack whole documents, in order, into sequences of `seq_len`:
    prefix d1 mid d2 mid ... dk suffix, then padding. A document that does not fit in an empty
    sequence is cut into full-length chunks (each its own sequence); its tail packs on as usual.
    A document never continues across sequences except by that cut."""
    room = seq_len - len(layout.prefix) - len(layout.suffix)  # content tokens in an empty sequence
    if room < 1:
        raise ValueError(f"seq_len {seq_len} leaves no room beside the special tokens {layout}")
    rows: list[list[int]] = []
    word_rows: list[list[int]] = []
    cur: list[int] = []
    cur_w: list[int] = []
    n_words = 0  # words already in `cur`: word ids are renumbered to stay unique within a sequence

    def flush() -> None:
        nonlocal cur, cur_w, n_words
        if cur:
            rows.append(layout.prefix + cur + layout.suffix)
            word_rows.append([-1] * len(layout.prefix) + cur_w + [-1] * len(layout.suffix))
        cur, cur_w, n_words = [], [], 0

    def add(piece: Sequence[int], piece_w: Sequence[int]) -> None:
        nonlocal n_words
        if cur:
            cur.extend(layout.mid)
            cur_w.extend([-1] * len(layout.mid))
        cur.extend(piece)
        present = [w for w in piece_w if w >= 0]
        if present:
            base = min(present)
            cur_w.extend(w - base + n_words if w >= 0 else -1 for w in piece_w)
            n_words += max(present) - base + 1
        else:
            cur_w.extend([-1] * len(piece))

    for d, doc in enumerate(docs):
        if not doc:
            continue
        doc_w = words[d] if words is not None else [-1] * len(doc)
        assert len(doc_w) == len(doc), "one word id per token"
        while len(doc) > room:  # cut what cannot fit even an empty sequence
            flush()
            add(doc[:room], doc_w[:room])
            flush()
            doc, doc_w = doc[room:], doc_w[room:]
        if cur and len(cur) + len(layout.mid) + len(doc) > room:
            flush()
        add(doc, doc_w)
    flush()

    # Fill (N, L) arrays in one go: flat values + the flat positions they go to.
    n = len(rows)
    lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=n)
    flat_pos = (np.repeat(np.arange(n) * seq_len, lengths) + np.arange(int(lengths.sum()))
                - np.repeat(np.cumsum(lengths) - lengths, lengths))
    ids = np.full(n * seq_len, pad_id, dtype=np.int32)
    ids[flat_pos] = np.fromiter((t for r in rows for t in r), dtype=np.int32, count=int(lengths.sum()))
    att = np.zeros(n * seq_len, dtype=bool)
    att[flat_pos] = True
    packed = Packed(torch.from_numpy(ids.reshape(n, seq_len)), torch.from_numpy(att.reshape(n, seq_len)))
    if words is not None:
        wid = np.full(n * seq_len, -1, dtype=np.int32)
        wid[flat_pos] = np.fromiter((w for r in word_rows for w in r), dtype=np.int32, count=int(lengths.sum()))
        packed.word_ids = torch.from_numpy(wid.reshape(n, seq_len))
    return packed


def pack_corpus(docs: Documents, seq_len: int, layout: SpecialLayout, pad_id: int) -> Packed:
    """Pack each group on its own (a sequence never mixes languages) and concatenate, group by group."""
    parts = []
    for g in range(docs.n_groups):
        ids, words = docs.group(g)
        p = pack_documents(ids, seq_len, layout, pad_id, words)
        p.groups = torch.full((len(p),), g, dtype=torch.long)
        parts.append(p)
    return Packed.concat(parts)


def pack_texts(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], seq_len: int, with_words: bool = False) -> Packed:
    """`tokenize_documents` then `pack_documents` with the tokenizer's own special layout."""
    docs, words = tokenize_documents(tokenizer, texts, with_words=with_words)
    return pack_documents(docs, seq_len, SpecialLayout.of(tokenizer), tokenizer.pad_token_id, words)


def sampling_probs(sizes: Sequence[int], alpha: float) -> list[float]:
    """XLM-R's exponentiated sampling over a list of group sizes (`train_data.sampling_probs`, the same
    formula keyed by language): q_i proportional to n_i ** alpha; empty groups get 0."""
    if sum(sizes) <= 0 or any(n < 0 for n in sizes):
        raise ValueError(f"sizes must be non-negative with a positive sum, got {list(sizes)}")
    q = language_sampling_probs(dict(enumerate(sizes)), alpha)
    return [q.get(i, 0.0) for i in range(len(sizes))]


def group_sample_weights(groups: torch.Tensor, probs: Sequence[float]) -> torch.Tensor:
    """(N,) weight per sequence, given its group (N,), so that drawing sequences in proportion to the
    weights picks group g with probability probs[g] (and sequences within a group uniformly)."""
    counts = torch.bincount(groups, minlength=len(probs)).double()
    p = torch.tensor(probs, dtype=torch.float64)
    per_group = torch.where(counts > 0, p / counts.clamp(min=1), torch.zeros_like(p))
    return per_group[groups]


def unigram_log_probs(docs: Documents, vocab_size: int, group_probs: Sequence[float] | None = None) -> torch.Tensor:
    """(V,) add-one-smoothed log unigram probabilities of the training tokens; with `group_probs`,
    each group's frequencies weighted as the sampler will weight the group."""
    counts = []
    for g in range(docs.n_groups):
        ids, _ = docs.group(g)
        flat = torch.tensor([t for d in ids for t in d], dtype=torch.long)
        counts.append(torch.bincount(flat, minlength=vocab_size).double())
    return log_unigram_prior(counts or [torch.zeros(vocab_size, dtype=torch.float64)], group_probs)


# ---------------------------------------------------------------------------------------------------
# Batches


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


class PhasedBatches(IterableDataset):
    """Exactly `sum(steps)` masked batches: phase by phase (sequence length, batch size, steps).
    Without group probabilities each phase walks its sequences in shuffled epochs; with them,
    sequences are drawn with replacement so that group g fills a share probs[g] of the batches."""

    def __init__(self, phases: list[tuple[Packed, int, int]], collators: list[MLMCollator],
                 group_probs: Sequence[float] | None, generator: torch.Generator):
        self.phases, self.collators = phases, collators
        self.group_probs = group_probs
        self.generator = generator

    def __len__(self) -> int:
        return sum(steps for _, _, steps in self.phases)

    def _indices(self, packed: Packed, batch_size: int, steps: int) -> Iterator[torch.Tensor]:
        g = self.generator
        if self.group_probs is not None and packed.groups is not None:
            weights = group_sample_weights(packed.groups, self.group_probs)
            for _ in range(steps):
                yield torch.multinomial(weights, batch_size, replacement=True, generator=g)
            return
        order = torch.randperm(len(packed), generator=g)
        pos = 0
        for _ in range(steps):
            if pos + batch_size > len(order):  # a new epoch
                order = torch.cat([order[pos:], torch.randperm(len(packed), generator=g)])
                pos = 0
            yield order[pos:pos + batch_size]
            pos += batch_size

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for (packed, batch_size, steps), collate in zip(self.phases, self.collators):
            for idx in self._indices(packed, batch_size, steps):
                yield collate(idx)


def fixed_masked_set(packed: Packed, tokenizer: PreTrainedTokenizerBase, mask_prob: float, seed: int,
                     limit: int | None = None, replace_prob: float = 0.8, random_prob: float = 0.1) -> dict[str, torch.Tensor]:
    """The first `limit` sequences of `packed`, masked once with `seed`: an evaluation set whose masks
    do not change between evaluations. Returns input_ids, attention_mask, labels, each (N, L)."""
    n = len(packed) if limit is None else min(limit, len(packed))
    collate = MLMCollator(packed, tokenizer, mask_prob, seed, replace_prob=replace_prob, random_prob=random_prob)
    return collate(list(range(n)))


class _TensorRows(Dataset):
    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    def __len__(self) -> int:
        return next(iter(self.tensors.values())).shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.tensors.items()}


# ---------------------------------------------------------------------------------------------------
# The LightningModule


def linear_warmup_decay(warmup_steps: int, max_steps: int):
    """LambdaLR factor: 0 -> 1 over `warmup_steps`, then 1 -> 0 linearly at `max_steps`."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        return max(0.0, (max_steps - step) / max(1, max_steps - warmup_steps))
    return factor


def mlm_loss_and_hits(model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Mean cross-entropy over the masked positions, the number predicted right, and their count."""
    labels = batch["labels"]  # (B, L), -100 where not selected
    selected = labels != IGNORE_INDEX  # (B, L)
    logits = masked_logits(model, batch["input_ids"], batch["attention_mask"], selected)  # (N, V)
    target = labels[selected]  # (N,)
    loss = F.cross_entropy(logits.float(), target)
    hits = (logits.argmax(-1) == target).sum()
    return loss, hits, int(target.numel())


class MLMModule(L.LightningModule):
    """Wires a masked LM to the MLM loss, AdamW and the warmup/decay schedule."""

    def __init__(self, model: PreTrainedModel, cfg: PretrainConfig):
        super().__init__()
        self.model = model
        self.cfg = cfg
        self._val: list[tuple[float, int, int]] = []  # (loss * n, hits, n) per validation batch
        self.last_val: dict[str, float] = {}
        self.history: list[dict[str, float]] = []

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, _, n = mlm_loss_and_hits(self.model, batch)
        self.log("train_loss", loss, batch_size=n)
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=n)
        self.log("seq_len", float(batch["input_ids"].shape[1]), batch_size=n)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss, hits, n = mlm_loss_and_hits(self.model, batch)
        self._val.append((float(loss) * n, int(hits), n))

    def on_validation_epoch_end(self) -> None:
        total = sum(n for _, _, n in self._val)
        if total:
            val_loss = sum(s for s, _, _ in self._val) / total
            val_acc = sum(h for _, h, _ in self._val) / total
            self.log("val_loss", val_loss)
            self.log("val_acc", val_acc)
            self.last_val = {"step": self.global_step, "val_loss": val_loss, "val_acc": val_acc}
            self.history.append(self.last_val)
        self._val.clear()

    def configure_optimizers(self):
        decay = [p for p in self.model.parameters() if p.requires_grad and p.dim() >= 2]
        no_decay = [p for p in self.model.parameters() if p.requires_grad and p.dim() < 2]
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.cfg.lr, betas=(0.9, self.cfg.adam_beta2), eps=1e-6,
        )
        sched = torch.optim.lr_scheduler.LambdaLR(opt, linear_warmup_decay(self.cfg.warmup, self.cfg.max_steps))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class ProgressLine(Callback):
    """One log line every `every` steps: step, loss (mean since the last line), tokens/s, ETA."""

    def __init__(self, every: int, name: str = ""):
        self.every = every
        self.name = f"{name}: " if name else ""
        self._losses: list[float] = []
        self._tokens = 0
        self.total_tokens = 0
        self._t0 = self._t_last = 0.0
        self._step0 = 0

    def on_train_start(self, trainer, pl_module) -> None:
        self._t0 = self._t_last = time.perf_counter()
        self._step0 = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._losses.append(float(outputs["loss"]) if isinstance(outputs, dict) else float(outputs))
        tokens = int(batch["attention_mask"].sum())
        self._tokens += tokens
        self.total_tokens += tokens
        step = trainer.global_step
        if step % self.every and step != trainer.max_steps:
            return
        now = time.perf_counter()
        rate = self._tokens / max(now - self._t_last, 1e-9)
        eta = (now - self._t0) / max(step - self._step0, 1) * (trainer.max_steps - step)
        log.info(f"{self.name}step {step}/{trainer.max_steps}  seq {batch['input_ids'].shape[1]}  "
                 f"loss {sum(self._losses) / len(self._losses):.3f}  {rate:,.0f} tok/s  ETA {_duration(eta)}")
        self._losses.clear()
        self._tokens = 0
        self._t_last = now

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or not getattr(pl_module, "last_val", None):
            return
        v = pl_module.last_val
        log.info(f"{self.name}step {trainer.global_step}  held-out loss {v['val_loss']:.3f}  masked acc {v['val_acc']:.3f}")


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


# ---------------------------------------------------------------------------------------------------
# The whole path


@dataclass
class PretrainResult:
    steps: int
    wall_s: float
    """Seconds of training and held-out evaluation."""
    setup_s: float
    """Seconds of packing and preparing batches before training started."""
    train_tokens: int
    """Non-padding tokens seen in training."""
    val: dict[str, float] = field(default_factory=dict)
    """The last held-out evaluation: step, val_loss, val_acc (80/10/10 mask, as in training)."""


def pretrain(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    train: Documents,
    valid: Documents | None,
    cfg: PretrainConfig,
    out_dir: str | os.PathLike,
    group_probs: Sequence[float] | None = None,
    name: str = "",
    meta: dict[str, Any] | None = None,
) -> PretrainResult:
    """Train `model` by masked-LM on `train`, evaluating on `valid` every `cfg.eval_every` steps, and
    save model + tokenizer + logs + pretrain.json to `out_dir` atomically (a temp folder renamed into
    place, so a killed run leaves nothing that looks finished).

    group_probs: with several groups (languages) in `train`, the probability of drawing each; None
      draws sequences uniformly (groups in their natural proportions).
    meta: extra JSON written into pretrain.json beside the resolved config and results.
    """
    problems = cfg.problems()
    if not any(train.ids):
        problems.append("the training set is empty: no text after tokenization")
    if group_probs is not None and len(group_probs) != train.n_groups:
        problems.append(f"group_probs has {len(group_probs)} entries for {train.n_groups} groups")
    if cfg.whole_word_mask and train.words is None:
        problems.append("whole_word_mask: the documents carry no word ids; tokenize with with_words=True")
    if problems:
        raise ValueError("pre-training problems:\n  - " + "\n  - ".join(problems))
    t_setup = time.perf_counter()
    torch.set_num_threads(cfg.num_threads or available_cores())
    out_dir = Path(out_dir)
    layout, pad = SpecialLayout.of(tokenizer), tokenizer.pad_token_id

    # Training batches: one packing per curriculum length, one generator for order and masks.
    gen = torch.Generator().manual_seed(cfg.seed)
    packs: dict[int, Packed] = {}
    phases = []
    for seq_len, batch_size, steps in cfg.phases():
        if seq_len not in packs:
            packs[seq_len] = pack_corpus(train, seq_len, layout, pad)
        phases.append((packs[seq_len], batch_size, steps))
    collators = [MLMCollator(p, tokenizer, cfg.mask_prob, whole_word_mask=cfg.whole_word_mask, generator=gen)
                 for p, _, _ in phases]
    batches = PhasedBatches(phases, collators, group_probs, gen)
    train_loader = DataLoader(batches, batch_size=None, num_workers=0)

    val_loader = None
    if valid is not None and any(valid.ids):
        vp = pack_corpus(Documents(valid.ids, valid.groups), cfg.seq_len, layout, pad)
        per_group = max(1, cfg.eval_sequences // max(valid.n_groups, 1))
        keep = torch.cat([torch.nonzero(vp.groups == g).squeeze(1)[:per_group] for g in range(valid.n_groups)])  # type: ignore[operator]
        vp = Packed(vp.input_ids[keep], vp.attention_mask[keep])
        fixed = fixed_masked_set(vp, tokenizer, cfg.mask_prob, cfg.seed + 1)
        val_loader = DataLoader(_TensorRows(fixed), batch_size=cfg.batch_size, shuffle=False)

    if cfg.init_output_bias:
        head = model.get_output_embeddings()
        if head is not None and getattr(head, "bias", None) is not None and head.bias.shape[0] == len(tokenizer):
            with torch.no_grad():
                head.bias.copy_(unigram_log_probs(train, len(tokenizer), group_probs).to(head.bias.dtype))
        else:
            log.warning(f"{name or 'pretrain'}: init_output_bias is set but the model has no output bias of vocabulary size; skipped")

    model.train()  # Lightning keeps the mode it finds; a model fresh from evaluation would train without dropout
    module = MLMModule(model, cfg)
    progress = ProgressLine(cfg.log_every, name)
    with atomic_dir(out_dir) as tmp, warnings.catch_warnings():
        # On a few CPU cores, worker processes cost more than they save: Lightning's advice does not apply.
        warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=r".*GPU available but not used.*")
        warnings.filterwarnings("ignore", message=r".*IterableDataset. has .__len__. defined.*")  # one process: exact
        warnings.filterwarnings("ignore", message=r".*smaller than the logging interval.*")
        trainer = L.Trainer(
            max_steps=cfg.max_steps,
            accelerator=cfg.accelerator,
            devices=cfg.devices,
            precision=cfg.precision,
            logger=CSVLogger(save_dir=str(tmp), name="logs", version=""),
            callbacks=[progress],
            default_root_dir=str(tmp),
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            val_check_interval=cfg.eval_every if val_loader is not None else None,
            check_val_every_n_epoch=None,
            limit_val_batches=None if val_loader is not None else 0,
            log_every_n_steps=cfg.log_every,
            gradient_clip_val=cfg.grad_clip or None,
        )
        t0 = time.perf_counter()
        setup = t0 - t_setup
        trainer.fit(module, train_dataloaders=train_loader, val_dataloaders=val_loader)
        if val_loader is not None and module.last_val.get("step") != trainer.global_step:
            trainer.validate(module, dataloaders=val_loader, verbose=False)
        wall = time.perf_counter() - t0
        steps = trainer.global_step
        result = PretrainResult(steps=steps, wall_s=round(wall, 1), setup_s=round(setup, 1), train_tokens=progress.total_tokens,
                                val=dict(module.last_val))
        model = module.model.cpu().eval()
        model.save_pretrained(tmp)  # safetensors by default
        tokenizer.save_pretrained(tmp)
        write_json_atomic(tmp / "pretrain.json", {
            "config": asdict(cfg), "result": asdict(result), "history": module.history,
            "phases": [{"seq_len": p.input_ids.shape[1], "batch_size": b, "steps": s, "sequences": len(p)} for p, b, s in phases],
            **(meta or {}),
        })
    log.info(f"{name + ': ' if name else ''}saved {out_dir} ({steps} steps, {_duration(wall)})")
    return result


def read_pretrain_meta(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The pretrain.json of a finished folder, or None when there is none."""
    path = Path(folder) / "pretrain.json"
    if not path.is_file():
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)
