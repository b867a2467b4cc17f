"""What a compressed variant costs: weights, non-zeros, bytes on disk, CPU inference throughput.

Throughput is only comparable within one process on one machine at one moment (the project's CPUs are
shared), so `throughput` runs every model on the same inputs, interleaved: repeat r runs each model
once over all batches, in an order rotated by r, and the figure is the median over repeats. Process CPU
time is recorded beside wall-clock time as a second view for shared cores (here, wall-clock ratios of
equal work, e.g. fp32 against its 50%-zeroed copy, ranged from x0.91 to x1.14 between runs).
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from mergedistill.compress.layout import unique_parameters


def count_weights(model: nn.Module) -> int:
    """Weights the model holds: parameters and int8 weight matrices (tied tables once, scales not counted),
    so a quantized model has as many as its float original."""
    return sum(t.numel() for t in unique_parameters(model))


def count_nonzero(model: nn.Module) -> int:
    """Of count_weights, those that are not exactly zero."""
    return sum(int(torch.count_nonzero(t)) for t in unique_parameters(model))


def folder_bytes(path: str | Path) -> int:
    """Total size of the files under `path` (a saved model folder), in bytes."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def weights_bytes(path: str | Path) -> int:
    """Size of the weight files only (*.safetensors, *.bin) under `path`: the part compression changes
    (tokenizers and model cards are the same for every variant)."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file() and f.suffix in (".safetensors", ".bin"))


@torch.inference_mode()
def throughput(models: dict[str, nn.Module], batches: Sequence[tuple[torch.Tensor, torch.Tensor]], repeats: int = 5,
               warmup: int = 1) -> dict[str, dict]:
    """CPU inference speed of each model on the same batches, measured side by side.

    batches: (input_ids (B, L), attention_mask (B, L)) pairs. Each model runs a full masked-LM forward
    (all positions, logits over the vocabulary). Returns name -> {"tokens_per_s": median over repeats
    of wall-clock time, "seconds": [per repeat], "tokens": non-padding tokens per repeat,
    "tokens_per_cpu_s" and "cpu_seconds": the same per CPU-second of this process (all its threads)}."""
    if not models or not batches:
        raise ValueError("throughput: need at least one model and one batch")
    tokens = int(sum(int(att.sum()) for _, att in batches))
    for m in models.values():
        m.eval()
    names = list(models)

    def run(m):
        for ids, att in batches:
            m(input_ids=ids, attention_mask=att)

    for _ in range(warmup):
        for n in names:
            run(models[n])
    seconds: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for n in names[r % len(names):] + names[:r % len(names)]:
            t, c = time.perf_counter(), time.process_time()
            run(models[n])
            seconds[n].append(time.perf_counter() - t)
            cpu[n].append(time.process_time() - c)
    return {n: {"tokens_per_s": tokens / statistics.median(s), "seconds": s, "tokens": tokens,
                "tokens_per_cpu_s": tokens / statistics.median(cpu[n]), "cpu_seconds": cpu[n]} for n, s in seconds.items()}
