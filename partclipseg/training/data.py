"""Training samples: augmentation, resizing to the model input and label remapping."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image

from runtime.io import IGNORE_LABEL
from runtime.preprocess import preprocess
from runtime.vocabulary import Vocabulary

from .losses import DATA_IGNORE

__all__ = ["TrainSamples", "label_maps"]


def label_maps(src: Vocabulary, dst: Vocabulary) -> tuple[np.ndarray, np.ndarray]:
    """Lookup tables from `src` class/object indices to `dst` ones.

    Classes missing from `dst` map to 255 (no part label); objects missing from `dst` (unseen
    objects) map to DATA_IGNORE (-1) so their pixels are not supervised at all. Index 255 maps
    to itself (background).
    """
    dst_names = {n: i for i, n in enumerate(dst.class_names)}
    cls = np.full(256, IGNORE_LABEL, np.int64)
    for k, name in enumerate(src.class_names):
        cls[k] = dst_names.get(name, IGNORE_LABEL)
    obj = np.full(256, DATA_IGNORE, np.int64)
    obj[IGNORE_LABEL] = IGNORE_LABEL
    for o, name in enumerate(src.objects):
        obj[o] = dst.objects.index(name) if name in dst.objects else DATA_IGNORE
    return cls, obj


class TrainSamples(torch.utils.data.Dataset):
    """A loader dataset as model-ready tensors in the training vocabulary.

    Each item: image (3, S, S) float32 CLIP-normalized, part (S, S) int64 (training class index,
    255 none), object (S, S) int64 (training object index, 255 background, -1 ignore).
    Augmentation: random horizontal flip and random scale with a random crop (or pad) back to S.
    """

    def __init__(self, dataset: Any, vocab: Vocabulary, size: int, seed: int = 0,
                 hflip: bool = True, scale_range: tuple[float, float] = (0.75, 1.25)):
        self.dataset, self.vocab, self.size = dataset, vocab, size
        self.seed, self.hflip, self.scale_range = seed, hflip, scale_range
        self.cls_map, self.obj_map = label_maps(dataset.vocabulary, vocab)
        self.epoch = 0  # set by the trainer: augmentation depends on (seed, epoch, index) only

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        s = self.dataset[i]
        rng = np.random.default_rng((self.seed, self.epoch, i))
        image, part, obj = s["image"], self.cls_map[s["part"]], self.obj_map[s["object"]]
        scale = rng.uniform(*self.scale_range) if self.scale_range else 1.0
        side = max(8, int(round(self.size * scale)))
        h, w = image.shape[:2]
        # Resize the short side to `side`, then crop / pad to size x size.
        f = side / min(h, w)
        nh, nw = max(1, round(h * f)), max(1, round(w * f))
        image = np.asarray(Image.fromarray(image).resize((nw, nh), Image.BILINEAR))
        part = np.asarray(Image.fromarray(part.astype(np.int32)).resize((nw, nh), Image.NEAREST))
        obj = np.asarray(Image.fromarray(obj.astype(np.int32)).resize((nw, nh), Image.NEAREST))
        canvas_i = np.zeros((max(nh, self.size), max(nw, self.size), 3), np.uint8)
        canvas_p = np.full(canvas_i.shape[:2], IGNORE_LABEL, np.int64)
        canvas_o = np.full(canvas_i.shape[:2], DATA_IGNORE, np.int64)  # padding: unsupervised
        canvas_i[:nh, :nw], canvas_p[:nh, :nw], canvas_o[:nh, :nw] = image, part, obj
        y = rng.integers(0, canvas_i.shape[0] - self.size + 1)
        x = rng.integers(0, canvas_i.shape[1] - self.size + 1)
        crop = np.s_[y:y + self.size, x:x + self.size]
        image, part, obj = canvas_i[crop], canvas_p[crop], canvas_o[crop]
        if self.hflip and rng.random() < 0.5:
            image, part, obj = image[:, ::-1], part[:, ::-1], obj[:, ::-1]
        return (torch.from_numpy(preprocess(np.ascontiguousarray(image), self.size)),
                torch.from_numpy(part.copy()), torch.from_numpy(obj.copy()))
