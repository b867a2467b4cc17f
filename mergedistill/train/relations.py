"""MiniLMv2 self-attention relation distillation (Wang et al., Findings of ACL 2021, "MiniLMv2:
Multi-Head Self-Attention Relation Distillation for Compressing Pretrained Transformers").

At one teacher layer and one student layer, the queries, keys and values (the outputs of the Q/K/V
projections, concatenated over attention heads: (B, L, H)) are split into R relation heads, the same R on
both sides whatever the attention head counts, and each slice A_r gives a relation matrix
softmax(A_r A_r^T / sqrt(d_r)) over the non-pad positions. The loss is KL(teacher || student) of the
Q-Q, K-K and V-V relations, averaged over the relation heads, the three types and the valid query
positions. Only the (L, L) relations are compared, so the widths and head counts may differ; the
student reads the teacher's tokenization mapped to student ids, so position i is the same token on
both sides.

`relation_loss` is the math (pure); `QKVCapture` reads the projections of a layer from a forward pass
that runs anyway (forward hooks on the query/key/value Linear modules); `routed_relation_loss`
compares each row with its own routed teacher (teachers may differ in width) and averages the
teacher groups weighted by rows.

Cost, measured on this project's 2-core AMD EPYC CPU (shared with other work; float32, one thread;
`python benchmarks/bench_relations.py`): online training steps (teachers in the step, backward, AdamW)
of a 2-layer, 128-wide student (4 heads) with two 2-layer, 128-wide teachers, batch 16 x 64 tokens,
R = 8, last layers: 1.31x to 1.38x the step time without relations in three runs (113.8 -> 151.4 ms,
114.1 -> 157.9 ms, 145.3 -> 189.9 ms; medians of 30 steps after 5 warm-up steps, the two variants
alternating). The extra work is the (B, R, L, L) relations, three per side, forward and backward, and
one (B, L, H) x (H, H) query projection per side (masked_logits computes the last layer's queries at the
masked positions only); it does not grow with depth, so deeper models pay a smaller share.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from mergedistill.errors import ConfigError

BERT_STYLE = ("bert", "roberta", "xlm-roberta", "camembert", "xmod")
"""Model types whose layers are `base_model.encoder.layer[i].attention.self.{query,key,value}`."""


# ---- the math -------------------------------------------------------------------------------------
def _relation_scores(a: torch.Tensor, key_bias: torch.Tensor, heads: int, side: str) -> torch.Tensor:
    """A_r A_r^T / sqrt(d_r) + key_bias: (B, L, H) -> (B, R, L, L) float32, the logits of the relations."""
    B, L, H = a.shape
    if H % heads:
        raise ValueError(f"train.relation_heads: {heads} does not divide the {side}'s attention width {H}; "
                         f"choose a divisor of every teacher's and the student's hidden size")
    d = H // heads
    a = a.float().view(B, L, heads, d).transpose(1, 2).reshape(B * heads, L, d)  # (B R, L, d)
    # one BLAS call scales, multiplies and adds the key mask (B R, 1, L)
    return torch.baddbmm(key_bias.repeat_interleave(heads, 0), a, a.transpose(1, 2), alpha=d ** -0.5).view(B, heads, L, L)


def relation_loss(t_q: torch.Tensor, t_k: torch.Tensor, t_v: torch.Tensor,
                  s_q: torch.Tensor, s_k: torch.Tensor, s_v: torch.Tensor,
                  attention_mask: torch.Tensor, relation_heads: int) -> torch.Tensor:
    """KL(teacher relation || student relation) of the Q-Q, K-K and V-V self-attention relations,
    averaged over the relation heads, the three types and the valid (non-pad) query positions.

    t_*: (B, L, Ht) the teacher's queries, keys, values at its layer (heads concatenated); s_*: (B, L, Hs)
    the student's; attention_mask: (B, L), 0 on padding. Ht and Hs must be multiples of relation_heads.
    Padding neither attends nor is attended to, so what pad positions hold changes nothing. A scalar,
    computed in float32 (also under autocast); 0 when there is no valid position."""
    with torch.autocast(attention_mask.device.type, enabled=False):  # bf16 autocast would round the mask to -inf
        return _relation_loss(t_q, t_k, t_v, s_q, s_k, s_v, attention_mask, relation_heads)


def _relation_loss(t_q, t_k, t_v, s_q, s_k, s_v, attention_mask, relation_heads) -> torch.Tensor:
    valid = attention_mask.bool()  # (B, L)
    keys = valid | ~valid.any(-1, keepdim=True)  # an all-pad row keeps finite relations (and weight 0)
    # masked keys: the lowest float, not -inf, so that the logs stay finite where p_t is exactly 0 (p_t
    # from softmax, not exp(log_t): torch's CPU exp is ~4x slower on such values)
    key_bias = torch.zeros(keys.shape, dtype=torch.float32, device=keys.device)
    key_bias = key_bias.masked_fill_(~keys, torch.finfo(torch.float32).min)[:, None, :]  # (B, 1, L)
    total = t_q.new_zeros((), dtype=torch.float32)
    for t, s in ((t_q, s_q), (t_k, s_k), (t_v, s_v)):
        scores_t = _relation_scores(t, key_bias, relation_heads, "teacher")  # (B, R, L, L)
        p_t, log_t = scores_t.softmax(-1), scores_t.log_softmax(-1)
        log_s = _relation_scores(s, key_bias, relation_heads, "student").log_softmax(-1)
        kl = (p_t * (log_t - log_s)).sum(-1)  # (B, R, L); 0 x finite at the masked keys
        total = total + (kl * valid[:, None, :]).sum()
    return total / (3 * relation_heads * valid.sum()).clamp(min=1)


@dataclass
class TeacherQKV:
    """One teacher's queries, keys and values (b, L, Ht) for the batch rows `rows` (b,) routed to it."""
    rows: torch.Tensor
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor


def routed_relation_loss(teachers: dict[str, TeacherQKV], s_q: torch.Tensor, s_k: torch.Tensor, s_v: torch.Tensor,
                         attention_mask: torch.Tensor, relation_heads: int) -> torch.Tensor:
    """The relation loss of each row against its own routed teacher: per teacher group (the widths may
    differ between teachers), averaged over the groups weighted by their rows. s_*: (B, L, Hs) the
    student's, for the whole batch; attention_mask (B, L)."""
    total, rows = s_q.new_zeros((), dtype=torch.float32), 0
    for name, t in teachers.items():
        if t.q.shape[-1] % relation_heads:
            raise ConfigError(f"train.relation_heads: {relation_heads} does not divide teacher {name!r}'s attention width "
                              f"{t.q.shape[-1]}; choose a divisor of every routed teacher's and the student's hidden size")
        r = t.rows
        loss = relation_loss(t.q, t.k, t.v, s_q[r], s_k[r], s_v[r], attention_mask[r], relation_heads)
        total, rows = total + len(r) * loss, rows + len(r)
    return total / max(rows, 1)


# ---- reading Q/K/V from a forward pass ------------------------------------------------------------
def attention_projections(model, layer: int, what: str = "layer") -> tuple[nn.Module, nn.Module, nn.Module, int]:
    """The query, key and value Linear modules of `model`'s layer `layer` (0-based; negative from the end)
    and which of their calls in one forward pass belongs to that layer: 0, except for ALBERT, whose
    layer groups are shared (one group for all layers in published models), so its modules run once per
    layer: layer i is the call that counts the earlier layers using the same group. With several inner
    layers per group, the last one's attention is read. `what` names the setting in messages."""
    mt = getattr(model.config, "model_type", "")
    name = type(model).__name__
    if mt in BERT_STYLE or mt == "distilbert":
        base = model.base_model
        layers = base.transformer.layer if mt == "distilbert" else base.encoder.layer
        i = _layer_index(layer, len(layers), what, name)
        att = layers[i].attention
        if mt == "distilbert":
            return att.q_lin, att.k_lin, att.v_lin, 0
        return att.self.query, att.self.key, att.self.value, 0
    if mt == "albert":
        c = model.config
        i = _layer_index(layer, c.num_hidden_layers, what, name)
        per_group = c.num_hidden_layers / c.num_hidden_groups
        groups = [int(j / per_group) for j in range(c.num_hidden_layers)]  # layer -> its group, as AlbertTransformer
        att = model.base_model.encoder.albert_layer_groups[groups[i]].albert_layers[-1].attention
        return att.query, att.key, att.value, groups[:i].count(groups[i])
    raise ConfigError(f"{what}: relation distillation reads the attention of BERT, RoBERTa, XLM-R, CamemBERT, X-Mod, "
                      f"DistilBERT and ALBERT masked LMs; {name} (model_type {mt!r}) is none of them: route its "
                      "languages to another teacher or set train.relation_weight: 0")


def _layer_index(layer: int, n: int, what: str, name: str) -> int:
    if not -n <= layer < n:
        raise ConfigError(f"{what}: {layer} is not a layer of this {n}-layer {name}; allowed -{n} to {n - 1} (-1: the last)")
    return layer % n


class QKVCapture:
    """While open (`with QKVCapture(model, layer) as cap:`), keeps the queries, keys and values that the
    layer computes in a forward pass, without changing the pass; `take()` returns them, (B, L, H) each.

    models.mlm.masked_logits runs the last layer's queries at the masked positions only (its keys and
    values everywhere); then `take()` computes the queries at every position from the keys' input with
    the layer's own query projection, as the full layer would (same numbers, one projection more)."""

    def __init__(self, model, layer: int, what: str = "layer"):
        *self.modules, self.call = attention_projections(model, layer, what)
        self._handles: list = []
        self._got: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._seen = [0, 0, 0]

    def __enter__(self) -> "QKVCapture":
        self._got, self._seen = {}, [0, 0, 0]
        self._handles = [m.register_forward_hook(partial(self._keep, j)) for j, m in enumerate(self.modules)]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _keep(self, j: int, module, args, output) -> None:
        if self._seen[j] == self.call:
            self._got[j] = (args[0], output)  # (input, output) of the projection
        self._seen[j] += 1

    def take(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(q, k, v), each (B, L, H), from the first forward pass in the block; handed over once."""
        got, self._got = self._got, {}
        if len(got) != 3:
            raise RuntimeError("no forward pass went through the captured layer's query, key and value since the capture opened")
        (q_in, q), (k_in, k), (_, v) = got[0], got[1], got[2]
        if q_in is not k_in:  # queries computed at some positions only: all of them, from the layer's input
            q = self.modules[0](k_in)
        return q, k, v
