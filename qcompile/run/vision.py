"""Image preprocessing as HF's image processors do it (ViTImageProcessor, CLIPImageProcessor), with Pillow.

Paths are opened as HF's `load_image` does (EXIF orientation applied, converted to RGB); PIL images with
transparency are composited onto white when the model's processor converts to RGB (CLIP). Then, on the
uint8 image: resize ("exact" to resize_size square; "shortest_edge": the short side to resize_size, the
long side int(resize_size * long / short)) with the configured PIL filter -> center crop to image_size
(top = (h - size) // 2; a smaller image is zero-padded, centred, first) -> rescale (float64, then
float32) -> normalise per channel -> channels first. Settings: `qcompile.models.vit.ViTConfig`, read from
and written to a checkpoint's preprocessor_config.json here (`preprocessing_from_hf`, `preprocessor_to_hf`).
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

from ..errors import UserError

FILTERS = {"bilinear": "BILINEAR", "bicubic": "BICUBIC"}
PREPROCESSOR_RESAMPLE = {2: "bilinear", 3: "bicubic"}  # PIL codes in preprocessor_config.json


def open_image(source: Any):
    """A PIL image from a path (as HF's load_image: EXIF-transposed, RGB) or a PIL image as it is."""
    from PIL import Image, ImageOps, UnidentifiedImageError  # noqa: PLC0415

    if isinstance(source, Image.Image):
        return source
    if not isinstance(source, (str, os.PathLike)):
        raise UserError(f"image: expected a path or a PIL image, got {type(source).__name__}")
    try:
        with Image.open(source) as image:
            return ImageOps.exif_transpose(image).convert("RGB")
    except FileNotFoundError:
        raise UserError(f"{source}: image not found") from None
    except IsADirectoryError:
        raise UserError(f"{source}: is a directory, not an image") from None
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError) as e:
        raise UserError(f"{source}: unreadable image ({e})") from None


def _to_rgb(image: Any, composite: bool):
    """HF's convert_to_rgb (transparency onto white) when `composite`, else a plain conversion."""
    from PIL import Image  # noqa: PLC0415

    if image.mode == "RGB":
        return image
    if composite and ("A" in image.getbands() or image.info.get("transparency") is not None):
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def _center_crop(pixels: np.ndarray, size: int) -> np.ndarray:
    """HF's center_crop on [h, w, c]: zero-pad a smaller image (centred, ceil of half the gap on top and
    left), then crop size x size from top = (h - size) // 2, left = (w - size) // 2."""
    h, w, c = pixels.shape
    top, left = (h - size) // 2, (w - size) // 2
    if h >= size and w >= size:
        return pixels[top:top + size, left:left + size]
    new_h, new_w = max(size, h), max(size, w)
    padded = np.zeros((new_h, new_w, c), pixels.dtype)
    pad_top, pad_left = math.ceil((new_h - h) / 2), math.ceil((new_w - w) / 2)
    padded[pad_top:pad_top + h, pad_left:pad_left + w] = pixels
    top, left = top + pad_top, left + pad_left
    return padded[max(0, top):min(new_h, top + size), max(0, left):min(new_w, left + size)]


def preprocess(image: Any, cfg: Any) -> np.ndarray:
    """One image -> float32 [channels, image_size, image_size], as the model's HF processor makes it."""
    from PIL import Image  # noqa: PLC0415

    if cfg.num_channels != 3:
        raise UserError(f"image preprocessing supports RGB models; this one takes {cfg.num_channels} channels")
    source = image if isinstance(image, (str, os.PathLike)) else "image"
    try:
        image = _to_rgb(open_image(image), cfg.convert_rgb)
        size, resample = cfg.resize_size or cfg.image_size, getattr(Image.Resampling, FILTERS[cfg.resample])
        if cfg.resize == "exact":
            image = image.resize((size, size), resample=resample)
        elif cfg.resize == "shortest_edge":
            width, height = image.size
            short, long = min(width, height), max(width, height)
            new_long = int(size * long / short)
            image = image.resize((size, new_long) if width <= height else (new_long, size), resample=resample)
    except (OSError, ValueError) as e:  # a truncated file shows up only when the pixels are decoded
        raise UserError(f"{source}: unreadable image ({e})") from None
    pixels = np.asarray(image)
    if cfg.center_crop:
        pixels = _center_crop(pixels, cfg.image_size)
    if pixels.shape[:2] != (cfg.image_size, cfg.image_size):
        raise UserError(f"image: preprocessed to {pixels.shape[0]}x{pixels.shape[1]}, the model takes "
                        f"{cfg.image_size}x{cfg.image_size} (check resize and center_crop)")
    pixels = (pixels.astype(np.float64) * cfg.rescale_factor if cfg.rescale_factor else pixels).astype(np.float32)
    if cfg.image_mean is not None:
        pixels = (pixels - np.asarray(cfg.image_mean, np.float32)) / np.asarray(cfg.image_std, np.float32)
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))


def as_pixel_values(images: Any, cfg: Any) -> np.ndarray:
    """Float32 [batch, channels, size, size] from such an array (checked) or from images / paths."""
    expected = (cfg.num_channels, cfg.image_size, cfg.image_size)
    if isinstance(images, np.ndarray):
        if images.ndim != 4 or images.shape[1:] != expected or images.shape[0] == 0:
            raise UserError(f"pixel_values: expected [batch, {', '.join(map(str, expected))}], got "
                            f"{list(images.shape)}")
        if not np.issubdtype(images.dtype, np.floating):
            raise UserError(f"pixel_values: expected floating point values, got {images.dtype}")
        return np.ascontiguousarray(images, dtype=np.float32)
    if isinstance(images, (str, os.PathLike)) or not hasattr(images, "__iter__"):
        images = [images]
    images = list(images)
    if not images:
        raise UserError("images: none given")
    return np.stack([preprocess(image, cfg) for image in images])


# --- HF preprocessor_config.json <-> the config's preprocessing fields ---------------------------------

def preprocessing_from_hf(p: dict[str, Any], values: dict[str, Any], where: str) -> dict[str, Any]:
    """preprocessor_config.json -> preprocessing fields, with HF's semantics and the defaults of the
    model type's processor (ViTImageProcessor / CLIPImageProcessor) for absent keys."""
    squares = values["weight_layout"] == "vit"  # HF: an int size is a square for ViT, a short edge for CLIP

    def flag(key: str, default: bool) -> bool:
        value = p.get(key, default)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise UserError(f"{where}: field '{key}' must be true or false, got {value!r}")
        return value

    def square(key: str, value: Any) -> int:
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
        if isinstance(value, dict) and value.get("height") == value.get("width") \
                and isinstance(value.get("height"), int) and value["height"] > 0:
            return value["height"]
        raise UserError(f"{where}: field '{key}' must be a positive int or a square "
                        f"{{height, width}}, got {value!r}")

    out: dict[str, Any] = {"convert_rgb": flag("do_convert_rgb", values["convert_rgb"])}
    size = p.get("size")
    if not flag("do_resize", True):
        out["resize"], out["resize_size"] = "none", None
    elif isinstance(size, dict) and "shortest_edge" in size or (isinstance(size, int) and not squares):
        edge = size["shortest_edge"] if isinstance(size, dict) else size
        if not isinstance(edge, int) or isinstance(edge, bool) or edge <= 0 or set(size if isinstance(
                size, dict) else ()) - {"shortest_edge"}:
            raise UserError(f"{where}: field 'size' {size!r}: only a shortest_edge alone is supported")
        out["resize"], out["resize_size"] = "shortest_edge", edge
    elif size is not None:
        out["resize"], out["resize_size"] = "exact", square("size", size)
    if out.get("resize_size") == values["image_size"]:
        out["resize_size"] = None  # one spelling: None means image_size
    if "resample" in p:
        if not isinstance(p["resample"], int) or p["resample"] not in PREPROCESSOR_RESAMPLE:
            raise UserError(f"{where}: field 'resample' must be 2 (bilinear) or 3 (bicubic), "
                            f"got {p['resample']!r}")
        out["resample"] = PREPROCESSOR_RESAMPLE[p["resample"]]
    out["center_crop"] = flag("do_center_crop", values["center_crop"])
    if out["center_crop"] and "crop_size" in p and square("crop_size", p["crop_size"]) != values["image_size"]:
        raise UserError(f"{where}: crop_size {p['crop_size']!r} differs from the model's image_size "
                        f"{values['image_size']}")
    factor = p.get("rescale_factor", 1 / 255)
    if not isinstance(factor, (int, float)) or isinstance(factor, bool) or factor <= 0:
        raise UserError(f"{where}: field 'rescale_factor' must be a positive number, got {factor!r}")
    out["rescale_factor"] = float(factor) if flag("do_rescale", True) else None
    if flag("do_normalize", True):
        for key in ("image_mean", "image_std"):
            value = p.get(key, values[key])
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                value = [float(value)] * values["num_channels"]  # HF accepts one value for all channels
            if not isinstance(value, list) or not all(isinstance(v, (int, float)) for v in value):
                raise UserError(f"{where}: field '{key}' must be a number or a list of numbers, got {value!r}")
            out[key] = [float(v) for v in value]
    else:
        out["image_mean"] = out["image_std"] = None
    return out


def preprocessor_to_hf(cfg: Any) -> dict[str, Any]:
    """The preprocessor_config.json of HF's processor class for this layout, with this config's settings."""
    size = cfg.resize_size or cfg.image_size
    return {
        "image_processor_type": {"vit": "ViTImageProcessor", "clip": "CLIPImageProcessor"}[cfg.weight_layout],
        "do_convert_rgb": cfg.convert_rgb, "do_resize": cfg.resize != "none",
        "size": {"shortest_edge": size} if cfg.resize == "shortest_edge" else {"height": size, "width": size},
        "resample": {v: k for k, v in PREPROCESSOR_RESAMPLE.items()}[cfg.resample],
        "do_center_crop": cfg.center_crop, "crop_size": {"height": cfg.image_size, "width": cfg.image_size},
        "do_rescale": cfg.rescale_factor is not None, "rescale_factor": cfg.rescale_factor or 1 / 255,
        "do_normalize": cfg.image_mean is not None,
        "image_mean": cfg.image_mean or [0.0] * cfg.num_channels,
        "image_std": cfg.image_std or [1.0] * cfg.num_channels,
    }
