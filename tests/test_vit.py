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
from qcompile.spec.model import resolve_model

from .conftest import CPU_TOLERANCE, max_rel_diff, random_vision_model

TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
# HF model, its config, its processor (PIL backend) and the sizes the tiny configs use.
CASES = {
    "vit-patch8": ("ViTModel", "ViTConfig", dict(image_size=32, patch_size=8, **TINY)),
    "vit-patch4-no-qkv-bias": ("ViTModel", "ViTConfig", dict(image_size=16, patch_size=4, qkv_bias=False,
                                                             hidden_act="gelu_pytorch_tanh", **TINY)),
    "clip-patch6": ("CLIPVisionModel", "CLIPVisionConfig", dict(image_size=30, patch_size=6, **TINY)),
}


# Each case's processor uses non-default settings, so a test passes only if preprocessor_config.json is read.
PROCESSORS = {
    "vit-patch8": dict(size={"height": 32, "width": 32}, resample=3, image_mean=[0.4, 0.5, 0.6],
                       image_std=[0.2, 0.25, 0.3]),
    "vit-patch4-no-qkv-bias": dict(size={"height": 20, "width": 20}, do_center_crop=True,
                                   crop_size={"height": 16, "width": 16}, rescale_factor=1 / 127.5,
                                   do_normalize=False),
    "clip-patch6": dict(size={"shortest_edge": 34}, crop_size={"height": 30, "width": 30}, resample=2),
}


def hf_processor(case_name: str):
    """HF's image processor (PIL backend: transformers 5.x's ViTImageProcessor / CLIPImageProcessor names
    are the torchvision backend, which is not installed here)."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

    model_name = CASES[case_name][0]
    return (ViTImageProcessorPil if model_name == "ViTModel" else CLIPImageProcessorPil)(**PROCESSORS[case_name])


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory, libraries):
    """(our encoder, HF model, checkpoint dir): random weights saved by transformers, with the matching
    preprocessor_config.json beside them."""
    model_name, config_name, fields = CASES[request.param]
    hf = random_vision_model(model_name, config_name, seed=0, **fields)
    ckpt = tmp_path_factory.mktemp("vit") / request.param
    hf.save_pretrained(ckpt)
    processor = hf_processor(request.param)
    processor.save_pretrained(ckpt)
    ours = qcompile.load(libraries.get(ckpt), weights=ckpt)
    return ours, hf, ckpt, processor


@pytest.mark.parametrize("batch", [1, 3])
def test_last_hidden_state_matches(case, batch):
    ours, hf, _, processor = case
    size = hf.config.image_size
    pixels = np.random.default_rng(batch).standard_normal((batch, 3, size, size)).astype(np.float32)
    with torch.no_grad():
        expected = hf(pixel_values=torch.tensor(pixels)).last_hidden_state.numpy()
    got = ours.encode(pixels)
    assert got.shape == expected.shape == (batch, 1 + (size // hf.config.patch_size) ** 2, 64)
    assert max_rel_diff(got, expected) <= CPU_TOLERANCE


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    """Real image files of odd sizes: RGB PNG, JPEG, grayscale PNG, RGBA PNG, palette PNG with a
    transparent colour, and a JPEG whose EXIF orientation (6) says rotate."""
    root, rng = tmp_path_factory.mktemp("images"), np.random.default_rng(0)
    smooth = np.cumsum(rng.integers(0, 9, (47, 61, 3)), axis=1) % 256  # gradients, not just noise
    rgba = np.concatenate([smooth, rng.integers(0, 256, (47, 61, 1))], axis=-1).astype(np.uint8)
    palette = Image.fromarray(smooth.astype(np.uint8)).convert("P")
    palette.info["transparency"] = 0
    files = {"a.png": Image.fromarray(smooth.astype(np.uint8)),
             "b.jpg": Image.fromarray(rng.integers(0, 256, (80, 53, 3), dtype=np.uint8)),
             "c.png": Image.fromarray(rng.integers(0, 256, (40, 40), dtype=np.uint8), mode="L"),
             "d.png": Image.fromarray(rgba, mode="RGBA"), "e.png": palette}
    for name, image in files.items():
        image.save(root / name)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(smooth.astype(np.uint8)).save(root / "f.jpg", exif=exif)
    return [root / name for name in (*files, "f.jpg")]


def test_preprocessing_matches_hf_processors(case, image_files):
    """Paths, as HF reads them (load_image: EXIF orientation, RGB), then the case's processor."""
    from transformers.image_utils import load_image

    from qcompile.run.vision import as_pixel_values

    ours, _, _, processor = case
    for path in image_files:
        expected = processor(images=[load_image(str(path))], return_tensors="np")["pixel_values"]
        got = as_pixel_values([path], ours.spec.config)
        assert got.shape == expected.shape
        assert np.abs(got - expected).max() <= 1e-5, path


def test_pil_images_with_transparency_match_hf(case, image_files):
    """PIL inputs go to the processor as they are: CLIP composites transparency onto white."""
    from qcompile.run.vision import as_pixel_values

    ours, _, _, processor = case
    if not ours.spec.config.convert_rgb:
        pytest.skip("HF's ViT processor does not convert RGBA; only RGB PIL inputs are defined there")
    for path in image_files:
        image = Image.open(path)
        expected = processor(images=[image], return_tensors="np")["pixel_values"]
        assert np.abs(as_pixel_values([image], ours.spec.config) - expected).max() <= 1e-5, path


def test_center_crop_pads_small_images_like_hf():
    from transformers.image_transforms import center_crop

    from qcompile.run.vision import _center_crop

    rng = np.random.default_rng(3)
    for h, w in ((5, 9), (16, 7), (7, 16), (20, 25), (16, 16), (3, 3)):
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        expected = center_crop(pixels, (16, 16), input_data_format="channels_last")
        np.testing.assert_array_equal(_center_crop(pixels, 16), expected)


def test_images_to_features_end_to_end(case, image_files):
    from transformers.image_utils import load_image

    ours, hf, _, processor = case
    images = [load_image(str(p)) for p in image_files]
    with torch.no_grad():
        pixels = processor(images=images, return_tensors="pt")["pixel_values"]
        expected = hf(pixel_values=pixels).last_hidden_state.numpy()
    assert max_rel_diff(ours.encode(image_files), expected) <= CPU_TOLERANCE  # from paths
    assert max_rel_diff(ours.encode(images), expected) <= CPU_TOLERANCE  # from PIL images


def test_checkpoint_preprocessor_config_is_read(case):
    ours, hf, _, processor = case
    cfg = ours.spec.config
    p = PROCESSORS[[name for name in CASES if CASES[name][2]["image_size"] == hf.config.image_size
                    and CASES[name][0] == type(hf).__name__][0]]
    resize_size = cfg.resize_size or cfg.image_size
    if "shortest_edge" in p["size"]:
        assert (cfg.resize, resize_size, cfg.center_crop) == ("shortest_edge", p["size"]["shortest_edge"], True)
    else:
        assert (cfg.resize, resize_size) == ("exact", p["size"]["height"])
        assert cfg.center_crop == p.get("do_center_crop", False)
    assert cfg.resample == {2: "bilinear", 3: "bicubic"}[processor.resample]
    assert cfg.rescale_factor == pytest.approx(p.get("rescale_factor", 1 / 255))
    assert cfg.image_mean == (None if p.get("do_normalize") is False else list(processor.image_mean))


def test_init_weights_writes_a_processor_config(tmp_path):
    """init-weights writes preprocessor_config.json, so transformers and qcompile read one setting."""
    import transformers

    ckpt = qcompile.init_weights("vit-debug", out=tmp_path / "ck")
    hf = transformers.AutoImageProcessor.from_pretrained(str(ckpt), backend="pil")
    assert (hf.size["height"], list(hf.image_mean)) == (32, [0.5, 0.5, 0.5])
    from qcompile.spec.model import load_checkpoint_config

    assert load_checkpoint_config(ckpt).config == resolve_model("vit-debug").config


@pytest.mark.parametrize("content,needle", [
    ({"size": "big"}, "field 'size' must be a positive int"),
    ({"size": {"height": 32, "width": 30}}, "must be a positive int or a square"),
    ({"resample": [3]}, "field 'resample' must be 2 (bilinear) or 3 (bicubic)"),
    ({"do_center_crop": True, "crop_size": 28}, "crop_size 28 differs from the model's image_size 32"),
    ({"rescale_factor": -1}, "field 'rescale_factor' must be a positive number"),
    ({"image_mean": "grey"}, "field 'image_mean' must be a number or a list"),
    ({"do_resize": "yes"}, "field 'do_resize' must be true or false"),
])
def test_bad_preprocessor_config_is_named(tmp_path, content, needle):
    import json as _json

    from qcompile.spec.model import load_checkpoint_config

    ckpt = qcompile.init_weights("vit-debug", out=tmp_path / "ck")
    (ckpt / "preprocessor_config.json").write_text(_json.dumps(content))
    with pytest.raises(UserError) as info:
        load_checkpoint_config(ckpt)
    assert "preprocessor_config.json: " in str(info.value) and needle in str(info.value), str(info.value)


def test_encoder_cli(case, image_files, tmp_path, capsys, libraries):
    ours, hf, ckpt, _ = case
    if ckpt.name == "clip-patch6":  # `compile` through the CLI once (~10 s a case); the others run the case's
        lib = tmp_path / "lib"      # library, built by the same compile_model with the same options
        assert main(["compile", str(ckpt), "-o", str(lib)]) == 0
    else:
        lib = libraries.get(ckpt)
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
    ours, hf, _, processor = case
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
