"""Downstream tasks: fine-tune an encoder with a linear head per language, test it there and, for the
languages in `zero_shot_from`, on every other language (zero-shot transfer).

  classify   one label per text: mean of the last hidden layer (specials excluded) -> dropout -> linear.
  tag        one label per word: the word's first token -> dropout -> linear. Accuracy counts every
             word of the test set (a word cut off by truncation counts as wrong).

Labelled data: JSON lines (`text_field`, `label_field`; for tagging both hold lists: words and tags), a
CoNLL file (CoNLL-U: FORM and UPOS columns; otherwise the first column is the word and the last the
tag; blank lines end sentences, `#` lines are comments), or a datasets spec
`datasets:<id or dir>[:<config>]:<split>` (class-label ids become their names).

For the offline demo `build_source_task` makes a real task from the corpora: which source (help, man,
fortune) a paragraph comes from, written as JSON lines under runs/<run>/eval/tasks/source/:
`python -m mergedistill.eval.downstream --config configs/demo.yaml` (evaluate also builds it when a
configured task file is missing there).
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import heapq
import json
import logging
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from mergedistill.config import DATASETS_PREFIX, DownstreamTask, RunConfig
from mergedistill.corpus import iter_json_lines
from mergedistill.errors import UserError
from mergedistill.train.optim import adamw, linear_schedule
from mergedistill.eval.scoring import mean_pool
from mergedistill.fsutil import atomic_dir, read_json, sha256_file
from mergedistill.eval.retrieval import jsonl_twin

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
    import datasets

    parts = spec[len(DATASETS_PREFIX):].split(":")
    if len(parts) not in (2, 3):
        raise UserError(f"{where}: {spec!r} is not a datasets spec `datasets:<id or dir>[:<config>]:<split>`")
    name, config, split = (parts[0], None, parts[1]) if len(parts) == 2 else (parts[0], parts[1] or None, parts[2])
    try:
        if Path(name).is_dir():
            ds = datasets.load_from_disk(name)
            ds = ds[split] if isinstance(ds, datasets.DatasetDict) else ds
        else:
            ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:
        raise UserError(f"{where}: cannot load {spec!r}: {type(e).__name__}: {str(e).splitlines()[0][:300]}") from None
    for col in (task.text_field, task.label_field):
        if col not in ds.column_names:
            raise UserError(f"{where}: {spec!r} has no column {col!r} (columns: {', '.join(ds.column_names)})")
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

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, L, H)
        if self.kind == "classify":
            return self.head(self.dropout(mean_pool(hidden, keep)))  # (B, C)
        return self.head(self.dropout(hidden))  # (B, L, C)


def fine_tune(mlm: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, train: Sequence[Example], labels: Sequence[str],
              kind: str, epochs: int, lr: float, batch_size: int, max_len: int, seed: int = 0, joiner: str = " ",
              warmup: float = 0.1, weight_decay: float = 0.01) -> TaskModel:
    """Fine-tune a copy of `mlm`'s encoder and a new head on `train` (AdamW, linear warmup over
    `warmup` of the steps then linear decay, gradient norm clipped at 1). `mlm` is left as it was."""
    label_ids = {lab: i for i, lab in enumerate(labels)}
    enc = encode(tokenizer, train, kind, label_ids, max_len, joiner)
    device = next(mlm.parameters()).device
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = TaskModel(mlm, len(labels), kind).to(device)
        gen = torch.Generator().manual_seed(seed)
        steps = max(1, epochs * math.ceil(len(train) / batch_size))
        opt = adamw(model.named_parameters(), lr, weight_decay)
        sched = linear_schedule(opt, max(1, int(warmup * steps)), steps)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        model.train()
        for _ in range(epochs):
            order = torch.randperm(len(train), generator=gen).tolist()
            for start in range(0, len(order), batch_size):
                x, att, keep, y = _batch(enc, order[start:start + batch_size], kind, pad, device)
                logits = model(x, att, keep)
                if not (y != IGNORE).any():
                    continue
                loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1), ignore_index=IGNORE)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                sched.step()
    return model.eval()


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


# ---- the demo's task: which source a paragraph comes from ----------------------------------------------
SOURCE_TASK = "source"
SOURCE_TASK_FORMAT = 1


def source_task_dir(cfg: RunConfig) -> Path:
    return cfg.run_dir / "eval" / "tasks" / SOURCE_TASK


def _pick(path: Path, per_class: int, seed: int) -> dict[str, list[str]]:
    """Up to `per_class` paragraphs per `source`: those with the smallest seeded hashes, so the choice
    is spread over the whole file and the same on every run."""
    heaps: dict[str, list[tuple[int, str]]] = {}  # per source: a min-heap of -hash, its top the largest hash kept
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            obj = json.loads(line)
            text, source = (obj.get("text") or "").strip(), obj.get("source")
            if not text or not isinstance(source, str):
                continue
            item = (-_hash(seed, text), text)
            heap = heaps.setdefault(source, [])
            if len(heap) < per_class:
                heapq.heappush(heap, item)
            elif item > heap[0]:
                heapq.heapreplace(heap, item)
    return {s: [t for _, t in sorted(heap, reverse=True)] for s, heap in heaps.items()}


def _hash(seed: int, text: str) -> int:
    return int.from_bytes(hashlib.sha1(f"{seed}\x00{text}".encode()).digest()[:8], "big")


def build_source_task(cfg: RunConfig, train_per_class: int = 300, test_per_class: int = 100, min_per_class: int = 10,
                      seed: int = 0, force: bool = False) -> dict[str, dict[str, str]]:
    """Write runs/<run>/eval/tasks/source/<lang>.{train,test}.jsonl ({"text", "label"}): for each language
    whose train and test corpora have JSON-lines twins with a `source` field, up to `train_per_class` /
    `test_per_class` paragraphs per source, keeping the sources with at least `min_per_class` in both
    splits; languages left with fewer than two sources are skipped. Returns {"train": {lang: path},
    "test": {lang: path}}, ready for eval.downstream. Idempotent: skips when built from the same inputs."""
    out = source_task_dir(cfg)
    inputs: dict = {"format": SOURCE_TASK_FORMAT, "caps": [train_per_class, test_per_class, min_per_class], "seed": seed,
                    "corpora": {}}
    sources: dict[str, tuple[Path, Path]] = {}
    for lang, lc in cfg.languages.items():
        tr, te = jsonl_twin(lc.train), jsonl_twin(lc.test)
        if tr is not None and te is not None:
            sources[lang] = (tr, te)
            inputs["corpora"][lang] = [sha256_file(tr), sha256_file(te)]
    meta_path = out / "task.json"
    if not force and meta_path.is_file() and read_json(meta_path).get("inputs") == inputs:
        meta = read_json(meta_path)
        log.info("source task: %s is complete for these corpora; skipping", out)
        return {"train": meta["train"], "test": meta["test"]}
    train_files: dict[str, str] = {}
    test_files: dict[str, str] = {}
    counts: dict[str, dict] = {}
    with atomic_dir(out) as tmp:
        for lang, (tr, te) in sources.items():
            a, b = _pick(tr, train_per_class, seed), _pick(te, test_per_class, seed)
            classes = sorted(s for s in a if len(a[s]) >= min_per_class and len(b.get(s, [])) >= min_per_class)
            if len(classes) < 2:
                log.info("source task: %s skipped (sources with >= %d paragraphs in train and test: %s)",
                         lang, min_per_class, ", ".join(classes) or "none")
                continue
            for split, picked, files in (("train", a, train_files), ("test", b, test_files)):
                rows = [(_hash(seed + 1, t), t, s) for s in classes for t in picked[s]]
                rows.sort()  # mixed order, the same every run
                name = f"{lang}.{split}.jsonl"
                (tmp / name).write_text("".join(json.dumps({"text": t, "label": s}, ensure_ascii=False) + "\n" for _, t, s in rows),
                                        encoding="utf-8")
                files[lang] = str(out / name)
            counts[lang] = {s: [len(a[s]), len(b[s])] for s in classes}
            log.info("source task: %s: %s (train, test)", lang, ", ".join(f"{s} {n[0]}/{n[1]}" for s, n in counts[lang].items()))
        (tmp / "task.json").write_text(json.dumps({"inputs": inputs, "counts": counts, "train": train_files, "test": test_files},
                                                  indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return {"train": train_files, "test": test_files}


def main(argv: list[str] | None = None) -> int:
    """`python -m mergedistill.eval.downstream --config C`: build the source task and print its config block."""
    import yaml

    from mergedistill.config import load_config

    p = argparse.ArgumentParser(prog="python -m mergedistill.eval.downstream", description=build_source_task.__doc__)
    p.add_argument("--config", "-c", required=True)
    p.add_argument("--train-per-class", type=int, default=300)
    p.add_argument("--test-per-class", type=int, default=100)
    p.add_argument("--force", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        cfg = load_config(args.config)
        files = build_source_task(cfg, args.train_per_class, args.test_per_class, force=args.force)
    except UserError as e:
        print(f"error: {e.render()}", file=sys.stderr)
        return 2
    block = {"eval": {"downstream": {SOURCE_TASK: {**files, "zero_shot_from": list(files["train"])[:1]}}}}
    print(yaml.safe_dump(block, sort_keys=False, allow_unicode=True), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
