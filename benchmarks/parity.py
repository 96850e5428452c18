"""Accuracy parity: a `runtime.Segmenter` evaluated with the OV-PARTS protocol (docs/design.md, "Evaluation").

`evaluate_segmenter` runs the library's `partclipseg.evaluation.evaluate.evaluate_segmenter`
(the evaluation protocol through the runtime) and keeps every label map with the region where it
counts, so two backends can be compared pixel by pixel (`compare`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

__all__ = ["EvalRun", "Comparison", "evaluate_segmenter", "compare", "METRICS"]

METRICS = ("miou_seen", "miou_unseen", "h_iou")


@dataclass(frozen=True)
class EvalRun:
    """One backend's evaluation of one setting.

    metrics: `PartSegEvaluator.compute()` without the per-class table (percentages).
    labels: per sample, the (H, W) int32 label map (-1 = background).
    regions: per sample, the (H, W) bool pixels the setting predicts on (Oracle-Obj: the
        object mask; Pred-All: every pixel).
    labeled: per sample, the (H, W) bool pixels with a ground-truth part (what mIoU scores).
    """

    backend: str
    setting: str
    metrics: dict[str, Any]
    labels: tuple[np.ndarray, ...]
    regions: tuple[np.ndarray, ...]
    labeled: tuple[np.ndarray, ...]
    seconds: float


@dataclass(frozen=True)
class Comparison:
    """`ours` vs `ref` on the same samples: mIoU deltas (points) and label agreement (0-1)."""

    setting: str
    delta: dict[str, float]        # METRICS -> ours - ref, percentage points (0.0 if both NaN)
    agreement: float               # share of equal labels over `regions` pixels
    agreement_labeled: float       # the same over GT-labeled pixels only

    def max_abs_delta(self) -> float:
        return max(abs(v) for v in self.delta.values())


def evaluate_segmenter(seg: Any, dataset: Any, setting: str, batch_size: int = 8) -> EvalRun:
    """Evaluate `seg` (a `runtime.Segmenter`) on `dataset` under "oracle-obj" or "pred-all".

    dataset: a `partclipseg.data.datasets` data set loaded per object for Oracle-Obj (as
    `partclipseg.evaluation.evaluate.eval_dataset` does); its vocabulary must be the bundle's.
    """
    from runtime.io import IGNORE_LABEL
    from partclipseg.evaluation.evaluate import evaluate_segmenter as evaluate_deployed
    from partclipseg.evaluation.evaluate import oracle_object

    vocab = dataset.vocabulary
    if (vocab.class_names != seg.vocabulary.class_names
            or tuple(vocab.objects) != tuple(seg.vocabulary.objects)):
        raise ValueError(f"the bundle's vocabulary ({seg.vocabulary.num_classes} classes) is not "
                         f"the data set's ({vocab.num_classes} classes, same order): parity "
                         "needs a bundle exported from a SynthParts checkpoint")
    t0 = time.perf_counter()
    result = evaluate_deployed(seg, dataset, setting, progress=False, keep_labels=True,
                               batch_size=batch_size)
    seconds = time.perf_counter() - t0
    labels = result.pop("labels")
    regions, labeled = [], []
    for i in range(len(dataset)):  # where each prediction counts, for pixel agreement
        s = dataset[i]
        regions.append(oracle_object(s)[0] if setting == "oracle-obj"
                       else np.ones(s["part"].shape, bool))
        labeled.append(s["part"] != IGNORE_LABEL)
    metrics = {k: v for k, v in result.items() if k != "per_class"}
    return EvalRun(seg.backend_name, setting, metrics, tuple(labels), tuple(regions),
                   tuple(labeled), seconds)


def _delta(a: float, b: float) -> float:
    if math.isnan(a) and math.isnan(b):
        return 0.0  # undefined for both (no class of that split in GT or prediction)
    return a - b  # NaN when only one is undefined: fails every threshold


def _agreement(a: Sequence[np.ndarray], b: Sequence[np.ndarray],
               where: Sequence[np.ndarray]) -> float:
    same = sum(int(np.count_nonzero((x == y) & w)) for x, y, w in zip(a, b, where))
    total = sum(int(np.count_nonzero(w)) for w in where)
    return same / total if total else float("nan")


def compare(ours: EvalRun, ref: EvalRun) -> Comparison:
    """Deltas of `METRICS` and label agreement of `ours` against `ref` (same data, setting)."""
    if ours.setting != ref.setting or len(ours.labels) != len(ref.labels):
        raise ValueError(f"cannot compare {ours.setting} on {len(ours.labels)} samples with "
                         f"{ref.setting} on {len(ref.labels)}")
    delta = {m: _delta(ours.metrics[m], ref.metrics[m]) for m in METRICS}
    return Comparison(ours.setting, delta,
                      _agreement(ours.labels, ref.labels, ref.regions),
                      _agreement(ours.labels, ref.labels, ref.labeled))
