"""ViT family vs transformers: last_hidden_state of ViTModel and CLIPVisionModel, preprocessing vs HF's
image processors on real PNG/JPEG files, image -> features end to end, CLI, and the full-size compiles."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import qcompile
from qcompile.cli import main
from qcompile.errors import UserError
from qcompile.zoo import resolve_model

from .conftest import CPU_TOLERANCE, max_rel_diff

TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
# HF model, its config, its processor (PIL backend) and the sizes the tiny configs use.
CASES = {
    "vit-patch8": ("ViTModel", "ViTConfig", dict(image_size=32, patch_size=8, **TINY)),
    "vit-patch4-no-qkv-bias": ("ViTModel", "ViTConfig", dict(image_size=16, patch_size=4, qkv_bias=False,
                                                             hidden_act="gelu_pytorch_tanh", **TINY)),
    "clip-patch6": ("CLIPVisionModel", "CLIPVisionConfig", dict(image_size=30, patch_size=6, **TINY)),
}


def hf_processor(model_type: str, size: int):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

    if model_type == "vit":
        return ViTImageProcessorPil(size={"height": size, "width": size})
    return CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory, libraries):
    """(our encoder, HF model, checkpoint dir): random weights saved by transformers, with the matching
    preprocessor_config.json beside them."""
    import transformers

    model_name, config_name, fields = CASES[request.param]
    torch.manual_seed(0)
    hf = getattr(transformers, model_name)(getattr(transformers, config_name)(**fields)).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.normal_(0, 0.2)
            if "norm" in name:
                p.add_(1.0)
    ckpt = tmp_path_factory.mktemp("vit") / request.param
    hf.save_pretrained(ckpt)
    hf_processor(hf.config.model_type, fields["image_size"]).save_pretrained(ckpt)
    ours = qcompile.load(libraries.get(ckpt), weights=ckpt)
    return ours, hf, ckpt


@pytest.mark.parametrize("batch", [1, 3])
def test_last_hidden_state_matches(case, batch):
    ours, hf, _ = case
    size = hf.config.image_size
    pixels = np.random.default_rng(batch).standard_normal((batch, 3, size, size)).astype(np.float32)
    with torch.no_grad():
        expected = hf(pixel_values=torch.tensor(pixels)).last_hidden_state.numpy()
    got = ours.encode(pixels)
    assert got.shape == expected.shape == (batch, 1 + (size // hf.config.patch_size) ** 2, 64)
    assert max_rel_diff(got, expected) <= CPU_TOLERANCE


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    """Real image files of odd sizes: a PNG (RGB), a JPEG, and a grayscale PNG."""
    root, rng = tmp_path_factory.mktemp("images"), np.random.default_rng(0)
    smooth = np.cumsum(rng.integers(0, 9, (47, 61, 3)), axis=1) % 256  # gradients, not just noise
    files = {"a.png": Image.fromarray(smooth.astype(np.uint8)),
             "b.jpg": Image.fromarray(rng.integers(0, 256, (80, 53, 3), dtype=np.uint8)),
             "c.png": Image.fromarray(rng.integers(0, 256, (40, 40), dtype=np.uint8), mode="L")}
    for name, image in files.items():
        image.save(root / name)
    return [root / name for name in files]


def test_preprocessing_matches_hf_processors(case, image_files):
    ours, hf, _ = case
    processor = hf_processor(hf.config.model_type, hf.config.image_size)
    from qcompile.vision import as_pixel_values

    for path in image_files:
        expected = processor(images=[Image.open(path).convert("RGB")], return_tensors="np")["pixel_values"]
        got = as_pixel_values([path], ours.spec.config)
        assert got.shape == expected.shape
        assert np.abs(got - expected).max() <= 1e-5, path


def test_images_to_features_end_to_end(case, image_files):
    ours, hf, _ = case
    processor = hf_processor(hf.config.model_type, hf.config.image_size)
    images = [Image.open(p).convert("RGB") for p in image_files]
    with torch.no_grad():
        pixels = processor(images=images, return_tensors="pt")["pixel_values"]
        expected = hf(pixel_values=pixels).last_hidden_state.numpy()
    assert max_rel_diff(ours.encode(image_files), expected) <= CPU_TOLERANCE  # from paths
    assert max_rel_diff(ours.encode(images), expected) <= CPU_TOLERANCE  # from PIL images


def test_checkpoint_preprocessor_config_is_read(case):
    ours, hf, _ = case
    cfg = ours.spec.config
    expected = {"vit": ("exact", "bilinear"), "clip_vision_model": ("shortest_edge", "bicubic")}
    assert (cfg.resize, cfg.resample) == expected[hf.config.model_type]


def test_encoder_cli(case, image_files, tmp_path, capsys):
    ours, hf, ckpt = case
    lib = tmp_path / "lib"
    assert main(["compile", str(ckpt), "-o", str(lib)]) == 0
    out = tmp_path / "features.npy"
    argv = ["run", str(lib), "--weights", str(ckpt), "--features-out", str(out), "--json"]
    for path in image_files:
        argv += ["--image", str(path)]
    capsys.readouterr()
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    features = np.load(out)
    assert result["shape"] == list(features.shape) and features.shape[0] == len(image_files)
    np.testing.assert_allclose(features, ours.encode(image_files), rtol=0, atol=1e-6)

    def error(*extra):
        assert main(["run", str(lib), "--weights", str(ckpt), *extra]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1
        return err

    (tmp_path / "broken.png").write_bytes(b"not an image at all")
    assert "broken.png: unreadable image" in error("--image", str(tmp_path / "broken.png"))
    assert "missing.png: image not found" in error("--image", str(tmp_path / "missing.png"))
    assert "--image is needed for this encoder" in error()
    assert "--prompt-ids does not apply to this encoder" in error("--image", str(image_files[0]),
                                                                "--prompt-ids", "1 2")


def test_pixel_values_of_the_wrong_shape_are_refused(case):
    ours, hf, _ = case
    size = hf.config.image_size
    for shape in ((1, 4, size, size), (1, 3, size + 1, size), (3, size, size)):
        with pytest.raises(UserError, match=r"pixel_values: expected \[batch, 3, "):
            ours.encode(np.zeros(shape, np.float32))


def vit_parameter_formula(c) -> int:
    """Patch conv (+bias), [cls], positions, (pre-LN), blocks, (final LN) — the encoder's parameters."""
    width, ffn = c.hidden_size, c.intermediate_size
    tokens = (c.image_size // c.patch_size) ** 2 + int(c.use_cls_token)
    embeddings = width * c.num_channels * c.patch_size ** 2 + width * c.patch_bias + width * c.use_cls_token \
        + tokens * width
    block = 4 * width * width + (3 * width if c.qkv_bias else 0) + width + 2 * width * ffn + ffn + width \
        + 4 * width
    return embeddings + c.num_hidden_layers * block + 2 * width * (c.pre_layernorm + c.final_layernorm)


@pytest.mark.slow
@pytest.mark.parametrize("model,approx", [("vit-b16", 86e6), ("qwen-vl-vit-bigg", 1.84e9)])
def test_full_size_encoders_compile(model, approx, tmp_path):
    manifest = qcompile.compile_model(model, out=tmp_path / "lib", log=lambda _m: None)
    assert manifest["parameter_count"] == vit_parameter_formula(resolve_model(model).config)
    assert abs(manifest["parameter_count"] - approx) / approx < 0.01
    assert manifest["functions"]["encode"]["inputs"]["pixel_values"]["shape"][0] == "batch"
