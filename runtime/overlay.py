"""Pictures of label maps: colour overlays and side-by-side panels with a legend (numpy + Pillow)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = ["palette", "colorize", "overlay", "panel"]


def palette(n: int) -> np.ndarray:
    """(n, 3) uint8 distinct colours (golden-ratio hues, alternating brightness)."""
    i = np.arange(n)
    h = (i * 0.618033988749895) % 1.0
    v = np.where(i % 2 == 0, 0.95, 0.7)
    s = np.where(i % 3 == 0, 0.65, 0.9)
    k = (np.array([5, 3, 1])[None] + h[:, None] * 6) % 6
    rgb = v[:, None] - v[:, None] * s[:, None] * np.clip(np.minimum(k, 4 - k), 0, 1)
    return (rgb * 255).astype(np.uint8)


def colorize(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(H, W) int labels (-1 / out of range = background) -> (H, W, 3) uint8, background black."""
    colours = np.concatenate([palette(num_classes), np.zeros((1, 3), np.uint8)])
    idx = np.where((labels >= 0) & (labels < num_classes), labels, num_classes)
    return colours[idx]


def overlay(image: np.ndarray, labels: np.ndarray, num_classes: int, alpha: float = 0.55
            ) -> np.ndarray:
    """Blend class colours over an (H, W, 3) uint8 image where labels are foreground."""
    fg = ((labels >= 0) & (labels < num_classes))[..., None]
    blend = (1 - alpha) * image + alpha * colorize(labels, num_classes)
    return np.where(fg, blend, image).astype(np.uint8)


def panel(image: np.ndarray, class_names: Sequence[str], prediction: np.ndarray,
          ground_truth: np.ndarray | None = None, title: str = "", scale: int = 2
          ) -> Image.Image:
    """One row: image | ground truth (optional) | prediction, plus a legend of the classes shown.

    Label maps are (H, W) int with -1 (or 255) for background; scale enlarges small images.
    """
    k = len(class_names)
    tiles = [image, overlay(image, prediction, k)]
    heads = ["image", "prediction"]
    if ground_truth is not None:
        tiles.insert(1, overlay(image, ground_truth, k))
        heads.insert(1, "ground truth")
    h, w = image.shape[:2]
    tiles = [np.asarray(Image.fromarray(t).resize((w * scale, h * scale), Image.NEAREST))
             for t in tiles]
    shown = sorted({int(c) for lab in (prediction, ground_truth) if lab is not None
                    for c in np.unique(lab) if 0 <= c < k})
    font = ImageFont.load_default()
    row_h, legend_w, top = 14, 190, 18 + (14 if title else 0)
    width = len(tiles) * (w * scale + 4) + legend_w
    height = max(top + h * scale, top + row_h * (len(shown) + 1)) + 4
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((4, 2), title, fill=(0, 0, 0), font=font)
    for i, (tile, head) in enumerate(zip(tiles, heads)):
        x = i * (w * scale + 4)
        draw.text((x + 2, top - 14), head, fill=(0, 0, 0), font=font)
        canvas.paste(Image.fromarray(tile), (x, top))
    colours = palette(k)
    x0 = len(tiles) * (w * scale + 4) + 4
    for j, c in enumerate(shown):
        y = top + j * row_h
        draw.rectangle([x0, y + 2, x0 + 10, y + 12], fill=tuple(int(v) for v in colours[c]))
        draw.text((x0 + 14, y), class_names[c][:30], fill=(0, 0, 0), font=font)
    return canvas
