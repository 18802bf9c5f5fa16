"""The ViT encoder in `tvm.relax.frontend.nn` (the family, its config and checkpoint names: `vit`). The
compiler side only: `vit.build` imports it.
"""

from __future__ import annotations

import math
from typing import Any

from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op

from ..quant import kernels as packed
from .layers import F32, attention_scores, attention_values
from .vit import ViTConfig


def _gelu(x: Tensor, kind: str) -> Tensor:
    if kind == "gelu":
        return op.gelu(x)  # exact (erf)
    if kind == "quick_gelu":
        return x * op.sigmoid(x * 1.702)
    return op.gelu(x, approximate="tanh")


class EncoderBlock(nn.Module):
    def __init__(self, cfg: ViTConfig, dtype: str):
        width, eps = cfg.hidden_size, cfg.layer_norm_eps
        self.heads, self.act = cfg.num_attention_heads, cfg.hidden_act
        self.norm1 = nn.LayerNorm(width, eps, dtype=dtype)
        self.qkv = packed.linear(width, 3 * width, bias=cfg.qkv_bias, dtype=dtype)
        self.out = packed.linear(width, width, bias=True, dtype=dtype)
        self.norm2 = nn.LayerNorm(width, eps, dtype=dtype)
        self.fc1 = packed.linear(width, cfg.intermediate_size, bias=True, dtype=dtype)
        self.fc2 = packed.linear(cfg.intermediate_size, width, bias=True, dtype=dtype)

    def attention(self, x: Tensor) -> Tensor:
        """Multi-head self-attention over all tokens: x [b, t, width] -> [b, t, width].

        The images' heads are one axis of b*h heads, so the decoders' attention products (and their CPU
        schedule) serve: each (image, head) pair attends within its own image, unmasked."""
        b, t, width = x.shape
        h = self.heads
        d = width // h
        # qkv(x) [b, t, 3*width] -> [b, t, 3, h, d] (q, k, v, each head's d features contiguous, as HF's
        # fused split) -> [3, t, b, h, d] -> [3, t, b*h, d]
        qkv = op.permute_dims(op.reshape(self.qkv(x), (b, t, 3, h, d)), [2, 1, 0, 3, 4])
        qkv = op.reshape(qkv, (3, t, b * h, d))
        q, k, v = (op.squeeze(part, 0) for part in op.split(qkv, 3, axis=0))  # each [t, b*h, d]
        scores = attention_scores(q, None, k, None) * (1.0 / math.sqrt(d))  # [b*h, t, t] float32, no cache
        probs = op.softmax(scores, axis=-1).astype(x.dtype)
        out = op.reshape(attention_values(probs, None, v, None), (t, b, width))  # [t, b*h, d] -> [t, b, h*d]
        return self.out(op.permute_dims(out, [1, 0, 2]))  # [b, t, width], heads concatenated

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attention(self.norm1(x))
        return x + self.fc2(_gelu(self.fc1(self.norm2(x)), self.act))


class Embeddings(nn.Module):
    def __init__(self, cfg: ViTConfig, dtype: str):
        self.cfg = cfg
        p, width = cfg.patch_size, cfg.hidden_size
        # The patch convolution (kernel = stride = p) as a linear layer over each patch's c*p*p pixels:
        # weight [width, c, p, p] flattened to [width, c*p*p] (the loader merges the trailing axes).
        self.patch = nn.Linear(cfg.num_channels * p * p, width, bias=cfg.patch_bias, dtype=dtype)
        if cfg.use_cls_token:
            self.cls = nn.Parameter((width,), dtype)
        self.position = nn.Parameter((cfg.num_positions, width), dtype)

    def forward(self, pixels: Tensor) -> Tensor:
        """pixels [b, channels, size, size] -> tokens [b, (1 +) patches, width]."""
        cfg, b = self.cfg, pixels.shape[0]
        width, p, c = cfg.hidden_size, cfg.patch_size, cfg.num_channels
        grid = cfg.image_size // p
        # [b, c, grid*p, grid*p] -> [b, c, grid, p, grid, p] -> [b, grid, grid, c, p, p] -> [b, patches,
        # c*p*p]: patches row-major (as HF's flatten(2) of the conv output), pixels in the weight's order
        patches = op.permute_dims(op.reshape(pixels, (b, c, grid, p, grid, p)), [0, 2, 4, 1, 3, 5])
        tokens = self.patch(op.reshape(patches, (b, grid * grid, c * p * p)))  # [b, patches, width]
        if cfg.use_cls_token:
            cls = op.broadcast_to(op.reshape(self.cls, (1, 1, width)), (b, 1, width))  # [width] -> [b, 1, width]
            tokens = op.concat([cls, tokens], dim=1)  # [b, 1 + patches, width]
        # position [positions, width] -> [1, positions, width], broadcast over the batch
        return tokens + op.reshape(self.position, (1, cfg.num_positions, width))


class VisionTransformer(nn.Module):
    """Entry point `encode(pixel_values [b, channels, size, size]) -> last_hidden_state`."""

    def __init__(self, cfg: ViTConfig, dtype: str):
        self.cfg, self.dtype = cfg, dtype
        self.embeddings = Embeddings(cfg, dtype)
        if cfg.pre_layernorm:
            self.pre_norm = nn.LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, dtype=dtype)
        self.blocks = nn.ModuleList([EncoderBlock(cfg, dtype) for _ in range(cfg.num_hidden_layers)])
        if cfg.final_layernorm:
            self.final_norm = nn.LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, dtype=dtype)

    def encode(self, pixel_values: Tensor) -> Tensor:
        x = self.embeddings(pixel_values.astype(self.dtype))
        if self.cfg.pre_layernorm:
            x = self.pre_norm(x)
        for block in self.blocks:
            x = block(x)
        if self.cfg.final_layernorm:
            x = self.final_norm(x)
        return x.astype(F32)

    def export_spec(self) -> dict[str, Any]:
        c = self.cfg
        return {"encode": {"pixel_values": nn.spec.Tensor(["batch", c.num_channels, c.image_size,
                                                           c.image_size], F32),
                           "$": {"param_mode": "packed", "effect_mode": "none"}}}
