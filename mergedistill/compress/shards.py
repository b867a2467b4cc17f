"""Batches from the run's shards for the compress stage, and a model's training loss on them.

Importance scores, throughput inputs and the held-out loss all read the data stage's shards through the
train stage's own reader (`ShardDataModule`, `SampledBatches`): batch b is a pure function of (seed, b),
so every variant is measured on the same batches.
"""
from __future__ import annotations

import torch
from torch import nn

from mergedistill.config import RunConfig
from mergedistill.train.batches import Batch, SampledBatches, ValidationBatches, sampling_probs

IMPORTANCE_SEED = 1
"""Offset added to train.seed for the importance batches (training's own first batches use train.seed)."""
THROUGHPUT_SEED = 2


def _module(cfg: RunConfig, manifest: dict, vocab_fp: str, languages: list[str]):
    from mergedistill.train.stage import ShardDataModule

    return ShardDataModule(cfg, manifest, vocab_fp, languages)


def train_batches(cfg: RunConfig, manifest: dict, vocab_fp: str, languages: list[str], n: int, batch_size: int,
                  seed_offset: int) -> list[Batch]:
    """The first n batches of the training sampler (languages mixed as in training) with seed train.seed + seed_offset."""
    dm = _module(cfg, manifest, vocab_fp, languages)
    sources = dm._sources("train")
    probs = sampling_probs({lang: dm.sizes()[lang] for lang in sources}, cfg.train.sampling_alpha)
    sampler = SampledBatches(sources, probs, batch_size, 0, 1, cfg.train.seed + seed_offset, manifest["k"])
    return [sampler.batch(b) for b in range(n)]


def heldout_batches(cfg: RunConfig, manifest: dict, vocab_fp: str, languages: list[str], per_language: int) -> list[Batch]:
    """Up to `per_language` sequences of each language's valid shards (as the train stage validates), in
    single-language batches; the train shards' first sequences when there is no valid split."""
    dm = _module(cfg, manifest, vocab_fp, languages)
    sources = dm._sources("valid") or dm._sources("train")
    ds = ValidationBatches(sources, languages, cfg.train.batch_size, per_language, manifest["k"])
    return [ds[i] for i in range(len(ds))]


@torch.no_grad()
def shard_loss(model: nn.Module, batches: list[Batch], alpha: float, temperature: float) -> float:
    """The training loss (alpha * KD + (1 - alpha) * MLM at the masked positions) of `model` on `batches`,
    averaged over masked positions."""
    from mergedistill.models.mlm import masked_logits
    from mergedistill.train.batches import batch_loss

    model.eval()
    device = next(model.parameters()).device
    total = count = 0.0
    for b in batches:
        b = b.to(device)
        logits = masked_logits(model, b.input_ids, b.attention_mask, b.selected).float()  # (N, V)
        n = b.labels.numel()
        total += float(batch_loss(logits, b, alpha, temperature)["loss"]) * n
        count += n
    return total / count if count else float("nan")
