"""Plain masked-LM pre-training with PyTorch Lightning: any fast tokenizer, any masked LM.

Used to train the demo's teachers (`teachers_build.py`) and, later, the MLM-only student baseline.
Reads top to bottom:

  texts --tokenize_documents--> token ids per document (no specials)
        --pack_documents------> (N, seq_len) sequences laid out as the tokenizer's post-processor
                                lays out a pair: [CLS] d1 [SEP] d2 [SEP] ... (RoBERTa: <s> d1 </s></s> d2 </s>)
        --MLMCollator---------> a fresh BERT mask per batch (dynamic masking, `masking.py`)
        --MLMModule-----------> cross-entropy at the masked positions, AdamW, linear warmup + decay
        --pretrain()----------> Lightning fit with CSV logs and periodic held-out evaluation, then
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
from typing import Any, Sequence

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .fsutil import atomic_dir, write_json_atomic
from .masking import IGNORE_INDEX, mask_tokens, random_candidates, special_positions
from .mlm_models import masked_logits

log = logging.getLogger(__name__)


@dataclass
class PretrainConfig:
    seq_len: int = 128
    """Tokens per training sequence, specials included (the model must accept this many positions)."""
    batch_size: int = 32
    """Sequences per optimizer step."""
    max_steps: int = 1000
    """Optimizer steps to train for (the data is cycled or sampled as often as needed)."""
    lr: float = 1e-3
    """Peak learning rate of AdamW, reached after `warmup_steps` and decayed linearly to 0 at `max_steps`."""
    warmup_steps: int = 100
    """Steps of linear warmup from 0 to `lr`."""
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
    eval_every: int = 200
    """Run the held-out evaluation every this many steps (and once at the end)."""
    eval_sequences: int = 256
    """Held-out sequences per evaluation, masked once with `seed` so every evaluation sees the same mask."""
    log_every: int = 50
    """Write a progress line (step, loss, tokens/s, ETA) and CSV metrics every this many steps."""
    seed: int = 0
    """Seed for initialisation order, data order and masks."""
    num_threads: int | None = None
    """CPU threads for torch (null: every core this process may use)."""
    accelerator: str = "auto"
    """Lightning accelerator: auto, cpu, gpu, ..."""
    devices: int | str = 1
    """Lightning devices (a count, a list spec or 'auto')."""
    precision: str = "32-true"
    """Lightning precision, e.g. 32-true or bf16-mixed."""
    dataloader_workers: int = 0
    """DataLoader worker processes (0: mask in the main process, deterministic and best on few cores)."""

    def problems(self) -> list[str]:
        out = []
        for name in ("seq_len", "batch_size", "max_steps", "eval_every", "log_every"):
            if getattr(self, name) < 1:
                out.append(f"{name}: must be at least 1, got {getattr(self, name)}")
        if self.seq_len < 8:
            out.append(f"seq_len: {self.seq_len} leaves no room for text beside the special tokens; use >= 8")
        if not 0 < self.mask_prob < 1:
            out.append(f"mask_prob: must be in (0, 1), got {self.mask_prob}")
        if self.warmup_steps < 0 or self.warmup_steps > self.max_steps:
            out.append(f"warmup_steps: must be in [0, max_steps={self.max_steps}], got {self.warmup_steps}")
        if self.lr <= 0:
            out.append(f"lr: must be positive, got {self.lr}")
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
        enc = tokenizer.backend_tokenizer.encode("a", "b", add_special_tokens=True)
        seq = enc.sequence_ids
        first_b = seq.index(1)
        last_a = max(i for i, s in enumerate(seq) if s == 0)
        first_a = seq.index(0)
        last_b = max(i for i, s in enumerate(seq) if s == 1)
        ids = enc.ids
        return cls(prefix=ids[:first_a], mid=ids[last_a + 1:first_b], suffix=ids[last_b + 1:])


def tokenize_documents(
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    batch_size: int = 1000,
    with_words: bool = False,
) -> tuple[list[list[int]], list[list[int]] | None]:
    """Token ids of each text without specials (batched through the fast tokenizer), and with
    `with_words` the word index of each token (-1 where the tokenizer gives none)."""
    ids: list[list[int]] = []
    words: list[list[int]] | None = [] if with_words else None
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(list(texts[start:start + batch_size]), add_special_tokens=False,
                        return_attention_mask=False, return_token_type_ids=False)
        ids.extend(enc["input_ids"])
        if words is not None:
            for i in range(len(enc["input_ids"])):
                words.append([-1 if w is None else w for w in enc.word_ids(i)])
    return ids, words


@dataclass
class Packed:
    """Fixed-length sequences ready for masking."""

    input_ids: torch.Tensor
    """(N, L) int32 ids, padded with the pad id."""
    attention_mask: torch.Tensor
    """(N, L) bool, False on padding."""
    word_ids: torch.Tensor | None = None
    """(N, L) int32 word index within the sequence (-1: special or padding), for whole-word masking."""

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def tokens(self) -> int:
        return int(self.attention_mask.sum())

    @staticmethod
    def concat(parts: Sequence["Packed"]) -> "Packed":
        words = None
        if all(p.word_ids is not None for p in parts):
            words = torch.cat([p.word_ids for p in parts])  # type: ignore[misc]
        return Packed(torch.cat([p.input_ids for p in parts]), torch.cat([p.attention_mask for p in parts]), words)


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
    n_words = 0  # words already in `cur`, to keep word ids unique within a sequence

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
        base = min((w for w in piece_w if w >= 0), default=0)
        cur.extend(piece)
        cur_w.extend(w - base + n_words if w >= 0 else -1 for w in piece_w)
        n_words += max(piece_w, default=-1) - base + 1 if any(w >= 0 for w in piece_w) else 0

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

    n = len(rows)
    ids = torch.full((n, seq_len), pad_id, dtype=torch.int32)
    att = torch.zeros((n, seq_len), dtype=torch.bool)
    wid = torch.full((n, seq_len), -1, dtype=torch.int32)
    for i, (row, wrow) in enumerate(zip(rows, word_rows)):
        ids[i, :len(row)] = torch.tensor(row, dtype=torch.int32)
        att[i, :len(row)] = True
        wid[i, :len(row)] = torch.tensor(wrow, dtype=torch.int32)
    return Packed(ids, att, wid if words is not None else None)


def pack_texts(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], seq_len: int, with_words: bool = False) -> Packed:
    """`tokenize_documents` then `pack_documents` with the tokenizer's own special layout."""
    docs, words = tokenize_documents(tokenizer, texts, with_words=with_words)
    return pack_documents(docs, seq_len, SpecialLayout.of(tokenizer), tokenizer.pad_token_id, words)


def sampling_probs(sizes: Sequence[int], alpha: float) -> list[float]:
    """XLM-R's exponentiated sampling: q_i proportional to p_i ** alpha, with p_i = n_i / sum(n).
    alpha = 1 keeps the natural shares; alpha -> 0 tends to uniform, so small languages get a fair share."""
    total = sum(sizes)
    if total <= 0 or any(n < 0 for n in sizes):
        raise ValueError(f"sizes must be non-negative with a positive sum, got {list(sizes)}")
    raw = [(n / total) ** alpha if n > 0 else 0.0 for n in sizes]
    return [r / sum(raw) for r in raw]


def group_sample_weights(sizes: Sequence[int], probs: Sequence[float]) -> torch.Tensor:
    """(sum(sizes),) weight per sequence of consecutive groups (e.g. languages) so that drawing
    sequences in proportion to them picks group i with probability probs[i]."""
    return torch.cat([torch.full((n,), p / n, dtype=torch.float64) for n, p in zip(sizes, probs) if n > 0])


# ---------------------------------------------------------------------------------------------------
# Masking per batch


class PackedDataset(Dataset):
    def __init__(self, packed: Packed):
        self.packed = packed

    def __len__(self) -> int:
        return len(self.packed)

    def __getitem__(self, i: int) -> int:
        return i  # the collator gathers rows itself: one tensor index per batch instead of per row


class MLMCollator:
    """Gathers rows of a Packed set and masks them afresh (dynamic masking): each call draws from one
    generator seeded once, so a run's masks are reproducible given its seed and data order."""

    def __init__(self, packed: Packed, tokenizer: PreTrainedTokenizerBase, mask_prob: float, seed: int,
                 whole_word_mask: bool = False, replace_prob: float = 0.8, random_prob: float = 0.1):
        if whole_word_mask and packed.word_ids is None:
            raise ValueError("whole_word_mask needs word ids: pack with with_words=True")
        self.packed = packed
        self.special_ids = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)
        self.mask_id = tokenizer.mask_token_id
        self.candidates = random_candidates(len(tokenizer), tokenizer.all_special_ids)
        self.mask_prob = mask_prob
        self.whole_word_mask = whole_word_mask
        self.replace_prob, self.random_prob = replace_prob, random_prob
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, index: list[int]) -> dict[str, torch.Tensor]:
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
        self.log("train_loss", loss, prog_bar=False, batch_size=n)
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=n)
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
        sched = torch.optim.lr_scheduler.LambdaLR(opt, linear_warmup_decay(self.cfg.warmup_steps, self.cfg.max_steps))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class ProgressLine(Callback):
    """One log line every `every` steps: step, loss (mean since the last line), tokens/s, ETA."""

    def __init__(self, every: int, name: str = ""):
        self.every = every
        self.name = f"{name}: " if name else ""
        self._losses: list[float] = []
        self._tokens = 0
        self._t0 = self._t_last = 0.0
        self._step_last = 0

    def on_train_start(self, trainer, pl_module) -> None:
        self._t0 = self._t_last = time.perf_counter()
        self._step_last = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._losses.append(float(outputs["loss"]) if isinstance(outputs, dict) else float(outputs))
        self._tokens += int(batch["attention_mask"].sum())
        step = trainer.global_step
        if step % self.every and step != trainer.max_steps:
            return
        now = time.perf_counter()
        rate = self._tokens / max(now - self._t_last, 1e-9)
        per_step = (now - self._t0) / max(step - self._step_last, 1)
        eta = per_step * (trainer.max_steps - step)
        log.info(f"{self.name}step {step}/{trainer.max_steps}  loss {sum(self._losses) / len(self._losses):.3f}  "
                 f"{rate:,.0f} tok/s  ETA {_duration(eta)}")
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
    train_tokens: int
    """Non-padding tokens seen in training (all steps)."""
    val: dict[str, float] = field(default_factory=dict)
    """The last held-out evaluation: step, val_loss, val_acc."""


def pretrain(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    train: Packed,
    valid: Packed | None,
    cfg: PretrainConfig,
    out_dir: str | os.PathLike,
    sample_weights: torch.Tensor | None = None,
    name: str = "",
    meta: dict[str, Any] | None = None,
) -> PretrainResult:
    """Train `model` by masked-LM on `train`, evaluating on `valid` every `cfg.eval_every` steps, and
    save model + tokenizer + logs to `out_dir` atomically.

    sample_weights: optional (N,) weight per training sequence; batches are then drawn with
      replacement in proportion to them (e.g. to rebalance languages) instead of cycling epochs.
    meta: extra JSON written into `out_dir/pretrain.json` beside the resolved config and results.
    """
    problems = cfg.problems()
    if len(train) == 0:
        problems.append("the training set is empty: no text after tokenization")
    if train.input_ids.shape[1] != cfg.seq_len:
        problems.append(f"training sequences have length {train.input_ids.shape[1]}, config says seq_len {cfg.seq_len}")
    if problems:
        raise ValueError("pre-training config problems:\n  - " + "\n  - ".join(problems))
    torch.set_num_threads(cfg.num_threads or available_cores())
    L.seed_everything(cfg.seed, verbose=False)
    out_dir = Path(out_dir)

    collate = MLMCollator(train, tokenizer, cfg.mask_prob, cfg.seed, cfg.whole_word_mask)
    gen = torch.Generator().manual_seed(cfg.seed)
    if sample_weights is not None:
        assert sample_weights.shape == (len(train),), "one weight per training sequence"
        sampler = WeightedRandomSampler(sample_weights.double(), num_samples=cfg.max_steps * cfg.batch_size,
                                        replacement=True, generator=gen)
        train_loader = DataLoader(PackedDataset(train), batch_size=cfg.batch_size, sampler=sampler,
                                  collate_fn=collate, num_workers=cfg.dataloader_workers, drop_last=True)
    else:
        train_loader = DataLoader(PackedDataset(train), batch_size=cfg.batch_size, shuffle=True, generator=gen,
                                  collate_fn=collate, num_workers=cfg.dataloader_workers,
                                  drop_last=len(train) >= cfg.batch_size)
    val_loader = None
    if valid is not None and len(valid):
        fixed = fixed_masked_set(valid, tokenizer, cfg.mask_prob, cfg.seed + 1, limit=cfg.eval_sequences)
        val_loader = DataLoader(_TensorRows(fixed), batch_size=cfg.batch_size, shuffle=False)

    model.train()  # Lightning keeps the mode it finds; a model fresh from evaluation would train without dropout
    module = MLMModule(model, cfg)
    progress = ProgressLine(cfg.log_every, name)
    with atomic_dir(out_dir) as tmp, warnings.catch_warnings():
        # On a few CPU cores workers cost more than they save; Lightning's advice does not apply.
        warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=r".*GPU available but not used.*")
        trainer = L.Trainer(
            max_steps=cfg.max_steps,
            accelerator=cfg.accelerator,
            devices=cfg.devices,
            precision=cfg.precision,
            logger=CSVLogger(save_dir=str(tmp), name="logs", version=""),
            callbacks=[progress],
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            val_check_interval=cfg.eval_every if val_loader is not None else None,
            check_val_every_n_epoch=None,
            limit_val_batches=None if val_loader is not None else 0,
            log_every_n_steps=cfg.log_every,
            gradient_clip_val=cfg.grad_clip or None,
            deterministic=False,
            default_root_dir=str(tmp),
        )
        t0 = time.perf_counter()
        trainer.fit(module, train_dataloaders=train_loader, val_dataloaders=val_loader)
        if val_loader is not None and module.last_val.get("step") != trainer.global_step:
            trainer.validate(module, dataloaders=val_loader, verbose=False)
        wall = time.perf_counter() - t0
        steps = trainer.global_step
        result = PretrainResult(steps=steps, wall_s=round(wall, 1),
                                train_tokens=int(progress_tokens(train, steps, cfg.batch_size)),
                                val=dict(module.last_val))
        model = module.model.cpu().eval()
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        write_json_atomic(tmp / "pretrain.json", {
            "config": asdict(cfg), "result": asdict(result), "history": module.history,
            "train_sequences": len(train), **(meta or {}),
        })
    log.info(f"{name + ': ' if name else ''}saved {out_dir} ({steps} steps, {_duration(wall)})")
    return result


def progress_tokens(train: Packed, steps: int, batch_size: int) -> float:
    """Expected non-padding tokens seen in `steps` batches (mean tokens per sequence x sequences)."""
    return train.tokens / max(len(train), 1) * steps * batch_size


def read_pretrain_meta(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The pretrain.json of a finished folder, or None when there is none."""
    path = Path(folder) / "pretrain.json"
    if not path.is_file():
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)
