"""MiniJoint's secondary MLM head (Marchisio et al., Findings of ACL 2023): an MLM head on the output
of the student's first k layers, trained with the primary loss, so that those layers and the head form
a mini-model aligned with the student; `mergedistill extend` learns a new language's embeddings on it.

The head has the shape of the student's own (dense, activation, LayerNorm, then the tied input
embeddings as the decoder, plus its own output bias) and starts as a copy of it. `LayerTap` keeps the
output of layer k from the student's ordinary forward pass, so the primary path runs exactly as
without the head. Saved beside the exported student as mini_head/{mini_head.safetensors, mini_head.json}.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from mergedistill.fsutil import write_json_atomic

FILE, META = "mini_head.safetensors", "mini_head.json"


class MiniHead(nn.Module):
    def __init__(self, hidden: int, vocab_size: int, layer: int, act: str = "gelu", eps: float = 1e-12):
        super().__init__()
        self.layer, self.act_name = layer, act
        self.dense = nn.Linear(hidden, hidden)
        self.act = ACT2FN[act]
        self.norm = nn.LayerNorm(hidden, eps=eps)
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def transform(self, hidden: torch.Tensor) -> torch.Tensor:
        """(N, H) -> (N, H): dense, activation, LayerNorm, as the student's head does before its decoder."""
        return self.norm(self.act(self.dense(hidden)))

    def forward(self, hidden: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        """(N, H) states of layer k -> (N, V) logits; `embeddings` (V, H) is the student's input
        embedding matrix (the decoder is tied to it, as the student's own)."""
        return F.linear(self.transform(hidden), embeddings, self.bias)

    @classmethod
    @torch.no_grad()
    def from_student(cls, student, layer: int) -> "MiniHead":
        """A head on layer `layer` that starts as a copy of the student's MLM head (BERT or X-Mod)."""
        from mergedistill.models.init import head_transform, output_bias

        parts = head_transform(student)
        if parts is None:
            raise ValueError(f"{type(student).__name__} has no BERT- or RoBERTa-style MLM head")
        cfg = student.config
        act = cfg.hidden_act if hasattr(student, "cls") else "gelu"  # X-Mod's / RoBERTa's head uses gelu
        head = cls(cfg.hidden_size, student.get_input_embeddings().weight.shape[0], layer, act, parts["norm"].eps)
        head.dense.load_state_dict(parts["dense"].state_dict())
        head.norm.load_state_dict(parts["norm"].state_dict())
        bias = output_bias(student)
        if bias is not None:
            head.bias.copy_(bias)
        return head.to(student.get_input_embeddings().weight.device)


class LayerTap:
    """Keeps the output (B, L, H) of the student's layer `layer` (its first `layer` layers) from each
    forward pass, without changing the pass. `take()` hands it over once."""

    def __init__(self, student, layer: int):
        layers = student.base_model.encoder.layer
        if not 1 <= layer < len(layers):
            raise ValueError(f"a tap after layer {layer} of {len(layers)}: the last layer's output is the student's own")
        self._out: torch.Tensor | None = None
        self._handle = layers[layer - 1].register_forward_hook(self._keep)

    def _keep(self, module, args, output) -> None:
        self._out = output[0] if isinstance(output, tuple) else output

    def take(self) -> torch.Tensor:
        out, self._out = self._out, None
        if out is None:
            raise RuntimeError("no forward pass went through the tapped layer since the last take()")
        return out

    def remove(self) -> None:
        self._handle.remove()


def save_mini_head(head: MiniHead, folder: Path) -> Path:
    """mini_head.safetensors (weights) and mini_head.json (layer, sizes, activation) in `folder`."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}, str(folder / FILE))
    write_json_atomic(folder / META, {"layer": head.layer, "hidden": head.dense.in_features, "vocab_size": head.bias.shape[0],
                                      "act": head.act_name, "eps": head.norm.eps})
    return folder


def load_mini_head(folder: Path) -> MiniHead:
    from safetensors.torch import load_file

    from mergedistill.fsutil import read_json

    meta = read_json(Path(folder) / META)
    head = MiniHead(meta["hidden"], meta["vocab_size"], meta["layer"], meta["act"], meta["eps"])
    head.load_state_dict(load_file(str(Path(folder) / FILE)))
    return head
