"""Which checkpoint tensors a quantization scheme stores packed (or 16-bit): one rule, used by the
checkpoint writer, the loader, the graph and the memory plan.

The weights of linear layers, embeddings and the LM head: 2-D HF tensors named `*.weight`, except
norms, the Qwen3-MoE router `*.mlp.gate.weight` (its softmax and top-k stay float32; tiny) and position
embeddings (CLIP's `position_embedding.weight`). The ViT patch convolution (4-D), class token and biases
are not 2-D `*.weight` tensors. Everything else stays float32.
"""

from __future__ import annotations


def is_quantized(hf_name: str, shape: tuple[int, ...]) -> bool:
    return (len(shape) == 2 and hf_name.endswith(".weight") and "norm" not in hf_name
            and not hf_name.endswith(".mlp.gate.weight") and "position_embedding" not in hf_name)
