"""`mergedistill extend --config C --language xx`: add language xx (declared under extend.languages) to the
run's exported student, without retraining it: new embedding rows learned with the student frozen, over
the whole student (`full`) or over a mini-model of its first layers (`minipost`, `minijoint`; Marchisio
et al., Findings of ACL 2023), or with a new X-Mod language module (`xmod`).

Output, runs/<run>/extend/<xx>/:
  export/        the extended student, a standard HF folder: the original's weights with the new rows
                 appended (every old row and weight bit for bit), the old tokenizers (padded with
                 placeholders for the new ids), tokenizers/new-<xx>/, languages.json with xx, a model card;
  report.md, results.csv, plots/curve.png: the methods side by side;
  work/          what a rerun reuses: the new tokenizer, xx's shards, each method's learned parameters.
The original export is only read. A rerun with the same inputs skips; a method whose inputs did not
change is not trained again (switching extend.method re-exports only); --force redoes everything.
"""
from __future__ import annotations

import copy
import hashlib
import io
import json
import logging
import shutil
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from mergedistill import __version__
from mergedistill.config import LanguageConfig, RunConfig, TeacherConfig
from mergedistill.configlib import to_dict
from mergedistill.corpus import check_corpus, corpus_fingerprint, iter_lines, sample_lines, spread_subset
from mergedistill.data.masking import IGNORE_INDEX
from mergedistill.errors import UserError
from mergedistill.eval.metrics import masked_eval_set
from mergedistill.eval.models import Export
from mergedistill.eval.stage import student_export_dir
from mergedistill.extend import evaluate as ev
from mergedistill.extend.adapt import Adapter, adapter_flops, adapter_step, curve_accuracy, train_loop
from mergedistill.extend.data import build_shards, mlm_batches, shard_batches
from mergedistill.extend.flops import RULES as FLOPS_RULES
from mergedistill.extend.guard import Guard, old_positions
from mergedistill.extend.mini import align_mini_head
from mergedistill.extend.report import curve_plot, report_md, write_results
from mergedistill.extend.surgery import NewRows, input_matrix, output_bias, plug
from mergedistill.extend.vocab import (
    emitted_ids,
    grow_idmap,
    grown_vocab,
    inverse_idmap,
    pad_tokenizer_folder,
    predicted_ids,
    unigram_bias,
)
from mergedistill.fsutil import (
    atomic_dir,
    atomic_path,
    library_write_errors,
    read_json_or_none,
    write_json_atomic,
    write_text_atomic,
)
from mergedistill.lock import exclusive
from mergedistill.models.xmod import is_xmod
from mergedistill.preflight import seq_len_problems, top_k_problems
from mergedistill.teachers import TeacherTokenizer, load_teacher_config, load_teacher_tokenizer, model_fingerprint
from mergedistill.train.batches import Batch, LanguageShards, SampledBatches, sampling_probs
from mergedistill.train.mini_head import MiniHead, load_mini_head, save_mini_head
from mergedistill.vocab.joint import JointVocab, kept_tokens
from mergedistill.vocab.stage import _scan, load_vocab
from mergedistill.vocab.tokenizers import bpe_merges, check_spaces_unreachable, save_student_tokenizer

log = logging.getLogger(__name__)
EXTEND_FORMAT = 1
MINI_METHODS = ("minipost", "minijoint")


def extend_dir(cfg: RunConfig, lang: str) -> Path:
    return cfg.run_dir / "extend" / lang


def _device(cfg: RunConfig) -> torch.device:
    dev = cfg.extend.device
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if dev == "auto" else dev)


# ---- preflight -----------------------------------------------------------------------------------
@dataclass
class Plan:
    lang: str
    lc: LanguageConfig
    export: Export
    vocab: JointVocab
    vrec: dict
    methods: list[str]
    depth: int
    xmod: bool
    k_post: int
    k_joint: int | None
    teacher: TeacherTokenizer | None
    student_fp: str
    """Fingerprint of the exported student's files."""
    model: object = None
    """The exported student (AutoModelForMaskedLM, eval mode, CPU), loaded and checked by `preflight`."""


def preflight(cfg: RunConfig, lang: str) -> Plan:
    """Check every input (the language, its corpora, the exported student, the methods' needs); raise
    all problems at once."""
    x = cfg.extend
    if lang in cfg.languages:
        raise UserError(f"--language {lang}: {lang!r} is already a language of this run (languages.{lang}): the student "
                        "was distilled on it; extend adds new ones")
    if lang not in x.languages:
        declared = ", ".join(x.languages) or "none"
        raise UserError(f"--language {lang}: no corpus for {lang!r}: it is not declared under extend.languages (declared: "
                        f"{declared}); add `extend: {{languages: {{{lang}: {{train: <corpus>, test: <corpus>}}}}}}` to the config")
    lc = x.languages[lang]
    where = f"extend.languages.{lang}"
    problems: list[str] = []
    export = Export.open("student", student_export_dir(cfg), problems, cfg.command("train"))
    vocab = vrec = None
    try:
        vocab, vrec = load_vocab(cfg)
    except UserError as e:
        problems += e.problems
    for split, needed in (("train", True), ("test", True), ("valid", False)):
        spec = getattr(lc, split)
        if not spec:
            if needed:
                problems.append(f"{where}.{split}: no corpus; add `{split}: <file>` ({'what the new rows learn from' if split == 'train' else 'the report scores it'})")
            continue
        p = check_corpus(spec, f"{where}.{split}")
        if p:
            problems.append(p)
    methods = list(dict.fromkeys([x.method, *x.compare]))
    depth, xmod, k_post, k_joint, model = 0, False, 0, None, None
    config = _export_config(export, problems, cfg.command("train")) if export is not None else None
    if config is None:
        export = None
    else:
        model = _load_student(export, config, problems, cfg.command("train"))
    if export is not None:
        if lang in export.languages:
            problems.append(f"--language {lang}: the student already has {lang!r} ({export.folder / 'languages.json'}); "
                            "extend adds languages it does not have")
        depth, xmod = int(config["num_hidden_layers"]), is_xmod(config)
        if vrec is not None and export.meta.get("vocab") not in (None, vrec["vocab"]):
            problems.append(f"{export.folder}: trained on vocabulary {export.meta.get('vocab')}, but {cfg.vocab_dir} is "
                            f"{vrec['vocab']}; retrain it (`{cfg.command('train')} --force`)")
        k_post = x.mini_layers if x.mini_layers is not None else max(1, depth // 2)
        if "minipost" in methods and not 1 <= k_post < depth:
            problems.append(f"extend.mini_layers: k = {k_post} is not smaller than the student's depth ({depth} layers in "
                            f"{export.folder}): the mini-model is the student's first k layers; use 1 to {depth - 1}")
        if "minijoint" in methods:
            head = export.folder / "mini_head" / "mini_head.json"
            if not head.is_file():
                problems.append(f"extend.method minijoint: {export.folder} has no mini_head/ (the student was not trained with a "
                                "secondary head); train it with `train.mini_head_layer: k`, or use minipost")
            else:
                k_joint = int(json.loads(head.read_text(encoding="utf-8"))["layer"])
                if not 1 <= k_joint < depth:
                    problems.append(f"{head}: layer {k_joint} is not smaller than the student's depth ({depth})")
        if "xmod" in methods and not xmod:
            problems.append(f"extend.method xmod: needs an X-Mod student (a language module per layer); {export.folder} is a "
                            f"{config.get('model_type')} model: use full, minipost or minijoint")
    if x.module_init is not None and export is not None:
        if not xmod:  # it would be silently ignored: a dense student has no language modules
            problems.append(f"extend.module_init: {x.module_init!r} sets where an X-Mod student's new language module starts, but "
                            f"{export.folder} is a {config.get('model_type')} model with no language modules; remove "
                            "extend.module_init (or extend an X-Mod student: student.arch: xmod)")
        elif x.module_init not in export.languages:
            problems.append(f"extend.module_init: {x.module_init!r} is not a language of the student ({', '.join(export.languages)})")
    teacher = None
    if x.compare_mlm and lc.teacher is None:
        problems.append(f"extend.compare_mlm: {where} has no teacher, so every method is trained on the MLM loss only "
                        f"already; name one (`{where}.teacher: <name>`) or set extend.compare_mlm: false")
    if lc.teacher is not None:
        try:
            teacher = load_teacher_tokenizer(lc.teacher, cfg.teachers[lc.teacher])
            check_spaces_unreachable(teacher)
            # its shards are built with the run's data settings: what the data stage's preflight checks for routed teachers
            configs = {lc.teacher: load_teacher_config(lc.teacher, cfg.teachers[lc.teacher])}
            problems += seq_len_problems(cfg, configs, [lc.teacher]) + top_k_problems(cfg, configs, [lc.teacher])
        except UserError as e:
            problems += e.problems
        if teacher is not None and vrec is not None and lc.teacher in vrec["teachers"] \
                and vrec["teachers"][lc.teacher]["tokenizer"] != teacher.fingerprint:
            problems.append(f"teachers.{lc.teacher}: its tokenizer changed since {cfg.vocab_dir} was built; rerun `mergedistill vocab`")
    if problems:
        raise UserError(problems, header=f"extend {lang}: {len(problems)} problem(s); nothing was run:")
    return Plan(lang, lc, export, vocab, vrec, methods, depth, xmod, k_post, k_joint, teacher,  # type: ignore[arg-type]
                export.fingerprint(), model)  # type: ignore[union-attr]


def _export_config(export: Export, problems: list[str], command: str) -> dict | None:
    """The exported student's config.json, or None with a problem saying why it cannot be used."""
    path = export.folder / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        problems.append(f"{path}: unreadable or truncated ({type(e).__name__}: {e}); export the student again (`{command} --force`)")
        return None
    if not isinstance(config, dict) or not isinstance(config.get("num_hidden_layers"), int):
        problems.append(f"{path}: not the config of a masked LM (no num_hidden_layers); export the student again (`{command} --force`)")
        return None
    return config


def _load_student(export: Export, config: dict, problems: list[str], command: str):
    """The exported student, loaded before any work, or None with the problems that stop it: weights that do not
    load, weights that leave part of the model to random initialisation (e.g. an X-Mod language's module), a
    language whose tokenizer folder or X-Mod module is missing."""
    from transformers import AutoModelForMaskedLM

    redo = f"export the student again (`{command} --force`)"
    missing_tok = [f"{lang}: {sub}" for lang, sub in export.languages.items() if not (export.folder / sub).is_dir()]
    if missing_tok:
        problems.append(f"{export.folder}: no tokenizer for {', '.join(missing_tok)} (languages.json names the folder); {redo}")
    if is_xmod(config):  # language -> module, as models.xmod.language_modules reads it
        modules = config.get("language_modules") or {str(m): str(m) for m in config.get("languages") or []}
        lost = [lang for lang in export.languages if lang not in modules]
        if lost:
            problems.append(f"{export.folder / 'config.json'}: the X-Mod student has no module for {', '.join(map(repr, lost))} "
                            f"(languages.json lists {'it' if len(lost) == 1 else 'them'}); {redo}")
    try:
        model, info = AutoModelForMaskedLM.from_pretrained(str(export.folder), output_loading_info=True)
    except Exception as e:  # truncated weights (SafetensorError), a config the model class rejects, ...
        problems.append(f"{export.folder}: cannot load the exported student ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                        f"{redo}")
        return None
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        problems.append(f"{export.folder / 'model.safetensors'}: {len(missing)} weight(s) of the model its config describes are not "
                        f"in it (e.g. {', '.join(missing[:3])}): they would start random; {redo}")
        return None
    return model.eval()


def _alpha(cfg: RunConfig, plan: Plan) -> float:
    if plan.teacher is None:
        return 0.0
    return cfg.extend.alpha if cfg.extend.alpha is not None else cfg.train.alpha


def _lines(cfg: RunConfig) -> int | None:
    return cfg.extend.max_lines if cfg.extend.max_lines is not None else cfg.data.max_lines


def inputs_of(cfg: RunConfig, plan: Plan) -> dict:
    """What the learned parameters depend on (the exported method and the report settings aside)."""
    lc = plan.lc
    x = {k: v for k, v in to_dict(cfg.extend).items()
         if k not in ("languages", "method", "compare", "compare_mlm", "old_lines", "device")}
    return {
        "format": EXTEND_FORMAT, "language": plan.lang, "student": plan.student_fp, "vocab": plan.vrec["vocab"],
        "corpora": {s: corpus_fingerprint(getattr(lc, s)) for s in ("train", "valid", "test") if getattr(lc, s)},
        "teacher": model_fingerprint(lc.teacher, cfg.teachers[lc.teacher]) if lc.teacher else None,
        "extend": x, "alpha": _alpha(cfg, plan), "temperature": cfg.train.temperature,
        "data": {k: getattr(cfg.data, k) for k in ("seq_len", "mask_prob", "top_k", "whole_word_mask", "dupe_factor", "seed",
                                                    "shard_lines", "max_lines")},
        "prune": cfg.vocab.prune, "keep_single_chars": cfg.vocab.keep_single_chars,
    }


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ---- the new language's vocabulary --------------------------------------------------------------
@dataclass
class NewVocab:
    vocab: JointVocab
    """The grown joint vocabulary (the new language's tokenizer among its teachers as `source`)."""
    source: str
    tokenizer: TeacherTokenizer
    idmap: np.ndarray
    counts: np.ndarray
    old_size: int
    folder: Path
    """The new language's student tokenizer (a standard HF folder)."""

    @property
    def new_ids(self) -> np.ndarray:
        return np.arange(self.old_size, self.vocab.size)


def _own_tokenizer(cfg: RunConfig, plan: Plan, folder: Path) -> TeacherTokenizer:
    """A tokenizer trained on the new language's train corpus (extend.tokenizer), cached in `folder`."""
    from mergedistill.tokenizer_train import train_tokenizer

    x = cfg.extend
    stamp = _hash({"corpus": corpus_fingerprint(plan.lc.train), "kind": x.tokenizer, "size": x.tokenizer_vocab_size,
                   "lines": x.tokenizer_lines})
    meta = folder / "mergedistill.json"
    if read_json_or_none(meta) != {"inputs": stamp}:
        log.info("extend %s: training a %s tokenizer of %s pieces on %s", plan.lang, x.tokenizer, f"{x.tokenizer_vocab_size:,}",
                 plan.lc.train)
        lines = list(iter_lines(plan.lc.train, f"extend.languages.{plan.lang}.train", x.tokenizer_lines))
        tokenizer = train_tokenizer(x.tokenizer, lines, x.tokenizer_vocab_size)
        with atomic_dir(folder) as tmp:
            with library_write_errors(tmp / "tokenizer.json"):
                tokenizer.save_pretrained(str(tmp))
            write_json_atomic(tmp / "mergedistill.json", {"inputs": stamp})
    t = load_teacher_tokenizer(f"new-{plan.lang}", TeacherConfig(path=str(folder)))
    check_spaces_unreachable(t)
    return t


ROW_METHODS = ("full", "minipost", "minijoint")
"""Methods that train only the new rows (and their output bias): with no new row they have nothing to learn."""


def nothing_to_learn(cfg: RunConfig, plan: Plan, source: str, tokens: int) -> None:
    """Every token the new language's tokenizer keeps already has a row: refuse, before any shard or
    training step, the methods that would train nothing (an X-Mod method still trains its module)."""
    idle = [m for m in plan.methods if m in ROW_METHODS]
    if not idle:
        log.info("extend %s: every one of the %s tokens from %s already has a row in the student: no new rows; %s trains "
                 "the language's module only", plan.lang, f"{tokens:,}", source, ", ".join(plan.methods))
        return
    fields = ", ".join(f"extend.{'method' if m == cfg.extend.method else 'compare'} {m}" for m in idle)
    own = plan.export.folder / "tokenizers" / source
    sub = f"{own}/ (its student tokenizer)" if own.is_dir() else f"{source}'s tokenizer on the student vocabulary"
    raise UserError(
        f"extend {plan.lang}: nothing new to learn: every one of the {tokens:,} tokens {source}'s tokenizer keeps for "
        f"{plan.lang} already has a row in the student (extend.share_tokens: {str(cfg.extend.share_tokens).lower()}), so "
        f"{fields} would train nothing (they learn new rows only). The student reads {plan.lang} as it is through "
        f"{sub}; to learn something for {plan.lang}, set extend.share_tokens: false (it gets rows of its own) or, with an "
        "X-Mod student, extend.method: xmod (a module of its own)")


def new_vocabulary(cfg: RunConfig, plan: Plan, work: Path) -> NewVocab:
    """The new language's tokenizer (its teacher's, or one trained on its corpus), the tokens it needs,
    the grown vocabulary, and its student tokenizer folder."""
    vocab, lang = plan.vocab, plan.lang
    if plan.teacher is not None:
        t, source = plan.teacher, plan.lc.teacher
    else:
        t = _own_tokenizer(cfg, plan, work / "tokenizer")
        source = f"new-{lang}"
    counts, _ = _scan(t, plan.lc.train, f"extend {lang}: token counts ({t.name})", _lines(cfg))
    keys = t.keys()
    if plan.teacher is not None and cfg.vocab.prune:  # the tokens the language uses, as the vocab stage prunes
        kept = kept_tokens(keys, counts, cfg.vocab.keep_single_chars, bpe_merges(t.tj))
    else:
        kept = np.ones(len(keys), dtype=bool)
    existing = vocab.idmaps.get(source) if cfg.extend.share_tokens else None
    idmap, new_keys = grow_idmap(vocab, keys, kept, existing, cfg.extend.share_tokens)
    if not new_keys:
        nothing_to_learn(cfg, plan, source, int((idmap >= 0).sum()))
    grown = grown_vocab(vocab, source, idmap, new_keys)
    folder = work / "student_tokenizer"
    meta = {"teacher": source, "teacher_source": t.source, "teacher_tokenizer": t.fingerprint, "vocab": grown.fingerprint(),
            "student_vocab_size": grown.size, "tokenizer": t.family.name, "language": lang, "mergedistill": __version__}
    if read_json_or_none(folder / "mergedistill.json") != meta:
        with atomic_dir(folder) as tmp:
            save_student_tokenizer(t, idmap, grown.size, tmp, meta)
    shared = int(((idmap >= 0) & (idmap < vocab.size)).sum())
    log.info("extend %s: %s tokens from %s: %s already in the vocabulary (%s), %s new rows; vocabulary %s -> %s", lang,
             f"{int((idmap >= 0).sum()):,}", source, f"{shared:,}", "shared" if cfg.extend.share_tokens else "specials only",
             f"{len(new_keys):,}", f"{vocab.size:,}", f"{grown.size:,}")
    return NewVocab(grown, source, t, idmap, counts, vocab.size, folder)


# ---- batches -------------------------------------------------------------------------------------
def _batches_of(eset: dict, batch_size: int) -> list[Batch]:
    """A fixed masked set (masked_eval_set) as Batches (student ids, no teacher)."""
    out = []
    for s in range(0, eset["input_ids"].shape[0], batch_size):
        ids, att, labels = (eset[k][s:s + batch_size] for k in ("input_ids", "attention_mask", "labels"))
        width = int(att.sum(1).max())
        ids, att, labels = ids[:, :width].long(), att[:, :width].long(), labels[:, :width]
        sel = labels != IGNORE_INDEX
        n = int(sel.sum())
        if n:
            out.append(Batch(ids, att, sel, labels[sel], torch.zeros(n, 0, dtype=torch.long), torch.zeros(n, 0),
                             torch.zeros(n, dtype=torch.long), torch.zeros(len(ids), dtype=torch.long)))
    return out


def _old_batches(cfg: RunConfig, plan: Plan, seed: int):
    """The run's own training batches (its data shards, all languages), for aligning a mini-model."""
    from mergedistill.data.stage import data_dir, load_manifest

    manifest = load_manifest(cfg, plan.vrec["vocab"])
    langs = [lang for lang in manifest["languages"] if manifest["languages"][lang]["splits"].get("train", {}).get("sequences")]
    sources = {lang: LanguageShards([data_dir(cfg) / p for p in manifest["languages"][lang]["splits"]["train"]["shards"]],
                                    plan.vrec["vocab"], manifest["k"]) for lang in langs}
    sizes = {lang: manifest["languages"][lang]["splits"]["train"]["tokens"] for lang in langs}
    sampled = SampledBatches(sources, sampling_probs(sizes, cfg.train.sampling_alpha), cfg.extend.batch_size, 0, 1, seed,
                             manifest["k"])
    return sampled.batch, langs, manifest


# ---- mini-models ---------------------------------------------------------------------------------
def minipost_head(cfg: RunConfig, plan: Plan, student, device) -> tuple[MiniHead, dict]:
    """MiniPost's aligned head on the first k layers, cached per student and k under runs/<run>/extend/mini/
    (shared by every new language). Returns it and its one-off cost {seconds, flops, steps}."""
    x, k = cfg.extend, plan.k_post
    folder = cfg.run_dir / "extend" / "mini" / f"k{k}"
    inputs = {"student": plan.student_fp, "k": k, "steps": x.mini_align_steps, "lr": x.lr, "warmup": x.warmup_steps,
              "batch_size": x.batch_size, "seed": x.seed, "alpha": cfg.train.alpha, "temperature": cfg.train.temperature,
              "flops_rules": FLOPS_RULES}
    state = read_json_or_none(folder / "state.json")
    if state is not None and state.get("inputs") == inputs and (folder / "mini_head").is_dir():
        log.info("extend: the mini-model head on the first %d layers is in %s; reusing it", k, folder)
        return load_mini_head(folder / "mini_head").to(device).eval(), state["cost"]
    if x.mini_align_steps == 0:
        head, cost = MiniHead.from_student(student, k), {"seconds": 0.0, "flops": 0.0, "steps": 0}
    else:
        try:
            batches, langs, _ = _old_batches(cfg, plan, x.seed)
        except UserError as e:
            raise UserError(f"extend.method minipost: aligning the mini-model needs the run's data shards ({e}); or set "
                            "extend.mini_align_steps: 0 to use the student's own head unaligned") from None
        table = None
        if plan.xmod:
            from mergedistill.models.xmod import lang_id_table

            table = lang_id_table(student, langs)
        head, res = align_mini_head(student, k, batches, steps=x.mini_align_steps, lr=x.lr, warmup=x.warmup_steps,
                                    alpha=cfg.train.alpha, temperature=cfg.train.temperature, device=device, lang_table=table,
                                    seed=x.seed)
        cost = {"seconds": res.seconds, "flops": res.flops, "steps": res.steps, "first_loss": res.first_loss, "last_loss": res.last_loss}
        log.info("extend: mini-model head on the first %d layers aligned in %d steps (loss %.3f -> %.3f), %.1f s, %.3g FLOPs",
                 k, res.steps, res.first_loss, res.last_loss, res.seconds, res.flops)
    with atomic_dir(folder) as tmp:
        save_mini_head(head, tmp / "mini_head")
        write_json_atomic(tmp / "state.json", {"inputs": inputs, "cost": cost})
    return head.to(device).eval(), cost


def _guard(cfg: RunConfig, plan: Plan, student, device, work: Path) -> Guard:
    """The guard's fixed old positions (extend.guard_positions), cached in work/guard.pt."""
    x = cfg.extend
    path = work / "guard.pt"
    key = _hash({"student": plan.student_fp, "n": x.guard_positions, "seed": x.seed})
    if path.is_file():
        saved = torch.load(path, weights_only=True)
        if saved.get("key") == key:
            return Guard(saved["x"], saved["lse"], x.guard_weight, x.guard_batch, x.seed, float(saved["flops"]))
    try:
        batches, langs, _ = _old_batches(cfg, plan, x.seed)
    except UserError as e:
        raise UserError(f"extend.guard_positions: the guard reads the run's data shards ({e}); or set it to 0") from None
    table = None
    if plan.xmod:
        from mergedistill.models.xmod import lang_id_table

        table = lang_id_table(student, langs)
    hx, lse, flops = old_positions(student.to(device), batches, x.guard_positions, device, table)
    log.info("extend %s: guard on %s old positions (%.3g FLOPs, once)", plan.lang, f"{len(hx):,}", flops)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()  # torch.save reports a full disk as an opaque RuntimeError: written by Python, it is an OSError
    torch.save({"key": key, "x": hx.cpu(), "lse": lse.cpu(), "flops": flops}, buf)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.getvalue())
    return Guard(hx.cpu(), lse.cpu(), x.guard_weight, x.guard_batch, x.seed, flops)


# ---- one method ----------------------------------------------------------------------------------
def _student_for(base, plan: Plan, method: str, init_from: str | None):
    """The student a method works on: the original (frozen, shared), or for an X-Mod student a copy with
    the new language's module (trained by `xmod` only). Returns (student, lang_id, module name)."""
    if not plan.xmod:
        return base, None, None
    from mergedistill.models.xmod import add_language_module, module_names

    student = copy.deepcopy(base)
    torch.manual_seed(0)  # the module's down-projection (its up-projection starts at zero unless copied)
    name = add_language_module(student, plan.lang, init_from=init_from)
    return student, module_names(student).index(name), name


def _module_state(student, name: str) -> dict[str, torch.Tensor]:
    return {f"{i}.{k}": v.detach().cpu().clone() for i, layer in enumerate(student.base_model.encoder.layer)
            for k, v in layer.output.adapter_modules[name].state_dict().items()}


def _load_module_state(student, name: str, state: dict[str, torch.Tensor]) -> None:
    for i, layer in enumerate(student.base_model.encoder.layer):
        mod = layer.output.adapter_modules[name]
        mod.load_state_dict({k.split(".", 1)[1]: v for k, v in state.items() if k.split(".", 1)[0] == str(i)})


def run_method(cfg: RunConfig, plan: Plan, method: str, base, nv: NewVocab, init: tuple[torch.Tensor, torch.Tensor], batches,
               curve_set: list[Batch], inputs: dict, work: Path, device, guard: Guard | None = None,
               mlm_only: bool = False) -> tuple[object, dict]:
    """Train one method (or reuse its saved parameters when its inputs are unchanged). Returns the
    plugged student (on the CPU) and the method's figures. `mlm_only`: the MLM loss alone (alpha 0) on the same
    batches, whatever the teacher (extend.compare_mlm), saved under `<method>-mlm`."""
    from safetensors.torch import load_file, save_file

    x = cfg.extend
    name = f"{method}-mlm" if mlm_only else method
    alpha = 0.0 if mlm_only else _alpha(cfg, plan)
    folder = work / "methods" / name
    inputs = {**inputs, "method": method, "k": plan.k_post if method == "minipost" else plan.k_joint, "flops_rules": FLOPS_RULES,
              "alpha": alpha}
    student, lang_id, module = _student_for(base, plan, method, x.module_init)
    done = read_json_or_none(folder / "result.json")
    if done is not None and done.get("inputs") == inputs and (folder / "params.safetensors").is_file():
        log.info("extend %s: %s is trained for these inputs (%s); reusing it", plan.lang, name, folder)
        params = load_file(str(folder / "params.safetensors"))
        if module is not None and method == "xmod":
            _load_module_state(student, module, {k[7:]: v for k, v in params.items() if k.startswith("module.")})
        return plug(student, params["rows"], params["bias"]), done["result"]
    head, setup = None, {}
    if method == "minipost":
        head, setup = minipost_head(cfg, plan, student.to(device), device)
    elif method == "minijoint":
        head = load_mini_head(plan.export.folder / "mini_head").to(device).eval()
    rows = NewRows(nv.old_size, *init)
    adapter = Adapter(student, rows, mini_head=head, k=head.layer if head is not None else None, lang_id=lang_id,
                      train_module=module if method == "xmod" else None).to(device)
    predicted = predicted_ids(nv.idmap, nv.vocab.size)
    pred_ids = predicted.nonzero().squeeze(1)
    out_ids = pred_ids if x.softmax == "language" else None
    adapter.train()
    res = train_loop(adapter.trainable(), adapter_step(adapter, out_ids, alpha, cfg.train.temperature, guard), batches,
                     adapter_flops(adapter, out_ids, guard), steps=x.steps, lr=x.lr, warmup=x.warmup_steps,
                     weight_decay=x.weight_decay, device=device, label=f"extend {plan.lang} {name}",
                     curve_fn=(lambda: curve_accuracy(adapter, curve_set, pred_ids, device)) if curve_set else None,
                     eval_every=x.eval_every, seed=x.seed)
    adapter.eval()
    trained = sum(p.numel() for _, p in adapter.trainable())
    result = {"trainable": trained, "steps": res.steps, "seconds": res.seconds, "flops": res.flops, "first_loss": res.first_loss,
              "last_loss": res.last_loss, "curve": res.curve.__dict__,
              "k": adapter.k, "setup_seconds": setup.get("seconds", 0.0), "setup_flops": setup.get("flops", 0.0),
              "alpha": alpha, "mlm_only": mlm_only}
    params = {"rows": rows.rows.detach().cpu(), "bias": rows.bias.detach().cpu()}
    if method == "xmod":
        params.update({f"module.{k}": v for k, v in _module_state(student, module).items()})
    student.cpu()
    with atomic_path(folder / "params.safetensors") as tmp, library_write_errors(tmp):  # a kill leaves a complete file or none
        save_file({k: v.contiguous() for k, v in params.items()}, str(tmp))
    write_json_atomic(folder / "result.json", {"inputs": inputs, "result": result})
    return plug(student, params["rows"], params["bias"]), result


def initial_rows(cfg: RunConfig, plan: Plan, nv: NewVocab, student, teacher_model) -> tuple[torch.Tensor, torch.Tensor]:
    """The new rows' starting values, the same for every method: the teacher's embedding rows when it
    has the student's hidden size, else random with the spread of the student's rows; output bias from
    the language's token frequencies (`unigram_bias`)."""
    w = input_matrix(student).detach().float()
    n = len(nv.new_ids)
    gen = torch.Generator().manual_seed(cfg.extend.seed)
    rows = torch.randn(n, w.shape[1], generator=gen) * w.std() + w.mean(0)
    if teacher_model is not None and n:
        t_w = teacher_model.get_input_embeddings().weight.detach().float()
        if t_w.shape[1] == w.shape[1]:
            inv = inverse_idmap(nv.idmap, nv.vocab.size)[nv.new_ids]
            rows = t_w[torch.from_numpy(inv)].clone()
    bias = unigram_bias(nv.counts, nv.idmap, nv.new_ids, output_bias(student).detach().float())
    return rows.to(w.dtype), bias


# ---- the stage -------------------------------------------------------------------------------------
@exclusive("extend", lambda cfg, language, **_: extend_dir(cfg, language))
def run_extend(cfg: RunConfig, *, language: str, force: bool = False) -> Path:
    """Extend the run's student to `language`; returns runs/<run>/extend/<language>/export."""
    from transformers import AutoTokenizer

    start = time.monotonic()
    plan = preflight(cfg, language)
    x, e = cfg.extend, cfg.eval
    out = extend_dir(cfg, language)
    inputs = inputs_of(cfg, plan)
    state_inputs = {**inputs, "method": x.method, "methods": plan.methods, "compare_mlm": x.compare_mlm, "old_lines": x.old_lines,
                    "eval": to_dict(e)}
    if force and out.exists():
        shutil.rmtree(out)
    done = read_json_or_none(out / "state.json")
    if done is not None and done.get("inputs") == state_inputs and (out / "export" / "config.json").is_file():
        log.info("extend %s: %s is complete for these inputs; skipping (--force redoes it)", language, out)
        return out / "export"
    work = out / "work"
    device = _device(cfg)
    nv = new_vocabulary(cfg, plan, work)
    tok = AutoTokenizer.from_pretrained(str(nv.folder))
    base = plan.model
    teacher_model = None
    if plan.teacher is not None:
        from mergedistill.teachers import load_teacher_model

        teacher_model = load_teacher_model(plan.lc.teacher, cfg.teachers[plan.lc.teacher]).to(device)
    seq_len = cfg.data.seq_len
    predicted = predicted_ids(nv.idmap, nv.vocab.size)
    if plan.teacher is not None:
        vrec = {"vocab": nv.vocab.fingerprint()}
        shard_inputs = _hash({"vocab": vrec["vocab"], "teacher": inputs["teacher"], "data": inputs["data"],
                              "corpus": inputs["corpora"]["train"], "lines": _lines(cfg)})
        paths = build_shards(cfg, language, {"train": plan.lc.train}, nv.vocab, vrec, plan.teacher, teacher_model, device,
                             work / "data", shard_inputs, _lines(cfg))
        batches = shard_batches(paths["train"], vrec["vocab"], cfg.data.top_k, x.batch_size, x.seed)
    else:
        lines = list(iter_lines(plan.lc.train, f"extend.languages.{language}.train", _lines(cfg)))
        batches = mlm_batches(tok, lines, seq_len, cfg.data.mask_prob, predicted, x.batch_size, x.seed)
    curve_set: list[Batch] = []
    if plan.lc.valid:
        valid = sample_lines(plan.lc.valid, f"extend.languages.{language}.valid", x.curve_lines, e.seed)
        curve_set = _batches_of(masked_eval_set(tok, valid, seq_len, e.mask_prob, e.seed), e.batch_size)
    init = initial_rows(cfg, plan, nv, base, teacher_model)
    guard = _guard(cfg, plan, base, device, work) if x.guard_positions else None

    plugged, results = {}, {}
    for m in plan.methods:
        plugged[m], results[m] = run_method(cfg, plan, m, base, nv, init, batches, curve_set, inputs, work, device, guard)
    if x.compare_mlm:  # the exported method without its teacher, on the same batches (preflight: there is a teacher)
        name = f"{x.method}-mlm"
        plugged[name], results[name] = run_method(cfg, plan, x.method, base, nv, init, batches, curve_set, inputs, work, device,
                                                  guard, mlm_only=True)

    log.info("extend %s: evaluating %s on the test split and the old languages", language, ", ".join(plugged))
    test = sample_lines(plan.lc.test, f"extend.languages.{language}.test", None)  # type: ignore[arg-type]
    acc_texts, pll_texts = spread_subset(test, e.max_lines, e.seed), spread_subset(test, e.pll_lines, e.seed)
    unit = "char" if language in e.char_languages else "word"
    teacher_eval = None
    if teacher_model is not None:
        t = plan.teacher
        n_out = teacher_model.get_output_embeddings().weight.shape[0]
        t_allowed = torch.zeros(n_out, dtype=torch.bool)
        m = min(n_out, len(nv.idmap))
        t_allowed[:m] = torch.from_numpy(nv.idmap[:m] >= 0)
        t_allowed[[i for i in t.special_ids().values() if 0 <= i < n_out]] = False
        teacher_eval = (teacher_model.eval(), inverse_idmap(nv.idmap, nv.vocab.size), t_allowed, nv.idmap.astype(np.int64))
    original = base.to(device)
    old: dict[str, dict[str, dict]] = {}
    for m in list(plugged):
        model = ev.with_language(plugged[m].to(device).eval(), language)
        results[m]["test"] = ev.new_language_metrics(
            model, tok, acc_texts, pll_texts, predicted, seq_len=seq_len, mask_prob=e.mask_prob, seed=e.seed,
            batch_size=e.batch_size, unit=unit, restrict_pll=x.softmax == "language", teacher=teacher_eval)
        log.info("extend %s / %s: test masked acc %.4f (own tokens), %.4f (all ids)%s", language, m, results[m]["test"]["acc_own"],
                 results[m]["test"]["acc_all"], f", agreement {results[m]['test']['agreement']:.4f}" if teacher_eval else "")
        old[m] = _old_languages(cfg, plan, original, model, x.old_lines, device)
        plugged[m] = model.cpu()

    export = _write_export(cfg, plan, nv, plugged[x.method], x.method, out / "export", results[x.method]["test"], old[x.method])
    rep = _write_report(cfg, plan, nv, results, old, out, time.monotonic() - start, guard)
    write_json_atomic(out / "state.json", {"inputs": state_inputs, "method": x.method, "seconds": round(time.monotonic() - start, 1),
                                           "mergedistill": __version__})
    log.info("extend %s: exported %s (method %s); report %s; %.0f s", language, export, x.method, rep, time.monotonic() - start)
    return export


def _old_languages(cfg: RunConfig, plan: Plan, original, extended, lines: int, device) -> dict[str, dict]:
    """The change on each old language that has a test (or valid) split in the config."""
    e = cfg.eval
    out = {}
    for lang, sub in plan.export.languages.items():
        lc = cfg.languages.get(lang)
        spec = (lc.test or lc.valid) if lc is not None else None
        if not spec:
            continue
        texts = sample_lines(spec, f"languages.{lang}", lines, e.seed)
        name = Path(sub).name
        own = predicted_ids(plan.vocab.idmaps[name], plan.vocab.size) if name in plan.vocab.idmaps else \
            emitted_ids(np.arange(plan.vocab.size), plan.vocab.size)
        ev.with_language(original, lang)
        ev.with_language(extended, lang)
        out[lang] = ev.old_language_change(original, extended, plan.export.tokenizer(lang), texts, own, seq_len=cfg.data.seq_len,
                                           mask_prob=e.mask_prob, seed=e.seed, batch_size=e.batch_size)
    ev.with_language(extended, plan.lang)
    return out


def _write_export(cfg: RunConfig, plan: Plan, nv: NewVocab, model, method: str, folder: Path, test: dict | None = None,
                  old: dict[str, dict] | None = None) -> Path:
    """The extended student: weights, old tokenizers padded to the grown size, the new one, languages.json,
    token_ids/<lang>.npy for every language, mergedistill.json and a model card (with `test`, the exported
    method's figures on the new language's test split, and `old`, its change on each old language)."""
    src = plan.export.folder
    sub = f"tokenizers/new-{plan.lang}"
    with atomic_dir(folder) as tmp:
        with library_write_errors(tmp / "model.safetensors"):
            if plan.xmod:
                from mergedistill.models.xmod import save_xmod_student

                default = json.loads((src / "config.json").read_text(encoding="utf-8")).get("default_language") or plan.lang
                save_xmod_student(model, tmp, default_language=default)
            else:
                model.save_pretrained(str(tmp), safe_serialization=True)
        for old_sub in sorted(set(plan.export.languages.values())):
            pad_tokenizer_folder(src / old_sub, tmp / old_sub, nv.vocab.size)
        shutil.copytree(nv.folder, tmp / sub)
        # the ids each language predicts among (exported.load_student): the old languages' as they were
        if (src / "token_ids").is_dir():
            shutil.copytree(src / "token_ids", tmp / "token_ids")
        (tmp / "token_ids").mkdir(exist_ok=True)
        np.save(tmp / "token_ids" / f"{plan.lang}.npy", nv.vocab.producible_ids(nv.source))
        (tmp / "languages.json").write_text(json.dumps({**plan.export.languages, plan.lang: sub}, indent=2) + "\n")
        meta = {**plan.export.meta, "extended": {"language": plan.lang, "method": method, "tokenizer": sub, "source": nv.source,
                                                 "old_vocab_size": nv.old_size, "vocab_size": nv.vocab.size,
                                                 "vocab": nv.vocab.fingerprint(), "from": str(src)}}
        write_json_atomic(tmp / "mergedistill.json", meta)
        card = (src / "README.md").read_text(encoding="utf-8") if (src / "README.md").is_file() else f"# {cfg.run}\n"
        (tmp / "README.md").write_text(card.rstrip() + "\n\n" + _card_section(plan, nv, method, sub, test, old), encoding="utf-8")
    return folder


def _card_section(plan: Plan, nv: NewVocab, method: str, sub: str, test: dict | None = None,
                  old: dict[str, dict] | None = None) -> str:
    how = {"full": "with the whole student frozen", "minipost": "over a mini-model of the student's first layers (MiniPost)",
           "minijoint": "over the mini-model the student was trained with (MiniJoint)",
           "xmod": "with a new language module, the shared body frozen"}[method]
    source = (f"distilled from its teacher `{plan.lc.teacher}` (KD on its top-k predictions + MLM)" if plan.teacher
              else "from its corpus alone (MLM: no teacher)")
    lines = [
        f"## Extended to `{plan.lang}` (mergedistill extend)",
        "",
        f"`{plan.lang}` was added after distillation: {len(nv.new_ids):,} new embedding rows (ids {nv.old_size:,} to "
        f"{nv.vocab.size - 1:,}) learned {how}, {source}; its tokenizer's pieces come from {nv.source!r}. "
        "Every other weight, and every old language's tokenizer, is the original's. Its tokenizer:",
        "",
        "```python",
        f"tokenizer = AutoTokenizer.from_pretrained(\"PATH_TO_THIS_FOLDER/{sub}\")  # language '{plan.lang}'",
        "```",
        "",
    ]
    if test:
        pll = (f"{test['pll_per_word']:.3f} PLL per word" if "pll_per_word" in test else f"{test['bits_per_char']:.3f} bits per char")
        agree = f"; top-1 agreement with the teacher {test['agreement']:.4f}" if "agreement" in test else ""
        lines += [
            f"Measured by `mergedistill extend` on `{plan.lang}`'s test split ({test['masked']:,} masked positions): masked "
            f"accuracy {test['acc_own']:.4f} among its own tokens ({test['acc_all']:.4f} among all ids), {pll}{agree}.",
            "",
        ]
    if old:
        worst = max(old.items(), key=lambda kv: kv[1].get("top1_changed_own", 0.0))
        lines += [
            f"The old languages ({', '.join(old)}), original vs extended student on their test splits: the largest share of "
            f"top-1 predictions changed among a language's own tokens is {worst[1].get('top1_changed_own', 0.0):.4f} "
            f"({worst[0]}); `../report.md` from this folder has every figure.",
            "",
        ]
    return "\n".join(lines)


DEFINITIONS = """\
- **<method>-mlm** (extend.compare_mlm): the exported method trained on the same batches with the MLM loss
  only (alpha 0), the teacher's top-k unused: what distilling from the teacher adds.
- **train s / train FLOPs**: wall time of the training steps themselves (forward, backward, optimizer; batch
  reading and learning-curve evaluations excluded), measured; FLOPs estimated from the shapes each step
  computes (extend/flops.py: matrix products, backward = 1x forward through frozen matrices, 2x for trained ones).
  **setup FLOPs**: minipost's one-off alignment of its mini-model head on the student's own data (shared by every
  new language of the student).
- **test acc (own tokens)**: masked-token accuracy on the new language's test split (eval.mask_prob, fixed seed,
  [MASK] only), the prediction being the top-1 among the tokens the language's tokenizer emits; **(all ids)**:
  among the whole vocabulary. **PLL**: pseudo-log-likelihood per word (bits per char for eval.char_languages),
  over the language's own tokens when extend.softmax is `language`. **agreement**: top-1 (own tokens) equal to
  the teacher's top-1 among the tokens the vocabulary keeps.
- **old languages**: each old language's test split masked the same way, original student vs extended one:
  the largest |logit difference| at the original ids, the share of top-1 predictions that changed among the
  language's own tokens and among all ids (a new row may outscore an old prediction there), and the mean increase
  of the gold token's cross-entropy among all ids (nats: -log of the probability mass left to the old ids), which
  extend.guard_positions trains the new rows to keep small.
- **goal**: target = full's final valid accuracy (learning curve) - 1 point; a mini-model method's first curve point
  at or above it, and full's total training FLOPs divided by that point's (`incl. setup`: with the alignment).
"""


def _write_report(cfg: RunConfig, plan: Plan, nv: NewVocab, results: dict, old: dict, out: Path, seconds: float,
                  guard: Guard | None) -> Path:
    x = cfg.extend
    header = "\n".join([
        f"# Extending `{cfg.run}` to `{plan.lang}`",
        "",
        f"- student `{plan.export.folder}` ({plan.depth} layers{', X-Mod' if plan.xmod else ''}); vocabulary {nv.old_size:,} -> "
        f"{nv.vocab.size:,} ({len(nv.new_ids):,} new rows, tokens from {nv.source}"
        f"{', shared tokens keep their row' if x.share_tokens else ''})",
        f"- objective: {'KD + MLM against ' + repr(plan.lc.teacher) + ' (alpha ' + str(_alpha(cfg, plan)) + ')' if plan.teacher else 'MLM'}; "
        f"softmax over {'the language' + chr(39) + 's own tokens' if x.softmax == 'language' else 'all ids'}; {x.steps} steps of "
        f"{x.batch_size} sequences, lr {x.lr}; minipost k = {plan.k_post}"
        + (f", minijoint k = {plan.k_joint}" if plan.k_joint else ""),
        f"- guard: {len(guard.x):,} old positions, {guard.batch} per step, weight {guard.weight} (once: {guard.setup_flops:.3g} FLOPs, "
        "shared by the methods; its per-step share is in their train FLOPs)" if guard is not None else
        "- guard: off (extend.guard_positions: 0)",
        f"- exported: `{x.method}` -> `{out / 'export'}`; {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}, "
        f"{seconds:.0f} s, mergedistill {__version__}",
    ])
    write_results(out / "results.csv", results, old)
    curve_plot(out / "plots" / "curve.png", results, f"{cfg.run}: extending to {plan.lang}")
    write_text_atomic(out / "report.md", report_md(header, results, old, x.method, DEFINITIONS))
    return out / "report.md"
