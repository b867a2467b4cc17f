"""Building one variant's model from the uncompressed student: pruning (one-shot or with recovery
training), quantization, or a smaller student distilled from the same shards.

Recovery training and the smaller student go through the train stage's own module, data and loss
(`train.stage.fit_model`): continued KD + MLM on the run's shards, with an LR schedule sized to the steps
(variants.recovery_config, variants.small_config). Unstructured recovery is gradual pruning: the cubic
schedule raises the sparsity from 0 to the target over compress.prune_until of the steps, masks recomputed
every compress.prune_frequency steps and re-applied after every step (callback.GradualPruning); the rest
of the steps train at the target sparsity. Structured recovery trains the smaller model as it is.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

from torch import nn

from mergedistill.compress.callback import GradualPruning
from mergedistill.compress.importance import Importance, choose_heads, choose_layers, choose_neurons
from mergedistill.compress.magnitude import prunable_weights, prune_magnitude, sparsity_of
from mergedistill.compress.quantize import quantize_int8
from mergedistill.compress.structured import drop_layers, prune_heads, prune_neurons
from mergedistill.compress.variants import Variant, recovery_config, small_config
from mergedistill.config import RunConfig

log = logging.getLogger(__name__)


def prune_one_shot(model: nn.Module, v: Variant, cfg: RunConfig, importance: Callable[[], Importance]) -> dict:
    """The variant's pruning applied to `model` in place (no training); returns what was removed."""
    c = cfg.compress
    if v.kind == "sparse":
        masks = prune_magnitude(model, v.amount, c.include_embeddings, c.include_head)
        return {"zeroed": sum(int((~m).sum()) for m in masks.values()), "of": sum(m.numel() for m in masks.values())}
    if v.kind == "heads":
        heads = choose_heads(importance(), v.amount)
        prune_heads(model, heads)
        return {"heads": {str(k): h for k, h in heads.items()}}  # layer -> removed heads
    if v.kind == "ffn":
        neurons = choose_neurons(importance(), v.amount)
        prune_neurons(model, neurons)
        return {"neurons_per_layer": {str(k): len(n) for k, n in neurons.items()}}
    if v.kind == "drop":
        layers = choose_layers(importance(), int(v.amount))
        drop_layers(model, layers)
        return {"layers": layers}
    raise AssertionError(f"{v.kind} is not a pruning variant")


def recover(model: nn.Module, v: Variant, cfg: RunConfig, logs: Path) -> dict:
    """Recovery training of `model` in place (gradual pruning for unstructured variants); returns what
    happened (steps, lr, mean training loss at the start and at the end)."""
    from mergedistill.train.stage import fit_model, read_metrics

    c = cfg.compress
    rc = recovery_config(cfg)
    callbacks = []
    if v.kind == "sparse":
        end = max(0, min(rc.train.max_steps, round(c.prune_until * rc.train.max_steps)))
        callbacks.append(GradualPruning(final_sparsity=v.amount, end_step=end, frequency=min(c.prune_frequency, max(1, end)),
                                        include_embeddings=c.include_embeddings, include_head=c.include_head))
    fit_model(rc, logs, model, callbacks, label=f"compress {v.name}")
    if v.kind == "sparse":
        weights = prunable_weights(model, c.include_embeddings, c.include_head)
        got, n = sparsity_of(weights), sum(w.numel() for w in weights.values())
        if got < v.amount - 1.0 / n:  # GradualPruning reaches the final sparsity at end_step <= max_steps
            raise RuntimeError(f"{v.name}: sparsity {got:.4f} after recovery training, expected {v.amount}")
    return {"steps": rc.train.max_steps, "lr": rc.train.lr, **_loss_ends(read_metrics(logs))}


def _loss_ends(rows: list[dict]) -> dict:
    """Mean logged training loss over the first and over the last quarter of the logged steps."""
    loss = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    k = max(1, len(loss) // 4)
    return {"train_loss_start": sum(loss[:k]) / k, "train_loss_end": sum(loss[-k:]) / k} if loss else {}


def build_model(v: Variant, cfg: RunConfig, load_student: Callable[[], nn.Module], importance: Callable[[], Importance],
                logs: Path) -> tuple[nn.Module, dict]:
    """(the variant's model, a record of how it was made). load_student() gives a fresh copy of the
    uncompressed student; importance() the (cached) Taylor importance of its units; logs: the folder for
    training logs of this variant."""
    if v.kind == "int8":
        return quantize_int8(load_student()), {}
    if v.kind == "small":
        from mergedistill.train.stage import fit_model, read_metrics

        sc = small_config(cfg)
        module = fit_model(sc, logs, None, label=f"compress {v.name}")
        return module.student, {"steps": sc.train.max_steps, "student": {k: getattr(sc.student, k) for k in
                                                                          ("layers", "hidden", "heads", "intermediate", "init")},
                                **_loss_ends(read_metrics(logs))}
    model = load_student()
    info: dict = {}
    if not (v.kind == "sparse" and v.recovered):  # gradual pruning starts from the dense student
        info["removed"] = prune_one_shot(model, v, cfg, importance)
    if v.recovered:
        info["recovery"] = recover(model, v, cfg, logs)
    return model.eval(), info
