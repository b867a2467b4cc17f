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
from typing import Literal

import yaml

from mergedistill.configlib import apply_overrides, from_dict, read_yaml_mapping
from mergedistill.errors import ConfigError


@dataclass
class TeacherConfig:
    path: str
    """A Hugging Face model id or a local folder holding a masked-LM (config, weights, tokenizer)."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) when `path` is a hub id."""
    trust_remote_code: bool = False
    """Allow model code from the hub. Off by default: only standard transformers classes load."""
    max_lines: int | None = None
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
    max_lines: int | None = None
    """Read at most this many lines per corpus when pruning (null: all of it)."""
    report_lines: int = 20000
    """Lines per language used for the fertility figures of the report (0: all)."""


@dataclass
class DataConfig:
    seq_len: int = 128
    """Tokens per training sequence, [CLS]/[SEP] included. Lines are packed `[CLS] a [SEP] b [SEP]`;
    a line is split only when it alone is longer than a sequence."""
    mask_prob: float = 0.15
    """Fraction of (non-special) tokens selected for prediction (80% [MASK], 10% random, 10% kept)."""
    top_k: int = 8
    """Teacher predictions kept per masked position (ids mapped to the student vocabulary)."""
    whole_word_mask: bool = False
    """Mask all pieces of a word together."""
    dupe_factor: int = 1
    """Masked copies of each training sequence, each with its own mask."""
    seed: int = 0
    """Masking seed (each shard and copy draws from its own stream, so results do not depend on how
    shards are spread over processes)."""
    batch_size: int = 64
    """Sequences per teacher forward pass (sequences are sorted by length first)."""
    shard_lines: int = 20000
    """Corpus lines per shard: the unit of resumption and of parallel work."""
    max_lines: int | None = None
    """Use at most this many lines of each corpus split (null: all of it)."""
    splits: list[str] = field(default_factory=lambda: ["train", "valid"])
    """Corpus splits turned into shards (valid shards feed validation during training)."""
    workers: int = 1
    """Local worker processes (CPU); across machines, ranks come from the launcher (torchrun, SLURM)."""
    device: str = "auto"
    """Where teachers run: `auto` (this rank's GPU if any, else CPU), `cpu`, `cuda`, `cuda:1`, ..."""
    teacher_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Teacher weights' dtype for inference: `auto` is bfloat16 where it is fast (GPUs, CPUs with
    AVX512-BF16 or AMX), else float32."""


@dataclass
class StudentConfig:
    layers: int = 4
    """Transformer layers."""
    hidden: int = 256
    """Hidden size (also the embedding size)."""
    heads: int = 4
    """Attention heads."""
    intermediate: int = 1024
    """Feed-forward size."""
    max_position: int = 512
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


@dataclass
class TrainConfig:
    alpha: float = 0.5
    """Weight of the KD loss; 1 - alpha weighs the MLM loss on gold tokens (0 = MLM-only baseline)."""
    temperature: float = 1.0
    """Softmax temperature of the KD loss."""
    sampling_alpha: float = 0.3
    """Language sampling exponent: p(lang) proportional to size**sampling_alpha."""
    max_steps: int = 1000
    """Optimizer steps."""
    batch_size: int = 32
    """Sequences per device per step (before gradient accumulation)."""
    lr: float = 5e-4
    """Peak learning rate."""
    warmup_steps: int = 100
    """Linear warmup steps, followed by linear decay to 0."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    grad_accum: int = 1
    """Gradient accumulation steps."""
    grad_clip: float = 1.0
    """Gradient norm clipping (0: off)."""
    devices: int | str = "auto"
    """Devices per node (a number, or `auto`)."""
    accelerator: str = "auto"
    """`cpu`, `gpu` or `auto`."""
    strategy: str = "auto"
    """Lightning strategy, e.g. `ddp`."""
    num_nodes: int = 1
    """Machines."""
    precision: str = "auto"
    """`auto` (bf16-mixed where bfloat16 is fast: GPUs, CPUs with AVX512-BF16 or AMX; else 32-true) or
    any Lightning precision string."""
    val_every: int = 200
    """Validate every this many steps."""
    seed: int = 0
    """Seed for initialisation and sampling."""
    logger: Literal["csv", "tensorboard", "wandb"] = "csv"
    """Where metrics go; wandb runs offline unless WANDB_MODE says otherwise."""
    mode: Literal["offline", "online"] = "offline"
    """`offline`: teacher predictions come from the data stage's shards; `online`: the teacher runs
    inside the training step (small runs and benchmarks)."""


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
    epochs: int = 2
    """Fine-tuning epochs per language."""
    lr: float = 0.0005
    """Fine-tuning learning rate."""
    max_train: int = 2000
    """Training examples per language (the first ones)."""
    max_test: int = 1000
    """Test examples per language (the first ones)."""
    zero_shot_from: list[str] = field(default_factory=list)
    """Languages whose fine-tuned model is also tested on every other language (zero-shot transfer)."""


@dataclass
class EvalConfig:
    batch_size: int = 32
    """Sequences per forward pass during evaluation."""
    max_lines: int | None = 2000
    """Test lines per language for masked-token accuracy and agreement (null: all), drawn at random
    with `seed` from the whole split (kept in order), not its first lines."""
    pll_lines: int = 200
    """Lines per language for pseudo-log-likelihood (one forward pass per token: costly), drawn like
    `max_lines`; `select` scores candidate teachers on as many valid lines."""
    mask_prob: float = 0.15
    """Masking rate for masked-token accuracy (fixed seed, [MASK] only)."""
    seed: int = 0
    """Seed of the evaluation masks."""
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
    retrieval_pairs: int = 500
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
    train_steps: int | None = None
    """Training steps per variant (null: train.max_steps)."""


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
    """`bert-base-cased` or `google/muril-base-cased`; a path starting with ./, / or ~ is local."""
    return bool(_HUB_ID.match(path)) and not os.path.exists(path)


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
        if t.max_lines is not None and t.max_lines < 1:
            problems.append(f"teachers.{name}.max_lines: {t.max_lines} must be at least 1 (or null: data.max_lines)")
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
        elif teacher not in cfg.teachers:
            problems.append(f"languages.{lang}.teacher: {teacher!r} is not defined under teachers ({', '.join(cfg.teachers)})")
        for cand in lc.candidates:
            if cand not in cfg.teachers:
                problems.append(f"languages.{lang}.candidates: {cand!r} is not defined under teachers ({', '.join(cfg.teachers)})")
        for split in ("train", "valid", "test"):
            spec = getattr(lc, split)
            if spec and not spec.startswith(DATASETS_PREFIX) and not Path(spec).is_file():
                problems.append(f"languages.{lang}.{split}: no file {spec!r} (resolved against {os.getcwd()})")
    for split in cfg.vocab.prune_splits:
        if split not in ("train", "valid", "test"):
            problems.append(f"vocab.prune_splits: {split!r} is not one of train, valid, test")
    d = cfg.data
    if not 0.0 < d.mask_prob < 1.0:
        problems.append(f"data.mask_prob: {d.mask_prob} must be between 0 and 1")
    if d.top_k < 1:
        problems.append(f"data.top_k: {d.top_k} must be at least 1")
    if d.seq_len < 8:
        problems.append(f"data.seq_len: {d.seq_len} must be at least 8")
    if d.dupe_factor < 1:
        problems.append(f"data.dupe_factor: {d.dupe_factor} must be at least 1")
    if d.shard_lines < 1 or d.batch_size < 1 or d.workers < 1:
        problems.append("data.shard_lines, data.batch_size and data.workers must be at least 1")
    for split in d.splits:
        if split not in ("train", "valid", "test"):
            problems.append(f"data.splits: {split!r} is not one of train, valid, test")
    t = cfg.train
    if not 0.0 <= t.alpha <= 1.0:
        problems.append(f"train.alpha: {t.alpha} must be between 0 and 1")
    if t.temperature <= 0:
        problems.append(f"train.temperature: {t.temperature} must be positive")
    if t.max_steps < 1:
        problems.append(f"train.max_steps: {t.max_steps} must be at least 1")
    s = cfg.student
    if s.hidden % max(s.heads, 1):
        problems.append(f"student.hidden: {s.hidden} must be a multiple of student.heads ({s.heads})")
    if s.init != "random" and not (s.init.startswith("teacher:") and s.init[8:] in cfg.teachers):
        problems.append(f"student.init: {s.init!r} must be `random` or `teacher:<name>` with a defined teacher")


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
