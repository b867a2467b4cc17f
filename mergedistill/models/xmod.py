"""The X-Mod student: a `transformers` `XmodForMaskedLM` over the joint vocabulary, with a small
bottleneck module per language (or per group of languages) in every layer and everything else shared
(Pfeiffer et al., NAACL 2022). Total capacity grows with the languages; the parameters one language
uses stay constant; a language's module can be appended later without touching the others.

Layout (what `transformers` builds, per layer):
    attention -> LN_att
    h = dense(intermediate) + attention_output                 the FFN sum, before the layer's LayerNorm
    adapter input   x = adapter_layer_norm(h) | LN(h) (adapter_reuse_layer_norm) | h
    residual        r = x if ln_before_adapter else h
    out = r + module[lang](x);  layer output = LN(out)         (post-norm; pre_norm skips this LN)
Modules live in `layer.output.adapter_modules`, a ModuleDict keyed by module name, in the order of
`config.languages`; `lang_ids` (B,) index that order. A new module is appended at the end, so the ids of
the existing ones never change. `config.language_modules` (language -> module name, an extra config
field) is saved with the model, so an exported folder knows which module serves which language.

Starting equal to a teacher. With the modules' up-projection (dense2) zero, module[lang](x) = 0, so
out = r, and the layer outputs LN(r). A BERT/RoBERTa layer outputs LN(h). So the student reproduces a
post-norm teacher exactly iff r = h at initialisation, that is iff
    ln_before_adapter = False                       (r = h whatever feeds the module), or
    ln_before_adapter = True with adapter_layer_norm = False and adapter_reuse_layer_norm = False
                                                    (nothing normalises before the module: x = h = r);
    pre_norm = False in both cases.
Up to float rounding only (not exact, still within 1e-5 at init): ln_before_adapter = True with
adapter_layer_norm = True: r = norm(h) (the new LayerNorm starts at weight 1, bias 0) and the layer
outputs LN(norm(h)) = LN(h) up to eps/var(h). It drifts as soon as that LayerNorm trains.
Never equivalent: ln_before_adapter = True with adapter_reuse_layer_norm = True and no adapter LayerNorm
(X-Mod's published default): r = LN(h) and the layer outputs LN(LN(h)), the teacher's affine LayerNorm
applied twice; and pre_norm = True, a different (pre-LN) network from a post-LN teacher.
Measured (tests/models/test_xmod.py, tiny BERT, XLM-R and RoBERTa teachers whose LayerNorms are not
identity): the exact settings give max |logit difference| 0.0; ln_before_adapter + adapter_layer_norm
1.2e-7 to 1.5e-7; X-Mod's default 0.12 to 0.23; pre_norm 0.17 to 0.39 (the README's table).

Positions: X-Mod numbers positions like RoBERTa, from padding_idx + 1 (the student's [PAD] is 0, so
from 1); BERT numbers them from 0. Teacher position i (row i + the teacher's offset: 0 for BERT,
pad + 1 for RoBERTa/XLM-R) goes to student row i + 1, so the table has max_position + 1 rows.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn
from transformers import XmodConfig, XmodForMaskedLM
from transformers.models.xmod.modeling_xmod import XmodAdapter, XmodOutput

from mergedistill.config import StudentConfig
from mergedistill.errors import UserError
from mergedistill.models.init import IdMaps, copy_embedding_rows, head_transform, layer_map
from mergedistill.models.layers import ROBERTA_STYLE, attention_at_rows, encoder_prefix, selected_rows
from mergedistill.tokens import CLS_ID, PAD_ID, SEP_ID

log = logging.getLogger(__name__)

TEACHER_TYPES = ("bert", *(t for t in ROBERTA_STYLE if t != "xmod"))

LN_OPTIONS = ("ln_before_adapter", "adapter_layer_norm", "adapter_reuse_layer_norm", "pre_norm")
"""The X-Mod layer-norm options (XmodConfig fields), as build_xmod_student takes them."""


class UnknownLanguage(UserError, ValueError):
    """A language (or lang_id) the X-Mod student has no module for."""


# ---- languages and modules --------------------------------------------------------------------------
def module_map(languages: Sequence[str], modules: Mapping[str, str] | None = None) -> dict[str, str]:
    """Language -> module name: one module per language by default; `modules` groups languages (e.g.
    {"es": "romance", "fr": "romance"}, or {"gl": "es"}: gl shares es's module); languages it leaves
    out get a module of their own, named after them."""
    languages = list(languages)
    if not languages:
        raise UserError("student.modules: an X-Mod student needs at least one language")
    modules = dict(modules or {})
    unknown = sorted(set(modules) - set(languages))
    if unknown:
        raise UserError(f"student.modules: {', '.join(unknown)} {'is' if len(unknown) == 1 else 'are'} not among the "
                        f"languages ({', '.join(languages)}); remove {'it' if len(unknown) == 1 else 'them'} or add the language")
    return {lang: str(modules.get(lang, lang)) for lang in languages}


def language_modules(model_or_config) -> dict[str, str]:
    """Language -> module name of an X-Mod model (or config): `config.language_modules` when stored,
    else one module per entry of `config.languages` (any X-Mod checkpoint, e.g. facebook/xmod-base)."""
    cfg = getattr(model_or_config, "config", model_or_config)
    stored = getattr(cfg, "language_modules", None)
    return dict(stored) if stored else {str(m): str(m) for m in cfg.languages}


def module_names(model) -> list[str]:
    """Module names in lang_id order (the order of every layer's ModuleDict)."""
    names = list(model.base_model.encoder.layer[0].output.adapter_modules.keys())
    if names != [str(m) for m in model.config.languages]:
        raise ValueError(f"adapter modules {names} != config.languages {model.config.languages}")
    return names


def module_of(model, lang: str) -> str:
    """The module that serves `lang` (a language, or a module name itself)."""
    lm = language_modules(model)
    if lang in lm:
        return lm[lang]
    if lang in module_names(model):
        return lang
    raise UnknownLanguage(f"language {lang!r} has no module in this X-Mod student; known languages: "
                          f"{', '.join(sorted(lm))} (modules: {', '.join(module_names(model))})")


def lang_id_table(model, languages: Sequence[str]) -> torch.Tensor:
    """(len(languages),) long: the lang_id of each language, so that a batch's language indices become
    lang_ids by indexing: `table[batch.seq_lang]`. Every unknown language is named in one error."""
    lm = language_modules(model)
    names = module_names(model)
    unknown = [lang for lang in languages if lang not in lm and lang not in names]
    if unknown:
        raise UnknownLanguage(f"language{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} "
                              f"{'have' if len(unknown) > 1 else 'has'} no module in this X-Mod student; known "
                              f"languages: {', '.join(sorted(lm))}")
    return torch.tensor([names.index(module_of(model, lang)) for lang in languages], dtype=torch.long)


def lang_ids_for(model, langs: Sequence[str], device=None) -> torch.Tensor:
    """(B,) long lang_ids for a batch whose sequence b is in language langs[b]."""
    distinct = list(dict.fromkeys(langs))
    table = lang_id_table(model, distinct)
    return table[[distinct.index(lang) for lang in langs]].to(device)


def check_lang_ids(model, lang_ids: torch.Tensor, batch_size: int) -> None:
    """transformers' X-Mod silently skips every module for a lang_id outside 0..M-1 (the sequence gets
    no module at all): refuse that, and a shape that does not fit the batch."""
    n = len(model.config.languages)
    if lang_ids.dim() != 1 or lang_ids.shape[0] != batch_size:
        raise ValueError(f"lang_ids must have shape ({batch_size},), one module index per sequence; got {tuple(lang_ids.shape)}")
    if lang_ids.dtype.is_floating_point and not torch.equal(lang_ids, lang_ids.round()):
        raise ValueError(f"lang_ids must be whole numbers; got {lang_ids.tolist()}")
    bad = lang_ids[(lang_ids < 0) | (lang_ids >= n)]
    if bad.numel():
        raise UnknownLanguage(f"lang_ids {sorted(set(bad.long().tolist()))} out of range: this X-Mod student has {n} "
                              f"modules, {', '.join(f'{i}={m}' for i, m in enumerate(model.config.languages))}")


def use_language(model, lang: str):
    """Make `lang`'s module the default, so that calls without lang_ids (pipelines, evaluation code
    written for dense models, `model.base_model(...)`) use it. Returns the model."""
    model.set_default_language(module_of(model, lang))
    return model


def is_xmod(model) -> bool:
    """Whether `model` is an X-Mod masked LM: a model, its config, or a config.json read as a dict (the one
    test every stage uses)."""
    if isinstance(model, Mapping):
        return model.get("model_type") == "xmod"
    return getattr(getattr(model, "config", model), "model_type", "") == "xmod"


def with_language(model, lang: str):
    """`model` set to read `lang`, for code written for dense models (metrics, pipelines, a deep copy of
    `model.base_model`): an X-Mod model gets that language's module as its default, and the grouped
    routing (the same numbers; transformers' own routing fails under bfloat16 autocast, which
    `eval.dtype: bfloat16` uses). Any other model is returned as it is. Returns the model."""
    if not is_xmod(model):
        return model
    if not isinstance(model.base_model.encoder.layer[0].output, GroupedXmodOutput):
        grouped_routing(model)
    return use_language(model, lang)


# ---- building and initialising ------------------------------------------------------------------
def xmod_config(
    *,
    vocab_size: int,
    languages: Sequence[str],
    student: StudentConfig | None = None,
    dropout: float = 0.1,
    layer_norm_eps: float = 1e-12,
    default_language: str | None = None,
) -> XmodConfig:
    """The X-Mod config of a student over `vocab_size` student ids ([PAD] = 0, [CLS] = 2, [SEP] = 3).

    max_position: the longest input (specials included); the table gets max_position + 1 rows since
    X-Mod numbers positions from padding_idx + 1. The layer-norm defaults are the ones under which a
    student initialised from a teacher starts equal to it (module docstring); X-Mod's published
    default is ln_before_adapter=True, adapter_reuse_layer_norm=True. `student`: its shape and X-Mod fields
    (student.modules, adapter_reduction_factor, the layer-norm options; default: StudentConfig's defaults)."""
    s = student if student is not None else StudentConfig()
    hidden, heads, adapter_reduction_factor = s.hidden, s.heads, s.adapter_reduction_factor
    if hidden % heads:
        raise UserError(f"student.hidden ({hidden}) must be a multiple of student.heads ({heads})")
    if not isinstance(adapter_reduction_factor, int) or isinstance(adapter_reduction_factor, bool) \
            or not 1 <= adapter_reduction_factor <= hidden:
        raise UserError(f"student.adapter_reduction_factor must be a whole number from 1 to hidden ({hidden}); "
                        f"got {adapter_reduction_factor!r}")
    lm = module_map(languages, s.modules)
    names = list(dict.fromkeys(lm.values()))
    if default_language is not None and default_language not in lm and default_language not in names:
        raise UnknownLanguage(f"default_language {default_language!r} is not one of the languages ({', '.join(lm)})")
    return XmodConfig(
        vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=s.layers, num_attention_heads=heads,
        intermediate_size=s.intermediate, max_position_embeddings=s.max_position + PAD_ID + 1, type_vocab_size=1,
        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout, layer_norm_eps=layer_norm_eps,
        pad_token_id=PAD_ID, bos_token_id=CLS_ID, eos_token_id=SEP_ID, tie_word_embeddings=True,
        adapter_reduction_factor=adapter_reduction_factor, **{k: getattr(s, k) for k in LN_OPTIONS},
        languages=names, language_modules=lm,
        default_language=lm.get(default_language, default_language) if default_language else None,
    )


@torch.no_grad()
def init_module(adapter: XmodAdapter, std: float, zero_up: bool = True) -> None:
    """A module's weights: down-projection N(0, std), up-projection zero (the module adds nothing
    until it trains, so the student starts as its shared body) or N(0, std); biases zero."""
    adapter.dense1.weight.normal_(0.0, std)
    adapter.dense1.bias.zero_()
    if zero_up:
        adapter.dense2.weight.zero_()
    else:
        adapter.dense2.weight.normal_(0.0, std)
    adapter.dense2.bias.zero_()


def _adapter_norms(model) -> list[nn.LayerNorm]:
    return [la.output.adapter_layer_norm for la in model.base_model.encoder.layer if la.output.adapter_layer_norm is not None]


@torch.no_grad()
def init_xmod_from_teacher(student: XmodForMaskedLM, teacher, name: str = "teacher") -> list[int]:
    """Copy a BERT- or RoBERTa/XLM-R-style teacher's weights into the X-Mod layout: every other encoder
    layer (student.layer_map), the embedding LayerNorm, token type 0, the position table (shifted: see
    the module docstring), the MLM head's transform and the LayerNorm eps. Word embeddings and the
    output bias come through the id maps (`copy_embedding_rows`). Modules are not touched (zero their
    up-projection with `init_module` to start equal to the teacher). Returns the teacher layer of each
    student layer."""
    sc, tc = student.config, teacher.config
    mt = getattr(tc, "model_type", "")
    if mt not in TEACHER_TYPES:
        raise UserError(f"student.init: teacher:{name} is a {mt or type(teacher).__name__} model; an X-Mod student "
                        f"can start from {', '.join(TEACHER_TYPES)} teachers only (or init randomly)")
    for attr, field in (("hidden_size", "hidden"), ("num_attention_heads", "heads"), ("intermediate_size", "intermediate")):
        if getattr(sc, attr) != getattr(tc, attr):
            raise UserError(f"student.init: teacher:{name} has {attr}={getattr(tc, attr)}, the student {getattr(sc, attr)}; "
                            f"set student.{field} to match or init randomly")
    if getattr(tc, "position_embedding_type", None) not in (None, "absolute"):
        raise UserError(f"student.init: teacher:{name} uses {tc.position_embedding_type} position embeddings; X-Mod's "
                        "are absolute; init randomly")
    if getattr(tc, "hidden_act", "gelu") != "gelu":
        raise UserError(f"student.init: teacher:{name} uses hidden_act={tc.hidden_act!r}; X-Mod's MLM head uses gelu, "
                        "so the student could not match it; init randomly")
    if sc.pre_norm:
        log.warning("student.init: a pre-norm X-Mod student cannot reproduce the post-norm teacher %s; its weights "
                    "are copied anyway", name)
    s_layers, t_layers = student.base_model.encoder.layer, teacher.base_model.encoder.layer
    src = layer_map(len(s_layers), len(t_layers))
    for i, j in enumerate(src):
        missing, unexpected = s_layers[i].load_state_dict(t_layers[j].state_dict(), strict=False)
        strange = unexpected + [k for k in missing if not k.startswith(("output.adapter_modules.", "output.adapter_layer_norm."))]
        if strange:
            raise UserError(f"student.init: teacher:{name}'s layer {j} does not map onto an X-Mod layer ({strange[0]})")
    s_emb, t_emb = student.base_model.embeddings, teacher.base_model.embeddings
    s_emb.LayerNorm.load_state_dict(t_emb.LayerNorm.state_dict())
    s_emb.token_type_embeddings.weight[:] = t_emb.token_type_embeddings.weight[0]  # inputs carry type 0
    t_off = tc.pad_token_id + 1 if mt in ROBERTA_STYLE else 0
    s_off = sc.pad_token_id + 1
    n = min(sc.max_position_embeddings - s_off, t_emb.position_embeddings.weight.shape[0] - t_off)
    s_emb.position_embeddings.weight[s_off: s_off + n] = t_emb.position_embeddings.weight[t_off: t_off + n]
    s_head, t_head = head_transform(student), head_transform(teacher)
    s_head["dense"].load_state_dict(t_head["dense"].state_dict())
    s_head["norm"].load_state_dict(t_head["norm"].state_dict())
    for norm in _adapter_norms(student):  # identity at the start (weight 1, bias 0)
        nn.init.ones_(norm.weight)
        nn.init.zeros_(norm.bias)
    eps = getattr(tc, "layer_norm_eps", sc.layer_norm_eps)
    if eps != sc.layer_norm_eps:
        sc.layer_norm_eps = eps
        for m in student.modules():
            if isinstance(m, nn.LayerNorm):
                m.eps = eps
    return src


def build_xmod_student(
    *,
    vocab: IdMaps,
    languages: Sequence[str],
    student: StudentConfig | None = None,
    zero_init_modules: bool = True,
    load_teacher=None,
    seed: int = 0,
    embedding_teachers: Sequence[str] | None = None,
) -> tuple[XmodForMaskedLM, dict]:
    """The initialised X-Mod student and a description of its initialisation, like the dense student's
    `build_student`: `student` gives its shape, X-Mod fields and initialisation (default: StudentConfig's
    defaults); `student.init` is `random` or `teacher:<name>` (that teacher's layers, every other one);
    embedding rows come from every teacher of the vocabulary whose hidden size matches, averaged where
    they share a token (`embedding_teachers`: those teachers only). `load_teacher(name)` returns a teacher
    model. Modules: down-projection random, up-projection zero when `zero_init_modules` (the student
    starts as its shared body). The first language's module is the default one."""
    s = student if student is not None else StudentConfig()
    init, embeddings_from_teachers = s.init, s.embeddings_from_teachers
    torch.manual_seed(seed)
    teachers_needed = init.startswith("teacher:") or embeddings_from_teachers
    if teachers_needed and load_teacher is None:
        raise ValueError("build_xmod_student: init from teachers needs load_teacher")
    cfg = xmod_config(vocab_size=vocab.size, languages=languages, student=s, default_language=languages[0])
    model = XmodForMaskedLM(cfg)
    for layer in model.base_model.encoder.layer:
        for adapter in layer.output.adapter_modules.values():
            init_module(adapter, cfg.initializer_range, zero_up=zero_init_modules)
    info: dict = {"init": init, "arch": "xmod", "modules": dict(cfg.language_modules),
                  "adapter_reduction_factor": cfg.adapter_reduction_factor, **{k: getattr(cfg, k) for k in LN_OPTIONS}}
    if init.startswith("teacher:"):
        name = init.split(":", 1)[1]
        info["layers_from"] = {name: init_xmod_from_teacher(model, load_teacher(name), name)}
    elif init != "random":
        raise UserError(f"student.init: {init!r} is neither `random` nor `teacher:<name>`")
    if embeddings_from_teachers:
        names = vocab.teachers if embedding_teachers is None else [n for n in vocab.teachers if n in embedding_teachers]
        teachers = {n: load_teacher(n) for n in names}
        info["embedding_rows"] = copy_embedding_rows(model, vocab, teachers)
    model.tie_weights()
    return model, info


def add_language_module(model: XmodForMaskedLM, lang: str, *, init_from: str | None = None) -> str:
    """Append a module for a new language `lang` to every layer (and to config.languages and
    config.language_modules). The existing modules, their lang_ids and every other weight stay as they
    are, so the other languages' outputs do not change. `init_from`: None (down-projection random,
    up-projection zero: the new language starts as the shared body) or a language/module whose module
    is copied. Returns the new module's name (= `lang`)."""
    lm = language_modules(model)
    names = module_names(model)
    if lang in lm or lang in names:
        raise ValueError(f"add_language_module: {lang!r} already has a module ({lm.get(lang, lang)!r}); "
                         f"languages: {', '.join(sorted(lm))}")
    src = module_of(model, init_from) if init_from is not None else None
    std = model.config.initializer_range
    for layer in model.base_model.encoder.layer:
        mods = layer.output.adapter_modules
        ref = mods[names[0]]
        new = XmodAdapter(model.config).to(device=ref.dense1.weight.device, dtype=ref.dense1.weight.dtype)
        if src is not None:
            new.load_state_dict(mods[src].state_dict())
        else:
            init_module(new, std, zero_up=True)
        mods[lang] = new
    model.config.languages = [*names, lang]
    model.config.language_modules = {**lm, lang: lang}
    return lang


# ---- counting ---------------------------------------------------------------------------------------
def parameter_counts(model: XmodForMaskedLM) -> dict:
    """{"total", "shared", "modules": {module: n}, "active": {language: n}}. Tied weights count once;
    `active[lang]` = shared + its module: what one sequence of that language runs through."""
    names = module_names(model)
    per_module = dict.fromkeys(names, 0)
    seen: set[int] = set()
    shared = 0
    for pname, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue
        seen.add(id(p))
        parts = pname.split(".")
        if "adapter_modules" in parts:
            per_module[parts[parts.index("adapter_modules") + 1]] += p.numel()
        else:
            shared += p.numel()
    lm = language_modules(model)
    return {"total": shared + sum(per_module.values()), "shared": shared, "modules": per_module,
            "active": {lang: shared + per_module[m] for lang, m in lm.items()}}


def active_parameters(model, languages: Sequence[str]) -> dict:
    """{"total": n, "active": {language: n}} for any masked LM: an X-Mod model's shared weights plus the
    language's module (`parameter_counts`); a dense model uses all its weights for every language.
    Tied weights count once."""
    if is_xmod(model):
        c = parameter_counts(model)
        return {"total": c["total"], "active": {lang: c["active"][lang] if lang in c["active"] else
                                                c["shared"] + c["modules"][module_of(model, lang)] for lang in languages}}
    total = sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once
    return {"total": total, "active": dict.fromkeys(languages, total)}


# ---- export -----------------------------------------------------------------------------------------
def save_xmod_student(model: XmodForMaskedLM, folder: str | Path, *, default_language: str) -> Path:
    """Save as a standard folder: `AutoModelForMaskedLM.from_pretrained(folder)` gives an
    XmodForMaskedLM whose default module is `default_language`'s (config.default_language, set on
    `model` too; the language -> module map is config.language_modules)."""
    use_language(model, default_language)
    folder = Path(folder)
    model.save_pretrained(str(folder))
    return folder


def model_card_usage(model: XmodForMaskedLM, lang: str, tokenizer_dir: str, other: str | None = None) -> str:
    """A README section (markdown) on choosing a language's module, with a fill-mask example that runs
    as written once PATH_TO_THIS_FOLDER is replaced."""
    lm = language_modules(model)
    other = other or next((x for x in lm if x != lang), lang)
    grouped = any(m != x for x, m in lm.items())
    rows = "\n".join(f"| {x} | {m} | {module_names(model).index(m)} |" for x, m in lm.items())
    return "\n".join([
        "## Choosing a language's module",
        "",
        f"This is an X-Mod model: every layer has a small module per {'group of languages' if grouped else 'language'}, "
        f"the rest is shared. Without `lang_ids` the model uses `config.default_language` ({model.config.default_language!r}); "
        "pick another module with `model.set_default_language(<module>)`, or pass `lang_ids` (one module index "
        "per sequence) to mix languages in one batch.",
        "",
        "| language | module | lang_id |",
        "|---|---|---|",
        rows,
        "",
        "```python",
        "import torch",
        "from transformers import AutoModelForMaskedLM, AutoTokenizer, pipeline",
        "",
        "model = AutoModelForMaskedLM.from_pretrained(\"PATH_TO_THIS_FOLDER\")",
        f"tokenizer = AutoTokenizer.from_pretrained(\"PATH_TO_THIS_FOLDER/{tokenizer_dir}\")  # language '{lang}'",
        f"model.set_default_language({lm[lang]!r})",
        "fill = pipeline(\"fill-mask\", model=model, tokenizer=tokenizer)",
        "print(fill(f\"... {tokenizer.mask_token} ...\"))",
        "",
        "# or per sequence: the module index of each sequence's language",
        "batch = tokenizer([f\"... {tokenizer.mask_token} ...\"] * 2, return_tensors=\"pt\")",
        f"lang_ids = torch.tensor([model.config.languages.index({lm[lang]!r}), model.config.languages.index({lm[other]!r})])",
        "logits = model(**batch, lang_ids=lang_ids).logits",
        "```",
    ])


# ---- routing sequences to their modules ---------------------------------------------------------------
class GroupedXmodOutput(XmodOutput):
    """XmodOutput whose modules run on the sequences of their language, grouped by one stable sort (none
    when the batch is already sorted by language), each module on its slice, instead of transformers'
    loop of a boolean-mask gather and scatter per module (each mask costs a device sync, and each scatter
    a zero-filled (B, L, H) gradient in the backward pass). Each module sees the same rows in the same
    order as in transformers' loop: outputs are bit-identical (tests). Other lang_ids shapes ((B, L),
    one module per token) fall back to transformers' loop."""

    def lang_adapter(self, lang_ids: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        if lang_ids.dim() != 1 or lang_ids.shape[0] != hidden_states.shape[0]:
            return super().lang_adapter(lang_ids, hidden_states)
        residual = hidden_states  # ln_before_adapter=False: the sum before any LayerNorm
        if self.adapter_layer_norm is not None:
            hidden_states = self.adapter_layer_norm(hidden_states)
        elif self.adapter_reuse_layer_norm:
            hidden_states = self.LayerNorm(hidden_states)
        if self.ln_before_adapter:
            residual = hidden_states
        mods = list(self.adapter_modules.values())
        ids = lang_ids.long()
        counts = torch.bincount(ids, minlength=len(mods)).tolist()  # one sync per layer (the loop: one per module)
        if len(counts) != len(mods) or int(ids.min()) < 0:
            raise ValueError(f"lang_ids {ids.tolist()} outside 0..{len(mods) - 1}")
        in_order = bool((ids[1:] >= ids[:-1]).all())  # a batch sorted by language needs no gather
        order = None if in_order else torch.argsort(ids, stable=True)  # (B,)
        x = hidden_states if order is None else hidden_states.index_select(0, order)
        # every module runs, on an empty slice if its language is absent: its weights then get a zero
        # gradient rather than none, as in transformers' loop, so DDP needs no find_unused_parameters
        parts = [mod(chunk) for mod, chunk in zip(mods, x.split(counts))]
        y = torch.cat(parts) if len(parts) > 1 else parts[0]
        if order is not None:
            y = y.index_select(0, torch.argsort(order))  # back to the batch's order
        return self.dropout(y) + residual


def grouped_routing(model: XmodForMaskedLM, enabled: bool = True) -> XmodForMaskedLM:
    """Switch every layer to GroupedXmodOutput (or back to transformers' XmodOutput). Weights, state
    dict keys and save_pretrained are unchanged; a reloaded model uses transformers' own routing."""
    for layer in model.base_model.encoder.layer:
        layer.output.__class__ = GroupedXmodOutput if enabled else XmodOutput
    return model


# ---- the MLM head at selected positions only ----------------------------------------------------------
def xmod_masked_hidden(
    model: XmodForMaskedLM,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    selected: torch.Tensor,
    lang_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """The encoder's output at the N selected positions (N, H), row-major over `selected` (B, L) bool: what
    models.mlm.masked_head_features (so masked_logits) feeds an X-Mod model's head. Every layer but the last
    runs everywhere, the last only where its output is needed. lang_ids (B,): each sequence's module; None:
    the default language's. The head on it equals `model(...).logits[selected]` up to float rounding."""
    B = input_ids.shape[0]
    if lang_ids is None:
        if model.config.default_language is None:
            raise ValueError("masked_logits of an X-Mod model: pass lang_ids or set a default language (use_language)")
        lang_ids = torch.full((B,), module_names(model).index(model.config.default_language), dtype=torch.long)
    lang_ids = lang_ids.to(input_ids.device)
    check_lang_ids(model, lang_ids, B)
    base = model.base_model
    layers = base.encoder.layer
    if selected.all() or len(layers) < 1 or model.config.is_decoder:
        hidden = base(input_ids=input_ids, attention_mask=attention_mask, lang_ids=lang_ids).last_hidden_state
        return hidden[selected]
    hidden = encoder_prefix(base, input_ids, attention_mask, len(layers) - 1, lang_ids=lang_ids)  # (B, L, H)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    out = xmod_layer_at_positions(layers[-1], hidden, attention_mask, selected, lang_ids)
    if base.encoder.is_pre_norm:  # the final LayerNorm of a pre-norm encoder
        out = base.encoder.LayerNorm(out)
    return out


def xmod_layer_at_positions(layer, hidden: torch.Tensor, attention_mask: torch.Tensor, selected: torch.Tensor,
                            lang_ids: torch.Tensor) -> torch.Tensor:
    """An X-Mod layer's output at the selected positions only: (N, H), row-major over `selected` (B, L).
    hidden: (B, L, H) the layer's input; attention_mask (B, L), 0 on padding; lang_ids (B,).
    Queries, attention output, feed-forward and the module run on the selected rows; keys and values on
    every position (models.layers.selected_rows / attention_at_rows, as for BERT). Follows XmodLayer:
    post-norm (LayerNorm after each residual sum) or pre-norm (before each block)."""
    att, pre = layer.attention, layer.pre_norm
    rows, valid = selected_rows(hidden, selected)  # (B, m, H), (B, m)
    if rows.shape[1] == 0:
        return hidden.new_zeros(0, hidden.shape[-1])
    if pre:  # LayerNorm before the attention: on the queries' rows and on every key/value position
        ctx = attention_at_rows(att.self, att.output.LayerNorm(rows), att.output.LayerNorm(hidden), attention_mask)
    else:
        ctx = attention_at_rows(att.self, rows, hidden, attention_mask)
    a = att.output(ctx, rows)  # dense, dropout, + rows
    if not pre:
        a = att.output.LayerNorm(a)
    ff_in = layer.output.LayerNorm(a) if pre else a
    out = layer.output(layer.intermediate(ff_in), a, lang_ids)  # dense, dropout, + a, module
    if not pre:
        out = layer.output.LayerNorm(out)
    return out[valid]
