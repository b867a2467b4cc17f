"""Distillation losses as pure tensor functions (no batches, no models).

All of them work on the N masked positions only: student_logits (N, V) over the joint vocabulary,
the teacher's top-k as ids (N, k) into that vocabulary and logits (N, k)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def sparse_kd_loss(student_logits: torch.Tensor, teacher_ids: torch.Tensor, teacher_logits: torch.Tensor,
                   temperature: float = 1.0) -> torch.Tensor:
    """Soft cross-entropy of the student against the teacher's top-k distribution, scaled by T^2.

    The teacher distribution is softmax(teacher_logits / T) renormalised over its k ids (-inf logits
    count as absent); the student's is log_softmax(student_logits / T) over the whole vocabulary.
    Equals KL(teacher || student) up to the teacher's entropy, which has no gradient.
    student_logits: (N, V); teacher_ids: (N, k) long; teacher_logits: (N, k). Returns a scalar (mean over N)."""
    if student_logits.shape[0] == 0:
        return student_logits.sum() * 0.0
    t = temperature
    p_teacher = torch.softmax(teacher_logits.float() / t, dim=-1)  # (N, k), sums to 1 over the k ids
    log_q = torch.log_softmax(student_logits.float() / t, dim=-1)  # (N, V)
    log_q_at = log_q.gather(1, teacher_ids.long())  # (N, k)
    per_pos = -(p_teacher * log_q_at).nansum(dim=-1)  # 0 * -inf (absent ids) would be nan: dropped
    return per_pos.mean() * (t * t)


def dense_kd_reference(student_logits: torch.Tensor, teacher_full_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Reference: KL(teacher || student) over the full vocabulary, x T^2 (tests compare against it)."""
    t = temperature
    log_p = torch.log_softmax(teacher_full_logits.float() / t, dim=-1)
    log_q = torch.log_softmax(student_logits.float() / t, dim=-1)
    return F.kl_div(log_q, log_p, log_target=True, reduction="batchmean") * (t * t)


def mlm_loss(student_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on the gold token at each masked position. student_logits (N, V), labels (N,)."""
    if student_logits.shape[0] == 0:
        return student_logits.sum() * 0.0
    return F.cross_entropy(student_logits.float(), labels.long())


def distill_loss(student_logits: torch.Tensor, labels: torch.Tensor, teacher_ids: torch.Tensor | None,
                 teacher_logits: torch.Tensor | None, alpha: float, temperature: float) -> dict[str, torch.Tensor]:
    """alpha * KD + (1 - alpha) * MLM, and both parts (alpha = 0: MLM only, no teacher needed)."""
    mlm = mlm_loss(student_logits, labels)
    if alpha == 0.0 or teacher_ids is None:
        return {"loss": mlm, "mlm": mlm, "kd": torch.zeros_like(mlm)}
    kd = sparse_kd_loss(student_logits, teacher_ids, teacher_logits, temperature)
    return {"loss": alpha * kd + (1.0 - alpha) * mlm, "mlm": mlm, "kd": kd}
