"""The Qwen2 family: dense decoder (Qwen-72B, Qwen2-*) with optional per-layer sliding-window attention.

Config fields are Hugging Face's `Qwen2Config` names. The reference is `transformers.Qwen2ForCausalLM`.
Delta over the shared decoder: q/k/v biases (o_proj none), a dense SwiGLU MLP, and HF's per-layer
sliding-window derivation (`max_window_layers`, `layer_types`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ..errors import UserError
from . import decoder
from .decoder import DecoderConfig, Shapes

ATTENTION_KINDS = ("full_attention", "sliding_attention")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Qwen2Config(DecoderConfig):
    max_window_layers: int
    layer_types: list[str] | None = None

    WINDOW_FIELDS = ("use_sliding_window", "sliding_window", "max_window_layers", "layer_types")

    def check(self, where: str) -> None:
        super().check(where)
        if self.max_window_layers < 0:
            raise UserError(f"{where}: field 'max_window_layers' must be >= 0, got {self.max_window_layers}")
        if self.layer_types is not None:
            if len(self.layer_types) != self.num_hidden_layers:
                raise UserError(f"{where}: field 'layer_types' has {len(self.layer_types)} entries, "
                                f"num_hidden_layers is {self.num_hidden_layers}")
            bad = [t for t in self.layer_types if t not in ATTENTION_KINDS]
            if bad:
                raise UserError(f"{where}: field 'layer_types' has {bad[0]!r}; "
                                f"allowed: {', '.join(ATTENTION_KINDS)}")
        if self.use_sliding_window and self.sliding_window is None \
                and "sliding_attention" in (self.layer_types or ()):
            raise UserError(f"{where}: field 'sliding_window' must be set when layer_types has "
                            f"sliding_attention")

    def layer_windows(self) -> list[int | None]:
        """Derived exactly as HF derives it: without `use_sliding_window` every layer is full and
        `layer_types` is ignored; otherwise an explicit `layer_types` decides, else layers with index
        >= `max_window_layers` slide."""
        n = self.num_hidden_layers
        if not self.use_sliding_window or self.sliding_window is None:
            return [None] * n
        kinds = self.layer_types or [
            "sliding_attention" if i >= self.max_window_layers else "full_attention" for i in range(n)
        ]
        return [self.sliding_window if k == "sliding_attention" else None for k in kinds]


# HF's own defaults for the fields a Qwen2 config.json may omit.
HF_DEFAULTS: dict[str, Any] = {
    "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
    "tie_word_embeddings": False, "hidden_act": "silu", "use_sliding_window": False,
    "sliding_window": 4096, "max_window_layers": 28,
}


def config_from_hf(hf: dict[str, Any], where: str, directory=None) -> dict[str, Any]:
    return decoder.config_from_hf(Qwen2Config, hf, where, HF_DEFAULTS)


def build(cfg: Qwen2Config, dtype: str):
    """The Relax module (`decoder_graph.CausalLM`); TVM's compiler is imported only here."""
    from .decoder_graph import CausalLM, DecoderLayer, attention  # noqa: PLC0415
    from .layers import SwiGLU  # noqa: PLC0415

    layers = [DecoderLayer(cfg, attention(cfg, window, dtype, qkv_bias=True),
                           SwiGLU(cfg.hidden_size, cfg.intermediate_size, dtype), dtype)
              for window in cfg.layer_windows()]
    return CausalLM(cfg, layers, dtype)


def hf_tensors(cfg: Qwen2Config) -> Shapes:
    """Every tensor of an HF Qwen2 checkpoint (`save_pretrained` names) and its shape."""
    return decoder.decoder_hf_tensors(cfg, lambda i, p: {
        **decoder.attention_hf_tensors(cfg, f"{p}.self_attn", qkv_bias=True),
        **decoder.swiglu_hf_tensors(cfg.hidden_size, cfg.intermediate_size, f"{p}.mlp")})


def weight_map(cfg: Qwen2Config) -> dict[str, list[str]]:
    """Library parameter -> HF tensors concatenated along axis 0 (q/k/v and gate/up fused)."""
    return decoder.fused_weight_map(hf_tensors(cfg))


def config_to_hf(cfg: Qwen2Config) -> dict[str, Any]:
    """The config.json that `save_pretrained` would write for this model (transformers 5.x spelling)."""
    fields = {k: v for k, v in dataclasses.asdict(cfg).items() if v is not None and k != "rope_theta"}
    return {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", **fields,
            "rope_parameters": {"rope_theta": cfg.rope_theta, "rope_type": "default"}}


# Tensor-parallel plan (shown by `zoo show`; not applied yet): q/k/v/gate/up column-wise, o/down row-wise.
TENSOR_PARALLEL_PLAN: dict[str, str] = decoder.ATTENTION_TP_PLAN | decoder.DENSE_MLP_TP_PLAN
