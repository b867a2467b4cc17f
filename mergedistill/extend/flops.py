"""Estimated training FLOPs of one step, from the shapes the step computes (a multiply-add = 2 FLOPs).

What a step computes (extend.surgery): the first n - 1 layers over every (padded) position, the n-th
layer's queries, attention output and feed-forward at the masked positions only (keys and values
everywhere), the head's transform and the decoder over the V_out ids predicted, at the masked positions.
The backward pass: a frozen matrix that gradients pass through costs its forward once more (input
gradients only); a trained one twice (input and weight gradients); nothing below the lowest trained
parameter. Embedding lookups, LayerNorms, activations and the optimizer are left out (small next to
the matrix products). Counted per step from the actual batch: padded positions B x L, masked N.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Shapes:
    hidden: int
    intermediate: int
    module_hidden: int = 0
    """X-Mod: the language module's bottleneck (0: none)."""


def shapes_of(model) -> Shapes:
    """The shapes of a student (BERT or X-Mod) that its FLOPs depend on."""
    c = model.config
    module = c.hidden_size // c.adapter_reduction_factor if getattr(c, "model_type", "") == "xmod" else 0
    return Shapes(c.hidden_size, c.intermediate_size, module)


def layer_flops(s: Shapes, positions: int, pairs: int) -> int:
    """A full encoder layer over `positions` (B x L), attention over `pairs` (sum of L^2 per sequence)."""
    h, i = s.hidden, s.intermediate
    return 2 * positions * (4 * h * h + 2 * h * i + 2 * h * s.module_hidden) + 4 * pairs * h


def last_layer_flops(s: Shapes, positions: int, masked: int, length: int) -> int:
    """The last layer at the masked positions only: keys and values everywhere, the rest at `masked`
    rows, each attending over `length` keys."""
    h, i = s.hidden, s.intermediate
    return 2 * positions * 2 * h * h + 2 * masked * (2 * h * h + 2 * h * i + 2 * h * s.module_hidden) + 4 * masked * length * h


def head_flops(s: Shapes, masked: int, v_out: int) -> tuple[int, int]:
    """(transform, decoder) at the masked positions over v_out ids."""
    return 2 * masked * s.hidden * s.hidden, 2 * masked * s.hidden * v_out


def step_flops(s: Shapes, *, batch: int, length: int, masked: int, layers: int, v_out: int, trained_out_rows: int,
               body_trained: bool, head_trained: bool, input_trained: bool) -> int:
    """FLOPs of one training step over `layers` layers (the n-th at the masked positions) and the head.

    trained_out_rows: decoder rows with a weight gradient (the new language's rows among the v_out);
    body_trained: the layers hold trained parameters (X-Mod's module); head_trained: the head's transform
    (and bias) train; input_trained: the input embeddings train (gradients flow through every layer)."""
    positions, pairs = batch * length, batch * length * length
    body = (layers - 1) * layer_flops(s, positions, pairs) + last_layer_flops(s, positions, masked, length)
    transform, decoder = head_flops(s, masked, v_out)
    forward = body + transform + decoder
    needs_input_grad = input_trained or body_trained
    backward = decoder * trained_out_rows // max(v_out, 1)  # weight gradient of the trained output rows
    backward += decoder if (needs_input_grad or head_trained) else 0  # gradient into the head's input
    backward += transform * ((2 if head_trained else 1) if needs_input_grad else (1 if head_trained else 0))
    if needs_input_grad:
        body_back = body
        if body_trained and s.module_hidden:  # the modules' weight gradients
            module_fwd = 2 * (positions * (layers - 1) + masked) * 2 * s.hidden * s.module_hidden
            body_back += module_fwd
        backward += body_back
    return forward + backward
