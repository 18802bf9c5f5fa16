"""The ViT encoder in `tvm.relax.frontend.nn` (the family, its config and checkpoint names: `vit`). The
compiler side only: `vit.build` imports it.
"""

from __future__ import annotations

import math
from typing import Any

from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op

from ..quant import kernels as packed
from .layers import F32
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
        """Multi-head self-attention over all tokens: x [b, t, width] -> [b, t, width]."""
        b, t, width = x.shape
        h = self.heads
        d = width // h
        # qkv(x) [b, t, 3*width] -> [b, t, 3, h, d] (q, k, v, each head's d features contiguous, as HF's
        # fused split) -> [3, b, h, t, d]
        qkv = op.permute_dims(op.reshape(self.qkv(x), (b, t, 3, h, d)), [2, 0, 3, 1, 4])
        q, k, v = (op.squeeze(part, 0) for part in op.split(qkv, 3, axis=0))  # each [b, h, t, d]
        # [b, h, t, d] @ [b, h, d, t] -> scores [b, h, t, t] in float32
        scores = op.matmul(q, op.permute_dims(k, [0, 1, 3, 2]), out_dtype=F32) * (1.0 / math.sqrt(d))
        probs = op.softmax(scores, axis=-1).astype(x.dtype)  # [b, h, t, t]
        out = op.permute_dims(op.matmul(probs, v), [0, 2, 1, 3])  # [b, h, t, d] -> [b, t, h, d]
        return self.out(op.reshape(out, (b, t, width)))  # heads concatenated: [b, t, h*d = width]

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attention(self.norm1(x))
        return x + self.fc2(_gelu(self.fc1(self.norm2(x)), self.act))


class Embeddings(nn.Module):
    def __init__(self, cfg: ViTConfig, dtype: str):
        self.cfg = cfg
        p, width = cfg.patch_size, cfg.hidden_size
        self.patch_weight = nn.Parameter((width, cfg.num_channels, p, p), dtype)
        if cfg.patch_bias:
            self.patch_bias = nn.Parameter((width,), dtype)
        if cfg.use_cls_token:
            self.cls = nn.Parameter((width,), dtype)
        self.position = nn.Parameter((cfg.num_positions, width), dtype)

    def forward(self, pixels: Tensor) -> Tensor:
        """pixels [b, channels, size, size] -> tokens [b, (1 +) patches, width]."""
        cfg, b = self.cfg, pixels.shape[0]
        width, grid = cfg.hidden_size, cfg.image_size // cfg.patch_size
        patches = op.conv2d(pixels, self.patch_weight, self.patch_bias if cfg.patch_bias else None,
                            stride=cfg.patch_size)  # [b, width, grid, grid]
        # [b, width, grid, grid] -> [b, width, patches] (row-major patches, as HF's flatten(2)) ->
        # [b, patches, width]
        tokens = op.permute_dims(op.reshape(patches, (b, width, grid * grid)), [0, 2, 1])
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
