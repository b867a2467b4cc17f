"""8-bit weight quantization of a masked LM for CPU inference, and its save/load format.

Scheme: symmetric int8 per output channel (per row of a Linear's weight, per token row of an embedding
table): q = round(w / s) in [-127, 127], s = max|w_row| / 127; biases, LayerNorms and the position /
token-type tables stay float32. Quantized: the six linear maps of every encoder layer, the MLM head's
transform dense, and (with `tables=True`, the default) the decoder, which is tied to the word embeddings:
both then read one int8 table with one scale per token, so the largest matrix of a multilingual student
shrinks 4x once, not twice.

Why this and not a library. Measured on this project's CPU (AMD EPYC, AVX2, no AVX-512/VNNI; torch
2.13; 2 threads; batch 8 x 128; random weights; the cores were shared, so wall-clock ratios of equal
work varied by up to +-40% between runs at the demo size): `python benchmarks/bench_compress.py --size
base --skip-training --pt2e` (4 layers x 768, vocabulary 30,522; torchao 0.18.0 on PYTHONPATH), throughput
against fp32 and max |logit - fp32 logit| (fp32 logits up to 3.0):
    this module, int8 incl. the tied table       x0.83   0.047    weights on disk x0.26
    this module, without the table               x0.91   0.041
    torchao Int8WeightOnlyConfig (eager)         x0.78   0.040
    torchao Int8DynamicActivationInt8Weight      x0.11   0.071
    torchao pt2e + X86InductorQuantizer (dynamic) + torch.compile   x1.58   0.191   (64 s to compile)
- `torch.ao.quantization` (fbgemm dynamic int8, x1.75 in an exploratory run) is deprecated, and so are
  the quantized tensors (torch.quantize_per_channel) its kernels take: not a path to build on.
- torchao's wheel has no CPU kernels: its eager int8 configs run slower than fp32 here (torch._int_mm
  and aten._weight_int8pack_mm were 25-50x slower than an fp32 GEMM on AVX2 in a GEMM micro-benchmark).
- torchao's fast CPU path (pt2e export, X86InductorQuantizer, torch.compile: onednn int8 GEMMs) is the
  only one faster than fp32, at BERT-base width; at the demo student's size (2 x 128, where the
  vocabulary projection dominates) it was x0.89 and x1.11 in two runs. It needs a C++ toolchain, ~1 min
  of compilation per model on every load plus recompilation for new shape classes (a batch of 1 took
  28 s), its graphs cannot be saved as a model folder, and it moves logits 4x more than int8 weights
  (dynamic activation quantization). Installing torchao also makes `import transformers` print four
  CUDA-library warnings in every process. It was measured, not adopted.
So the variant is int8 weights in this small, dependency-free format: 4x smaller on disk and in memory
for the quantized matrices, eagerly runnable anywhere (about fp32 speed or a little below: each call
widens the weight), and `load_quantized(path, dequantize=True)` gives a plain float model holding
exactly the int8-rounded weights, to be used by any code (or compiled) at fp32 speed.

Folder (`save_quantized`): config.json (the model's config), model.int8.safetensors (int8 tables,
scales, float rest; tied tensors once), quantization.json (scheme, quantized modules, ties). The weights
file is deliberately not called model.safetensors: `from_pretrained` on this folder then fails loudly
instead of initialising the missing float weights at random. Load with `load_quantized(path)`.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForMaskedLM

from mergedistill.compress.layout import decoder, encoder_linears, head_transform_dense
from mergedistill.compress.structured import PrunedBertForMaskedLM, needs_pruned_class
from mergedistill.errors import UserError

FORMAT = "mergedistill-int8-weight-only"
VERSION = 1
WEIGHTS = "model.int8.safetensors"
META = "quantization.json"


@torch.no_grad()
def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row. w: (R, C) float -> q (R, C) int8, s (R,) float32 with w ~ q * s[:, None].
    An all-zero row gets scale 1 (q = 0), so pruned rows stay exact zeros."""
    w = w.detach().float()
    amax = w.abs().amax(dim=1)
    s = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.round(w / s[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, s


class Int8Linear(nn.Module):
    """y = x @ (q * s)^T + b with int8 q (out, in) and float32 scales s (out,). The weight is widened
    and scaled for each call (out x in multiplications, against rows x out x in for the matmul), then
    one fused matmul + bias runs. Scaling the output instead costs two more passes over it, which for
    the vocabulary projection (rows x 32k) is large: x0.63 of fp32 speed against x0.78 this way, in two
    consecutive runs at the demo size (shared cores: noisy)."""

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, bias: nn.Parameter | None):
        super().__init__()
        self.in_features, self.out_features = qweight.shape[1], qweight.shape[0]
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)
        self.bias = bias

    @classmethod
    def from_linear(cls, lin: nn.Linear) -> "Int8Linear":
        q, s = quantize_rows(lin.weight)
        return cls(q, s, lin.bias)

    def dequantized(self) -> torch.Tensor:
        return self.qweight.float() * self.scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.qweight.to(x.dtype) * self.scale.to(x.dtype)[:, None]  # (out, in)
        return F.linear(x, w, self.bias.to(x.dtype) if self.bias is not None else None)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-row"


class Int8Embedding(nn.Module):
    """Embedding lookup from an int8 table (V, H) with one float32 scale per row."""

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, padding_idx: int | None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = qweight.shape
        self.padding_idx = padding_idx
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)

    @classmethod
    def from_embedding(cls, emb: nn.Embedding) -> "Int8Embedding":
        q, s = quantize_rows(emb.weight)
        return cls(q, s, emb.padding_idx)

    def dequantized(self) -> torch.Tensor:
        return self.qweight.float() * self.scale[:, None]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.qweight[ids].float() * self.scale[ids].unsqueeze(-1)


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _targets(model: nn.Module, tables: bool) -> tuple[dict[str, nn.Linear], str | None, str | None]:
    """(linears to quantize, decoder name or None, its tied word-embedding name or None)."""
    lins = dict(encoder_linears(model))
    head = head_transform_dense(model)
    if head is not None:
        lins[head[0]] = head[1]
    dec_name = emb_name = None
    if tables:
        dec = decoder(model)
        if dec is not None:
            dec_name = dec[0]
            emb = model.get_input_embeddings()
            if emb is not None and emb.weight is dec[1].weight:
                emb_name = next(n for n, m in model.named_modules() if m is emb)
            else:
                lins[dec_name] = dec[1]
                dec_name = None
    return lins, dec_name, emb_name


@torch.no_grad()
def quantize_int8(model: nn.Module, tables: bool = True) -> nn.Module:
    """Replace the linear layers of `model` (in place; see the module docstring) by Int8Linear, and with
    `tables` the (tied) decoder and word embeddings by one int8 table. Returns the model, in eval mode."""
    if any(isinstance(m, (Int8Linear, Int8Embedding)) for m in model.modules()):
        raise UserError("quantize_int8: the model is already quantized")
    lins, dec_name, emb_name = _targets(model, tables)
    for name, lin in lins.items():
        _set(model, name, Int8Linear.from_linear(lin))
    if emb_name is not None:
        emb = Int8Embedding.from_embedding(model.get_submodule(emb_name))
        dec = model.get_submodule(dec_name)
        _set(model, emb_name, emb)
        _set(model, dec_name, Int8Linear(emb.qweight, emb.scale, dec.bias))  # the same tensors: one table
    return model.eval()


def _quantized_modules(model: nn.Module) -> dict[str, str]:
    return {n: ("linear" if isinstance(m, Int8Linear) else "embedding") for n, m in model.named_modules()
            if isinstance(m, (Int8Linear, Int8Embedding))}


def save_quantized(model: nn.Module, path: str | Path) -> Path:
    """Write a quantized model as a folder (config.json, model.int8.safetensors, quantization.json)."""
    from safetensors.torch import save_file

    modules = _quantized_modules(model)
    if not modules:
        raise UserError("save_quantized: the model has no int8 modules; call quantize_int8 first")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors, aliases, seen = {}, {}, {}
    for name, t in model.state_dict(keep_vars=True).items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if key in seen:
            aliases[name] = seen[key]  # tied: stored once
        else:
            seen[key] = name
            tensors[name] = t.detach().contiguous()
    save_file(tensors, str(path / WEIGHTS), metadata={"format": FORMAT})
    model.config.save_pretrained(str(path))
    meta = {"format": FORMAT, "version": VERSION, "scheme": "symmetric int8 per output row, scale = max|w_row| / 127",
            "modules": modules, "aliases": aliases, "load": "mergedistill.compress.quantize.load_quantized(path)"}
    (path / META).write_text(json.dumps(meta, indent=2) + "\n")
    return path


def _skeleton(config) -> nn.Module:
    if needs_pruned_class(config):
        return PrunedBertForMaskedLM(config)
    return AutoModelForMaskedLM.from_config(config)


def _empty_like(module: nn.Module, kind: str) -> nn.Module:
    if kind == "embedding":
        w = module.weight
        return Int8Embedding(torch.empty(w.shape, dtype=torch.int8), torch.empty(w.shape[0]), module.padding_idx)
    w = module.weight
    return Int8Linear(torch.empty(w.shape, dtype=torch.int8), torch.empty(w.shape[0]), module.bias)


def _retie(model: nn.Module, alias: str, original: str) -> None:
    """Make state-dict entry `alias` the very tensor `original` is (as it was when saved)."""
    mod_a, _, attr_a = alias.rpartition(".")
    mod_o, _, attr_o = original.rpartition(".")
    owner, src = model.get_submodule(mod_a), model.get_submodule(mod_o)
    t = src._parameters.get(attr_o) if attr_o in src._parameters else src._buffers[attr_o]
    if attr_a in owner._parameters:
        owner._parameters[attr_a] = t
    else:
        owner._buffers[attr_a] = t


def load_quantized(path: str | Path, dequantize: bool = False) -> nn.Module:
    """Load a folder written by save_quantized: the int8 model (eval mode), or with `dequantize` a plain
    float model of the standard class whose weights are exactly the int8 values times their scales."""
    from safetensors.torch import load_file

    path = Path(path)
    meta_file = path / META
    if not meta_file.is_file():
        raise UserError(f"{path}: no {META}; not a quantized variant (load a float model with from_pretrained)")
    meta = json.loads(meta_file.read_text())
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise UserError(f"{path}: {META} describes {meta.get('format')} v{meta.get('version')}; this version reads "
                        f"{FORMAT} v{VERSION}")
    model = _skeleton(AutoConfig.from_pretrained(path))
    for name, kind in meta["modules"].items():
        _set(model, name, _empty_like(model.get_submodule(name), kind))
    for alias, original in meta["aliases"].items():
        _retie(model, alias, original)
    state = load_file(str(path / WEIGHTS))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in meta["aliases"]]
    if missing or unexpected:
        raise UserError(f"{path}: {WEIGHTS} does not match its config ({(missing or unexpected)[:3]})")
    model.eval()
    return dequantize_model(model) if dequantize else model


@torch.no_grad()
def dequantize_model(model: nn.Module) -> nn.Module:
    """Replace int8 modules by float nn.Linear / nn.Embedding holding q * s (in place; ties kept)."""
    tables: dict[int, nn.Parameter] = {}
    for name, kind in _quantized_modules(model).items():
        m = model.get_submodule(name)
        key = m.qweight.untyped_storage().data_ptr()
        if key not in tables:
            tables[key] = nn.Parameter(m.dequantized())
        if kind == "embedding":
            new = nn.Embedding(m.num_embeddings, m.embedding_dim, padding_idx=m.padding_idx)
        else:
            new = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
            if m.bias is not None:
                new.bias = m.bias
        new.weight = tables[key]
        _set(model, name, new)
    return model.eval()
