"""Tiny BERT masked LMs built in code for the compression tests (imported as `_tiny`)."""
from __future__ import annotations

import torch
from transformers import BertConfig, BertForMaskedLM

VOCAB = 60


def tiny_bert(seed: int = 0, hidden: int = 32, layers: int = 2, heads: int = 4, intermediate: int = 64) -> BertForMaskedLM:
    """A randomly initialised BertForMaskedLM (tied decoder, as the student), in eval mode. Biases and
    LayerNorms get random values too, so that zeroed units cannot hide behind zero-initialised biases."""
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                     intermediate_size=intermediate, max_position_embeddings=32, type_vocab_size=1, tie_word_embeddings=True)
    model = BertForMaskedLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def inputs(batch: int = 3, length: int = 12, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) with some padding at the end of the last row."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (batch, length), generator=g)
    att = torch.ones_like(ids)
    att[-1, length - 3:] = 0
    ids[-1, length - 3:] = 0
    return ids, att
