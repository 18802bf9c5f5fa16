"""The ViT family: the image encoder of Qwen-VL (OpenCLIP ViT-bigG/14) and plain ViTs (ViT-B/16).

Patch embedding as a strided convolution -> [cls] token prepended -> learned absolute position
embeddings -> (optional pre-LayerNorm, CLIP) -> pre-norm blocks (LayerNorm -> MHA -> residual ->
LayerNorm -> GELU MLP -> residual) -> (optional final LayerNorm). Output: `last_hidden_state` as HF
defines it, [batch, 1 + patches, width]. The batch is symbolic.

Differences between HF ViTModel and CLIPVisionModel are fields, not code paths: `weight_layout` only
names the checkpoint tensors; `patch_bias`, `pre_layernorm`, `final_layernorm` (CLIP applies its
post_layernorm to the pooled [cls] output only, not to last_hidden_state), `hidden_act`, `qkv_bias`.
Preprocessing fields follow HF's image processors (ViTImageProcessor, CLIPImageProcessor).

No TVM here (the runtime reads the config and the weight map without the compiler): the encoder in Relax
is `vit_graph`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..spec.schema import positive, read_json_object
from .decoder import Shapes, parameter_count

GELUS = ("gelu", "gelu_pytorch_tanh", "gelu_new", "quick_gelu")  # exact, tanh, tanh, x*sigmoid(1.702x)
RESAMPLES = ("bilinear", "bicubic")
LAYOUTS = ("vit", "clip")
IMAGENET_STANDARD = [0.5, 0.5, 0.5]
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]


@dataclasses.dataclass(frozen=True, kw_only=True)
class ViTConfig:
    weight_layout: str  # checkpoint tensor names: "vit" (HF ViTModel) or "clip" (HF CLIPVisionModel)
    image_size: int = positive()
    patch_size: int = positive()
    num_channels: int = positive()
    hidden_size: int = positive()
    num_hidden_layers: int = positive()
    num_attention_heads: int = positive()
    intermediate_size: int = positive()
    hidden_act: str
    layer_norm_eps: float = positive()
    qkv_bias: bool
    patch_bias: bool
    use_cls_token: bool
    pre_layernorm: bool
    final_layernorm: bool
    # Preprocessing, as HF's image processors do it (qcompile.vision): convert to RGB (compositing
    # transparency onto white when `convert_rgb`, CLIP's do_convert_rgb) -> resize ("exact" to
    # resize_size square, "shortest_edge" to resize_size, or "none") -> center crop to image_size
    # (zero-padding a smaller image) -> rescale by rescale_factor -> normalise (if image_mean is set).
    convert_rgb: bool
    resize: str
    resample: str
    center_crop: bool
    image_mean: list[float] | None
    image_std: list[float] | None
    resize_size: int | None = positive(None)  # None: image_size
    rescale_factor: float | None = positive(1 / 255)  # None: no rescale

    # Preprocessing fields: they decide the runtime's input pipeline, not the compiled code or the
    # checkpoint's tensors (so a checkpoint is not refused over them; the library's settings win).
    PREPROCESSING_FIELDS = ("convert_rgb", "resize", "resample", "center_crop", "image_mean", "image_std",
                            "resize_size", "rescale_factor")

    def check(self, where: str) -> None:
        if self.image_size % self.patch_size:
            raise UserError(f"{where}: field 'image_size' ({self.image_size}) must be a multiple of "
                            f"patch_size ({self.patch_size})")
        if self.hidden_size % self.num_attention_heads:
            raise UserError(f"{where}: field 'hidden_size' ({self.hidden_size}) must be a multiple of "
                            f"num_attention_heads ({self.num_attention_heads})")
        for field, value, allowed in (("hidden_act", self.hidden_act, GELUS),
                                      ("resample", self.resample, RESAMPLES),
                                      ("weight_layout", self.weight_layout, LAYOUTS),
                                      ("resize", self.resize, ("exact", "shortest_edge", "none"))):
            if value not in allowed:
                raise UserError(f"{where}: field '{field}' must be one of {', '.join(allowed)}, got {value!r}")
        if (self.image_mean is None) != (self.image_std is None):
            raise UserError(f"{where}: fields 'image_mean' and 'image_std' go together (both or neither)")
        for field in ("image_mean", "image_std"):
            values = getattr(self, field)
            if values is not None and len(values) != self.num_channels:
                raise UserError(f"{where}: field '{field}' has {len(values)} values, num_channels is "
                                f"{self.num_channels}")
        if any(v <= 0 for v in self.image_std or ()):
            raise UserError(f"{where}: field 'image_std' must be positive")
        if self.weight_layout == "clip" and not (self.qkv_bias and not self.patch_bias):
            raise UserError(f"{where}: weight_layout 'clip' has q/k/v biases and no patch bias "
                            f"(qkv_bias: true, patch_bias: false)")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_positions(self) -> int:
        return self.num_patches + int(self.use_cls_token)

    def canonical(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --- HF config.json ---------------------------------------------------------------------------------

# Per HF model type: its config defaults (HF's) and the fixed traits of its architecture.
HF_MODEL_TYPES: dict[str, dict[str, Any]] = {
    "vit": dict(weight_layout="vit", image_size=224, patch_size=16, num_channels=3, hidden_size=768,
                num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, hidden_act="gelu",
                layer_norm_eps=1e-12, qkv_bias=True, patch_bias=True, use_cls_token=True,
                pre_layernorm=False, final_layernorm=True, convert_rgb=False, resize="exact",
                resample="bilinear", center_crop=False, image_mean=IMAGENET_STANDARD,
                image_std=IMAGENET_STANDARD),
    "clip_vision_model": dict(weight_layout="clip", image_size=224, patch_size=32, num_channels=3,
                              hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                              intermediate_size=3072, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                              qkv_bias=True, patch_bias=False, use_cls_token=True, pre_layernorm=True,
                              final_layernorm=False, convert_rgb=True, resize="shortest_edge",
                              resample="bicubic", center_crop=True, image_mean=CLIP_MEAN,
                              image_std=CLIP_STD),
}
ARCHITECTURE_FIELDS = ("weight_layout", "patch_bias", "use_cls_token", "pre_layernorm", "final_layernorm")
PREPROCESSOR_FILE = "preprocessor_config.json"  # parsed and written by qcompile.run.vision


def config_from_hf(hf: dict[str, Any], where: str, directory: Path | None = None) -> dict:
    """config.json (+ preprocessor_config.json, when the checkpoint has one) -> ViTConfig fields."""
    values = dict(HF_MODEL_TYPES[hf["model_type"]])
    names = {f.name for f in dataclasses.fields(ViTConfig)} - set(ARCHITECTURE_FIELDS) \
        - set(ViTConfig.PREPROCESSING_FIELDS)
    values |= {k: v for k, v in hf.items() if k in names}
    path = directory / PREPROCESSOR_FILE if directory else None
    if path is not None and path.is_file():
        from ..run.vision import preprocessing_from_hf  # noqa: PLC0415 (the preprocessing's own module)

        values |= preprocessing_from_hf(read_json_object(path, missing=""), values, str(path))
    return values


def checkpoint_files(cfg: ViTConfig) -> dict[str, dict[str, Any]]:
    """The JSON files beside config.json that init-weights writes: the image processor's settings."""
    from ..run.vision import preprocessor_to_hf  # noqa: PLC0415

    return {PREPROCESSOR_FILE: preprocessor_to_hf(cfg)}


def config_to_hf(cfg: ViTConfig) -> dict[str, Any]:
    """config.json for the HF model type of this config's weight layout."""
    model_type = {"vit": "vit", "clip": "clip_vision_model"}[cfg.weight_layout]
    architecture = {"vit": "ViTModel", "clip": "CLIPVisionModel"}[cfg.weight_layout]
    fields = {k: getattr(cfg, k) for k in ("image_size", "patch_size", "num_channels", "hidden_size",
                                           "num_hidden_layers", "num_attention_heads",
                                           "intermediate_size", "hidden_act", "layer_norm_eps")}
    if cfg.weight_layout == "vit":
        fields["qkv_bias"] = cfg.qkv_bias
    return {"architectures": [architecture], "model_type": model_type, **fields}


def build(cfg: ViTConfig, dtype: str):
    """The Relax module (`vit_graph.VisionTransformer`); TVM's compiler is imported only here."""
    from .vit_graph import VisionTransformer  # noqa: PLC0415

    return VisionTransformer(cfg, dtype)


# --- checkpoint names -------------------------------------------------------------------------------

def weight_map(cfg: ViTConfig) -> dict[str, list[str]]:
    """Library parameter -> HF tensor name(s) for the config's weight layout (q/k/v fuse into qkv).
    CLIP names are transformers 5.x's; 4.x's "vision_model." prefix is stripped on load."""
    clip = cfg.weight_layout == "clip"
    m: dict[str, list[str]] = {
        "embeddings.patch.weight": ["embeddings.patch_embedding.weight" if clip
                                    else "embeddings.patch_embeddings.projection.weight"],
        "embeddings.position": ["embeddings.position_embedding.weight" if clip
                                else "embeddings.position_embeddings"]}
    if cfg.patch_bias:
        m["embeddings.patch.bias"] = ["embeddings.patch_embeddings.projection.bias"]
    if cfg.use_cls_token:
        m["embeddings.cls"] = ["embeddings.class_embedding" if clip else "embeddings.cls_token"]
    norms = {"pre_norm": (cfg.pre_layernorm, "pre_layrnorm"),
             "final_norm": (cfg.final_layernorm, "post_layernorm" if clip else "layernorm")}
    for ours, (present, theirs) in norms.items():
        if present:
            m |= {f"{ours}.{k}": [f"{theirs}.{k}"] for k in ("weight", "bias")}
    for i in range(cfg.num_hidden_layers):
        if clip:
            p = f"encoder.layers.{i}"
            parts = {"norm1": f"{p}.layer_norm1", "out": f"{p}.self_attn.out_proj", "norm2": f"{p}.layer_norm2",
                     "fc1": f"{p}.mlp.fc1", "fc2": f"{p}.mlp.fc2"}
            qkv = [f"{p}.self_attn.{x}_proj" for x in "qkv"]
        else:
            p = f"encoder.layer.{i}"
            parts = {"norm1": f"{p}.layernorm_before", "out": f"{p}.attention.output.dense",
                     "norm2": f"{p}.layernorm_after", "fc1": f"{p}.intermediate.dense",
                     "fc2": f"{p}.output.dense"}
            qkv = [f"{p}.attention.attention.{x}" for x in ("query", "key", "value")]
        for ours, theirs in parts.items():
            m |= {f"blocks.{i}.{ours}.{k}": [f"{theirs}.{k}"] for k in ("weight", "bias")}
        m[f"blocks.{i}.qkv.weight"] = [f"{x}.weight" for x in qkv]
        if cfg.qkv_bias:
            m[f"blocks.{i}.qkv.bias"] = [f"{x}.bias" for x in qkv]
    return m


def _library_shapes(cfg: ViTConfig) -> Shapes:
    """Shape of every library parameter a block or the embeddings may have, as HF stores it (the patch
    weight is the convolution's [width, c, p, p]; the library reads it flattened to [width, c*p*p])."""
    width, ffn, p = cfg.hidden_size, cfg.intermediate_size, cfg.patch_size
    shapes: Shapes = {"embeddings.patch.weight": (width, cfg.num_channels, p, p), "embeddings.patch.bias": (width,),
                      "embeddings.cls": (width,), "embeddings.position": (cfg.num_positions, width)}
    shapes |= {f"{norm}.{k}": (width,) for norm in ("pre_norm", "final_norm") for k in ("weight", "bias")}
    for i in range(cfg.num_hidden_layers):
        b = f"blocks.{i}"
        shapes |= {f"{b}.norm1.weight": (width,), f"{b}.norm1.bias": (width,), f"{b}.norm2.weight": (width,),
                   f"{b}.norm2.bias": (width,), f"{b}.qkv.weight": (3 * width, width), f"{b}.qkv.bias": (3 * width,),
                   f"{b}.out.weight": (width, width), f"{b}.out.bias": (width,), f"{b}.fc1.weight": (ffn, width),
                   f"{b}.fc1.bias": (ffn,), f"{b}.fc2.weight": (width, ffn), f"{b}.fc2.bias": (width,)}
    return shapes


def hf_tensors(cfg: ViTConfig) -> Shapes:
    """Every tensor the HF model of this layout has (CLIP's post_layernorm, which only pools, and
    ViTModel's pooler included: a checkpoint may carry them; the encoder does not read them)."""
    width, library = cfg.hidden_size, _library_shapes(cfg)
    shapes: Shapes = {}
    for name, hf_names in weight_map(cfg).items():
        rows, *rest = library[name]
        for hf_name in hf_names:  # a fused parameter splits evenly along axis 0
            shapes[hf_name] = (rows // len(hf_names), *rest)
    if cfg.weight_layout == "vit":  # ViTModel keeps a leading batch axis on these two
        if cfg.use_cls_token:
            shapes["embeddings.cls_token"] = (1, 1, width)
        shapes["embeddings.position_embeddings"] = (1, cfg.num_positions, width)
        extra = {"pooler.dense.weight": (width, width), "pooler.dense.bias": (width,)}
    else:
        extra = {"post_layernorm.weight": (width,), "post_layernorm.bias": (width,)}
    return shapes | {k: v for k, v in extra.items() if k not in shapes}


def parameters_used(cfg: ViTConfig) -> int:
    """Parameters the encoder computes with (unread pooling tensors excluded)."""
    used = {n for names in weight_map(cfg).values() for n in names}
    return parameter_count({k: v for k, v in hf_tensors(cfg).items() if k in used})


# Checkpoint name prefixes read as if absent: transformers 4.x saved CLIPVisionModel under vision_model.
CHECKPOINT_PREFIXES = ("vision_model.",)

# Tensor-parallel plan (declared, not applied): as the decoders, q/k/v/fc1 column-wise, out/fc2 row-wise.
TENSOR_PARALLEL_PLAN: dict[str, str] = {"blocks.*.qkv": "colwise", "blocks.*.out": "rowwise",
                                        "blocks.*.fc1": "colwise", "blocks.*.fc2": "rowwise"}
