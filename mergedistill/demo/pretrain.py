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
import random
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, Dataset, IterableDataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from mergedistill.data.masking import IGNORE_INDEX, MLMCollator, fixed_masked_set
from mergedistill.data.packing import (
    Packed,
    SpecialLayout,
    pack_documents,
    tokenize_documents,
)
from mergedistill.fsutil import atomic_dir, write_json_atomic
from mergedistill.models.mlm import masked_logits, top1
from mergedistill.precision import lightning_precision
from mergedistill.progress import format_duration
from mergedistill.train.batches import log_unigram_prior
from mergedistill.train.batches import sampling_probs as language_sampling_probs
from mergedistill.train.optim import adamw, clip_gradients, scales_gradients, with_schedule
from mergedistill.train.progress import TrainProgress, writes_logs

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
    precision: str = "auto"
    """Lightning precision: `auto` (bf16-mixed where bfloat16 is fast: GPUs, CPUs with AVX512-BF16 or AMX,
    about 1.7x faster there; else 32-true), or any Lightning value such as 32-true or bf16-mixed."""

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


def pack_corpus(docs: Documents, seq_len: int, layout: SpecialLayout, pad_id: int) -> Packed:
    """Pack each group on its own (a sequence never mixes languages) and concatenate, group by group."""
    parts = []
    for g in range(docs.n_groups):
        ids, words = docs.group(g)
        p = pack_documents(ids, seq_len, layout, pad_id, words)
        p.groups = torch.full((len(p),), g, dtype=torch.long)
        parts.append(p)
    return Packed.concat(parts)


def sampling_probs(sizes: Sequence[int], alpha: float) -> list[float]:
    """XLM-R's exponentiated sampling over a list of group sizes (`train_data.sampling_probs`, the same
    formula keyed by language): q_i proportional to n_i ** alpha; empty groups get 0."""
    if sum(sizes) <= 0 or any(n < 0 for n in sizes):
        raise ValueError(f"sizes must be non-negative with a positive sum, got {list(sizes)}")
    q = language_sampling_probs(dict(enumerate(sizes)), alpha)
    return [q.get(i, 0.0) for i in range(len(sizes))]


def sample_by_chars(lines: list[str], max_chars: int | None, seed: int) -> list[str]:
    """A fixed random subset of `lines` holding about `max_chars` characters (all of them if None),
    in corpus order; drawn at random so that every source of a mixed corpus is represented."""
    if max_chars is None or sum(map(len, lines)) <= max_chars:
        return lines
    order = list(range(len(lines)))
    random.Random(seed).shuffle(order)
    keep, total = [], 0
    for i in order:
        if total >= max_chars:
            break
        keep.append(i)
        total += len(lines[i])
    return [lines[i] for i in sorted(keep)]


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


class _TensorRows(Dataset):
    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    def __len__(self) -> int:
        return next(iter(self.tensors.values())).shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.tensors.items()}


# ---------------------------------------------------------------------------------------------------
# The LightningModule


def mlm_loss_and_hits(model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Mean cross-entropy over the masked positions, the number predicted right, and their count."""
    labels = batch["labels"]  # (B, L), -100 where not selected
    selected = labels != IGNORE_INDEX  # (B, L)
    logits = masked_logits(model, batch["input_ids"], batch["attention_mask"], selected)  # (N, V)
    target = labels[selected]  # (N,)
    loss = F.cross_entropy(logits.float(), target)
    hits = (top1(logits) == target).sum()
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
        self.log("train/loss", loss, batch_size=n)
        if writes_logs(self):
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
            self.log("val/loss", val_loss)
            self.log("val/acc", val_acc)
            self.last_val = {"step": self.global_step, "val_loss": val_loss, "val_acc": val_acc}
            self.history.append(self.last_val)
        self._val.clear()

    def configure_optimizers(self):
        opt = adamw(self.model.named_parameters(), self.cfg.lr, self.cfg.weight_decay, betas=(0.9, self.cfg.adam_beta2), eps=1e-6,
                    fuse=not scales_gradients(self))
        return with_schedule(opt, self.cfg.warmup, self.cfg.max_steps)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        clip_gradients(self, optimizer, gradient_clip_val, gradient_clip_algorithm)


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
    progress = TrainProgress(name or "pretrain", every_steps=cfg.log_every, every_s=None, logger=log)
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
            precision=lightning_precision(cfg.precision, cfg.accelerator),
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
    log.info(f"{name + ': ' if name else ''}saved {out_dir} ({steps} steps, {format_duration(wall)})")
    return result


def read_pretrain_meta(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The pretrain.json of a finished folder, or None when there is none."""
    path = Path(folder) / "pretrain.json"
    if not path.is_file():
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)
