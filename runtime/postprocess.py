"""Logits -> label maps for the two inference settings (docs/design.md, "The method"), numpy only.

Shared by every runtime backend and by evaluation, so measured accuracy is deployed accuracy.
Label maps are (H, W) int32: a class index in [0, K), or BACKGROUND (-1).
Probabilities are sigmoid(logits); since sigmoid is monotonic and a zeroed class can never win
an argmax against the background channel's positive probability, excluding channels is the same
as zeroing their probabilities, and the argmax runs on logits.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .preprocess import InputError

__all__ = ["BACKGROUND", "resize_bilinear", "resize_nearest", "oracle_obj", "pred_all", "sigmoid"]

BACKGROUND = -1


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (np.tanh(0.5 * x) + 1.0)  # overflow-free


def _resize_matrix(n_out: int, n_in: int) -> np.ndarray:
    """(n_out, n_in) bilinear weights, PyTorch's align_corners=False convention."""
    src = np.maximum((np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    frac = src - i0
    m = np.zeros((n_out, n_in), np.float64)
    np.add.at(m, (np.arange(n_out), i0), 1.0 - frac)
    np.add.at(m, (np.arange(n_out), i1), frac)
    return m.astype(np.float32)


def resize_bilinear(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(C, h, w) float -> (C, H, W) float32; equals torch's bilinear, align_corners=False.

    Returns `x` itself (no copy) when it is float32 and already of the requested size.
    """
    c, h, w = x.shape
    if (h, w) == tuple(size):
        return x.astype(np.float32, copy=False)
    ry, rx = _resize_matrix(size[0], h), _resize_matrix(size[1], w)
    return np.einsum("Hh,chw,Ww->cHW", ry, x.astype(np.float32, copy=False), rx, optimize=True)


def resize_nearest(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(h, w) label map -> (H, W), nearest neighbour (pixel centres, like PIL's NEAREST)."""
    h, w = labels.shape
    if (h, w) == tuple(size):
        return labels
    rows = np.minimum(((np.arange(size[0]) + 0.5) * (h / size[0])).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(size[1]) + 0.5) * (w / size[1])).astype(np.int64), w - 1)
    return labels[rows[:, None], cols[None, :]]


_BLOCK_BYTES = 1 << 26  # float32 scratch per row block: bounds memory for large frames


def _row_blocks(channels: int, size: tuple[int, int]) -> list[tuple[int, int]]:
    rows = max(1, _BLOCK_BYTES // (4 * max(1, channels) * size[1]))
    return [(r, min(size[0], r + rows)) for r in range(0, size[0], rows)]


class _Resizer:
    """Bilinear resize (torch's align_corners=False) of (C, h, w) maps, one row block at a time."""

    def __init__(self, src: tuple[int, int], size: tuple[int, int]):
        self.same = tuple(src) == tuple(size)
        if not self.same:
            self.ry, self.rx = _resize_matrix(size[0], src[0]), _resize_matrix(size[1], src[1])

    def rows(self, x: np.ndarray, r0: int, r1: int) -> np.ndarray:
        """Output rows [r0, r1) of the resized maps: (C, r1 - r0, W) float32."""
        if self.same:
            return x[:, r0:r1].astype(np.float32, copy=False)
        return np.einsum("Hh,chw,Ww->cHW", self.ry[r0:r1], x.astype(np.float32, copy=False),
                         self.rx, optimize=True)


def _argmax_labels(logits: np.ndarray, channels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Argmax over the given channel subset (last one = background) -> class labels."""
    sub = logits[channels]
    resize = _Resizer(sub.shape[1:], size)
    labels = np.empty(size, np.int32)
    for r0, r1 in _row_blocks(len(channels), size):
        win = resize.rows(sub, r0, r1).argmax(0)
        block = channels[win].astype(np.int32)
        block[win == len(channels) - 1] = BACKGROUND
        labels[r0:r1] = block
    return labels


def oracle_obj(logits: np.ndarray, class_objects: Sequence[int], object_mask: np.ndarray,
               object_class: int) -> np.ndarray:
    """Oracle-Obj: the object's mask and class are given.

    logits: (K + 1, h, w) float, classes then background. class_objects: (K,) object index of
    each class. object_mask: (H, W) bool at output resolution. Returns (H, W) int32 labels:
    only classes of `object_class` (or BACKGROUND) inside the mask, BACKGROUND outside.
    """
    class_objects = np.asarray(class_objects)
    k = len(class_objects)
    if logits.ndim != 3 or logits.shape[0] != k + 1:
        raise InputError(f"logits must be (K + 1 = {k + 1}, h, w), got {logits.shape}")
    mask = np.asarray(object_mask)
    if mask.ndim != 2:
        raise InputError(f"object_mask must be (H, W), got shape {mask.shape}")
    own = np.flatnonzero(class_objects == object_class)
    if len(own) == 0:
        raise InputError(f"object class {object_class} has no part classes in this vocabulary")
    labels = _argmax_labels(logits, np.append(own, k), mask.shape)
    labels[~mask.astype(bool)] = BACKGROUND
    return labels


def pred_all(logits: np.ndarray, class_objects: Sequence[int], size: tuple[int, int],
             object_logits: np.ndarray | None = None) -> np.ndarray:
    """Pred-All: no oracle. The object head's argmax (objects + background) gates the classes.

    logits: (K + 1, h, w); object_logits: (O + 1, h, w) or None (CLIPSeg baseline: plain argmax
    over K + 1). Returns (H, W) int32 labels at `size`.
    """
    class_objects = np.asarray(class_objects)
    k = len(class_objects)
    if logits.ndim != 3 or logits.shape[0] != k + 1:
        raise InputError(f"logits must be (K + 1 = {k + 1}, h, w), got {logits.shape}")
    if object_logits is None:
        return _argmax_labels(logits, np.arange(k + 1), tuple(size))
    n_obj = object_logits.shape[0] - 1  # last = background
    resize = _Resizer(logits.shape[1:], size)
    labels = np.full(size, BACKGROUND, np.int32)
    own = {o: np.append(np.flatnonzero(class_objects == o), k) for o in range(n_obj)}
    for r0, r1 in _row_blocks(k + n_obj + 2, size):
        up = resize.rows(logits, r0, r1)
        winner = resize.rows(object_logits, r0, r1).argmax(0)
        block = labels[r0:r1]
        # Each pixel competes only among the classes of the object the object head picked (and
        # background); where it picked background no class passes. Same ties as a masked argmax.
        for o in np.unique(winner):
            ch = own.get(int(o))
            if ch is None or len(ch) == 1:
                continue
            where = winner == o
            win = up[ch][:, where].argmax(0)
            picked = ch[win].astype(np.int32)
            picked[win == len(ch) - 1] = BACKGROUND
            block[where] = picked
    return labels
