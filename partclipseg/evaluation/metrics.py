"""Part-segmentation metrics of the OV-PARTS / PartCLIPSeg protocol (numpy only).

* A confusion matrix over the K object-specific classes is accumulated over the whole dataset,
  on the pixels that carry a ground-truth part label only (``gt != ignore_index``).
* Predicted values outside ``[0, K)`` (background predicted as 255 or as K, "other") land in an
  extra "other" column: they count as a miss for the GT class and lower its IoU.
  (OV-PARTS' released evaluator drops such pixels from the GT count instead, so predicting
  background on a part costs nothing there; ``count_other_as_miss=False`` reproduces that.)
* IoU_k = TP_k / (GT_k + Pred_k - TP_k). A class that never appears in GT nor prediction has an
  undefined (NaN) IoU and is left out of the means, like detectron2's SemSegEvaluator; a class
  predicted but absent from GT has IoU 0.
* mIoU over seen classes, over unseen classes, and the harmonic mean h-IoU = 2su / (s + u)
  (0 when both are 0, NaN when either is undefined). All values are percentages.
* Boundary IoU (Cheng et al. 2021, detectron2 ``mask_to_boundary``): the boundary of a binary mask
  is the mask minus its erosion by a 3x3 square applied ``d = max(1, round(0.02 * diagonal))``
  times (pixels outside the image count as background). It is computed per class per image on
  the GT mask ``gt == k`` and the prediction mask ``pred == k`` restricted to labeled pixels
  (the same pixels the mIoU sees, so a prediction that is perfect on labeled pixels scores 100);
  intersections and unions are summed over the dataset. Reported as seen / unseen / h.
  (detectron2 erodes the multi-class label map itself, which mixes classes; this is the per-class
  definition the Boundary IoU paper uses.)
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from runtime.io import IGNORE_LABEL

__all__ = [
    "PartSegEvaluator",
    "boundary_dilation",
    "erode",
    "mask_to_boundary",
    "harmonic_mean",
    "format_table",
]


def boundary_dilation(height: int, width: int, dilation_ratio: float = 0.02) -> int:
    """Boundary width in pixels: ``max(1, round(dilation_ratio * sqrt(h^2 + w^2)))`` (detectron2)."""
    return max(1, int(round(dilation_ratio * math.sqrt(height * height + width * width))))


def erode(mask: np.ndarray, iterations: int) -> np.ndarray:
    """Binary erosion of an (H, W) mask by a 3x3 square applied ``iterations`` times, i.e. by a
    (2n+1) x (2n+1) square, with pixels outside the image treated as False (like detectron2's
    zero-padded ``cv2.erode``). Returns an (H, W) bool array."""
    m = np.asarray(mask, dtype=bool)
    if m.ndim != 2:
        raise ValueError(f"erode expects a 2-D mask, got shape {m.shape}")
    out = np.zeros_like(m)
    n = int(iterations)
    if n <= 0:
        return m.copy()
    rows = np.flatnonzero(m.any(axis=1))
    if rows.size == 0:
        return out
    cols = np.flatnonzero(m.any(axis=0))
    r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    crop = np.pad(m[r0:r1, c0:c1], n).astype(np.int32)
    # integral image with a leading zero row / column
    s = np.zeros((crop.shape[0] + 1, crop.shape[1] + 1), dtype=np.int64)
    np.cumsum(np.cumsum(crop, axis=0), axis=1, out=s[1:, 1:])
    k = 2 * n + 1
    window = s[k:, k:] - s[:-k, k:] - s[k:, :-k] + s[:-k, :-k]
    out[r0:r1, c0:c1] = window == k * k
    return out


def mask_to_boundary(mask: np.ndarray, dilation: int) -> np.ndarray:
    """Inner boundary of an (H, W) binary mask: the mask minus its erosion (see ``erode``)."""
    m = np.asarray(mask, dtype=bool)
    return m & ~erode(m, dilation)


def harmonic_mean(seen: float, unseen: float) -> float:
    """h = 2su / (s + u); 0 if both are 0; NaN if either is NaN."""
    if math.isnan(seen) or math.isnan(unseen):
        return float("nan")
    if seen + unseen == 0:
        return 0.0
    return 2.0 * seen * unseen / (seen + unseen)


def _nanmean_pct(values: np.ndarray, select: np.ndarray) -> float:
    v = values[select]
    v = v[~np.isnan(v)]
    return float(100.0 * v.mean()) if v.size else float("nan")


class PartSegEvaluator:
    """Accumulates a part-segmentation confusion matrix (and boundary statistics) over a dataset.

    Args:
        num_classes: K, the number of object-specific classes.
        class_seen: K booleans, True for classes of seen objects (e.g. ``Vocabulary.class_seen``).
        class_names: K names for the per-class table (default "class k").
        ignore_index: GT value of unlabeled pixels (255).
        boundary: also accumulate Boundary IoU.
        boundary_dilation_ratio: boundary width as a fraction of the image diagonal (0.02).
        count_other_as_miss: predictions outside [0, K) on labeled pixels lower the GT class's
            IoU (default). False reproduces OV-PARTS' released evaluator, which ignores them.
    """

    def __init__(
        self,
        num_classes: int,
        class_seen: Sequence[bool],
        class_names: Sequence[str] | None = None,
        ignore_index: int = IGNORE_LABEL,
        boundary: bool = True,
        boundary_dilation_ratio: float = 0.02,
        count_other_as_miss: bool = True,
    ) -> None:
        if int(num_classes) <= 0:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.num_classes = int(num_classes)
        self.class_seen = np.asarray([bool(s) for s in class_seen], dtype=bool)
        if self.class_seen.shape != (self.num_classes,):
            raise ValueError(f"class_seen has {self.class_seen.size} entries for "
                             f"{self.num_classes} classes")
        names = list(class_names) if class_names is not None else [
            f"class {k}" for k in range(self.num_classes)]
        if len(names) != self.num_classes:
            raise ValueError(f"class_names has {len(names)} entries for {self.num_classes} classes")
        self.class_names = names
        self.ignore_index = int(ignore_index)
        if 0 <= self.ignore_index < self.num_classes:
            raise ValueError(f"ignore_index {ignore_index} collides with a class index")
        self.boundary = bool(boundary)
        self.boundary_dilation_ratio = float(boundary_dilation_ratio)
        self.count_other_as_miss = bool(count_other_as_miss)
        self.reset()

    def reset(self) -> None:
        """Clear all accumulated statistics."""
        k = self.num_classes
        # rows: GT class, columns: predicted class, column K = "other" (outside [0, K))
        self.confusion = np.zeros((k, k + 1), dtype=np.int64)
        self.boundary_intersection = np.zeros(k, dtype=np.int64)
        self.boundary_union = np.zeros(k, dtype=np.int64)
        self.num_images = 0

    # -- accumulation ---------------------------------------------------------------------------
    def update(self, pred: np.ndarray, gt: np.ndarray) -> None:
        """Add one image, or a batch.

        Args:
            pred: (H, W) or (B, H, W) integer class map; values outside [0, K) mean
                background / other.
            gt: same shape, integer class map with values in [0, K) or ``ignore_index``.
        """
        pred = np.asarray(pred)
        gt = np.asarray(gt)
        if pred.shape != gt.shape:
            raise ValueError(f"prediction shape {pred.shape} differs from ground truth {gt.shape}")
        if gt.ndim == 3:
            for p, g in zip(pred, gt):
                self.update(p, g)
            return
        if gt.ndim != 2:
            raise ValueError(f"expected (H, W) or (B, H, W) maps, got shape {gt.shape}")
        if not (np.issubdtype(pred.dtype, np.integer) and np.issubdtype(gt.dtype, np.integer)):
            raise TypeError(f"class maps must be integer arrays, got {pred.dtype} and {gt.dtype}")
        k = self.num_classes
        gt = gt.astype(np.int64, copy=False)
        pred = pred.astype(np.int64, copy=False)
        valid = gt != self.ignore_index
        bad = valid & ((gt < 0) | (gt >= k))
        if bad.any():
            raise ValueError(f"ground truth holds value(s) {np.unique(gt[bad])[:8].tolist()} outside "
                             f"[0, {k}) that are not the ignore index {self.ignore_index}")
        g = gt[valid]
        p = pred[valid]
        p = np.where((p >= 0) & (p < k), p, k)
        self.confusion += np.bincount(g * (k + 1) + p, minlength=k * (k + 1)).reshape(k, k + 1)
        self.num_images += 1
        if self.boundary and g.size:
            self._update_boundary(pred, gt, valid)

    def _update_boundary(self, pred: np.ndarray, gt: np.ndarray, valid: np.ndarray) -> None:
        k = self.num_classes
        d = boundary_dilation(gt.shape[0], gt.shape[1], self.boundary_dilation_ratio)
        pred_valid = np.where(valid & (pred >= 0) & (pred < k), pred, -1)
        classes = np.union1d(np.unique(gt[valid]), np.unique(pred_valid[pred_valid >= 0]))
        for c in classes:
            bg = mask_to_boundary(gt == c, d)
            bp = mask_to_boundary(pred_valid == c, d)
            self.boundary_intersection[c] += int(np.count_nonzero(bg & bp))
            self.boundary_union[c] += int(np.count_nonzero(bg | bp))

    def merge(self, other: "PartSegEvaluator") -> None:
        """Add another evaluator's statistics (e.g. from another worker)."""
        if other.num_classes != self.num_classes:
            raise ValueError("cannot merge evaluators with different class counts")
        self.confusion += other.confusion
        self.boundary_intersection += other.boundary_intersection
        self.boundary_union += other.boundary_union
        self.num_images += other.num_images

    # -- results --------------------------------------------------------------------------------
    def class_iou(self) -> np.ndarray:
        """(K,) float IoU in [0, 1] per class, NaN where the class is in neither GT nor prediction."""
        k = self.num_classes
        conf = self.confusion
        tp = np.diag(conf[:, :k]).astype(np.float64)
        gt_pixels = (conf.sum(axis=1) if self.count_other_as_miss else conf[:, :k].sum(axis=1))
        pred_pixels = conf[:, :k].sum(axis=0)
        union = (gt_pixels + pred_pixels).astype(np.float64) - tp
        iou = np.full(k, np.nan)
        ok = union > 0
        iou[ok] = tp[ok] / union[ok]
        return iou

    def class_biou(self) -> np.ndarray:
        """(K,) float Boundary IoU in [0, 1] per class, NaN where both boundaries were always empty
        (or boundary statistics are off)."""
        biou = np.full(self.num_classes, np.nan)
        if not self.boundary:
            return biou
        ok = self.boundary_union > 0
        biou[ok] = self.boundary_intersection[ok] / self.boundary_union[ok]
        return biou

    def compute(self) -> dict[str, Any]:
        """Metrics in percent.

        Returns:
            dict with ``miou_seen``, ``miou_unseen``, ``h_iou``, ``miou_all``, ``biou_seen``,
            ``biou_unseen``, ``biou_h``, ``biou_all`` (floats, NaN when undefined),
            ``num_images`` and ``per_class``: a list of
            ``{index, name, seen, iou, biou, gt_pixels, pred_pixels}`` (iou/biou in percent or NaN).
        """
        k = self.num_classes
        iou = self.class_iou()
        biou = self.class_biou()
        seen, unseen = self.class_seen, ~self.class_seen
        res: dict[str, Any] = {
            "miou_seen": _nanmean_pct(iou, seen),
            "miou_unseen": _nanmean_pct(iou, unseen),
            "miou_all": _nanmean_pct(iou, np.ones(k, dtype=bool)),
            "biou_seen": _nanmean_pct(biou, seen),
            "biou_unseen": _nanmean_pct(biou, unseen),
            "biou_all": _nanmean_pct(biou, np.ones(k, dtype=bool)),
        }
        res["h_iou"] = harmonic_mean(res["miou_seen"], res["miou_unseen"])
        res["biou_h"] = harmonic_mean(res["biou_seen"], res["biou_unseen"])
        res["num_images"] = self.num_images
        gt_pixels = self.confusion.sum(axis=1)
        pred_pixels = self.confusion[:, :k].sum(axis=0)
        res["per_class"] = [
            {
                "index": c,
                "name": self.class_names[c],
                "seen": bool(self.class_seen[c]),
                "iou": float(100.0 * iou[c]),
                "biou": float(100.0 * biou[c]),
                "gt_pixels": int(gt_pixels[c]),
                "pred_pixels": int(pred_pixels[c]),
            }
            for c in range(k)
        ]
        return res

    def format_table(self, result: dict[str, Any] | None = None) -> str:
        """Readable summary + per-class table of ``result`` (default: ``self.compute()``)."""
        return format_table(self.compute() if result is None else result)


def _fmt(v: float, width: int = 6) -> str:
    return f"{'-':>{width}}" if v is None or (isinstance(v, float) and math.isnan(v)) \
        else f"{v:{width}.2f}"


def format_table(result: dict[str, Any]) -> str:
    """Render a ``PartSegEvaluator.compute()`` result as text: summary lines, then one row per
    class (index, name, seen/unseen, IoU %, boundary IoU %, GT pixels); '-' marks undefined."""
    lines = [
        f"mIoU  seen {_fmt(result['miou_seen'])}  unseen {_fmt(result['miou_unseen'])}  "
        f"h-IoU {_fmt(result['h_iou'])}  all {_fmt(result['miou_all'])}",
        f"bIoU  seen {_fmt(result['biou_seen'])}  unseen {_fmt(result['biou_unseen'])}  "
        f"h-bIoU {_fmt(result['biou_h'])}  all {_fmt(result.get('biou_all', float('nan')))}",
    ]
    per_class = result.get("per_class", [])
    if per_class:
        w = max(10, max(len(str(c["name"])) for c in per_class))
        lines.append("")
        lines.append(f"{'#':>4}  {'class':<{w}}  {'split':<6}  {'IoU':>6}  {'bIoU':>6}  {'GT px':>10}")
        for i, c in enumerate(per_class):
            idx = c.get("index", i)
            split = "seen" if c["seen"] else "unseen"
            lines.append(f"{idx:>4}  {str(c['name']):<{w}}  {split:<6}  {_fmt(c['iou'])}  "
                         f"{_fmt(c['biou'])}  {c['gt_pixels']:>10}")
    return "\n".join(lines)
