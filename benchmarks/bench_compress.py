#!/usr/bin/env python3
"""Benchmark of the compression variants on CPU, side by side in one process (random weights: the cost
is what is measured; logit differences on random weights only bound the error).

1. Recovery-training step time with masks kept three ways: none (dense), re-zeroing after each
   optimizer step (callback.py's choice), torch.nn.utils.prune's weight_orig * mask reparametrisation.
2. Inference throughput (full masked-LM forward, batch x seq tokens, interleaved repeats, median) and
   max |logit - fp32 logit| for: fp32; 50% unstructured (dense kernels: same cost expected); structured
   (half the FFN neurons and one head in every layer with more than one); int8 (quantize.py: encoder +
   head + tied table); int8 without the table; int8 read back as a float model (dequantize=True); and, if
   torchao is importable, torchao's eager Int8WeightOnlyConfig / Int8DynamicActivationInt8WeightConfig on
   the same linear layers (with --pt2e also torchao's pt2e export + X86InductorQuantizer + torch.compile).

usage: python benchmarks/bench_compress.py [--size demo|base] [--threads 2] [--repeats 7] [--skip-training] [--pt2e]
  demo: 2 layers x 128 (2 heads, 512 FFN), vocabulary 32k: the demo student's shape
  base: 4 layers x 768 (12 heads, 3072 FFN), vocabulary 30,522: BERT-base width
"""
from __future__ import annotations

import argparse
import copy
import logging
import statistics
import sys
import tempfile
import time
import types
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SIZES = {"demo": dict(layers=2, hidden=128, heads=2, intermediate=512, vocab=32000),
         "base": dict(layers=4, hidden=768, heads=12, intermediate=3072, vocab=30522)}


def build(size: dict):
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=size["vocab"], hidden_size=size["hidden"], num_hidden_layers=size["layers"],
                     num_attention_heads=size["heads"], intermediate_size=size["intermediate"], max_position_embeddings=512,
                     type_vocab_size=1, tie_word_embeddings=True)
    return BertForMaskedLM(cfg).eval()


def train_steps(size: dict, steps: int, batch: int, seq: int, threads: int) -> None:
    from torch.nn.utils import prune as torch_prune

    from mergedistill.compress.magnitude import apply_masks, prunable_weights, prune_magnitude
    from mergedistill.models.mlm import masked_logits

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, size["vocab"], (batch, seq), generator=g)
    att = torch.ones_like(ids)
    sel = torch.rand(batch, seq, generator=g) < 0.15
    labels = ids[sel]
    setups = {}
    for kind in ("dense", "re-zero after step", "torch prune reparam"):
        m = build(size).train()
        masks = prune_magnitude(m, 0.5) if kind != "dense" else {}
        if kind == "torch prune reparam":
            for name, mask in masks.items():
                mod = m.get_submodule(name.rsplit(".", 1)[0])
                torch_prune.custom_from_mask(mod, "weight", mask)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
        setups[kind] = (m, opt, masks if kind == "re-zero after step" else None)
    times = {k: [] for k in setups}
    for step in range(steps + 2):
        for kind, (m, opt, masks) in setups.items():
            t = time.perf_counter()
            loss = torch.nn.functional.cross_entropy(masked_logits(m, ids, att, sel), labels)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if masks:
                apply_masks(m, masks)
            if step >= 2:
                times[kind].append(time.perf_counter() - t)
    print(f"\n1. training step, batch {batch} x {seq}, {threads} threads, median of {steps} interleaved steps")
    base = statistics.median(times["dense"])
    for kind, ts in times.items():
        m = setups[kind][0]
        ws = prunable_weights(m) if kind != "torch prune reparam" else {
            n: mod.weight for n, mod in m.named_modules() if hasattr(mod, "weight_mask")}
        zeros = sum(int((w == 0).sum()) for w in ws.values()) / sum(w.numel() for w in ws.values())
        print(f"   {kind:22s} {statistics.median(ts) * 1000:8.1f} ms/step  x{statistics.median(ts) / base:.2f} of dense  "
              f"(sparsity after {steps + 2} steps: {zeros:.3f})")


class _Logits(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


def pt2e_compiled(fp32, example):
    """torchao's x86 CPU path: export (dynamic batch and length), X86InductorQuantizer with dynamic
    int8 activations, convert, torch.compile with freezing. Prints the time it takes."""
    from torch._inductor import config as inductor_config
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    t = time.perf_counter()
    b, n = torch.export.Dim("batch", min=1, max=1024), torch.export.Dim("seq", min=2, max=512)
    with torch.no_grad():
        graph = torch.export.export(_Logits(copy.deepcopy(fp32)), example, dynamic_shapes=({0: b, 1: n}, {0: b, 1: n})).module()
        quantizer = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config(is_dynamic=True))
        prepared = prepare_pt2e(graph, quantizer)
        prepared(*example)
        inductor_config.freezing = True
        compiled = torch.compile(convert_pt2e(prepared), dynamic=True)
        compiled(*example)
    print(f"   (pt2e export + quantize + compile: {time.perf_counter() - t:.0f} s)")

    return _Compiled(compiled)


class _Compiled(torch.nn.Module):
    """A compiled graph behind the masked-LM call signature (its weights are frozen inside it)."""

    def __init__(self, fn):
        super().__init__()
        self._fn = [fn]  # not a submodule: exported graphs refuse .eval()

    def forward(self, input_ids, attention_mask):
        return types.SimpleNamespace(logits=self._fn[0](input_ids, attention_mask))


def inference(size: dict, batch: int, seq: int, repeats: int, threads: int, pt2e: bool = False) -> None:
    from mergedistill.compress.importance import Importance, choose_heads, choose_neurons
    from mergedistill.compress.magnitude import prune_magnitude
    from mergedistill.compress.measure import count_weights, throughput, weights_bytes
    from mergedistill.compress.quantize import load_quantized, quantize_int8, save_quantized
    from mergedistill.compress.structured import prune_heads, prune_neurons

    fp32 = build(size)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randint(5, size["vocab"], (batch, seq), generator=g), torch.ones(batch, seq, dtype=torch.long))]
    variants = {"fp32": fp32}
    sparse = copy.deepcopy(fp32)
    prune_magnitude(sparse, 0.5)
    variants["50% unstructured"] = sparse
    small = copy.deepcopy(fp32)  # structure only matters for speed: drop the lowest-norm units
    imp = Importance(heads=[torch.arange(size["heads"], dtype=torch.float)] * size["layers"],
                     neurons=[layer.intermediate.dense.weight.norm(dim=1) for layer in small.bert.encoder.layer],
                     layers=torch.ones(size["layers"]))
    prune_neurons(small, choose_neurons(imp, 0.5))
    if size["heads"] > 1:
        prune_heads(small, choose_heads(imp, 1.0 / size["heads"]))
    variants["structured (1/2 FFN, -1 head/layer)"] = small
    variants["int8 (encoder+head+table)"] = quantize_int8(copy.deepcopy(fp32))
    variants["int8 (no table)"] = quantize_int8(copy.deepcopy(fp32), tables=False)
    with tempfile.TemporaryDirectory() as tmp:
        fp32.save_pretrained(Path(tmp) / "fp32")
        save_quantized(variants["int8 (encoder+head+table)"], Path(tmp) / "int8")
        sizes_on_disk = {"fp32": weights_bytes(Path(tmp) / "fp32"), "int8": weights_bytes(Path(tmp) / "int8")}
        variants["int8 -> float (dequantize=True)"] = load_quantized(Path(tmp) / "int8", dequantize=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, quantize_

        from mergedistill.compress.layout import encoder_linears

        for name, config in (("torchao Int8WeightOnly", Int8WeightOnlyConfig()),
                             ("torchao Int8DynAct-Int8Weight", Int8DynamicActivationInt8WeightConfig())):
            m = copy.deepcopy(fp32)
            names = set(encoder_linears(m)) | {"cls.predictions.transform.dense"}
            quantize_(m, config, filter_fn=lambda mod, fqn, names=names: fqn in names)
            variants[name + " (encoder+head)"] = m
        if pt2e:
            variants["torchao pt2e x86 dynamic int8 + compile"] = pt2e_compiled(fp32, batches[0])
    except ImportError:
        print("\n(torchao is not installed: its rows are left out)")
    with torch.inference_mode():
        ref = fp32(input_ids=batches[0][0], attention_mask=batches[0][1]).logits
        err = {n: float((m(input_ids=batches[0][0], attention_mask=batches[0][1]).logits.float() - ref).abs().max())
               for n, m in variants.items()}
    res = throughput(variants, batches, repeats=repeats, warmup=1)
    print(f"\n2. inference, batch {batch} x {seq} tokens, {threads} threads, median of {repeats} interleaved repeats "
          f"(logits of fp32 up to {float(ref.abs().max()):.2f})")
    base, base_cpu = res["fp32"]["tokens_per_s"], res["fp32"]["tokens_per_cpu_s"]
    for n, r in res.items():
        print(f"   {n:44s} {r['tokens_per_s']:7.0f} tokens/s x{r['tokens_per_s'] / base:.2f}  "
              f"{r['tokens_per_cpu_s']:7.0f} tokens/CPU-s x{r['tokens_per_cpu_s'] / base_cpu:.2f}  max|dlogit| {err[n]:.4f}  "
              f"weights {f'{count_weights(variants[n]):,}' if count_weights(variants[n]) else '(frozen in the graph)'}")
    print(f"   weights on disk: fp32 {sizes_on_disk['fp32'] / 1e6:.1f} MB, int8 {sizes_on_disk['int8'] / 1e6:.1f} MB "
          f"(x{sizes_on_disk['int8'] / sizes_on_disk['fp32']:.2f})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=list(SIZES), default="demo")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--skip-training", action="store_true")
    ap.add_argument("--pt2e", action="store_true", help="also torchao's pt2e + torch.compile path (needs torchao and a C++ compiler)")
    args = ap.parse_args()
    logging.disable(logging.WARNING)
    torch.set_num_threads(args.threads)
    size = SIZES[args.size]
    print(f"bench_compress: {args.size} {size}, torch {torch.__version__}")
    if not args.skip_training:
        train_steps(size, args.steps, args.batch * 4 if args.size == "demo" else args.batch, args.seq, args.threads)
    inference(size, args.batch, args.seq, args.repeats, args.threads, args.pt2e)


if __name__ == "__main__":
    main()
