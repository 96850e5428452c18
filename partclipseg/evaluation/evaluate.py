"""Evaluate a model under Oracle-Obj or Pred-All with the OV-PARTS protocol (docs/design.md, "Evaluation").

Pre- and post-processing are the runtime's numpy functions, so measured accuracy is the
accuracy of the deployed pipeline.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from runtime.postprocess import oracle_obj, pred_all
from runtime.preprocess import preprocess
from runtime.vocabulary import Vocabulary

from runtime.io import IGNORE_LABEL

from ..data.datasets import load_dataset
from .metrics import PartSegEvaluator

__all__ = ["SETTINGS", "evaluate", "evaluate_segmenter", "eval_dataset", "oracle_object"]

SETTINGS = ("oracle-obj", "pred-all")


def eval_dataset(kind: str, root: str, split: str, setting: str) -> Any:
    """Oracle-Obj: one sample per (image, object); Pred-All: one sample per image."""
    if setting not in SETTINGS:
        raise ValueError(f"setting must be one of {SETTINGS}, got {setting!r}")
    return load_dataset(kind, root, split, per_object=(setting == "oracle-obj"))


def oracle_object(sample: dict[str, Any]) -> tuple[np.ndarray, int]:
    """Oracle-Obj's given object of a per-object sample: ((H, W) bool mask, object index)."""
    present = np.unique(sample["object"][sample["object"] != IGNORE_LABEL])
    if len(present) != 1:
        raise ValueError(f"sample {sample['name']}: Oracle-Obj needs exactly one object per "
                         f"sample, found {present.tolist()}")
    return sample["object"] == present[0], int(present[0])


@torch.no_grad()
def evaluate(model: torch.nn.Module, dataset: Any, setting: str, vocab: Vocabulary | None = None,
             batch_size: int = 8, limit: int | None = None, progress: bool = True,
             ) -> dict[str, Any]:
    """Metrics dict of `PartSegEvaluator.compute()` (percent) plus `setting` and `samples`.

    `vocab` is the evaluation vocabulary (default: the dataset's, seen + unseen classes). Label
    maps are computed at each image's own resolution.
    """
    if setting not in SETTINGS:
        raise ValueError(f"setting must be one of {SETTINGS}, got {setting!r}")
    vocab = vocab or dataset.vocabulary
    if vocab.class_names != dataset.vocabulary.class_names:
        raise ValueError("evaluation vocabulary must list the dataset's classes in its order")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    cond = model.encode_vocabulary(vocab)
    size = model.cfg.image_size
    class_objects = np.asarray(vocab.class_objects)
    ev = PartSegEvaluator(vocab.num_classes, vocab.class_seen, vocab.class_names)
    n = len(dataset) if limit is None else min(limit, len(dataset))
    bar = tqdm(total=n, desc=f"eval {setting}", disable=not progress, leave=False)
    for start in range(0, n, batch_size):
        samples = [dataset[i] for i in range(start, min(n, start + batch_size))]
        x = torch.from_numpy(np.stack([preprocess(s["image"], size) for s in samples]))
        out = model.forward_image(x.to(device), cond)
        logits = out.logits.float().cpu().numpy()
        obj_logits = None if out.object_logits is None else out.object_logits.float().cpu().numpy()
        for j, s in enumerate(samples):
            gt = s["part"]
            if setting == "oracle-obj":
                pred = oracle_obj(logits[j], class_objects, *oracle_object(s))
            else:
                pred = pred_all(logits[j], class_objects, gt.shape,
                                None if obj_logits is None else obj_logits[j])
            ev.update(pred, gt)
        bar.update(len(samples))
    bar.close()
    model.train(was_training)
    result = ev.compute()
    result.update(setting=setting, samples=n)
    return result


def evaluate_segmenter(seg: Any, dataset: Any, setting: str, limit: int | None = None,
                       progress: bool = True, keep_labels: bool = False, batch_size: int = 8
                       ) -> dict[str, Any]:
    """The same protocol as `evaluate`, through a deployed `runtime.Segmenter` (any backend).

    The bundle's vocabulary must list the dataset's classes in its order. Pred-All runs
    `predict_batch` on `batch_size` images; Oracle-Obj one `predict` per (image, object). With
    `keep_labels`, the result also holds "labels": the predicted (H, W) int32 maps.
    """
    if setting not in SETTINGS:
        raise ValueError(f"setting must be one of {SETTINGS}, got {setting!r}")
    vocab = dataset.vocabulary
    if seg.vocabulary.class_names != vocab.class_names:
        raise ValueError("the bundle's vocabulary must list the dataset's classes in its order")
    ev = PartSegEvaluator(vocab.num_classes, vocab.class_seen, vocab.class_names)
    n = len(dataset) if limit is None else min(limit, len(dataset))
    labels = []
    bar = tqdm(total=n, desc=f"eval {setting} ({seg.backend_name})", disable=not progress,
               leave=False)
    for start in range(0, n, batch_size):
        samples = [dataset[i] for i in range(start, min(n, start + batch_size))]
        if setting == "oracle-obj":
            preds = []
            for s in samples:
                mask, obj = oracle_object(s)
                preds.append(seg.predict(s["image"], object_mask=mask, object_class=obj).labels)
        else:
            preds = [p.labels for p in seg.predict_batch([s["image"] for s in samples])]
        for s, pred in zip(samples, preds):
            ev.update(pred, s["part"])
        if keep_labels:
            labels.extend(preds)
        bar.update(len(samples))
    bar.close()
    result = ev.compute()
    result.update(setting=setting, samples=n, backend=seg.backend_name)
    if keep_labels:
        result["labels"] = labels
    return result
