"""The run config: one dataclass per stage, one docstring per field (printed by `--help`).

`load_config(path, overrides)` reads YAML, applies `--section.key=value` overrides, converts to
these dataclasses and runs the cross-field checks, raising one `ConfigError` that lists every
problem found (unknown keys with a did-you-mean, wrong types, routing to undefined teachers,
missing files) before any work starts.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import yaml

from mergedistill.configlib import Range, above, apply_overrides, at_least, between, from_dict, read_yaml_mapping
from mergedistill.errors import ConfigError


@dataclass
class TeacherConfig:
    path: str
    """A Hugging Face model id or a local folder holding a masked-LM (config, weights, tokenizer)."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) when `path` is a hub id."""
    trust_remote_code: bool = False
    """Allow model code from the hub. Off by default: only standard transformers classes load."""
    max_lines: Annotated[int, at_least(1)] | None = None
    """The data stage labels at most this many lines of each corpus split routed to this teacher (and no
    more than data.max_lines): a large teacher's labelling costs more per token; with vocab.prune its
    tokens are counted on as many lines (the vocabulary keeps what it labels). Null: data.max_lines."""


@dataclass
class LanguageConfig:
    train: str
    """Training corpus: a .txt file (one document or paragraph per line), a .jsonl file (field `text`),
    or a datasets spec `datasets:<id or local dir>[:<config>]:<split>[:<column>]`."""
    valid: str | None = None
    """Validation corpus, same formats (used for validation losses and by `select`)."""
    test: str | None = None
    """Held-out test corpus, same formats (used by `evaluate`)."""
    teacher: str | None = None
    """The teacher that serves this language; defaults to `default_teacher`."""
    candidates: list[str] = field(default_factory=list)
    """Other teachers that know this language: compared by `evaluate`, ranked by `select`."""


@dataclass
class VocabConfig:
    prune: bool = False
    """Keep only the tokens each teacher's tokenizer produces on the corpora routed to it (plus
    specials); the rest map to [UNK] and are dropped from teacher predictions."""
    prune_splits: list[str] = field(default_factory=lambda: ["train"])
    """Corpus splits scanned for pruning (train, valid, test)."""
    prune_candidates: bool = False
    """When pruning, also keep what each language's candidate teachers produce on it, so the vocabulary
    serves every routing among the candidates (`ablate` shares one vocabulary across its variants)."""
    keep_single_chars: bool = True
    """When pruning, keep every single-character piece too, so unseen text still splits into known
    pieces instead of [UNK]."""
    max_lines: Annotated[int, at_least(1)] | None = None
    """Read at most this many lines per corpus when pruning (null: all of it)."""
    report_lines: Annotated[int, at_least(0)] = 20000
    """Lines per language used for the fertility figures of the report (0: all)."""
    verify_lines: Annotated[int, at_least(0)] = 200
    """Texts of each routed train corpus (a seeded sample; with pruning, of the lines it scanned) on which
    every student tokenizer is checked against its teacher (AutoTokenizer + id map); any difference
    stops the stage with the first differing text (exit 2). 0: no check."""


@dataclass
class DataConfig:
    seq_len: Annotated[int, at_least(8)] = 128
    """Tokens per training sequence, [CLS]/[SEP] included. Lines are packed `[CLS] a [SEP] b [SEP]`;
    a line is split only when it alone is longer than a sequence."""
    mask_prob: Annotated[float, between(0, 1, exclusive=True)] = 0.15
    """Fraction of (non-special) tokens selected for prediction (80% [MASK], 10% random, 10% kept)."""
    top_k: Annotated[int, at_least(1)] = 8
    """Teacher predictions kept per masked position (ids mapped to the student vocabulary)."""
    lse_temperatures: Annotated[list[float], Range(low=0, low_open=True)] = field(default_factory=lambda: [1.0, 2.0])
    """Temperatures at which the teacher's log-normaliser (logsumexp of its logits over the ids the student
    vocabulary keeps) is stored with each labelled position, 4 bytes each: with it the top-k are exact
    probabilities and the mass outside them is known (train.kd_target: exact, at a train.temperature listed here)."""
    unmasked_kd_prob: Annotated[float, between(0, 1)] = 0.0
    """Share of the unmasked (non-special) tokens whose teacher top-k is stored too, for distillation at
    unmasked positions (the KD loss covers them, the MLM loss and accuracy do not). Each costs what a
    masked position costs (k x 4 bytes + 4 per lse temperature) and teacher time only for its top-k."""
    whole_word_mask: bool = False
    """Mask all pieces of a word together."""
    dupe_factor: Annotated[int, at_least(1)] = 1
    """Masked copies of each training sequence, each with its own mask."""
    seed: Annotated[int, at_least(0)] = 0
    """Masking seed (each shard and copy draws from its own stream, so results do not depend on how
    shards are spread over processes)."""
    batch_size: Annotated[int, at_least(1)] = 64
    """Sequences per teacher forward pass (sequences are sorted by length first)."""
    shard_lines: Annotated[int, at_least(1)] = 20000
    """Corpus lines per shard: the unit of resumption and of parallel work."""
    max_lines: Annotated[int, at_least(1)] | None = None
    """Use at most this many lines of each corpus split (null: all of it)."""
    splits: list[str] = field(default_factory=lambda: ["train", "valid"])
    """Corpus splits turned into shards (valid shards feed validation during training)."""
    valid_max_sequences: Annotated[int, at_least(1)] | None = None
    """Packed sequences kept (and labelled) in each valid shard: its first ones (null: all). Validation
    reads each language's first 256 valid sequences (`compress` its first 64), so more cost teacher time
    only: a 12-layer teacher labels ~6,000 tokens/s on 2 CPU cores."""
    workers: Annotated[int, at_least(1)] = 1
    """Local worker processes (CPU); across machines, ranks come from the launcher (torchrun, SLURM)."""
    device: str = "auto"
    """Where teachers run: `auto` (this rank's GPU if any, else CPU), `cpu`, `cuda`, `cuda:1`, ..."""
    teacher_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Teacher weights' dtype for inference: `auto` is bfloat16 where it is fast (GPUs, CPUs with
    AVX512-BF16 or AMX), else float32."""


@dataclass
class StudentConfig:
    layers: Annotated[int, at_least(1)] = 4
    """Transformer layers."""
    hidden: Annotated[int, at_least(1)] = 256
    """Hidden size (also the embedding size)."""
    heads: Annotated[int, at_least(1)] = 4
    """Attention heads."""
    intermediate: Annotated[int, at_least(1)] = 1024
    """Feed-forward size."""
    max_position: Annotated[int, at_least(8)] = 512
    """Maximum sequence length the position embeddings cover."""
    init: str = "random"
    """`random`, or `teacher:<name>` to copy every other layer of that teacher (sizes must match)."""
    embeddings_from_teachers: bool = True
    """Copy embedding rows from the teachers through the id maps where hidden sizes match (averaged
    where several teachers share a token)."""
    init_output_bias: bool = False
    """Set the MLM head's output bias to the log frequencies of the gold tokens in the training shards
    (languages mixed with the sampling probabilities), so that a student from random initialisation
    starts at the unigram baseline instead of spending its first steps learning token frequencies.
    Uses no teacher; `train --baseline` turns it on."""
    arch: Literal["bert", "xmod"] = "bert"
    """`bert`: one dense BERT masked LM for every language. `xmod`: an X-Mod masked LM (Pfeiffer et al.,
    2022): the same shared body plus a small bottleneck module per language in every layer, chosen per
    sequence by its language; exports as `XmodForMaskedLM` (`set_default_language` / `lang_ids`)."""
    modules: dict[str, str] = field(default_factory=dict)
    """X-Mod: language -> module name, to let languages share a module (e.g. `{es: romance, fr: romance}`);
    a language left out gets a module of its own, named after it."""
    adapter_reduction_factor: Annotated[int, at_least(1)] = 2
    """X-Mod: each module's bottleneck is hidden / this (2: hidden 128 -> 64)."""
    ln_before_adapter: bool = False
    """X-Mod: the module's residual is taken after the LayerNorm that feeds it (X-Mod's published
    default) instead of before it. False keeps a student initialised from a teacher equal to it (README)."""
    adapter_layer_norm: bool = False
    """X-Mod: a LayerNorm of its own in front of the modules."""
    adapter_reuse_layer_norm: bool = True
    """X-Mod: without `adapter_layer_norm`, feed the modules through the layer's output LayerNorm."""
    pre_norm: bool = False
    """X-Mod: LayerNorm before each block instead of after (a pre-LN network: cannot start equal to a
    post-LN teacher)."""


@dataclass
class TrainConfig:
    alpha: Annotated[float, between(0, 1)] = 0.5
    """Weight of the KD loss; 1 - alpha weighs the MLM loss on gold tokens (0 = MLM-only baseline)."""
    temperature: Annotated[float, above(0)] = 1.0
    """Softmax temperature of the KD loss (the loss is scaled by its square)."""
    kd_target: Literal["exact", "renormalised"] = "exact"
    """The KD target at each labelled position: `exact`, the teacher's exact probabilities of its stored
    top-k (from the log-normaliser the data stage stores at data.lse_temperatures, which must list
    train.temperature) and the rest of its mass on everything else, as one more outcome; `renormalised`,
    softmax over the top-k alone (the mass outside them is dropped and the k scaled up to sum to 1)."""
    softmax: Literal["language", "all"] = "language"
    """Among which ids the student predicts each labelled position in training (KD and MLM alike): `language`,
    the ids its language's student tokenizer can write (the routed teacher's kept tokens, specials excluded:
    what the teacher's stored top-k and log-normaliser cover and what `evaluate` and `load_student` score),
    the decoder computing those rows only (as extend.softmax does for a new language); `all`, the whole joint
    vocabulary (MergeDistill's formulation: the student also learns to rule out every other teacher's tokens).
    The exported model is the same kind of masked LM either way; use it through its language's ids
    (`load_student`)."""
    sampling_alpha: Annotated[float, at_least(0)] = 0.3
    """Language sampling exponent: p(lang) proportional to size**sampling_alpha."""
    max_steps: Annotated[int, at_least(1)] = 1000
    """Optimizer steps."""
    batch_size: Annotated[int, at_least(1)] = 32
    """Sequences per device per step (before gradient accumulation)."""
    lr: Annotated[float, above(0)] = 5e-4
    """Peak learning rate."""
    warmup_steps: Annotated[int, at_least(0)] = 100
    """Linear warmup steps, followed by linear decay to 0."""
    weight_decay: Annotated[float, at_least(0)] = 0.01
    """AdamW weight decay."""
    grad_accum: Annotated[int, at_least(1)] = 1
    """Gradient accumulation steps."""
    grad_clip: Annotated[float, at_least(0)] = 1.0
    """Gradient norm clipping (0: off)."""
    devices: Annotated[int, at_least(1)] | str = "auto"
    """Devices per node (a number, or `auto`)."""
    accelerator: str = "auto"
    """`cpu`, `gpu` or `auto`."""
    strategy: str = "auto"
    """Lightning strategy, e.g. `ddp`."""
    num_nodes: Annotated[int, at_least(1)] = 1
    """Machines."""
    precision: str = "auto"
    """`auto` (bf16-mixed where bfloat16 is fast: GPUs, CPUs with AVX512-BF16 or AMX; else 32-true) or
    any Lightning precision string."""
    val_every: Annotated[int, at_least(1)] = 200
    """Validate every this many steps."""
    best_metric: Literal["val/loss", "val/mlm_loss", "val/kd_loss", "val/acc", "val/agree"] = "val/loss"
    """Validation figure that picks the best checkpoint (checkpoints/best-step=N.ckpt, judged right after
    each validation): `val/loss` (the training objective on the valid shards), `val/mlm_loss`, `val/kd_loss`
    (lower is better), or `val/acc`, `val/agree` (higher is better; near 0 early in training, so a poor
    judge of early checkpoints)."""
    seed: Annotated[int, between(0, 2**32 - 1)] = 0
    """Seed for initialisation and sampling."""
    logger: Literal["csv", "tensorboard", "wandb"] = "csv"
    """Where metrics go; wandb runs offline unless WANDB_MODE says otherwise."""
    mode: Literal["offline", "online"] = "offline"
    """`offline`: teacher predictions come from the data stage's shards; `online`: the teacher runs
    inside the training step (small runs and benchmarks)."""
    mini_head_layer: Annotated[int, at_least(1)] | None = None
    """MiniJoint (Marchisio et al., Findings of ACL 2023): a secondary MLM head on the output of the
    student's first k layers, trained with the same loss, so that those layers and the head form an
    aligned mini-model on which `mergedistill extend` (method minijoint) learns a new language cheaply.
    Exported with the student (export/mini_head/). null: no secondary head."""
    mini_head_weight: Annotated[float, at_least(0)] = 1.0
    """Weight of the secondary head's loss, added to the primary loss (0: the head trains nothing)."""
    relation_weight: Annotated[float, at_least(0)] = 0.0
    """MiniLMv2 self-attention relation distillation (Wang et al., 2021; train/relations.py): the weight of
    the KL between each teacher's and the student's query-query, key-key and value-value relations at one
    layer each, added to the loss (logged as train/relation_loss; train/loss includes the weighted term).
    Needs train.mode: online (the teachers' attention is read during the step). 0: off."""
    relation_heads: Annotated[int, at_least(1)] = 8
    """Relation heads: queries, keys and values (concatenated over attention heads) are split into this many
    equal slices on both sides, whatever the attention head counts. Must divide the student's and every
    routed teacher's hidden size; 8 divides all the common ones (32 ... 1024, 312, 384) and gives the demo's
    128-wide student slices of 16, as MiniLMv2's 48 heads do on a 768-wide teacher."""
    relation_teacher_layer: Annotated[int, Range()] = -1
    """The teacher layer whose attention is distilled (0-based; negative counts from the end: -1, the last),
    checked against each routed teacher when training starts. ALBERT counts its shared layer once per pass."""
    relation_student_layer: Annotated[int, Range()] = -1
    """The student layer that learns it (0-based; negative counts from the end: -1, the last; from
    -student.layers to student.layers - 1)."""
    export: Literal["best", "last"] = "best"
    """Which weights `train` exports: `best`, the checkpoint with the best train.best_metric among the
    validations (the last step's weights when the run has no validation split); `last`, the last step's.
    The model card and train/state.json say which was exported, from which step, with what score."""
    divergence_nats: Annotated[float, above(0)] = 0.5
    """The divergence watch: the training loss (an exponential moving average over ~50 steps) rising this
    many nats above its lowest point and staying there for train.divergence_patience steps counts as a
    divergence: said at once in the log (step, loss, what to try), in train/state.json and the model card."""
    divergence_patience: Annotated[int, at_least(1)] = 100
    """Steps the smoothed training loss must stay train.divergence_nats above its minimum to count as diverged."""
    on_divergence: Literal["warn", "stop"] = "warn"
    """What a divergence does: `warn` (say so and train on: the exported weights are the best checkpoint's
    with train.export: best), or `stop` (end training at once and export as train.export says)."""


@dataclass
class DownstreamTask:
    train: dict[str, str]
    """Language -> labelled training data: JSON lines (`text_field`, `label_field`), a CoNLL file
    (tagging: token and tag columns), or a datasets spec `datasets:<id or dir>[:<config>]:<split>`."""
    test: dict[str, str]
    """Language -> labelled test data, same formats."""
    kind: Literal["classify", "tag"] = "classify"
    """`classify`: one label per text (mean-pooled encoder + linear); `tag`: one label per word."""
    text_field: str = "text"
    """Field holding the text (JSON lines / datasets)."""
    label_field: str = "label"
    """Field holding the label (JSON lines / datasets)."""
    tune: Literal["full", "head"] = "full"
    """`full`: the encoder and the head are fine-tuned; `head`: a linear probe: the encoder stays frozen, its
    features are computed once and only the head trains (one forward pass per example instead of a
    forward and backward per epoch: the choice for large teachers on a CPU; give it more epochs and a
    higher `lr`, as a fresh head alone learns slowly)."""
    epochs: Annotated[int, at_least(1)] = 2
    """Fine-tuning epochs per language."""
    lr: Annotated[float, above(0)] = 0.0005
    """Fine-tuning learning rate."""
    max_train: Annotated[int, at_least(1)] = 2000
    """Training examples per language (the first ones)."""
    max_test: Annotated[int, at_least(1)] = 1000
    """Test examples per language (the first ones)."""
    zero_shot_from: list[str] = field(default_factory=list)
    """Languages whose fine-tuned model is also tested on every other language (zero-shot transfer)."""


@dataclass
class EvalConfig:
    batch_size: Annotated[int, at_least(1)] = 32
    """Sequences per forward pass during evaluation."""
    max_lines: Annotated[int, at_least(1)] | None = 2000
    """Test lines per language for masked-token accuracy and agreement (null: all), drawn at random
    with `seed` from the whole split (kept in order), not its first lines."""
    pll_lines: Annotated[int, at_least(1)] = 200
    """Lines per language for pseudo-log-likelihood (one forward pass per token: costly), drawn like
    `max_lines`; `select` scores candidate teachers on as many valid lines."""
    mask_prob: Annotated[float, between(0, 1, exclusive=True)] = 0.15
    """Masking rate for masked-token accuracy (fixed seed, [MASK] only)."""
    seed: Annotated[int, at_least(0)] = 0
    """Seed of the evaluation masks (and of the bootstrap resamples)."""
    bootstrap: Annotated[int, between(100, 100_000)] = 1000
    """Resamples of the test lines for the 95% intervals on student - routed teacher (and baseline -
    teacher) differences in masked accuracy and masked cross-entropy (paired: both models on each resample)."""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """Model dtype during evaluation: `auto` is bfloat16 where it is fast (GPUs, CPUs with AVX512-BF16
    or AMX: ~2.4x faster than float32 there), else float32 (emulated bfloat16 is several times slower)."""
    device: str = "auto"
    """Where evaluation (and `select`, `ablate` scoring) runs: `auto` (a GPU when there is one, else the
    CPU), `cpu`, `cuda`, `cuda:1`, ..."""
    char_languages: list[str] = field(default_factory=lambda: ["ja", "zh", "th", "ko"])
    """Languages written without spaces: scored per character instead of per word."""
    retrieval: bool = True
    """Cross-lingual retrieval on aligned test paragraphs (JSON lines test files sharing a `key` field)."""
    retrieval_pairs: Annotated[int, at_least(1)] = 500
    """Aligned paragraphs per language pair at most."""
    baseline: bool = True
    """Compare with the MLM-only baseline student (runs/<run>/baseline, `mergedistill train --baseline`)."""
    downstream: dict[str, DownstreamTask] = field(default_factory=dict)
    """Labelled tasks: task name -> its data per language and fine-tuning settings."""


@dataclass
class AblateConfig:
    variants: dict[str, dict[str, str]] = field(default_factory=dict)
    """Variant name -> routing (language -> teacher; `*` for every language). Empty: the configured
    routing, every teacher that can serve all languages alone (`all-<teacher>`), and `selected` when
    runs/<run>/select/routing.yaml exists."""
    train_steps: Annotated[int, at_least(1)] | None = None
    """Training steps per variant (null: train.max_steps)."""


@dataclass
class SweepConfig:
    seeds: Annotated[list[int], between(0, 2**32 - 1)] = field(default_factory=list)
    """Training seeds (train.seed) each variant of `mergedistill sweep` is trained with: one student per
    variant and seed, and the report gives each figure's mean and spread over the seeds. Empty: train.seed."""
    metric: str = "mlm_acc"
    """The student metric (a name in evaluate's results.csv, e.g. mlm_acc, agreement, pppl) that the
    sweep's main table and plot show per language; the report's other tables hold every metric."""
    name: str | None = None
    """The sweep's folder, runs/<run>/sweep/<name>/ (null: the varied keys joined by `+`, e.g.
    `train.lr+data.top_k`), so that sweeps over different keys keep their own tables."""


EXTEND_METHODS = ("full", "minipost", "minijoint", "xmod")


@dataclass
class ExtendConfig:
    languages: dict[str, LanguageConfig] = field(default_factory=dict)
    """New languages, each declared like an entry of `languages:` (train, valid, test, and an optional
    teacher naming one of `teachers:`); `mergedistill extend --language xx` adds one to the exported
    student, in runs/<run>/extend/<xx>/."""
    method: Literal["full", "minipost", "minijoint", "xmod"] = "minipost"
    """How the new language's embedding rows are learned (the result exported): `full`: over the whole
    frozen student; `minipost`: over a mini-model (the student's first `mini_layers` layers, frozen, and
    a small head aligned to the student), then plugged into the student; `minijoint`: over the mini-model
    the student was trained with (train.mini_head_layer); `xmod` (X-Mod students): the rows and a new
    language module, with the shared body frozen."""
    compare: list[str] = field(default_factory=list)
    """Other methods trained side by side on the same batches, for the report (not exported)."""
    compare_mlm: bool = False
    """With a teacher for the new language: also train the exported method with the MLM loss only (alpha 0) on
    the same batches, reported as `<method>-mlm` (not exported): what distilling from the teacher adds."""
    mini_layers: Annotated[int, at_least(1)] | None = None
    """minipost: the mini-model's depth k (the student's first k layers); null: half the student's layers
    (at least 1). minijoint uses the layer the student was trained with."""
    mini_align_steps: Annotated[int, at_least(0)] = 300
    """minipost: steps that train the mini-model's head (transform and output bias, started from the
    student's head) over the frozen first k layers on the run's own data shards, so that layer k maps
    onto the student's output embeddings. Done once per student and k, shared by every new language."""
    tokenizer: Literal["wordpiece", "unigram", "sp-bpe", "byte-bpe"] = "sp-bpe"
    """Family of the tokenizer trained on the new language's train corpus when it has no teacher."""
    tokenizer_vocab_size: Annotated[int, at_least(1)] = 8000
    """Size of that tokenizer."""
    tokenizer_lines: Annotated[int, at_least(1)] | None = 50000
    """Train lines that tokenizer is trained on (null: all)."""
    share_tokens: bool = True
    """A token of the new language whose canonical key is already in the joint vocabulary keeps that
    token's row (frozen: the old languages read it); false: every token gets a new row."""
    softmax: Literal["language", "all"] = "language"
    """The new language's predictions range over `language`: the tokens its tokenizer emits (as a model
    of its own vocabulary, like the mini-model paper's new embedding matrix; cheaper), or `all`: the
    whole vocabulary. Reported accuracies say which."""
    steps: Annotated[int, at_least(1)] = 1000
    """Optimizer steps per method."""
    batch_size: Annotated[int, at_least(1)] = 32
    """Sequences per step."""
    lr: Annotated[float, above(0)] = 0.003
    """Peak learning rate (the mini-model's head alignment uses it too)."""
    warmup_steps: Annotated[int, at_least(0)] = 50
    """Linear warmup steps, then linear decay to 0."""
    weight_decay: Annotated[float, at_least(0)] = 0.0
    """AdamW weight decay of the new parameters."""
    alpha: Annotated[float, between(0, 1)] | None = None
    """Weight of the KD loss when the new language has a teacher (null: train.alpha); without a teacher
    the loss is MLM only."""
    max_lines: Annotated[int, at_least(1)] | None = None
    """Lines per split of the new language's corpora (null: data.max_lines)."""
    eval_every: Annotated[int, at_least(1)] = 100
    """Steps between points of the learning curve (masked accuracy on the valid split, plugged student)."""
    curve_lines: Annotated[int, at_least(1)] = 200
    """Valid lines the learning curve is measured on."""
    old_lines: Annotated[int, at_least(1)] = 200
    """Test lines per old language on which the change of the old languages is measured."""
    guard_positions: Annotated[int, at_least(0)] = 0
    """Masked positions of the old languages (the run's own shards) at which the new rows are kept from
    outscoring the old languages' predictions among all ids: each step adds the mean increase of the old
    gold tokens' cross-entropy that the new rows cause there (computed from the student's fixed outputs,
    once). 0: off (predictions among each old language's own tokens never change either way)."""
    guard_weight: Annotated[float, at_least(0)] = 1.0
    """Weight of that term."""
    guard_batch: Annotated[int, at_least(1)] = 256
    """Old positions drawn per step for that term."""
    module_init: str | None = None
    """X-Mod students: the language whose module the new language's module starts from (null: a module
    that adds nothing, i.e. the shared body alone). Methods other than `xmod` keep it frozen."""
    seed: Annotated[int, between(0, 2**32 - 1)] = 0
    """Seed of the new rows' initialisation, the batches and the masks."""
    device: str = "auto"
    """Where extend trains and evaluates: `auto` (a GPU when there is one, else the CPU), `cpu`, `cuda`, ..."""


@dataclass
class CompressConfig:
    sparsity: Annotated[list[float], Range(low=0, high=1, high_open=True)] = field(default_factory=lambda: [0.3, 0.5, 0.7, 0.9])
    """Unstructured magnitude pruning: one variant per level, the share of the encoder's linear weights set
    to zero (global ranking by |w|), each in [0, 1). Empty: no unstructured variants."""
    recovery_steps: Annotated[int, at_least(0)] = 200
    """Optimizer steps of KD + MLM training on the run's shards after (structured) or while (unstructured:
    gradual, cubic schedule) pruning; each pruned variant then also gets a `-rec` twin. 0: one-shot only."""
    recovery_lr: Annotated[float, above(0)] | None = None
    """Peak learning rate of recovery training (warmup over a tenth of the steps, then linear decay to 0);
    null: a tenth of train.lr (the student is trained already)."""
    prune_until: Annotated[float, Range(low=0, high=1, low_open=True)] = 0.75
    """Gradual pruning reaches the final sparsity after this share of recovery_steps; the rest trains at it."""
    prune_frequency: Annotated[int, at_least(1)] = 10
    """Gradual pruning recomputes the masks every this many optimizer steps."""
    include_embeddings: bool = False
    """Prune the embedding tables too (the word table is tied to the decoder: a pruned entry changes a
    token's meaning in every language that uses it). Off: embeddings stay dense."""
    include_head: bool = False
    """Prune the MLM head's transform dense layer too (every prediction passes through it)."""
    heads: Annotated[list[float], Range(low=0, high=1, high_open=True)] = field(default_factory=lambda: [0.5])
    """Structured pruning: remove this share of all attention heads, the least important first (first-order
    Taylor importance on shard batches); every layer keeps at least one head. One variant per value."""
    neurons: Annotated[list[float], Range(low=0, high=1, high_open=True)] = field(default_factory=lambda: [0.5])
    """Structured pruning: remove this share of the feed-forward neurons of every layer (by importance).
    One variant per value."""
    layers: Annotated[list[int], at_least(1)] = field(default_factory=lambda: [1])
    """Structured pruning: remove this many whole layers (the least important). One variant per value."""
    importance_batches: Annotated[int, at_least(1)] = 8
    """Shard batches (train.batch_size sequences each) the importance of heads, neurons and layers is
    measured on (one backward pass each)."""
    quantize: bool = True
    """An int8 variant: per-row symmetric int8 weights of the encoder's linear layers, the head's dense and
    the tied word table (mergedistill's own format; load with `mergedistill.compress.quantize.load_quantized`)."""
    small: bool = True
    """A smaller student distilled from the same shards (the distillation point of comparison)."""
    small_layers: Annotated[int, at_least(1)] | None = None
    """Layers of the smaller student; null: half the student's (at least 1)."""
    small_hidden: Annotated[int, at_least(1)] | None = None
    """Hidden size of the smaller student; null: the student's."""
    small_heads: Annotated[int, at_least(1)] | None = None
    """Attention heads of the smaller student; null: the student's."""
    small_intermediate: Annotated[int, at_least(1)] | None = None
    """Feed-forward size of the smaller student; null: the student's."""
    small_steps: Annotated[int, at_least(1)] | None = None
    """Training steps of the smaller student; null: train.max_steps (the student's budget)."""
    throughput_batches: Annotated[int, at_least(1)] = 4
    """Shard batches each variant runs for the CPU throughput measurement (the same batches for every model)."""
    throughput_batch_size: Annotated[int, at_least(1)] = 8
    """Sequences per throughput batch (data.seq_len tokens at most each)."""
    throughput_repeats: Annotated[int, at_least(1)] = 5
    """Interleaved repeats of the throughput measurement (the median is reported)."""
    throughput_threads: Annotated[int, at_least(1)] | None = None
    """CPU threads during the throughput measurement; null: torch's default."""
    mild_sparsity: Annotated[float, Range(low=0, high=1, high_open=True)] = 0.5
    """Sparsity levels up to this count as mild in the report's findings (did mild sparsity help a language?)."""


@dataclass
class RunConfig:
    run: str
    """Run name: outputs go to vocab/<run>/ and runs/<run>/ under the current directory."""
    teachers: dict[str, TeacherConfig]
    """Teacher name -> where its model is."""
    languages: dict[str, LanguageConfig]
    """Language code -> its corpora and its teacher."""
    default_teacher: str | None = None
    """Teacher for languages that name none."""
    vocab_run: str | None = None
    """Use the vocabulary of another run (vocab/<vocab_run>/) instead of this run's own; `ablate` sets it
    so that its variants share one vocabulary."""
    routing: str | None = None
    """A routing file (YAML mapping language -> teacher, as `mergedistill select` writes) that overrides
    `languages.<lang>.teacher`."""
    vocab: VocabConfig = field(default_factory=VocabConfig)
    """The vocabulary stage."""
    data: DataConfig = field(default_factory=DataConfig)
    """The data stage."""
    student: StudentConfig = field(default_factory=StudentConfig)
    """The student model."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The train stage."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """The evaluate stage."""
    ablate: AblateConfig = field(default_factory=AblateConfig)
    """The ablate stage: teacher-selection variants."""
    sweep: SweepConfig = field(default_factory=SweepConfig)
    """The sweep stage: recipe variants (`--vary section.key=v1,v2`) end to end."""
    extend: ExtendConfig = field(default_factory=ExtendConfig)
    """The extend stage: new languages on the distilled student (mini-model adaptation)."""
    compress: CompressConfig = field(default_factory=CompressConfig)
    """The compress stage: pruning, quantization and smaller-student variants, evaluated per language."""
    config_path: str | None = field(default=None, metadata={"internal": True})
    """The YAML file this config was read from (set by `load_config`; messages name it)."""

    # ---- derived ----------------------------------------------------------------------------
    def teacher_of(self, lang: str) -> str:
        return self.languages[lang].teacher or self.default_teacher  # type: ignore[return-value]

    def teachers_of(self, lang: str) -> list[str]:
        """The teachers that know `lang`: the routed one, then its candidates."""
        return list(dict.fromkeys([self.teacher_of(lang)] + list(self.languages[lang].candidates)))

    def max_lines_of(self, lang: str) -> int | None:
        """Lines of each of `lang`'s corpus splits the data stage uses: data.max_lines, capped by its
        teacher's max_lines."""
        caps = [n for n in (self.data.max_lines, self.teachers[self.teacher_of(lang)].max_lines) if n is not None]
        return min(caps) if caps else None

    def prune_lines_of(self, teacher: str) -> int | None:
        """Lines per corpus the vocabulary's pruning scan of `teacher` reads: vocab.max_lines, capped by the
        teacher's max_lines (the lines the data stage lets it label: the vocabulary keeps what it labels)."""
        caps = [n for n in (self.vocab.max_lines, self.teachers[teacher].max_lines) if n is not None]
        return min(caps) if caps else None

    def languages_of(self, teacher: str) -> list[str]:
        """Languages routed to `teacher`, in config order."""
        return [lang for lang in self.languages if self.teacher_of(lang) == teacher]

    @property
    def vocab_dir(self) -> Path:
        return Path("vocab") / (self.vocab_run or self.run)

    @property
    def run_dir(self) -> Path:
        return Path("runs") / self.run

    def command(self, stage: str) -> str:
        """The command line that runs `stage` on this config, for messages that say what to run."""
        return f"mergedistill {stage} --config {self.config_path or '<config>'}"


DATASETS_PREFIX = "datasets:"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def looks_like_hub_id(path: str) -> bool:
    """`bert-base-cased` or `google/muril-base-cased`; a path starting with ./, / or ~ is local, and so is
    `teachers/xlmr` when a folder `teachers` exists here (a missing folder, not a hub organisation)."""
    if not _HUB_ID.match(path) or os.path.exists(path):
        return False
    return "/" not in path or not os.path.isdir(path.split("/", 1)[0])


def _check(cfg: RunConfig, problems: list[str]) -> None:
    """Cross-field checks: routing, files, value ranges."""
    if not re.match(r"^[\w.-]+$", cfg.run or ""):
        problems.append(f"run: {cfg.run!r} must be a plain name (letters, digits, . _ -): it names output folders")
    if not cfg.teachers:
        problems.append("teachers: define at least one teacher, e.g. `multi: {path: teachers/multi}`")
    if not cfg.languages:
        problems.append("languages: define at least one language, e.g. `de: {train: corpora/de/train.txt, teacher: de}`")
    if cfg.default_teacher is not None and cfg.default_teacher not in cfg.teachers:
        problems.append(f"default_teacher: {cfg.default_teacher!r} is not a teacher; defined: {', '.join(cfg.teachers)}")
    for name, t in cfg.teachers.items():
        if t is None:
            continue
        if not looks_like_hub_id(t.path) and not Path(t.path).is_dir():
            problems.append(
                f"teachers.{name}.path: no folder {t.path!r} (resolved against {os.getcwd()}); "
                "build it (the demo's teachers: `make teachers`) or give a hub model id"
            )
    for lang, lc in cfg.languages.items():
        if lc is None:
            continue
        teacher = lc.teacher or cfg.default_teacher
        if teacher is None:
            problems.append(f"languages.{lang}: no teacher assigned; add `teacher: <name>` or a top-level `default_teacher`")
        else:
            _teacher_problem(cfg, f"languages.{lang}.teacher", teacher, problems)
        for cand in lc.candidates:
            _teacher_problem(cfg, f"languages.{lang}.candidates", cand, problems)
        _corpus_file_problems(lc, f"languages.{lang}", problems)
    for split in cfg.vocab.prune_splits:
        if split not in ("train", "valid", "test"):
            problems.append(f"vocab.prune_splits: {split!r} is not one of train, valid, test")
    # value ranges are declared beside each field (Range) and checked while the config is read
    d = cfg.data
    for split in d.splits:
        if split not in ("train", "valid", "test"):
            problems.append(f"data.splits: {split!r} is not one of train, valid, test")
    _check_compress(cfg, problems)
    s = cfg.student
    k = cfg.train.mini_head_layer
    if k is not None and not 1 <= k < s.layers:
        problems.append(f"train.mini_head_layer: {k} must be from 1 to student.layers - 1 ({s.layers - 1}): the mini-model "
                        "is the student's first k layers")
    tr = cfg.train
    if tr.relation_weight > 0:  # relation distillation reads the teachers' attention inside the step
        if tr.mode != "online" or tr.alpha == 0:
            problems.append(f"train.relation_weight: {tr.relation_weight} needs train.mode: online with train.alpha > 0 (now "
                            f"mode {tr.mode}, alpha {tr.alpha}): the teachers' attention is read while they run in the step; "
                            "set train.mode: online (and train.alpha > 0) or train.relation_weight: 0")
        if s.hidden % tr.relation_heads:
            problems.append(f"train.relation_heads: {tr.relation_heads} must divide student.hidden ({s.hidden}) (and every "
                            "routed teacher's hidden size)")
        if not -s.layers <= tr.relation_student_layer < s.layers:
            problems.append(f"train.relation_student_layer: {tr.relation_student_layer} must be from -{s.layers} to "
                            f"{s.layers - 1} (student.layers: {s.layers}; -1 is the last)")
    _check_extend(cfg, problems)
    if s.hidden % s.heads:
        problems.append(f"student.hidden: {s.hidden} must be a multiple of student.heads ({s.heads})")
    if s.max_position < d.seq_len:
        problems.append(f"student.max_position: {s.max_position} is smaller than data.seq_len ({d.seq_len}); "
                        f"allowed: >= data.seq_len (raise student.max_position or lower data.seq_len)")
    if s.init != "random" and not (s.init.startswith("teacher:") and s.init[8:] in cfg.teachers):
        problems.append(f"student.init: {s.init!r} must be `random` or `teacher:<name>` with a defined teacher")
    _check_xmod(cfg, problems)


XMOD_FIELDS = {"modules": {}, "adapter_reduction_factor": 2, "ln_before_adapter": False, "adapter_layer_norm": False,
                "adapter_reuse_layer_norm": True, "pre_norm": False}


def _check_xmod(cfg: RunConfig, problems: list[str]) -> None:
    """The X-Mod student's fields: set only with `arch: xmod`, modules for configured languages."""
    s = cfg.student
    if s.arch != "xmod":
        changed = [k for k, v in XMOD_FIELDS.items() if getattr(s, k) != v]
        if changed:
            problems.append(f"student.{changed[0]}: X-Mod settings ({', '.join(changed)}) need `student.arch: xmod` "
                            f"(the student is `{s.arch}`); set the arch or remove them")
        return
    unknown = [lang for lang in s.modules if lang not in cfg.languages]
    if unknown:
        problems.append(f"student.modules: {', '.join(unknown)} {'is' if len(unknown) == 1 else 'are'} not under languages "
                        f"({', '.join(cfg.languages)}); remove {'it' if len(unknown) == 1 else 'them'} or add the language")
    names = {lang: str(s.modules.get(lang, lang)) for lang in cfg.languages}
    bad = [f"{lang}: {m!r}" for lang, m in names.items() if not re.match(r"^[\w-]+$", m)]
    if bad:
        problems.append(f"student.modules: module names (a language's own code unless mapped) must be letters, digits, "
                        f"_ or - (they name weights); got {', '.join(bad)}; map those languages to plain names")
    if s.adapter_reduction_factor > s.hidden:  # >= 1: its declared range
        problems.append(f"student.adapter_reduction_factor: {s.adapter_reduction_factor} must be from 1 to student.hidden "
                        f"({s.hidden}): the module bottleneck is hidden / it")


def _teacher_problem(cfg: RunConfig, where: str, name: str, problems: list[str]) -> None:
    """A routing or candidate field that names a teacher `teachers:` does not define."""
    if name not in cfg.teachers:
        problems.append(f"{where}: {name!r} is not defined under teachers ({', '.join(cfg.teachers)})")


def _corpus_file_problems(lc: LanguageConfig, where: str, problems: list[str]) -> None:
    """The train/valid/test files of a language entry (`languages.<x>`, `extend.languages.<x>`) that do not exist."""
    for split in ("train", "valid", "test"):
        spec = getattr(lc, split)
        if spec and not spec.startswith(DATASETS_PREFIX) and not Path(spec).is_file():
            problems.append(f"{where}.{split}: no file {spec!r} (resolved against {os.getcwd()})")


def _check_extend(cfg: RunConfig, problems: list[str]) -> None:
    """The extend section: new languages (not already in the run, a defined teacher, readable files), methods, sizes."""
    x = cfg.extend
    for lang, lc in x.languages.items():
        if lc is None:
            continue
        where = f"extend.languages.{lang}"
        if lang in cfg.languages:
            problems.append(f"{where}: {lang!r} is already a language of this run (languages.{lang}); extend adds new ones")
        if lc.teacher is not None:
            _teacher_problem(cfg, f"{where}.teacher", lc.teacher, problems)
        _corpus_file_problems(lc, where, problems)
    for i, m in enumerate(x.compare):
        if m not in EXTEND_METHODS:
            problems.append(f"extend.compare[{i}]: {m!r} is not one of {', '.join(EXTEND_METHODS)}")
    if x.mini_layers is not None and not 1 <= x.mini_layers < cfg.student.layers:
        problems.append(f"extend.mini_layers: {x.mini_layers} must be from 1 to student.layers - 1 ({cfg.student.layers - 1}): "
                        "the mini-model is the student's first k layers")



def _check_compress(cfg: RunConfig, problems: list[str]) -> None:
    """compress: value ranges. What the student's shape allows (heads, layers) is checked by the compress
    stage against the exported student, so that the defaults never make another stage's config invalid."""
    c, s = cfg.compress, cfg.student
    hidden, heads = c.small_hidden or s.hidden, c.small_heads or s.heads
    if c.small and hidden % max(heads, 1):
        problems.append(f"compress.small_hidden: {hidden} must be a multiple of the smaller student's heads ({heads})")


def _apply_routing(data: dict, problems: list[str]) -> None:
    """Fold a routing file into languages.<lang>.teacher."""
    spec = data.get("routing")
    if not spec:
        return
    p = Path(str(spec))
    if not p.is_file():
        problems.append(f"routing: no file {str(spec)!r} (write one with `mergedistill select`)")
        return
    try:
        routing = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        problems.append(f"routing: {spec} is not valid YAML: {e}")
        return
    routing = routing.get("routing", routing) if isinstance(routing, dict) else routing
    if not isinstance(routing, dict) or not all(isinstance(v, str) for v in routing.values()):
        problems.append(f"routing: {spec} must map each language to a teacher name")
        return
    langs = data.get("languages") if isinstance(data.get("languages"), dict) else {}
    for lang, teacher in routing.items():
        if lang not in langs or not isinstance(langs[lang], dict):
            problems.append(f"routing: {spec} routes {lang!r}, which is not under languages")
            continue
        langs[lang]["teacher"] = teacher


def load_config(path: str | os.PathLike | None, overrides: list[str] | None = None, data: dict | None = None) -> RunConfig:
    """Read a YAML config (or take `data`), apply overrides, check everything, return a RunConfig.

    Raises ConfigError listing every problem."""
    problems: list[str] = []
    if data is None:
        data = read_yaml_mapping(path, "sections run, teachers, languages, ...; the demo's is configs/demo.yaml")
    apply_overrides(data, overrides, problems)
    _apply_routing(data, problems)
    cfg = from_dict(RunConfig, data, "", problems)
    if cfg is not None:
        _check(cfg, problems)
    if problems:
        where = f"config {path}" if path else "config"
        raise ConfigError(problems, header=f"{where}: {len(problems)} problem(s); nothing was run:")
    cfg.config_path = str(path) if path is not None else None
    return cfg
