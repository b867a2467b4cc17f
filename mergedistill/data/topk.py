"""The teacher's top-k predictions at masked positions: the fast path the data stage uses, and the
naive reference it is checked and benchmarked against."""
from __future__ import annotations

import torch

from mergedistill.models.mlm import masked_logits


@torch.inference_mode()
def topk_at_masked(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor, selected: torch.Tensor, k: int,
    allowed: torch.Tensor | None = None, lse_temperatures: tuple[float, ...] = (),
) -> tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k teacher ids and logits at the selected positions, row-major over `selected`.

    input_ids, attention_mask, selected: (B, L); allowed: (V,) bool, the teacher ids that may be
    predicted (pruned and special ids excluded, so the k kept logits renormalise among themselves).
    Returns ids (N, k) long and logits (N, k) float32. The MLM head runs on the N selected rows only,
    and with `allowed` its decoder computes the allowed ids' logits only (the same numbers as the full
    head at those ids, at a fraction of the cost for a large pruned vocabulary). With fewer than k
    allowed ids, the full head runs and the rest of the k are disallowed ids at -inf.
    With `lse_temperatures` (T_1, ...), also the log-normaliser at each: logsumexp_v(logits_v / T) over the
    allowed ids, (N, len) float32, so that exp(logit / T - lse_T) is the teacher's exact probability."""
    decoder = model.get_output_embeddings()
    if allowed is not None and decoder is not None:
        columns = allowed[: decoder.weight.shape[0]].nonzero().squeeze(1).to(input_ids.device)  # (S,)
        if len(columns) >= k:
            logits = masked_logits(model, input_ids, attention_mask, selected, columns=columns).float()  # (N, S)
            vals, idx = logits.topk(k, dim=-1)  # (N, k)
            return (columns[idx], vals, *_lse(logits, lse_temperatures))
    logits = masked_logits(model, input_ids, attention_mask, selected).float()  # (N, V)
    if allowed is not None:
        logits = logits.masked_fill(~allowed[: logits.shape[-1]].to(logits.device), float("-inf"))
    vals, idx = logits.topk(min(k, logits.shape[-1]), dim=-1)  # (N, k)
    return (idx, vals, *_lse(logits, lse_temperatures))


def _lse(logits: torch.Tensor, temperatures: tuple[float, ...]) -> tuple[torch.Tensor, ...]:
    """() without temperatures, else ((N, len(temperatures)) float32,): logsumexp of logits / T per row."""
    if not temperatures:
        return ()
    return (torch.stack([torch.logsumexp(logits / t, dim=-1) for t in temperatures], dim=1),)


@torch.inference_mode()
def topk_naive(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor, selected: torch.Tensor, k: int,
    allowed: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: the full (B, L, V) logits, top-k at every position, then the selected ones."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()  # (B, L, V)
    if allowed is not None:
        logits = logits.masked_fill(~allowed[: logits.shape[-1]].to(logits.device), float("-inf"))
    vals, idx = logits.topk(min(k, logits.shape[-1]), dim=-1)  # (B, L, k)
    return idx[selected], vals[selected]
