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
    log_q = torch.log_softmax(student_logits.float() / temperature, dim=-1)  # (N, V)
    return sparse_kd_from_log_probs(log_q, teacher_ids, teacher_logits, temperature)


def sparse_kd_from_log_probs(log_q: torch.Tensor, teacher_ids: torch.Tensor, teacher_logits: torch.Tensor,
                             temperature: float) -> torch.Tensor:
    """`sparse_kd_loss` given the student's log-probabilities at temperature T, log_q (N, V)."""
    t = temperature
    p_teacher = torch.softmax(teacher_logits.float() / t, dim=-1)  # (N, k), sums to 1 over the k ids
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
    """alpha * KD + (1 - alpha) * MLM, both parts, and the MLM loss of each position (detached, for
    per-language figures). One log-softmax over the vocabulary serves both losses when T = 1.
    alpha = 0: MLM only, no teacher needed."""
    if student_logits.shape[0] == 0:
        zero = student_logits.sum() * 0.0
        return {"loss": zero, "mlm": zero, "kd": zero, "mlm_per_position": zero.detach().reshape(0)}
    log_p = torch.log_softmax(student_logits.float(), dim=-1)  # (N, V)
    per_pos = -log_p.gather(1, labels.long()[:, None]).squeeze(1)  # (N,) cross-entropy on the gold token
    mlm = per_pos.mean()
    if alpha == 0.0 or teacher_ids is None:
        kd = torch.zeros_like(mlm)
        loss = mlm
    else:
        log_q = log_p if temperature == 1.0 else torch.log_softmax(student_logits.float() / temperature, dim=-1)
        kd = sparse_kd_from_log_probs(log_q, teacher_ids, teacher_logits, temperature)
        loss = alpha * kd + (1.0 - alpha) * mlm
    return {"loss": loss, "mlm": mlm, "kd": kd, "mlm_per_position": per_pos.detach()}
