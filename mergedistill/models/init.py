"""Starting a student from its teachers, for the dense and the X-Mod student alike: which teacher layer
each student layer copies, the MLM head's transform, and embedding rows (and output-bias entries) copied
through the id maps."""
from __future__ import annotations

import logging
from typing import Protocol

import numpy as np
import torch

log = logging.getLogger(__name__)


class IdMaps(Protocol):
    """What the models read of a joint vocabulary (vocab.joint.JointVocab has it): models sit below vocab."""

    size: int
    teachers: list[str]
    idmaps: dict[str, np.ndarray]


def layer_map(student_layers: int, teacher_layers: int) -> list[int]:
    """Teacher layer for each student layer: every other one (0, 2, 4, ...) when there is room,
    else evenly spread over the teacher's depth."""
    if student_layers * 2 <= teacher_layers + 1:
        return [2 * i for i in range(student_layers)]
    if student_layers == 1:
        return [0]
    return [round(i * (teacher_layers - 1) / (student_layers - 1)) for i in range(student_layers)]


def output_bias(model) -> torch.Tensor | None:
    out = model.get_output_embeddings()
    return getattr(out, "bias", None)


def head_transform(model) -> dict | None:
    """The MLM head's dense + LayerNorm (BERT: cls.predictions.transform; RoBERTa: lm_head)."""
    if hasattr(model, "cls"):
        tr = model.cls.predictions.transform
        return {"dense": tr.dense, "norm": tr.LayerNorm}
    if hasattr(model, "lm_head") and hasattr(model.lm_head, "layer_norm"):
        return {"dense": model.lm_head.dense, "norm": model.lm_head.layer_norm}
    return None


@torch.no_grad()
def copy_embedding_rows(student, vocab: IdMaps, teachers: dict) -> dict[str, int]:
    """Student embedding rows := mean of the teachers' rows for the same token (teachers whose hidden
    size matches). Returns how many rows each teacher contributed to."""
    emb = student.get_input_embeddings().weight  # (V, H)
    bias = output_bias(student)
    total = torch.zeros_like(emb)
    total_bias = torch.zeros(emb.shape[0])
    count = torch.zeros(emb.shape[0])
    used = {}
    for name, model in teachers.items():
        t_emb = model.get_input_embeddings().weight
        if t_emb.shape[1] != emb.shape[1]:
            log.info("student: %s has hidden size %d, the student %d: its embeddings are not copied", name, t_emb.shape[1], emb.shape[1])
            continue
        m = torch.from_numpy(vocab.idmaps[name]).long()
        n = min(len(m), t_emb.shape[0])
        tid = torch.arange(n)[m[:n] >= 0]
        sid = m[:n][m[:n] >= 0]
        total.index_add_(0, sid, t_emb[tid].float())
        t_bias = output_bias(model)
        if t_bias is not None and bias is not None:
            total_bias.index_add_(0, sid, t_bias[tid].float())
        count.index_add_(0, sid, torch.ones(len(sid)))
        used[name] = int(len(sid))
    have = count > 0
    emb[have] = (total[have] / count[have, None]).to(emb.dtype)
    if bias is not None:
        bias[have] = (total_bias[have] / count[have]).to(bias.dtype)
    return used
