"""`mergedistill train`: Lightning training of the student on the data stage's shards.

Output: runs/<run>/train/{checkpoints/, logs/, export/}. `--resume` continues from checkpoints/last.ckpt
with the data position restored (batch b is a pure function of the seed and b, see train_data.py).
"""
from __future__ import annotations

import logging
import os
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

import lightning as L
import torch

from mergedistill.config import RunConfig
from mergedistill.configlib import to_dict
from mergedistill.data.stage import data_dir, load_manifest
from mergedistill.errors import UserError
from mergedistill.fsutil import read_json_record, write_json_atomic
from mergedistill.lock import exclusive
from mergedistill.models.student import build_student
from mergedistill.precision import lightning_precision
from mergedistill.teachers import load_all_tokenizers, load_teacher_model
from mergedistill.train.batches import (
    REPEAT_WARN,
    Batch,
    LanguageShards,
    SampledBatches,
    ValidationBatches,
    expected_passes,
    lse_column,
    sampling_probs,
)
from mergedistill.train.divergence import DivergenceWatch, ValidationHistory
from mergedistill.train.export import export_student
from mergedistill.train.guard import AtomicCheckpointIO, InterruptWatch
from mergedistill.train.module import DistillModule, NonFiniteLoss
from mergedistill.train.progress import TrainProgress
from mergedistill.vocab.stage import load_vocab

log = logging.getLogger(__name__)


def train_dir(cfg: RunConfig, baseline: bool = False) -> Path:
    """runs/<run>/train (the distilled student) or runs/<run>/baseline (the MLM-only student)."""
    return cfg.run_dir / ("baseline" if baseline else "train")


class ShardDataModule(L.LightningDataModule):
    def __init__(self, cfg: RunConfig, manifest: dict, vocab_fp: str, languages: list[str], val_sequences: int = 256):
        super().__init__()
        self.cfg, self.manifest, self.vocab_fp, self.languages, self.val_sequences = cfg, manifest, vocab_fp, languages, val_sequences
        self.train_ds: SampledBatches | None = None

    def _sources(self, split: str) -> dict[str, LanguageShards]:
        out = {}
        for lang in self.languages:
            entry = self.manifest["languages"][lang]["splits"].get(split)
            if entry and entry["sequences"] > 0:
                out[lang] = LanguageShards([data_dir(self.cfg) / p for p in entry["shards"]], self.vocab_fp, self.manifest["k"],
                                           temperature=self.cfg.train.temperature if self.cfg.train.kd_target == "exact" else None)
        return out

    def sizes(self) -> dict[str, int]:
        return {lang: self.manifest["languages"][lang]["splits"]["train"]["tokens"] for lang in self.languages}

    def setup(self, stage: str) -> None:
        self.train_sources = self._sources("train")
        self.val_sources = self._sources("valid")

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        return batch.to(device) if isinstance(batch, Batch) else super().transfer_batch_to_device(batch, device, dataloader_idx)

    def train_dataloader(self):
        t = self.cfg.train
        world, rank = self.trainer.world_size, self.trainer.global_rank
        probs = sampling_probs(self.sizes(), t.sampling_alpha)
        trainer = self.trainer
        # micro-batch to start from: 0, or where a resumed run stopped (its step is restored by now)
        start = lambda: trainer.global_step * trainer.accumulate_grad_batches  # noqa: E731
        self.train_ds = SampledBatches(self.train_sources, probs, t.batch_size * world, rank, world, t.seed, self.manifest["k"], start)
        return torch.utils.data.DataLoader(self.train_ds, batch_size=None)

    def val_dataloader(self):
        ds = ValidationBatches(self.val_sources, self.languages, self.cfg.train.batch_size, self.val_sequences, self.manifest["k"])
        return torch.utils.data.DataLoader(ds, batch_size=None) if len(ds) else []


def _loggers(cfg: RunConfig, out: Path) -> list:
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    kind = cfg.train.logger
    csv_logger = CSVLogger(out, name="logs")  # version_0, version_1 (after --resume), ...: see read_metrics
    if kind == "tensorboard":
        return [csv_logger, TensorBoardLogger(out, name="tensorboard")]
    if kind == "wandb":
        from lightning.pytorch.loggers import WandbLogger

        offline = os.environ.get("WANDB_MODE", "offline") != "online"
        return [csv_logger, WandbLogger(project="mergedistill", name=cfg.run, save_dir=str(out), offline=offline)]
    return [csv_logger]


def read_metrics(train_out: Path) -> list[dict]:
    """All logged rows of a training run, across resumed attempts (logs/version_*/metrics.csv), by
    step; a later attempt's rows replace an earlier one's for the steps they both logged."""
    import csv

    rows: list[dict] = []
    versions = sorted((train_out / "logs").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    for v in versions:
        f = v / "metrics.csv"
        if not f.is_file():
            continue
        with open(f, newline="") as fh:
            new = list(csv.DictReader(fh))
        if new:
            first = min(int(r["step"]) for r in new)
            rows = [r for r in rows if int(r["step"]) < first] + new
    return rows


@torch.no_grad()
def init_output_bias(student, dm: "ShardDataModule", sampling_alpha: float) -> str:
    """Set the student's MLM output bias to the log unigram frequencies of the training shards."""
    from mergedistill.train.batches import unigram_log_probs

    bias = student.get_output_embeddings().bias
    sources = dm._sources("train")
    probs = sampling_probs({lang: dm.sizes()[lang] for lang in sources}, sampling_alpha)
    bias.copy_(unigram_log_probs(sources, probs, bias.shape[0]).to(bias.dtype))
    return "log unigram frequencies of the training shards"


def training_passes(cfg: RunConfig, manifest: dict, dm: "ShardDataModule", world_size: int) -> dict[str, float]:
    """Expected passes over each language's training sequences in this run (batches.expected_passes)."""
    t = cfg.train
    sequences = {lang: manifest["languages"][lang]["splits"]["train"]["sequences"] for lang in dm.languages}
    draws = t.max_steps * t.grad_accum * t.batch_size * world_size
    return expected_passes(sequences, sampling_probs(dm.sizes(), t.sampling_alpha), draws)


def make_module(cfg: RunConfig, vocab, languages: list[str]) -> tuple[DistillModule, dict]:
    cache: dict = {}

    def teacher(name):
        if name not in cache:
            cache[name] = load_teacher_model(name, cfg.teachers[name])
        return cache[name]

    student, info = build_student(cfg, vocab, teacher, languages)
    if cfg.student.arch == "xmod":
        from mergedistill.models.xmod import grouped_routing

        grouped_routing(student)  # the same numbers as transformers' routing, without a gather per module
    online = None
    if cfg.train.mode == "online" and cfg.train.alpha > 0:
        from mergedistill.train.online import OnlineTeachers

        toks = load_all_tokenizers(cfg)
        routed = {cfg.teacher_of(lang) for lang in languages}
        online = OnlineTeachers(vocab, {n: teacher(n) for n in routed}, {lang: cfg.teacher_of(lang) for lang in languages},
                                languages, cfg.data.mask_prob, cfg.data.top_k, cfg.train.seed, {n: toks[n].special_ids() for n in routed},
                                lse_temperature=cfg.train.temperature if cfg.train.kd_target == "exact" else None)
    return DistillModule(cfg, student, languages, online=online, vocab=vocab), info


def student_inputs(cfg: RunConfig) -> dict:
    """The student settings a trained student depends on: a dense student's leave out the X-Mod fields,
    so that students trained before they existed still count as complete."""
    d = to_dict(cfg.student)
    if cfg.student.arch == "bert":
        from mergedistill.config import XMOD_FIELDS

        d = {k: v for k, v in d.items() if k != "arch" and not (k in XMOD_FIELDS and v == XMOD_FIELDS[k])}
    return d


def _is_launcher() -> bool:
    """False in the worker processes Lightning's DDP launcher starts (they rerun this command): the
    checks, clean-up and state files belong to the process the user started."""
    return int(os.environ.get("LOCAL_RANK", 0)) == 0 and int(os.environ.get("NODE_RANK", 0)) == 0


def previous_dir(out: Path) -> Path:
    """runs/<run>/train.prev (baseline.prev): where a replaced student waits until its successor is exported."""
    return out.with_name(out.name + ".prev")


def set_aside(out: Path) -> None:
    """Make room for a new training run in `out` without losing a trained student: a finished one (with
    an export) moves to train.prev/, replacing an older one there; an unfinished attempt is deleted (an
    older finished student stays in train.prev/)."""
    prev = previous_dir(out)
    if (out / "export" / "config.json").is_file():
        if prev.exists():
            shutil.rmtree(prev)
        out.rename(prev)
        log.info("train: the previous student moved to %s until this one is exported (move it back to keep it)", prev)
    elif out.exists():
        shutil.rmtree(out)


def baseline_config(cfg: RunConfig) -> RunConfig:
    """The MLM-only baseline's settings: the run's, with nothing from any teacher (alpha 0, offline,
    random initialisation, no embedding rows copied) and the output bias started at the data's token
    frequencies. A copy: `cfg` is left as it was."""
    return replace(cfg, train=replace(cfg.train, alpha=0.0, mode="offline", relation_weight=0.0),
                   student=replace(cfg.student, init="random", embeddings_from_teachers=False, init_output_bias=True))


@exclusive("train", lambda cfg, baseline=False, **_: train_dir(cfg, baseline))
def run_train(cfg: RunConfig, *, resume: bool = False, baseline: bool = False, force: bool = False,
              restart_if_changed: bool = False) -> Path:
    """Train the student (or, with `baseline`, the MLM-only baseline: same size, data and steps, but
    nothing from any teacher) and export it.

    resume: continue checkpoints/last.ckpt (refused when it was trained with other settings);
    force: start over, deleting an earlier student; restart_if_changed: continue the last checkpoint
    when it was trained with these settings, start over when they changed (what `run` and `ablate` do)."""
    start = time.monotonic()
    resume = resume or restart_if_changed
    if baseline:
        cfg = baseline_config(cfg)
    vocab, vrec = load_vocab(cfg)
    manifest = load_manifest(cfg, vrec["vocab"])
    languages = [lang for lang in cfg.languages if lang in manifest["languages"]]
    missing = [lang for lang in cfg.languages if lang not in manifest["languages"]]
    if missing:
        raise UserError(f"train: no shards for {', '.join(missing)}; rerun `mergedistill data`")
    check_kd_target(cfg, manifest)
    out = train_dir(cfg, baseline)
    ckpt_dir = out / "checkpoints"
    last = ckpt_dir / "last.ckpt"
    export = out / "export"
    state_path = out / "state.json"
    # Everything that changes the trained weights: devices x batch_size is the global batch, and the
    # strategy and nodes decide how it is split (accelerator, logger and best_metric do not change them).
    inputs = {"vocab": vrec["vocab"], "data": {lang: manifest["languages"][lang]["inputs"] for lang in languages},
              "student": student_inputs(cfg), "train": {k: v for k, v in to_dict(cfg.train).items()
                                                         if k not in ("accelerator", "logger", "best_metric")
                                                         and not (k.startswith("mini_head_") and cfg.train.mini_head_layer is None)
                                                         and not (k.startswith("divergence_") and cfg.train.on_divergence == "warn")
                                                         and not (k.startswith("relation_") and cfg.train.relation_weight == 0)
                                                         and not (k == "softmax" and v == "all")}}  # students trained before it existed
    start_over = False  # set the earlier student aside once this one is about to train (never before)
    if _is_launcher():
        if state_path.is_file() and (export / "config.json").is_file() and not force:
            if read_json_record(state_path, cfg.command("train") + " --force").get("inputs") == inputs:
                log.info("train: %s is complete for these inputs; skipping (--force retrains)", export)
                return export
        start_over = force and out.exists()
        if last.is_file() and not start_over:
            prev = read_json_record(state_path, cfg.command("train") + " --force").get("inputs") if state_path.is_file() else None
            if prev is not None and prev != inputs:
                # Never continue a checkpoint trained with other settings (it would be exported as if
                # trained with these). `run` and `ablate` start over; an explicit --resume is refused.
                if restart_if_changed:
                    log.info("train: the settings changed since %s was written; starting over", last)
                    start_over = True
                else:
                    raise UserError(f"train: {last} belongs to a run with other settings; pass --force to start over")
            elif not resume:
                raise UserError(f"train: {last} exists from an earlier run; pass --resume to continue it or --force to start over")

    from lightning.pytorch.callbacks import ModelCheckpoint

    t = cfg.train
    L.seed_everything(t.seed, workers=True, verbose=False)
    module, init_info = make_module(cfg, vocab, languages)
    dm = ShardDataModule(cfg, manifest, vrec["vocab"], languages)
    if cfg.student.init_output_bias and not (resume and last.is_file() and not start_over):
        init_info["output_bias"] = init_output_bias(module.student, dm, t.sampling_alpha)
    if _is_launcher():  # the new student is built: now the old one may make room
        if start_over:
            set_aside(out)
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(state_path, {"inputs": inputs, "status": "training"})
    has_val = any("valid" in manifest["languages"][lang]["splits"] for lang in languages)
    ckpt = ModelCheckpoint(dirpath=ckpt_dir, save_last=True, save_top_k=0, every_n_train_steps=t.val_every)
    # the best checkpoint is judged right after each validation, on that validation's figures (a step-
    # triggered save would pair a checkpoint with the previous validation's)
    best = ModelCheckpoint(dirpath=ckpt_dir, filename="best-{step}", monitor=t.best_metric, save_top_k=1, every_n_epochs=1,
                           mode="max" if t.best_metric in ("val/acc", "val/agree") else "min", save_on_train_epoch_end=False)
    watch = InterruptWatch()
    diverge = DivergenceWatch(t.divergence_nats, t.divergence_patience, stop=t.on_divergence == "stop", logger=log)
    history = ValidationHistory()
    trainer = L.Trainer(
        accelerator=t.accelerator, devices=t.devices, strategy=t.strategy, num_nodes=t.num_nodes, precision=lightning_precision(cfg.train.precision, cfg.train.accelerator),
        max_steps=t.max_steps, accumulate_grad_batches=t.grad_accum, gradient_clip_val=t.grad_clip or None,
        val_check_interval=t.val_every * t.grad_accum if has_val else None, check_val_every_n_epoch=None,
        num_sanity_val_steps=0, logger=_loggers(cfg, out), plugins=[AtomicCheckpointIO()],
        callbacks=[ckpt, *([best] if has_val else []), TrainProgress("train", every_s=20, logger=log), watch, diverge, history],
        default_root_dir=str(out), enable_progress_bar=sys.stderr.isatty(), enable_model_summary=False,
        log_every_n_steps=min(10, t.val_every), use_distributed_sampler=False, limit_val_batches=None if has_val else 0,
    )
    log.info("train: %d languages (%s), sampling %s; student %d layers x %d, %s parameters; %s",
             len(languages), ", ".join(languages),
             ", ".join(f"{k} {v:.2f}" for k, v in sampling_probs(dm.sizes(), t.sampling_alpha).items()),
             cfg.student.layers, cfg.student.hidden, f"{sum(p.numel() for p in module.student.parameters()):,}",
             f"init {init_info}")
    passes = training_passes(cfg, manifest, dm, trainer.world_size)
    log.info("train: %d steps read each language's training sequences %s times on average",
             t.max_steps, ", ".join(f"{lang} {p:.1f}" for lang, p in passes.items()))
    over = {lang: p for lang, p in passes.items() if p > REPEAT_WARN}
    if over:
        log.warning("train: %s: more than %g passes over the same masked sequences (the data stage masks each once), "
                    "so the student can learn their gold tokens by heart: label more lines (data.max_lines, "
                    "teachers.<name>.max_lines) or train fewer steps",
                    ", ".join(f"{lang} {p:.1f}" for lang, p in over.items()), REPEAT_WARN)
    try:
        trainer.fit(module, datamodule=dm, ckpt_path=str(last) if resume and last.is_file() and not start_over else None)
    except NonFiniteLoss as e:
        raise UserError(str(e) + (f" ({last})" if last.is_file() else "")) from None
    except SystemExit:  # Lightning's answer to Ctrl-C: say where training stopped
        if watch.interrupted_at is None:
            raise
        raise watch.error(last) from None
    if trainer.global_rank != 0:
        return export
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    best_info = None
    if has_val and best.best_model_path:
        best_info = {"file": os.path.relpath(best.best_model_path, out), "metric": t.best_metric,
                     "score": float(best.best_model_score) if best.best_model_score is not None else None}
    exported = choose_export(module, t.export, best_info, out, history.by_step, trainer.global_step, metrics)
    if diverge.found is not None:
        exported["divergence"] = diverge.found.as_dict()
    export_student(cfg, module.student, vocab, vrec, manifest, languages, exported["val"], init_info, best_info, out / "export",
                   mini_head=module.mini_head, exported=exported, passes=passes)
    write_json_atomic(state_path, {"inputs": inputs, "status": "done", "steps": trainer.global_step, "val": metrics,
                                   "best": best_info, "exported": exported,
                                   "passes": passes, "seconds": time.monotonic() - start})
    prev_dir = previous_dir(out)
    if prev_dir.exists():
        shutil.rmtree(prev_dir)
        log.info("train: the new student is exported; removed the previous one (%s)", prev_dir)
    log.info("train: %d steps in %.0f s; exported to %s", trainer.global_step, time.monotonic() - start, export)
    return export


def check_kd_target(cfg: RunConfig, manifest: dict) -> None:
    """The exact-mass KD target needs the teacher's log-normaliser at train.temperature in the shards."""
    t = cfg.train
    if t.kd_target != "exact" or t.alpha == 0.0 or t.mode != "offline":
        return
    stored = manifest.get("lse_temperatures") or []
    if lse_column(stored, t.temperature) is None:
        raise UserError(f"train.temperature: {t.temperature:g} has no stored teacher log-normaliser in the shards "
                        f"(data.lse_temperatures: {stored}); add it to data.lse_temperatures and rerun `{cfg.command('data')}`, "
                        "or set train.kd_target: renormalised")


def choose_export(module: DistillModule, which: str, best_info: dict | None, out: Path, history: dict[int, dict],
                  last_step: int, last_metrics: dict) -> dict:
    """Put the weights to export into `module` and say which they are: with `which` = best and a best
    checkpoint, that checkpoint's weights (loaded with weights_only) and the validation figures of its step;
    otherwise the last step's. Returns {"weights": best | last, "step", "metric", "score", "val": figures of
    those weights, "last": {"step", "val"}} (the last step's figures, for comparison)."""
    out_info = {"weights": "last", "step": last_step, "val": last_metrics, "last": {"step": last_step, "val": last_metrics}}
    if which != "best" or best_info is None:
        if which == "best":
            out_info["note"] = "no validation split: the last step's weights"
        return out_info
    ckpt = torch.load(out / best_info["file"], map_location="cpu", weights_only=True)
    step = int(ckpt["global_step"])
    if step != last_step:
        module.load_state_dict(ckpt["state_dict"])
    val = history.get(step, {best_info["metric"]: best_info["score"]})
    return {**out_info, "weights": "best", "step": step, "metric": best_info["metric"], "score": best_info["score"], "val": val}


def fit_model(cfg: RunConfig, out: Path, student=None, callbacks: list | tuple = (), label: str = "train"):
    """Train `student` (an existing masked LM, trained in place) or, when None, a new student built as the
    train stage builds it from `cfg.student`, with this run's loss on its shards for cfg.train.max_steps steps
    (warmup and decay sized to them), adding Lightning `callbacks`. The hook `compress` uses for recovery
    training and for its smaller student: one process, offline shards, no validation, no checkpoints and
    no export (the caller saves the model); CSV logs in out/logs. Returns the DistillModule (`.student`)."""
    from lightning.pytorch.loggers import CSVLogger

    t = cfg.train
    vocab, vrec = load_vocab(cfg)
    manifest = load_manifest(cfg, vrec["vocab"])
    languages = [lang for lang in cfg.languages if lang in manifest["languages"]]
    check_kd_target(cfg, manifest)
    L.seed_everything(t.seed, workers=True, verbose=False)
    if student is None:
        module, _ = make_module(replace(cfg, train=replace(t, mode="offline")), vocab, languages)
    else:
        module = DistillModule(cfg, student.train(), languages, vocab=vocab)  # Lightning keeps the modes it finds: dropout on, as in training
    dm = ShardDataModule(cfg, manifest, vrec["vocab"], languages)
    if student is None and cfg.student.init_output_bias:
        init_output_bias(module.student, dm, t.sampling_alpha)
    trainer = L.Trainer(
        accelerator=t.accelerator, devices=1, precision=lightning_precision(t.precision, t.accelerator), max_steps=t.max_steps,
        accumulate_grad_batches=t.grad_accum, gradient_clip_val=t.grad_clip or None, val_check_interval=None,
        check_val_every_n_epoch=None, limit_val_batches=0, num_sanity_val_steps=0, logger=CSVLogger(out, name="logs"),
        callbacks=[*callbacks, TrainProgress(label, every_s=20, logger=log)], default_root_dir=str(out),
        enable_checkpointing=False, enable_progress_bar=sys.stderr.isatty(), enable_model_summary=False,
        log_every_n_steps=max(1, min(10, t.max_steps // 10)), use_distributed_sampler=False,
    )
    try:
        trainer.fit(module, datamodule=dm)
    except NonFiniteLoss as e:
        raise UserError(f"{label}: {e}") from None
    return module.cpu().eval()
