"""Image preprocessing as HF's image processors do it (ViTImageProcessor, CLIPImageProcessor), with Pillow.

resize ("exact": to size x size; "shortest_edge": the short side to size, the long side
int(size * long / short), then a center crop at ((h - size) // 2, (w - size) // 2)) with the configured
PIL filter on the uint8 image -> rescale by 1/255 (float64, then float32) -> normalise per channel ->
channels first. The model config (`qcompile.models.vit.ViTConfig`) carries the settings.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from .errors import UserError

FILTERS = {"bilinear": "BILINEAR", "bicubic": "BICUBIC"}


def open_image(source: Any):
    """A PIL image from a path or a PIL image; unreadable files are a UserError naming them."""
    from PIL import Image, UnidentifiedImageError  # noqa: PLC0415

    if isinstance(source, Image.Image):
        return source
    if not isinstance(source, (str, os.PathLike)):
        raise UserError(f"image: expected a path or a PIL image, got {type(source).__name__}")
    try:
        with Image.open(source) as image:
            image.load()
            return image
    except FileNotFoundError:
        raise UserError(f"{source}: image not found") from None
    except (UnidentifiedImageError, OSError) as e:
        raise UserError(f"{source}: unreadable image ({e})") from None


def preprocess(image: Any, cfg: Any) -> np.ndarray:
    """One image -> float32 [channels, size, size], normalised as the model's HF processor does."""
    from PIL import Image  # noqa: PLC0415

    image = open_image(image)
    mode = {3: "RGB", 1: "L"}.get(cfg.num_channels)
    if mode is None:
        raise UserError(f"preprocessing supports 1 or 3 channels; the model takes {cfg.num_channels}")
    image = image.convert(mode)
    size, resample = cfg.image_size, getattr(Image.Resampling, FILTERS[cfg.resample])
    if cfg.resize == "exact":
        image = image.resize((size, size), resample=resample)
    else:
        width, height = image.size
        short, long = min(width, height), max(width, height)
        new_long = int(size * long / short)
        image = image.resize((size, new_long) if width <= height else (new_long, size), resample=resample)
        width, height = image.size
        top, left = (height - size) // 2, (width - size) // 2
        image = image.crop((left, top, left + size, top + size))
    pixels = (np.asarray(image, dtype=np.float64) * (1 / 255)).astype(np.float32)
    pixels = pixels.reshape(size, size, cfg.num_channels)
    mean, std = np.asarray(cfg.image_mean, np.float32), np.asarray(cfg.image_std, np.float32)
    return np.ascontiguousarray(((pixels - mean) / std).transpose(2, 0, 1))


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


def is_image_path(path: Path) -> bool:
    return Path(path).suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
