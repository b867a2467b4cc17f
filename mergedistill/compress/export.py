"""A variant's folder under runs/<run>/compress/: written atomically, loaded by one function.

    config.json + model.safetensors   a standard HF masked LM (pruned weights are exact zeros in `weight`;
                                      structured variants have smaller shapes in their config), or
    config.json + model.int8.safetensors + quantization.json   the int8 format (quantize.py)
    tokenizers/, languages.json       the student's, unchanged (a variant reads text as the student does)
    mergedistill.json                 the student's record + `compress`: the variant, what it depends on
                                      (a rerun keeps a folder whose inputs are unchanged), how to load it
    README.md                         what the variant is and how to load it

How each kind loads: `AutoModelForMaskedLM.from_pretrained(folder)` for unstructured, feed-forward, layer
and smaller-student variants; `structured.load_pruned(folder)` for head-pruned ones (a standard config
has one head count for all layers); `quantize.load_quantized(folder)` for int8. `load_variant` picks.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from torch import nn

from mergedistill.compress.magnitude import make_permanent
from mergedistill.compress.quantize import META as QUANT_META
from mergedistill.compress.quantize import load_quantized, save_quantized
from mergedistill.compress.structured import load_pruned, needs_pruned_class
from mergedistill.compress.variants import Variant
from mergedistill.eval.models import Export
from mergedistill.fsutil import atomic_dir, library_write_errors, read_json_or_none

RECORD = "mergedistill.json"

LOADERS = {
    "from_pretrained": ("from transformers import AutoModelForMaskedLM", "AutoModelForMaskedLM.from_pretrained(path)"),
    "load_pruned": ("from mergedistill.compress.structured import load_pruned", "load_pruned(path)"),
    "load_quantized": ("from mergedistill.compress.quantize import load_quantized",
                       "load_quantized(path)  # int8; load_quantized(path, dequantize=True): a float model"),
}


def loader_of(model: nn.Module, quantized: bool) -> str:
    if quantized:
        return "load_quantized"
    return "load_pruned" if needs_pruned_class(model.config) else "from_pretrained"


def write_variant(folder: Path, model: nn.Module, student: Export, variant: Variant, inputs: dict, quantized: bool = False,
                  extra: dict | None = None) -> Path:
    """Write `model` as variant folder `folder` (replacing any earlier one only once complete)."""
    loader = loader_of(model, quantized)
    with atomic_dir(folder) as tmp:
        with library_write_errors(tmp / "model.safetensors"):
            if quantized:
                save_quantized(model, tmp)
            else:
                make_permanent(model).save_pretrained(str(tmp), safe_serialization=True)
        shutil.copytree(student.folder / "tokenizers", tmp / "tokenizers")
        shutil.copy2(student.folder / "languages.json", tmp / "languages.json")
        record = {**student.meta, "compress": {"variant": variant.name, "description": variant.describe(), "loader": loader,
                                               "inputs": inputs, **(extra or {})}}
        (tmp / RECORD).write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        (tmp / "README.md").write_text(card(variant, loader, student), encoding="utf-8")
    return folder


def card(variant: Variant, loader: str, student: Export) -> str:
    imp, call = LOADERS[loader]
    first = next(iter(student.languages), None)
    tok = f"tokenizer = AutoTokenizer.from_pretrained(f\"{{path}}/{student.languages[first]}\")  # language '{first}'" if first else ""
    return "\n".join([
        f"# {variant.name}: a compressed variant of `{student.folder}`",
        "",
        f"{variant.describe()[0].upper()}{variant.describe()[1:]}. Written by `mergedistill compress`; its per-language "
        "evaluation is in the compress report beside this folder.",
        "",
        "```python",
        imp,
        "from transformers import AutoTokenizer",
        "",
        "path = \"PATH_TO_THIS_FOLDER\"",
        f"model = {call}",
        tok,
        "```",
        "",
        "Text must be tokenized with the tokenizer of the teacher that served its language (`languages.json`).",
        "",
    ])


def load_variant(folder: str | Path) -> nn.Module:
    """Any variant folder (or the uncompressed student's export), in eval mode on the CPU."""
    folder = Path(folder)
    if (folder / QUANT_META).is_file():
        return load_quantized(folder)
    return load_pruned(str(folder)).eval()


def recorded_inputs(folder: Path) -> dict | None:
    """The inputs a complete variant folder was built from (None: missing or incomplete)."""
    if not (folder / "config.json").is_file():
        return None
    record = read_json_or_none(folder / RECORD)
    return (record or {}).get("compress", {}).get("inputs")


class VariantExport(Export):
    """A variant folder as evaluate's `Export` (same tokenizers and languages), loaded with `load_variant`."""

    def model(self):
        if self._model is None:
            self._model = load_variant(self.folder).to(self.device)
        return self._model
