"""The student: a BERT masked LM over the joint vocabulary, so it exports as a standard folder
(`student.arch: xmod`: an X-Mod masked LM with a module per language, built by `models/xmod.py`).

Initialisation:
  - random (BERT's own init);
  - `teacher:<name>`: the encoder layers of that teacher, every other one (DistilBERT's recipe),
    spread evenly when the student has more than half as many; sizes must match;
  - embedding rows (and output-bias entries) copied from every teacher whose hidden size matches,
    through its id map, averaged where several teachers share a token: no shared token starts from noise.
"""
from __future__ import annotations


import torch
from transformers import BertConfig, BertForMaskedLM

from mergedistill.config import RunConfig
from mergedistill.errors import UserError
from mergedistill.models.init import IdMaps, copy_embedding_rows, head_transform, layer_map
from mergedistill.models.layers import ROBERTA_STYLE
from mergedistill.models.xmod import build_xmod_student
from mergedistill.tokens import PAD_ID



def student_config(cfg: RunConfig, vocab_size: int) -> BertConfig:
    s = cfg.student
    return BertConfig(
        vocab_size=vocab_size, hidden_size=s.hidden, num_hidden_layers=s.layers, num_attention_heads=s.heads,
        intermediate_size=s.intermediate, max_position_embeddings=s.max_position, type_vocab_size=1,
        pad_token_id=PAD_ID, tie_word_embeddings=True,
    )


def _layers(model) -> torch.nn.ModuleList:
    return model.base_model.encoder.layer


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
    s_head, t_head = head_transform(student), head_transform(teacher)
    if s_head is not None and t_head is not None:
        s_head["dense"].load_state_dict(t_head["dense"].state_dict())
        s_head["norm"].load_state_dict(t_head["norm"].state_dict())
    return src


def build_student(cfg: RunConfig, vocab: IdMaps, load_teacher, languages: list[str] | None = None) -> tuple[BertForMaskedLM, dict]:
    """The initialised student and a description of its initialisation. `load_teacher(name)` returns a
    teacher model (loaded only when needed). `languages`: the X-Mod student's modules, in lang_id order
    (default: the config's languages)."""
    if cfg.student.arch == "xmod":
        return build_xmod_student(vocab=vocab, languages=languages or list(cfg.languages), student=cfg.student,
                                  load_teacher=load_teacher, seed=cfg.train.seed,
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
