"""Which HF tensors a scheme stores quantized (or 16-bit): one rule, used by the checkpoint writer, the
loader, the graph and the memory plan.

The weights of linear layers, embeddings and the LM head: 2-D tensors named `*.weight`. Not norms or
biases (1-D), not the Qwen3-MoE router `*.mlp.gate.weight` (its softmax and top-k stay float32, and it
is tiny), not the ViT's patch convolution (4-D), class token or position embeddings (CLIP names its
position table `embeddings.position_embedding.weight`, 2-D: excluded by name). Everything else stays
float32 in a quantized checkpoint.
"""

from __future__ import annotations

ROUTER_SUFFIX = ".mlp.gate.weight"
POSITION_TABLE = "position_embedding"  # CLIP's "position_embedding.weight", ViT's "position_embeddings"


def is_quantized(hf_name: str, shape: tuple[int, ...]) -> bool:
    """Whether the HF tensor `hf_name` of `shape` is stored under the scheme (packed or 16-bit)."""
    return (len(shape) == 2 and hf_name.endswith(".weight") and not hf_name.endswith(ROUTER_SUFFIX)
            and POSITION_TABLE not in hf_name)
