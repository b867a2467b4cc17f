"""The new language's training batches (`train.batches.Batch`), batch b a pure function of (seed, b):

  - with a teacher: KD + MLM against its offline top-k, in shards built by the data stage's own
    `ShardBuilder` over the grown vocabulary (resumable: a complete shard is skipped), sampled as the
    train stage samples them (`SampledBatches`);
  - without: MLM only, the corpus packed by the language's student tokenizer and masked afresh for
    each batch (`MLMCollator`), random replacements drawn from the language's own tokens.
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from mergedistill.corpus import iter_lines
from mergedistill.data.masking import IGNORE_INDEX, MLMCollator
from mergedistill.data.packing import pack_texts
from mergedistill.data.shards import shard_record
from mergedistill.progress import Progress
from mergedistill.train.batches import Batch, LanguageShards, SampledBatches

log = logging.getLogger(__name__)


def build_shards(cfg, lang: str, splits: dict[str, str], vocab, vrec: dict, tokenizer, model, device, out: Path, inputs: str,
                 max_lines: int | None) -> dict[str, list[Path]]:
    """Shards of `lang` per split ({split: corpus spec}) under out/<split>/, cut every data.shard_lines
    lines like the data stage's; a shard whose record says these `inputs` is kept. Returns their paths."""
    from mergedistill.data.stage import Shard, ShardBuilder

    builder = None
    n = cfg.data.shard_lines
    paths: dict[str, list[Path]] = {}
    for split, spec in splits.items():
        prog = Progress(f"extend data {lang}/{split} ({tokenizer.name})", log, unit="shards")
        paths[split] = []
        block: list[str] = []

        def flush(index: int) -> None:
            nonlocal builder
            shard = Shard(lang, split, index, out / split / f"shard-{index:05d}.arrow", inputs)
            paths[split].append(shard.path)
            rec = shard_record(shard.path)
            if rec is not None and rec.get("inputs") == inputs:
                return
            if builder is None:
                builder = ShardBuilder(cfg, vocab, vrec, tokenizer, model, device)
            builder.build(shard, block, prog)

        for i, line in enumerate(iter_lines(spec, f"extend.languages.{lang}.{split}", max_lines)):
            if i and i % n == 0:
                flush(i // n - 1)
                block = []
            block.append(line)
        if block:
            flush(len(paths[split]))
        log.info("%s", prog.line())
    return paths


def shard_batches(paths: list[Path], vocab_fp: str, k: int, batch_size: int, seed: int) -> Callable[[int], Batch]:
    """Batch b: `batch_size` sequences drawn from the shards with seed (seed, b)."""
    source = LanguageShards(paths, vocab_fp, k)
    sampled = SampledBatches({"new": source}, {"new": 1.0}, batch_size, 0, 1, seed, k)
    return sampled.batch


def mlm_batches(tokenizer, lines: list[str], seq_len: int, mask_prob: float, predicted: torch.Tensor, batch_size: int,
                seed: int) -> Callable[[int], Batch]:
    """Batch b: `batch_size` packed sequences drawn with seed (seed, b), masked with a generator seeded by
    (seed, b); replacements drawn from the `predicted` ids ((V,) bool). No teacher: top-k of width 0."""
    packed = pack_texts(tokenizer, lines, seq_len)
    if len(packed) == 0:
        raise ValueError("no sequences to train on")
    collate = MLMCollator(packed, tokenizer, mask_prob, seed)
    collate.candidates = predicted.nonzero().squeeze(1)

    def batch(b: int) -> Batch:
        rng = np.random.default_rng([seed, b])
        rows = rng.integers(len(packed), size=batch_size)
        collate.generator = torch.Generator().manual_seed(_seed(seed, b))
        out = collate(rows.tolist())
        width = int(out["attention_mask"].sum(1).max())
        ids, att, labels = out["input_ids"][:, :width], out["attention_mask"][:, :width], out["labels"][:, :width]
        sel = labels != IGNORE_INDEX
        n = int(sel.sum())
        return Batch(ids, att, sel, labels[sel], torch.zeros(n, 0, dtype=torch.long), torch.zeros(n, 0),
                     torch.zeros(n, dtype=torch.long), torch.zeros(len(rows), dtype=torch.long))
    return batch


def _seed(*parts) -> int:
    return int.from_bytes(hashlib.sha256("|".join(map(str, parts)).encode()).digest()[:8], "little") & ((1 << 63) - 1)
