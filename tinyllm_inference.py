"""Using a trained tinyllm model beyond plain sampling: int8 weights, and text streamed as it is
generated, with stop strings.

tinyllm.py names `quantize_int8` in its QUANTIZATIONS registry, so a checkpoint saved with int8
weights loads through `tinyllm.load_checkpoint` and imports this module only then.
"""
from __future__ import annotations

from typing import Any, Iterator, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

import tinyllm


class Int8Linear(nn.Module):
    """A linear layer stored as int8 weights with one float scale per output channel.

    Weight-only quantization: each weight row is scaled so its largest magnitude becomes 127 and
    rounded; activations stay in floating point, and the weights are expanded back as they are used.
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scales", torch.ones(out_features))

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        weight = linear.weight.detach().float()
        scales = weight.abs().amax(dim=1).clamp(min=1e-12) / 127
        quantized = cls(linear.in_features, linear.out_features).to(weight.device)
        quantized.weight.copy_(torch.round(weight / scales[:, None]).to(torch.int8))
        quantized.scales.copy_(scales)
        return quantized

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype)) * self.scales.to(x.dtype)


def quantize_int8(model: tinyllm.TransformerModel) -> tinyllm.TransformerModel:
    """Replace every nn.Linear of `model` by an Int8Linear, in place: about 4x smaller weights.
    Embeddings and norm gains stay in float; they are a small share of the weights."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, name, Int8Linear.from_linear(child))
    model.quantization = "int8"
    return model


def stream_text(model: tinyllm.TransformerModel, tokenizer: tinyllm.Tokenizer, prompt: str, length: int, *,
                stop: Sequence[str] = (), lowercase: bool = True, normalize_whitespace: bool = True,
                seed: Optional[int] = None, **sampling: Any) -> Iterator[str]:
    """Yield the continuation of `prompt` piece by piece as it is generated, for up to `length` tokens.

    The prompt gets the training text's preprocessing (see `tinyllm.sample_text`). Generation ends
    before the first `stop` string, which is not yielded, so text that might begin one is held
    back; so are the bytes of a character not yet complete. `sampling`: see `tinyllm.generate_tokens`.
    """
    device = next(model.parameters()).device
    prompt = tinyllm.prepare_text(prompt, lowercase, normalize_whitespace)
    idx = tinyllm.encode_prompt(tokenizer, prompt, device)
    generator = torch.Generator(device).manual_seed(seed) if seed is not None else None
    stop = [s for s in stop if s]
    pending, held = [], ""  # tokens not yet whole characters; text that may start a stop string
    for next_id in tinyllm.generate_tokens(model, idx, length, generator=generator, **sampling):
        pending.append(int(next_id))
        piece = tokenizer.decode(pending)
        if piece.endswith("\ufffd") and len(pending) < 4:  # a UTF-8 character still incomplete
            continue
        held, pending = held + piece, []
        hits = [held.find(s) for s in stop if s in held]
        if hits:
            yield held[:min(hits)]
            return
        keep = max((n for s in stop for n in range(1, len(s)) if held.endswith(s[:n])), default=0)
        if len(held) > keep:
            yield held[:len(held) - keep]
            held = held[len(held) - keep:]
    if held or pending:
        yield held + tokenizer.decode(pending)
