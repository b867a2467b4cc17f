"""Choosing bfloat16 or float32 by what the hardware does fast: `auto` settings of the train stage
(`train.precision`), the data stage (`data.teacher_dtype`), evaluation (`eval.dtype`) and the demo's
pre-training resolve here.

bfloat16 pays off on GPUs and on CPUs with native bf16 arithmetic (AVX512-BF16 or AMX): measured ~1.7x
faster training and ~2.4x faster evaluation for small BERTs there. Without it (e.g. AVX2-only CPUs) torch
emulates bf16 and a training step of the same model is ~9x *slower* than float32 (measured on this
project's AMD EPYC build machines: 1.67 s vs 0.18 s for a 2 x 128 BERT step at batch 128 x 16)."""
from __future__ import annotations

import contextlib
from functools import lru_cache

import torch


@lru_cache(maxsize=None)
def cpu_has_fast_bf16() -> bool:
    """True when this CPU computes bfloat16 natively (AVX512-BF16 or AMX tiles)."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # an older torch without the probes: assume the safe choice
        return False


def fast_bf16(device_type: str) -> bool:
    """Whether bfloat16 is the faster choice on `device_type` ('cuda', 'cpu', ...)."""
    if device_type == "cuda":
        return True
    return device_type == "cpu" and cpu_has_fast_bf16()


def lightning_precision(setting: str, accelerator: str) -> str:
    """A Lightning precision string for `setting` (`auto` or any Lightning value) and `accelerator`
    (`cpu`, `gpu`, `cuda`, `auto`): `auto` is bf16-mixed where bfloat16 is fast, else 32-true."""
    if setting != "auto":
        return setting
    gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    return "bf16-mixed" if fast_bf16("cuda" if gpu else "cpu") else "32-true"


def torch_dtype(setting: str, device_type: str) -> torch.dtype:
    """`auto` -> bfloat16 where it is fast on `device_type`, else float32; other names as torch dtypes."""
    if setting == "auto":
        return torch.bfloat16 if fast_bf16(device_type) else torch.float32
    return getattr(torch, setting)


def autocast(setting: str, device_type: str):
    """Forward passes under bfloat16 autocast when `setting` (`auto`, `float32`, `bfloat16`) resolves to
    bfloat16 on `device_type`; a no-op context (float32) otherwise."""
    if torch_dtype(setting, device_type) == torch.bfloat16:
        return torch.autocast(device_type=device_type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
