"""Image preprocessing as HF's image processors do it (ViTImageProcessor, CLIPImageProcessor), with Pillow.

Paths are opened as HF's `load_image` does (EXIF orientation applied, converted to RGB); PIL images with
transparency are composited onto white when the model's processor converts to RGB (CLIP). Then, on the
uint8 image: resize ("exact" to resize_size square; "shortest_edge": the short side to resize_size, the
long side int(resize_size * long / short)) with the configured PIL filter -> center crop to image_size
(top = (h - size) // 2; a smaller image is zero-padded, centred, first) -> rescale (float64, then
float32) -> normalise per channel -> channels first. Settings: `qcompile.models.vit.ViTConfig`.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

from .errors import UserError

FILTERS = {"bilinear": "BILINEAR", "bicubic": "BICUBIC"}


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
