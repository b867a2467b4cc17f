"""The student: a BERT masked LM over the joint vocabulary, so it exports as a standard folder
(`student.arch: xmod`: an X-Mod masked LM with a module per language, built by `train/xmod.py`).

Initialisation:
  - random (BERT's own init);
  - `teacher:<name>`: the encoder layers of that teacher, every other one (DistilBERT's recipe),
    spread evenly when the student has more than half as many; sizes must match;
  - embedding rows (and output-bias entries) copied from every teacher whose hidden size matches,
    through its id map, averaged where several teachers share a token: no shared token starts from noise.
"""
from __future__ import annotations

import logging

import torch
from transformers import BertConfig, BertForMaskedLM

from mergedistill.config import RunConfig
from mergedistill.errors import UserError
from mergedistill.mlm_models import ROBERTA_STYLE
from mergedistill.vocab.joint import PAD_ID, JointVocab

log = logging.getLogger(__name__)


def student_config(cfg: RunConfig, vocab_size: int) -> BertConfig:
    s = cfg.student
    return BertConfig(
        vocab_size=vocab_size, hidden_size=s.hidden, num_hidden_layers=s.layers, num_attention_heads=s.heads,
        intermediate_size=s.intermediate, max_position_embeddings=s.max_position, type_vocab_size=1,
        pad_token_id=PAD_ID, tie_word_embeddings=True,
    )


def _layers(model) -> torch.nn.ModuleList:
    return model.base_model.encoder.layer


def _output_bias(model) -> torch.Tensor | None:
    out = model.get_output_embeddings()
    return getattr(out, "bias", None)


def layer_map(student_layers: int, teacher_layers: int) -> list[int]:
    """Teacher layer for each student layer: every other one (0, 2, 4, ...) when there is room,
    else evenly spread over the teacher's depth."""
    if student_layers * 2 <= teacher_layers + 1:
        return [2 * i for i in range(student_layers)]
    if student_layers == 1:
        return [0]
    return [round(i * (teacher_layers - 1) / (student_layers - 1)) for i in range(student_layers)]


@torch.no_grad()
def init_from_teacher_layers(student: BertForMaskedLM, teacher, name: str) -> list[int]:
    sc, tc = student.config, teacher.config
    for attr in ("hidden_size", "num_attention_heads", "intermediate_size"):
        if getattr(sc, attr) != getattr(tc, attr):
            raise UserError(f"student.init: teacher:{name} has {attr}={getattr(tc, attr)}, the student {getattr(sc, attr)}; "
                            f"set student.{ {'hidden_size': 'hidden', 'num_attention_heads': 'heads', 'intermediate_size': 'intermediate'}[attr]} to match or init randomly")
    src = layer_map(len(_layers(student)), len(_layers(teacher)))
    for i, j in enumerate(src):
        missing, unexpected = _layers(student)[i].load_state_dict(_layers(teacher)[j].state_dict(), strict=False)
        if missing or unexpected:
            raise UserError(f"student.init: teacher:{name}'s layers do not match a BERT layer ({(missing or unexpected)[0]})")
    # embedding LayerNorm and the MLM head's transform come along; positions where the layout allows
    s_emb, t_emb = student.base_model.embeddings, teacher.base_model.embeddings
    s_emb.LayerNorm.load_state_dict(t_emb.LayerNorm.state_dict())
    offset = (tc.pad_token_id + 1) if getattr(tc, "model_type", "") in ROBERTA_STYLE else 0
    n = min(sc.max_position_embeddings, t_emb.position_embeddings.weight.shape[0] - offset)
    s_emb.position_embeddings.weight[:n] = t_emb.position_embeddings.weight[offset: offset + n]
    s_head, t_head = _head_transform(student), _head_transform(teacher)
    if s_head is not None and t_head is not None:
        s_head["dense"].load_state_dict(t_head["dense"].state_dict())
        s_head["norm"].load_state_dict(t_head["norm"].state_dict())
    return src


def _head_transform(model) -> dict | None:
    """The MLM head's dense + LayerNorm (BERT: cls.predictions.transform; RoBERTa: lm_head)."""
    if hasattr(model, "cls"):
        tr = model.cls.predictions.transform
        return {"dense": tr.dense, "norm": tr.LayerNorm}
    if hasattr(model, "lm_head") and hasattr(model.lm_head, "layer_norm"):
        return {"dense": model.lm_head.dense, "norm": model.lm_head.layer_norm}
    return None


@torch.no_grad()
def copy_embedding_rows(student: BertForMaskedLM, vocab: JointVocab, teachers: dict) -> dict[str, int]:
    """Student embedding rows := mean of the teachers' rows for the same token (teachers whose hidden
    size matches). Returns how many rows each teacher contributed to."""
    emb = student.get_input_embeddings().weight  # (V, H)
    bias = _output_bias(student)
    total = torch.zeros_like(emb)
    total_bias = torch.zeros(emb.shape[0])
    count = torch.zeros(emb.shape[0])
    used = {}
    for name, model in teachers.items():
        t_emb = model.get_input_embeddings().weight
        if t_emb.shape[1] != emb.shape[1]:
            log.info("student: %s has hidden size %d, the student %d: its embeddings are not copied", name, t_emb.shape[1], emb.shape[1])
            continue
        m = torch.from_numpy(vocab.idmaps[name]).long()
        n = min(len(m), t_emb.shape[0])
        tid = torch.arange(n)[m[:n] >= 0]
        sid = m[:n][m[:n] >= 0]
        total.index_add_(0, sid, t_emb[tid].float())
        t_bias = _output_bias(model)
        if t_bias is not None and bias is not None:
            total_bias.index_add_(0, sid, t_bias[tid].float())
        count.index_add_(0, sid, torch.ones(len(sid)))
        used[name] = int(len(sid))
    have = count > 0
    emb[have] = (total[have] / count[have, None]).to(emb.dtype)
    if bias is not None:
        bias[have] = (total_bias[have] / count[have]).to(bias.dtype)
    return used


def build_student(cfg: RunConfig, vocab: JointVocab, load_teacher, languages: list[str] | None = None) -> tuple[BertForMaskedLM, dict]:
    """The initialised student and a description of its initialisation. `load_teacher(name)` returns a
    teacher model (loaded only when needed). `languages`: the X-Mod student's modules, in lang_id order
    (default: the config's languages)."""
    if cfg.student.arch == "xmod":
        from mergedistill.train.xmod import build_xmod_student

        s = cfg.student
        return build_xmod_student(
            vocab=vocab, languages=languages or list(cfg.languages), modules=s.modules, hidden=s.hidden, layers=s.layers,
            heads=s.heads, intermediate=s.intermediate, max_position=s.max_position,
            adapter_reduction_factor=s.adapter_reduction_factor, ln_before_adapter=s.ln_before_adapter,
            adapter_layer_norm=s.adapter_layer_norm, adapter_reuse_layer_norm=s.adapter_reuse_layer_norm, pre_norm=s.pre_norm,
            init=s.init, embeddings_from_teachers=s.embeddings_from_teachers, load_teacher=load_teacher, seed=cfg.train.seed,
            embedding_teachers=[n for n in vocab.teachers if n in cfg.teachers])
    torch.manual_seed(cfg.train.seed)
    student = BertForMaskedLM(student_config(cfg, vocab.size))
    info: dict = {"init": cfg.student.init}
    if cfg.student.init.startswith("teacher:"):
        name = cfg.student.init.split(":", 1)[1]
        info["layers_from"] = {name: init_from_teacher_layers(student, load_teacher(name), name)}
    if cfg.student.embeddings_from_teachers:
        teachers = {n: load_teacher(n) for n in vocab.teachers if n in cfg.teachers}
        info["embedding_rows"] = copy_embedding_rows(student, vocab, teachers)
    student.tie_weights()
    return student, info
