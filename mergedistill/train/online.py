"""Online KD: the teachers run inside the training step, with dynamic masking.

The data stage's shards serve only as a tokenized, packed corpus here: each sequence is unmasked
(gold tokens put back), mapped to its teacher's ids, masked afresh, and the teacher's top-k at the
new masked positions is computed on the spot. Costly by design: it is the small-run mode and the
comparison point of the offline stage.
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch

from mergedistill.data.masking import mask_tokens
from mergedistill.data.topk import topk_at_masked
from mergedistill.tokens import CLS_ID, MASK_ID, PAD_ID, SEP_ID, UNK_ID
from mergedistill.train.batches import Batch
from mergedistill.train.relations import QKVCapture, TeacherQKV
from mergedistill.vocab.joint import JointVocab


class OnlineTeachers(torch.nn.Module):
    def __init__(self, vocab: JointVocab, teachers: dict, routing: dict[str, str], languages: list[str],
                 mask_prob: float, k: int, seed: int, specials: dict[str, dict[str, int]], lse_temperature: float | None = None):
        """lse_temperature: also the teachers' log-normaliser at this temperature (the exact-mass KD target)."""
        super().__init__()
        self.lse_temps = () if lse_temperature is None else (float(lse_temperature),)
        self.teachers = torch.nn.ModuleDict(teachers)  # moved to the device with the module; never trained
        for m in self.teachers.values():
            m.eval().requires_grad_(False)
        self.languages, self.routing, self.mask_prob, self.k = languages, routing, mask_prob, k
        self.to_student: dict[str, torch.Tensor] = {}
        self.to_teacher: dict[str, torch.Tensor] = {}
        self.allowed: dict[str, torch.Tensor] = {}
        self.specials = specials
        for name in teachers:
            m = vocab.idmaps[name].astype(np.int64)
            inv = np.full(vocab.size, specials[name]["unk"], dtype=np.int64)
            inv[m[m >= 0]] = np.flatnonzero(m >= 0)
            inv[[PAD_ID, CLS_ID, SEP_ID, MASK_ID, UNK_ID]] = [specials[name][r] for r in ("pad", "cls", "sep", "mask", "unk")]
            self.to_teacher[name] = torch.from_numpy(inv)
            self.to_student[name] = torch.from_numpy(np.where(m < 0, UNK_ID, m))
            allowed = m >= 0
            allowed[[specials[name][r] for r in ("pad", "cls", "sep", "mask")]] = False
            self.allowed[name] = torch.from_numpy(allowed)
        self.gen = torch.Generator().manual_seed(seed)

    @torch.no_grad()
    def predict(self, batch: Batch, relation_layer: int | None = None) -> Batch | tuple[Batch, dict[str, TeacherQKV]]:
        """A new batch: the same sequences, masked afresh, with the teachers' top-k at the new positions.

        relation_layer (train.relation_teacher_layer; None: the batch alone): also each teacher's queries,
        keys and values at that layer for the rows routed to it, read from the same pass (train/relations.py):
        (batch, {teacher: TeacherQKV}), q/k/v (b, L, H_teacher) of the new, masked inputs."""
        gold = batch.input_ids.clone()
        gold[batch.selected] = batch.labels  # (B, L) unmasked student ids
        device = gold.device
        new_ids = gold.clone()
        new_sel = torch.zeros_like(batch.selected)
        rows_ids, rows_val, rows_lse = [None] * gold.shape[0], [None] * gold.shape[0], [None] * gold.shape[0]
        qkv: dict[str, TeacherQKV] = {}
        for name, model in self.teachers.items():
            rows = [i for i, li in enumerate(batch.seq_lang.tolist()) if self.routing[self.languages[li]] == name]
            if not rows:
                continue
            r = torch.tensor(rows, device=device)
            t_ids = self.to_teacher[name].to(device)[gold[r]]  # (b, L) teacher ids
            sp = self.specials[name]
            special = torch.isin(t_ids, torch.tensor([sp["pad"], sp["cls"], sp["sep"]], device=device)) | (batch.attention_mask[r] == 0)
            cands = torch.from_numpy(np.flatnonzero(self.allowed[name].numpy()))
            mb = mask_tokens(t_ids.cpu(), special.cpu(), sp["mask"], cands, self.mask_prob, self.gen)
            capture = QKVCapture(model, relation_layer, f"train.relation_teacher_layer (teacher {name})") \
                if relation_layer is not None else contextlib.nullcontext()
            with capture:
                ids, val, *lse = topk_at_masked(model, mb.input_ids.to(device), batch.attention_mask[r], mb.selected.to(device),
                                                self.k, self.allowed[name], lse_temperatures=self.lse_temps)
            if relation_layer is not None:  # clones: normal tensors (topk_at_masked's pass runs in inference mode)
                qkv[name] = TeacherQKV(r, *(x.clone() for x in capture.take()))
            to_s = self.to_student[name].to(device)
            new_ids[r] = to_s[mb.input_ids.to(device)]
            new_sel[r] = mb.selected.to(device)
            counts = mb.selected.sum(1).tolist()
            start = 0
            for row, c in zip(rows, counts):
                rows_ids[row] = to_s[ids[start:start + c]]
                rows_val[row] = val[start:start + c]
                if lse:
                    rows_lse[row] = lse[0][start:start + c, 0]
                start += c
        new_ids[batch.attention_mask == 0] = PAD_ID
        labels = gold[new_sel]
        lang = batch.seq_lang[:, None].expand_as(new_sel)[new_sel]
        out = Batch(new_ids, batch.attention_mask, new_sel, labels, torch.cat(rows_ids), torch.cat(rows_val).float(), lang, batch.seq_lang,
                    topk_lse=torch.cat(rows_lse).float() if self.lse_temps else None)
        return out if relation_layer is None else (out, qkv)
