"""Estimated training FLOPs of one step, from the shapes the step computes (a multiply-add = 2 FLOPs).

What a step computes (extend.surgery): the first n - 1 layers over every (padded) position, the n-th
layer's keys and values everywhere and its queries, attention output and feed-forward only at the
masked rows (gathered per sequence and padded to the longest count: B x max per sequence), the head's
transform and the decoder over the V_out ids predicted, at the N masked positions.

The backward pass, as autograd runs it:
- a matrix product with a frozen weight that gradients pass through costs its forward once more (the
  input gradient); a trained one twice (input and weight gradients); nothing below the lowest trained
  parameter;
- attention (scores q k^T and context p v) has two activation operands, both needing gradients: 2x its
  forward wherever gradients pass through it;
- the decoder's weight is gathered from the embedding matrix and the new rows (`surgery.lookup`), so its
  gradient is computed for every predicted row (V_out), not only for the new ones, and then scattered.
Embedding lookups, LayerNorms, activations, softmax and the optimizer are left out (small next to the
matrix products; torch's FLOP counter leaves them out too). Counted per step from the actual batch:
padded positions B x L, masked N, last-layer rows B x m. `tests/extend/test_surgery.py` checks every
method's estimate against `torch.utils.flop_counter` under the math attention backend (the CPU flash
kernel is invisible to the counter).
"""
from __future__ import annotations

from dataclasses import dataclass

from mergedistill.models.xmod import is_xmod


RULES = 2
"""The counting rules' version, part of the inputs of a cached extend result (a result counted by older
rules is retrained rather than reported with them). 2: attention backward 2x, the decoder's whole weight
gradient, padded last-layer rows."""


@dataclass(frozen=True)
class Shapes:
    hidden: int
    intermediate: int
    module_hidden: int = 0
    """X-Mod: the language module's bottleneck (0: none)."""


def shapes_of(model) -> Shapes:
    """The shapes of a student (BERT or X-Mod) that its FLOPs depend on."""
    c = model.config
    module = c.hidden_size // c.adapter_reduction_factor if is_xmod(c) else 0
    return Shapes(c.hidden_size, c.intermediate_size, module)


def _row_linear(s: Shapes) -> int:
    """Matrix-product FLOPs per row of a layer after its keys and values: query, attention output,
    feed-forward, the language module."""
    h, i = s.hidden, s.intermediate
    return 2 * (2 * h * h + 2 * h * i + 2 * h * s.module_hidden)


def layer_linear_flops(s: Shapes, positions: int) -> int:
    """A full encoder layer's matrix products with weights over `positions` (B x L)."""
    return 2 * positions * 2 * s.hidden * s.hidden + positions * _row_linear(s)


def attention_flops(s: Shapes, pairs: int) -> int:
    """Scores and context over `pairs` (query, key) pairs: 2 products of 2 x hidden FLOPs each."""
    return 4 * pairs * s.hidden


def layer_flops(s: Shapes, positions: int, pairs: int) -> int:
    """A full encoder layer over `positions` (B x L), attention over `pairs` (sum of L^2 per sequence)."""
    return layer_linear_flops(s, positions) + attention_flops(s, pairs)


def last_layer_linear_flops(s: Shapes, positions: int, rows: int) -> int:
    """The last layer's matrix products with weights: keys and values at every position, the rest at `rows`."""
    return 2 * positions * 2 * s.hidden * s.hidden + rows * _row_linear(s)


def last_layer_flops(s: Shapes, positions: int, rows: int, length: int) -> int:
    """The last layer at `rows` rows only (B x the most masked positions of a sequence, as
    `models.mlm.layer_at_positions` pads them): keys and values everywhere, each row attending over
    `length` keys."""
    return last_layer_linear_flops(s, positions, rows) + attention_flops(s, rows * length)


def head_flops(s: Shapes, masked: int, v_out: int) -> tuple[int, int]:
    """(transform, decoder) at the masked positions over v_out ids."""
    return 2 * masked * s.hidden * s.hidden, 2 * masked * s.hidden * v_out


def step_flops(s: Shapes, *, batch: int, length: int, masked: int, layers: int, v_out: int, decoder_trained: bool,
               body_trained: bool, head_trained: bool, input_trained: bool, last_rows: int | None = None) -> int:
    """FLOPs of one training step over `layers` layers (the n-th at the masked rows) and the head.

    decoder_trained: the decoder's weight has a gradient (new rows among the predicted ids: computed for
    all v_out rows); body_trained: the layers hold trained parameters (X-Mod's module); head_trained: the
    head's transform (and bias) train; input_trained: the input embeddings train (gradients flow through
    every layer); last_rows: rows the last layer computes (default `masked`; `layer_at_positions` pads each
    sequence to the most masked positions of one: B x that)."""
    positions, pairs = batch * length, batch * length * length
    rows = masked if last_rows is None else last_rows
    linear = (layers - 1) * layer_linear_flops(s, positions) + last_layer_linear_flops(s, positions, rows)
    attention = (layers - 1) * attention_flops(s, pairs) + attention_flops(s, rows * length)
    transform, decoder = head_flops(s, masked, v_out)
    forward = linear + attention + transform + decoder
    needs_input_grad = input_trained or body_trained
    backward = decoder if decoder_trained else 0  # the gathered decoder's whole weight gradient
    backward += decoder if (needs_input_grad or head_trained) else 0  # gradient into the head's output
    backward += (transform if needs_input_grad else 0) + (transform if head_trained else 0)  # input, weight
    if needs_input_grad:
        backward += linear + 2 * attention  # input gradients; attention: both operands
        if body_trained and s.module_hidden:  # the modules' weight gradients
            backward += 2 * (positions * (layers - 1) + rows) * 2 * s.hidden * s.module_hidden
    return forward + backward
