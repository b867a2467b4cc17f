"""Which variants a `compress:` section asks for, what each is called, and what its result depends on.
Pure functions of the config (no models).

    sparse-50        unstructured magnitude pruning to 50%, one-shot
    sparse-50-rec    the same sparsity reached gradually during recovery training (cubic schedule)
    heads-50         half of all attention heads removed (by importance), one-shot; -rec: then recovery training
    ffn-50           half of every layer's feed-forward neurons removed; -rec likewise
    drop-1           one whole layer removed; -rec likewise
    int8             int8 weights (the uncompressed student quantized)
    small            a smaller student distilled from the same shards
The uncompressed student, the reference of every comparison, is `student`.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from mergedistill.config import RunConfig, StudentConfig
from mergedistill.configlib import to_dict

REFERENCE = "student"

KINDS = ("sparse", "heads", "ffn", "drop", "int8", "small")
"""sparse: unstructured; heads / ffn / drop: structured (heads, feed-forward neurons, layers)."""


@dataclass(frozen=True)
class Variant:
    name: str
    """Folder name under runs/<run>/compress/ and the row label of the report."""
    kind: str
    """One of KINDS."""
    amount: float = 0.0
    """sparse: sparsity; heads, ffn: share removed; drop: layers removed; int8, small: 0."""
    recovered: bool = False
    """Trained on the shards for compress.recovery_steps after (structured) or while (sparse) pruning."""

    @property
    def structured(self) -> bool:
        return self.kind in ("heads", "ffn", "drop")

    def describe(self) -> str:
        what = {"sparse": f"{self.amount:.0%} of the encoder's linear weights zeroed (global magnitude)",
                "heads": f"{self.amount:.0%} of the attention heads removed (Taylor importance)",
                "ffn": f"{self.amount:.0%} of each layer's feed-forward neurons removed (Taylor importance)",
                "drop": f"{int(self.amount)} layer(s) removed (Taylor importance)",
                "int8": "int8 weights (per-row symmetric) of the linear layers and the tied word table",
                "small": "a smaller student distilled from the same shards"}[self.kind]
        if self.recovered:
            what += ", pruned gradually during recovery training" if self.kind == "sparse" else ", then recovery training"
        elif self.kind in ("sparse", "heads", "ffn", "drop"):
            what += ", one-shot"
        return what


def _pct(x: float) -> str:
    return f"{x * 100:.10g}".replace(".", "_")


def plan_variants(cfg: RunConfig) -> list[Variant]:
    """The variants `cfg.compress` asks for, in report order (duplicates removed)."""
    c = cfg.compress
    rec = [False, True] if c.recovery_steps > 0 else [False]
    out: list[Variant] = []
    for s in dict.fromkeys(c.sparsity):
        out += [Variant(f"sparse-{_pct(s)}" + ("-rec" if r else ""), "sparse", s, r) for r in rec]
    for kind, values in (("heads", c.heads), ("ffn", c.neurons)):
        for f in dict.fromkeys(values):
            out += [Variant(f"{kind}-{_pct(f)}" + ("-rec" if r else ""), kind, f, r) for r in rec]
    for n in dict.fromkeys(c.layers):
        out += [Variant(f"drop-{n}" + ("-rec" if r else ""), "drop", float(n), r) for r in rec]
    if c.quantize:
        out.append(Variant("int8", "int8"))
    if c.small:
        out.append(Variant("small", "small"))
    return out


def small_student(cfg: RunConfig) -> StudentConfig:
    """The smaller student's settings: the student's with compress.small_* applied. Its initialisation
    stays the student's when only the layer count changes (teacher layers still fit), else random."""
    c, s = cfg.compress, cfg.student
    layers = c.small_layers or max(1, s.layers // 2)
    shape = dict(hidden=c.small_hidden or s.hidden, heads=c.small_heads or s.heads, intermediate=c.small_intermediate or s.intermediate)
    same_shape = shape == dict(hidden=s.hidden, heads=s.heads, intermediate=s.intermediate)
    return replace(s, layers=layers, **shape, init=s.init if same_shape else "random",
                   embeddings_from_teachers=s.embeddings_from_teachers and shape["hidden"] == s.hidden)


def recovery_config(cfg: RunConfig) -> RunConfig:
    """The run's settings for recovery training: compress.recovery_steps steps at compress.recovery_lr
    (null: train.lr / 10), warmup over a tenth of them, offline shards, one process."""
    c, t = cfg.compress, cfg.train
    steps = max(1, c.recovery_steps)
    return replace(cfg, train=replace(t, max_steps=steps, lr=c.recovery_lr if c.recovery_lr is not None else t.lr / 10,
                                      warmup_steps=max(1, steps // 10), mode="offline"))


def small_config(cfg: RunConfig) -> RunConfig:
    """The run's settings for the smaller student: compress.small_* sizes, compress.small_steps steps (the
    student's warmup scaled to them)."""
    t = cfg.train
    steps = cfg.compress.small_steps or t.max_steps
    warmup = max(1, round(t.warmup_steps * steps / t.max_steps)) if t.warmup_steps else 0  # the student's schedule, scaled
    return replace(cfg, student=small_student(cfg), train=replace(t, max_steps=steps, warmup_steps=warmup, mode="offline"))


TRAIN_KEYS = ("alpha", "temperature", "sampling_alpha", "max_steps", "batch_size", "lr", "warmup_steps", "weight_decay",
              "grad_accum", "grad_clip", "precision", "seed")
"""The train settings a trained variant depends on (devices, loggers and validation do not change it)."""


def variant_inputs(cfg: RunConfig, v: Variant, student_fp: str, data_fp: dict) -> dict:
    """Everything variant `v` is a function of: a complete variant folder with the same inputs is kept."""
    c = cfg.compress
    d: dict = {"variant": v.name, "kind": v.kind, "amount": v.amount, "recovered": v.recovered, "student": student_fp}
    if v.kind == "sparse":
        d.update(include_embeddings=c.include_embeddings, include_head=c.include_head)
    trained = None
    if v.recovered:
        rc = recovery_config(cfg)
        trained = rc.train
        if v.kind == "sparse":
            d.update(prune_until=c.prune_until, prune_frequency=c.prune_frequency)
    if v.structured:
        d.update(importance_batches=c.importance_batches, batch_size=cfg.train.batch_size, alpha=cfg.train.alpha,
                 temperature=cfg.train.temperature, seed=cfg.train.seed, data=data_fp)
    if v.kind == "small":
        sc = small_config(cfg)
        trained = sc.train
        d["student_config"] = to_dict(sc.student)
    if trained is not None:
        d["train"] = {k: x for k, x in to_dict(trained).items() if k in TRAIN_KEYS}
        d["data"] = data_fp
    return d
