"""Image checks and preprocessing shared by every backend, training evaluation and export tests."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image

from .errors import UserError
from .io import CLIP_MEAN, CLIP_STD

__all__ = ["InputError", "check_image", "resize_image", "preprocess"]


class InputError(UserError, ValueError):
    """An input image, mask or class request is malformed."""


def check_image(image: np.ndarray, bgr: bool = False) -> np.ndarray:
    """Validate an (H, W, 3) uint8 image; return it as contiguous RGB."""
    if not isinstance(image, np.ndarray):
        raise InputError(f"image must be a numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise InputError(f"image dtype must be uint8 (0-255), got {image.dtype}; convert with "
                         "np.clip(img, 0, 255).astype(np.uint8) (or (img * 255) for [0, 1] floats)")
    if image.ndim != 3 or image.shape[2] != 3:
        hint = " (drop the alpha channel: image[..., :3])" if image.ndim == 3 and image.shape[2] == 4 \
            else " (stack a grey image: np.repeat(img[..., None], 3, -1))" if image.ndim == 2 else ""
        raise InputError(f"image must have shape (H, W, 3), got {image.shape}{hint}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise InputError(f"image is empty: shape {image.shape}")
    return np.ascontiguousarray(image[..., ::-1] if bgr else image)


def resize_image(image: np.ndarray, size: int, bgr: bool = False) -> np.ndarray:
    """(H, W, 3) uint8 -> (size, size, 3) uint8 RGB, bilinear (Pillow). What deployed graphs
    take: they normalize inside."""
    image = check_image(image, bgr)
    if image.shape[:2] != (size, size):
        image = np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))
    return image


def preprocess(image: np.ndarray, size: int, mean: Sequence[float] = CLIP_MEAN,
               std: Sequence[float] = CLIP_STD, bgr: bool = False) -> np.ndarray:
    """(H, W, 3) uint8 -> (3, size, size) float32, bilinear-resized and CLIP-normalized.

    The same resize as `resize_image`, then the normalization deployed graphs do in-graph.
    """
    x = resize_image(image, size, bgr).astype(np.float32) / 255.0
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))
