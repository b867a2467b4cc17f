"""The LightningModule: wires the student, the batches and the pure losses together; one shared step
function for training and validation, metrics through `self.log`."""
from __future__ import annotations

import time

import lightning as L
import torch

from mergedistill.config import RunConfig
from mergedistill.models.mlm import masked_head_features, masked_logits
from mergedistill.models.xmod import is_xmod, lang_id_table
from mergedistill.train.batches import Batch, batch_loss
from mergedistill.train.language_head import LanguageColumns, language_id_sets
from mergedistill.train.mini_head import LayerTap, MiniHead
from mergedistill.train.optim import adamw, clip_gradients, scales_gradients, with_schedule
from mergedistill.train.progress import writes_logs


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or inf: training stops; the last checkpoint written before stays good."""


class DistillModule(L.LightningModule):
    def __init__(self, cfg: RunConfig, student, languages: list[str], online=None, vocab=None):
        super().__init__()
        self.cfg, self.student, self.languages = cfg, student, languages
        # train.softmax language: each position predicts among its language's ids (train/language_head.py)
        self.columns = None
        if cfg.train.softmax == "language":
            if vocab is None:
                raise ValueError("DistillModule: train.softmax language needs the joint vocabulary (vocab=)")
            self.columns = LanguageColumns(language_id_sets(vocab, cfg, languages), student.get_output_embeddings().weight.shape[0],
                                           languages)
        self.online = online  # an OnlineTeachers for online KD (teachers run inside the step), or None
        self._t0: float | None = None
        # X-Mod: batch language index -> the student's module (lang_id); derived, so not checkpointed
        self.register_buffer("lang_table", lang_id_table(student, languages) if is_xmod(student) else None, persistent=False)
        # MiniJoint (train.mini_head_layer = k): a secondary head on layer k's output, read off the primary pass
        k = cfg.train.mini_head_layer
        self.mini_head = MiniHead.from_student(student, k) if k else None
        self._tap = LayerTap(student, k) if k else None

    def losses(self, batch: Batch) -> tuple[torch.Tensor, dict]:
        """The student's logits at the labelled positions (N, V) and the loss parts (train/losses.py); with
        train.softmax language, (N, S) logits over each position's language's ids (train/language_head.py) and
        parts["top1"] as student ids. An X-Mod student runs each sequence through its language's module."""
        t = self.cfg.train
        lang_ids = self.lang_table[batch.seq_lang] if self.lang_table is not None else None  # (B,)
        if self.columns is None:
            logits = masked_logits(self.student, batch.input_ids, batch.attention_mask, batch.selected, lang_ids=lang_ids)
            return logits, batch_loss(logits, batch, t.alpha, t.temperature, t.kd_target)
        # the language softmax: (N, S) logits of each position's language's ids, labels and teacher ids as columns;
        # the top-1 goes back to student ids, so that every figure below compares student ids as before
        features = masked_head_features(self.student, batch.input_ids, batch.attention_mask, batch.selected, lang_ids)
        if features is None:
            raise ValueError(f"train.softmax language: no known MLM head on a {self.student.config.model_type} student")
        decoder = self.student.get_output_embeddings()
        columns = self.columns.to(features.device)
        logits = columns.logits(features, decoder.weight, decoder.bias, batch.lang)
        parts = batch_loss(logits, columns.localise(batch), t.alpha, t.temperature, t.kd_target)
        parts["top1"] = columns.globalise(parts["top1"], batch.lang)
        return logits, parts

    # ---- the shared step -----------------------------------------------------------------------
    def _step(self, batch: Batch, stage: str) -> torch.Tensor:
        # ---- begin: MiniLMv2 relation distillation (train.relation_weight > 0; train/relations.py) ----------------
        t = self.cfg.train
        if self.online is not None and stage == "train" and t.relation_weight > 0:
            from mergedistill.train.relations import QKVCapture, routed_relation_loss

            batch, teacher_qkv = self.online.predict(batch, relation_layer=t.relation_teacher_layer)  # from their own pass
            with QKVCapture(self.student, t.relation_student_layer, "train.relation_student_layer") as student_qkv:
                logits, parts = self.losses(batch)  # (N, V); the student's Q/K/V from hooks on this same forward
            relation = routed_relation_loss(teacher_qkv, *student_qkv.take(), batch.attention_mask, t.relation_heads)
            parts["loss"] = parts["loss"] + t.relation_weight * relation  # train/loss below: the whole objective
            if writes_logs(self):
                self.log("train/relation_loss", relation, batch_size=len(batch.seq_lang), sync_dist=True)
        # ---- end: relation distillation; without it, the step as before: ------------------------------------------
        else:
            if self.online is not None and stage == "train":
                batch = self.online.predict(batch)
            logits, parts = self.losses(batch)  # (N, V)
        per_pos = parts["mlm_per_position"]  # (N,)
        with torch.no_grad():
            top1 = parts["top1"]  # the loss's pass found it (argmax over bf16 rows costs a sixth of a step)
            if batch.masked is not None and not bool(batch.masked.all()):  # figures on the masked positions only
                m = batch.masked
                top1, labels, first, lang, per_pos = top1[m], batch.labels[m], batch.topk_ids[m, 0], batch.lang[m], per_pos[m]
            else:
                labels, first, lang = batch.labels, batch.topk_ids[:, 0], batch.lang
            n = labels.numel()
            correct = (top1 == labels).float()
            agree = (top1 == first).float()
        sync = True  # means over ranks: a DDP run logs the same curve as one process with the global batch
        self.log(f"{stage}/loss", parts["loss"], batch_size=n, sync_dist=sync, prog_bar=True)
        # The other figures only on the steps the loggers write (~20 self.log calls a step were ~7% of the demo
        # student's training step under cProfile)
        detail = stage != "train" or writes_logs(self)
        if detail:
            self.log(f"{stage}/mlm_loss", parts["mlm"], batch_size=n, sync_dist=sync)
            self.log(f"{stage}/kd_loss", parts["kd"], batch_size=n, sync_dist=sync)
            self.log(f"{stage}/acc", correct.mean(), batch_size=n, sync_dist=sync)
            self.log(f"{stage}/agree", agree.mean(), batch_size=n, sync_dist=sync)
        loss = parts["loss"]
        if self.mini_head is not None:  # the primary path above is unchanged; weight 0 adds exactly nothing
            t = self.cfg.train
            mid = self._tap.take()[batch.selected]  # (N, H): layer k's output at the masked positions
            mini = batch_loss(self.mini_head(mid, self.student.get_input_embeddings().weight), batch, t.alpha, t.temperature,
                              t.kd_target)
            loss = loss + t.mini_head_weight * mini["loss"]
            if detail:
                self.log(f"{stage}/mini_loss", mini["loss"], batch_size=n, sync_dist=sync)
        # Per-language figures: a language may be absent from one rank's part of a training batch, and
        # a synced log must be called by every rank alike, so these stay rank-local in training.
        # Validation batches are the same on every rank: synced there.
        lang_sync = stage != "train"
        for li, lang_name in enumerate(self.languages if detail else []):
            here = lang == li
            m = int(here.sum())
            if m == 0:
                continue
            self.log(f"{stage}/{lang_name}/mlm_loss", per_pos[here].mean(), batch_size=m, sync_dist=lang_sync, add_dataloader_idx=False)
            self.log(f"{stage}/{lang_name}/acc", correct[here].mean(), batch_size=m, sync_dist=lang_sync, add_dataloader_idx=False)
            if stage != "train":
                self.log(f"{stage}/{lang_name}/agree", agree[here].mean(), batch_size=m, sync_dist=lang_sync, add_dataloader_idx=False)
        return loss

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        loss = self._step(batch, "train")
        if not torch.isfinite(loss):
            langs = sorted({self.languages[i] for i in batch.seq_lang.tolist()})
            raise NonFiniteLoss(
                f"train: the loss became {loss.item()} at step {self.global_step} (batch languages: {', '.join(langs)}); "
                "training stopped and the last checkpoint is the last good state. Lower train.lr, raise "
                "train.warmup_steps or use precision 32, then continue with --resume"
            )
        tokens = int(batch.attention_mask.sum())
        now = time.perf_counter()
        if self._t0 is not None and writes_logs(self):
            self.log("train/tokens_per_s", tokens / max(now - self._t0, 1e-9), batch_size=1)
            self.log("train/step_s", now - self._t0, batch_size=1)
        self._t0 = now
        return loss

    def validation_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._step(batch, "val")

    # ---- exact resumption: the random state (dropout) of step s is a function of (seed, s, rank), like
    # its batch, so a resumed run draws exactly what the uninterrupted one would have
    def on_train_batch_start(self, batch, batch_idx):
        micro = batch_idx % self.trainer.accumulate_grad_batches
        torch.manual_seed(((self.cfg.train.seed * 1_000_003 + self.global_step) * 64 + micro) * 1009 + self.global_rank)
        if writes_logs(self):
            self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=1)

    # ---- optimisation --------------------------------------------------------------------------
    def configure_optimizers(self):
        t = self.cfg.train
        params = list(self.student.named_parameters())
        if self.mini_head is not None:
            params += list(self.mini_head.named_parameters())
        return with_schedule(adamw(params, t.lr, t.weight_decay, fuse=not scales_gradients(self)), t.warmup_steps, t.max_steps)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        clip_gradients(self, optimizer, gradient_clip_val, gradient_clip_algorithm)
