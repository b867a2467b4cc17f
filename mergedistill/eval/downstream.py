"""Downstream tasks: fine-tune an encoder with a linear head per language, test it there and, for the
languages in `zero_shot_from`, on every other language (zero-shot transfer).

  classify   one label per text: mean of the last hidden layer (specials excluded) -> dropout -> linear.
  tag        one label per word: the word's first token -> dropout -> linear. Accuracy counts every
             word of the test set (a word cut off by truncation counts as wrong).

Labelled data: JSON lines (`text_field`, `label_field`; for tagging both hold lists: words and tags), a
CoNLL file (CoNLL-U: FORM and UPOS columns; otherwise the first column is the word and the last the
tag; blank lines end sentences, `#` lines are comments), or a datasets spec
`datasets:<id or dir>[:<config>]:<split>` (class-label ids become their names).

The demo builds a real task of this kind from its corpora: `mergedistill.demo.source_task`.
"""
from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from mergedistill.config import DATASETS_PREFIX, DownstreamTask
from mergedistill.corpus import (
    iter_json_lines,
    load_datasets_split,
    parse_datasets_spec,
)
from mergedistill.errors import UserError
from mergedistill.eval.metrics import mean_pool
from mergedistill.train.optim import adamw, linear_schedule

log = logging.getLogger(__name__)

IGNORE = -100


# ---- reading labelled data -------------------------------------------------------------------------
@dataclass
class Example:
    text: str | list[str]
    """A text (classify) or its words (tag)."""
    label: str | list[str]
    """Its label (classify) or one tag per word (tag)."""


def read_conll(path: str, where: str, limit: int | None = None) -> list[Example]:
    """Sentences of a CoNLL / CoNLL-U file as (words, tags)."""
    out: list[Example] = []
    words: list[str] = []
    tags: list[str] = []

    def flush() -> None:
        if words:
            out.append(Example(list(words), list(tags)))
        words.clear()
        tags.clear()

    try:
        f = open(path, encoding="utf-8")
    except OSError as e:
        raise UserError(f"{where}: cannot read {path!r}: {e.strerror}") from None
    with f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line.strip():
                flush()
                if limit is not None and len(out) >= limit:
                    break
                continue
            if line.startswith("#"):
                continue
            cols = line.split("\t") if "\t" in line else line.split()
            if len(cols) == 10 and cols[0].replace("-", "").replace(".", "").isdigit():  # CoNLL-U
                if "-" in cols[0] or "." in cols[0]:
                    continue  # multiword token ranges and empty nodes carry no tag of their own
                word, tag = cols[1], cols[3]
            elif len(cols) >= 2:
                word, tag = cols[0], cols[-1]
            else:
                raise UserError(f"{where}: {path} line {lineno} has one column; CoNLL needs a word and a tag per line")
            words.append(word)
            tags.append(tag)
    flush()
    return out[:limit] if limit is not None else out


def _check_example(text, label, kind: str) -> bool:
    if kind == "classify":
        return isinstance(text, str) and bool(text.strip()) and label is not None
    return (isinstance(text, list) and isinstance(label, list) and len(text) == len(label) and len(text) > 0
            and all(isinstance(w, str) for w in text))


def read_examples(spec: str, task: DownstreamTask, where: str, limit: int | None = None) -> list[Example]:
    """The first `limit` examples of a labelled file or datasets spec (see the module docstring)."""
    tf, lf, kind = task.text_field, task.label_field, task.kind
    out: list[Example] = []
    if spec.startswith(DATASETS_PREFIX):
        return _read_datasets(spec, task, where, limit)
    path = Path(spec)
    if not path.is_file():
        raise UserError(f"{where}: no file {spec!r}")
    if path.suffix not in (".jsonl", ".json"):
        if kind != "tag":
            raise UserError(f"{where}: {spec} is not JSON lines; a classification task reads .jsonl files or a datasets spec")
        return read_conll(spec, where, limit)
    for lineno, obj in iter_json_lines(spec, where):
        if not isinstance(obj, dict) or tf not in obj or lf not in obj:
            raise UserError(f"{where}: {spec} line {lineno} lacks the field `{tf}` or `{lf}` (set text_field / label_field)")
        text, label = obj[tf], obj[lf]
        if not _check_example(text, label, kind):
            if kind == "tag":
                raise UserError(f"{where}: {spec} line {lineno}: a tagging task needs `{tf}` (words) and `{lf}` (tags) "
                                "as lists of equal length")
            continue  # an empty text: nothing to classify
        out.append(Example(text, [str(t) for t in label] if kind == "tag" else str(label)))
        if limit is not None and len(out) >= limit:
            break
    return out


def _read_datasets(spec: str, task: DownstreamTask, where: str, limit: int | None) -> list[Example]:
    if parse_datasets_spec(spec, where).column is not None:
        raise UserError(f"{where}: {spec!r} names a column; a task reads `text_field` and `label_field` instead "
                        "(write `datasets:<id or dir>[:<config>]:<split>`)")
    ds = load_datasets_split(spec, where, [task.text_field, task.label_field])
    feat = ds.features[task.label_field]
    names = getattr(feat, "names", None) or getattr(getattr(feat, "feature", None), "names", None)

    def name_of(v):
        return names[v] if names is not None and isinstance(v, int) else str(v)

    out: list[Example] = []
    for row in ds:
        text, label = row[task.text_field], row[task.label_field]
        if task.kind == "tag":
            label = [name_of(v) for v in label]
        else:
            label = name_of(label)
        if _check_example(text, label, task.kind):
            out.append(Example(text, label))
        if limit is not None and len(out) >= limit:
            break
    return out


# ---- encoding --------------------------------------------------------------------------------------
@dataclass
class Encoded:
    ids: list[list[int]]
    """Token ids per example, specials included."""
    keep: list[list[bool]]
    """Per token: pooled (classify: not a special token)."""
    targets: list[list[int]] | list[int]
    """classify: label id per example (-100: a label the training set lacks);
    tag: per token the word's tag id at its first token, -100 elsewhere."""
    words: int
    """Words to tag (tag) or examples (classify): the accuracy's denominator."""


def encode(tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example], kind: str, label_ids: dict[str, int],
           max_len: int, joiner: str = " ") -> Encoded:
    """Tokenize labelled examples. Tagging joins the words with `joiner` ('' for languages written
    without spaces) and maps tokens to words through character offsets, so any fast tokenizer works."""
    if kind == "classify":
        enc = tokenizer([e.text for e in examples], truncation=True, max_length=max_len, return_special_tokens_mask=True,
                        return_attention_mask=False, return_token_type_ids=False)
        keep = [[not s for s in row] for row in enc["special_tokens_mask"]]
        targets = [label_ids.get(e.label, IGNORE) for e in examples]  # type: ignore[arg-type]
        return Encoded(enc["input_ids"], keep, targets, len(examples))
    texts, owners = [], []
    for e in examples:
        pieces, owner = [], []
        for w, word in enumerate(e.text):
            if w:
                pieces.append(joiner)
                owner.extend([-1] * len(joiner))
            pieces.append(word)
            owner.extend([w] * len(word))
        texts.append("".join(pieces))
        owners.append(owner)
    enc = tokenizer(texts, truncation=True, max_length=max_len, return_offsets_mapping=True,
                    return_attention_mask=False, return_token_type_ids=False)
    targets: list[list[int]] = []
    for e, owner, offsets in zip(examples, owners, enc["offset_mapping"]):
        row, seen = [], set()
        for start, end in offsets:
            w = owner[end - 1] if end > start else -1  # the word holding the token's last character
            if w >= 0 and w not in seen:
                seen.add(w)
                row.append(label_ids.get(e.label[w], IGNORE))
            else:
                row.append(IGNORE)
        targets.append(row)
    return Encoded(enc["input_ids"], [[True] * len(r) for r in enc["input_ids"]], targets,
                   sum(len(e.text) for e in examples))


def _batch(enc: Encoded, rows: Sequence[int], kind: str, pad: int, device) -> tuple[torch.Tensor, ...]:
    width = max(len(enc.ids[r]) for r in rows)
    x = torch.full((len(rows), width), pad, dtype=torch.long)  # (B, W)
    att = torch.zeros((len(rows), width), dtype=torch.long)
    keep = torch.zeros((len(rows), width), dtype=torch.bool)
    y = torch.full((len(rows), width), IGNORE, dtype=torch.long) if kind == "tag" else torch.tensor([enc.targets[r] for r in rows])
    for j, r in enumerate(rows):
        n = len(enc.ids[r])
        x[j, :n] = torch.tensor(enc.ids[r])
        att[j, :n] = 1
        keep[j, :n] = torch.tensor(enc.keep[r])
        if kind == "tag":
            y[j, :n] = torch.tensor(enc.targets[r])
    return x.to(device), att.to(device), keep.to(device), y.to(device)


# ---- the model ---------------------------------------------------------------------------------------
class TaskModel(nn.Module):
    """An MLM's encoder (a private copy) with a linear head: per text (classify) or per token (tag)."""

    def __init__(self, mlm: PreTrainedModel, n_labels: int, kind: str, dropout: float = 0.1):
        super().__init__()
        self.encoder = copy.deepcopy(mlm.base_model)
        self.kind = kind
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(mlm.config.hidden_size, n_labels)
        # what the head reads is (features - shift) / scale: a linear probe standardises the frozen features
        # with the training set's statistics; full fine-tuning keeps 0 and 1
        self.register_buffer("shift", torch.zeros(mlm.config.hidden_size))
        self.register_buffer("scale", torch.ones(mlm.config.hidden_size))

    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """What the head reads: (B, H) pooled (classify) or (B, L, H) per token (tag)."""
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, L, H)
        return mean_pool(hidden, keep) if self.kind == "classify" else hidden

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.standardise(self.features(input_ids, attention_mask, keep))))  # (B, C) / (B, L, C)

    def standardise(self, features: torch.Tensor) -> torch.Tensor:
        return (features - self.shift.to(features.dtype)) / self.scale.to(features.dtype)


def fine_tune(mlm: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, train: Sequence[Example], labels: Sequence[str],
              kind: str, epochs: int, lr: float, batch_size: int, max_len: int, seed: int = 0, joiner: str = " ",
              warmup: float = 0.1, weight_decay: float = 0.01, tune: str = "full") -> TaskModel:
    """Fine-tune a copy of `mlm`'s encoder and a new head on `train` (AdamW, linear warmup over
    `warmup` of the steps then linear decay, gradient norm clipped at 1). `tune="head"`: a linear probe,
    the encoder frozen and its features computed once; the head takes as many steps as full
    fine-tuning would. `mlm` is left as it was."""
    if tune not in ("full", "head"):
        raise ValueError(f"tune must be 'full' or 'head', got {tune!r}")
    label_ids = {lab: i for i, lab in enumerate(labels)}
    enc = encode(tokenizer, train, kind, label_ids, max_len, joiner)
    device = next(mlm.parameters()).device
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = TaskModel(mlm, len(labels), kind).to(device)
        gen = torch.Generator().manual_seed(seed)
        batches_per_epoch = math.ceil(len(train) / batch_size)
        steps = max(1, epochs * batches_per_epoch)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        if tune == "head":
            model.encoder.requires_grad_(False)
            feats, y = _frozen_features(model, enc, kind, pad, device, batch_size)  # (M, H), (M,)
            model.shift.copy_(feats.mean(0))
            model.scale.copy_(feats.std(0).clamp(min=1e-6) if len(feats) > 1 else torch.ones_like(model.scale))
            feats = model.standardise(feats)
        opt = adamw(model.named_parameters(), lr, weight_decay)
        sched = linear_schedule(opt, max(1, int(warmup * steps)), steps)
        model.train()

        def epoch():
            """(logits, targets) per step of one epoch; the head's rows are texts or tagged tokens, split into
            as many steps as full fine-tuning takes."""
            if tune == "head":
                for rows in torch.randperm(len(y), generator=gen).tensor_split(min(batches_per_epoch, max(1, len(y)))):
                    yield model.head(model.dropout(feats[rows])), y[rows]
                return
            order = torch.randperm(len(train), generator=gen).tolist()
            for start in range(0, len(order), batch_size):
                x, att, keep, target = _batch(enc, order[start:start + batch_size], kind, pad, device)
                yield model(x, att, keep), target

        for _ in range(epochs):
            for logits, target in epoch():
                if not (target != IGNORE).any():
                    continue
                loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1), ignore_index=IGNORE)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
                opt.step()
                sched.step()
    return model.eval()


@torch.no_grad()  # not inference_mode: the head's backward saves these features
def _frozen_features(model: TaskModel, enc: Encoded, kind: str, pad: int, device,
                     batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen encoder's features of every training row, once: (M, H) float32 and their targets (M,):
    one row per text (classify) or per tagged token (tag). Rows without a target are left out."""
    model.eval()
    feats, targets = [], []
    for start in range(0, len(enc.ids), batch_size):
        x, att, keep, y = _batch(enc, list(range(start, min(start + batch_size, len(enc.ids)))), kind, pad, device)
        f = model.features(x, att, keep).float()  # (B, H) or (B, L, H)
        feats.append(f[y != IGNORE])  # tag: (T, H), the tagged tokens only
        targets.append(y[y != IGNORE])
    return torch.cat(feats), torch.cat(targets)


@torch.inference_mode()
def task_accuracy(model: TaskModel, tokenizer: PreTrainedTokenizerBase, test: Sequence[Example], labels: Sequence[str],
                  max_len: int, batch_size: int = 32, joiner: str = " ") -> tuple[float, int]:
    """(accuracy, denominator): correct texts / texts (classify) or correct words / words (tag). A test
    label the training set lacks, or a word lost to truncation, counts as wrong."""
    model.eval()
    enc = encode(tokenizer, test, model.kind, {lab: i for i, lab in enumerate(labels)}, max_len, joiner)
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    order = sorted(range(len(test)), key=lambda i: len(enc.ids[i]))
    hits = 0
    for start in range(0, len(order), batch_size):
        x, att, keep, y = _batch(enc, order[start:start + batch_size], model.kind, pad, device)
        pred = model(x, att, keep).argmax(-1)
        hits += int(((pred == y) & (y != IGNORE)).sum())
    return (hits / enc.words if enc.words else float("nan")), enc.words
