"""Dataset loaders for open-vocabulary part segmentation (numpy + Pillow, no torch).

Every loader yields samples in one common format::

    {
        "image":  (H, W, 3) uint8 RGB,
        "part":   (H, W) int64, class index into ``dataset.vocabulary.classes``,
                  IGNORE_LABEL (255) = ignore / background / unlabeled,
        "object": (H, W) int64, object index into ``dataset.vocabulary.objects``,
                  IGNORE_LABEL (255) = background / no object,
        "name":   str, a stable sample id (file stem, plus "#object" for per-object samples),
    }

Supported datasets (``load_dataset(kind, root, split)``):

``"pascal_part_116"`` (OV-PARTS refined Pascal-Part, folder usually ``PascalPart116``)::

    ROOT/images/{train,val}/*.jpg
    ROOT/annotations_detectron2_part/{train,val}/*.png   uint8: class index, 255 = ignore
    ROOT/annotations_detectron2_obj/{train,val}/*.png    uint8: index into the 20 VOC objects
                                                         (vocabularies.PASCAL_PART_116_OBJ_CLASS_NAMES),
                                                         255 = background
    ROOT/annotations_detectron2_part/{split}_obj_label_count.json   optional, {png: [obj ids]}

  VOC objects without part classes (boat, chair, diningtable, sofa) become "no object" (255).

``"ade20k_part_234"`` (OV-PARTS ADE20K-Part-234, folder usually ``ADE20KPart234``)::

    ROOT/images/{training,validation}/*.jpg
    ROOT/annotations_detectron2_part/{training,validation}/*.png   uint16: class index, 65535 = ignore
    ROOT/ade20k_instance_{train,val}.json    COCO instances; category_id indexes the 44 objects
                                             (vocabularies.ADE20K_PART_234_OBJ_CLASS_NAMES)

``"partimagenet"`` (PartImageNet COCO release)::

    ROOT/images/{train,val,test}/<file_name from the JSON>
    ROOT/annotations/{split}.json   (official layout) or ROOT/{split}.json (PartCLIPSeg layout)

  Classes come from the JSON ``categories`` (supercategory x part, "quadruped's head"); the
  object map is the supercategory of each part. Polygons / RLE are rasterized here.

``"synthparts"`` (ours): the Pascal layout (images may be .jpg or .png) plus ``ROOT/classes.json``
= ``{"dataset": "SynthParts", "format_version": 1, ..., "vocabulary": Vocabulary.to_dict()}``;
its part and object PNGs are already in the common convention.

Per-object samples (the OV-PARTS evaluation protocol): with ``per_object=True`` a dataset holds
one sample per (image, object class) for Pascal-Part-116 and SynthParts, and one per object
instance for ADE20K-Part-234; part labels outside that object and the other objects are set to
255. ``per_object=None`` (default) means True for evaluation splits (anything but train) and
False for train. For ADE20K-Part-234 the val protocol also includes the unseen-object instances
of the training images (``ade_val_with_train_unseen``, default on, as OV-PARTS does).

Datasets are plain picklable objects (lists of file paths and small annotation records), so a
torch ``DataLoader`` with workers can use them; files are read lazily in ``__getitem__``.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
from PIL import Image, ImageOps

from runtime.errors import UserError
from runtime.io import IGNORE_LABEL
from runtime.vocabulary import Vocabulary, VocabularyError

from .vocabularies import (
    ADE20K_PART_234,
    ADE20K_PART_234_OBJ_CLASS_NAMES,
    PARTIMAGENET_CATEGORIES,
    PASCAL_PART_116,
    PASCAL_PART_116_OBJ_CLASS_NAMES,
    partimagenet_vocabulary,
)

__all__ = [
    "ADE_IGNORE_VALUE",
    "KINDS",
    "DatasetError",
    "SampleRecord",
    "OVPartsDataset",
    "load_dataset",
    "normalize_kind",
    "read_image",
    "read_label_png",
    "decode_rle",
    "rasterize_polygons",
    "segmentation_to_mask",
]

ADE_IGNORE_VALUE = 65535
"""Ignore value of the 16-bit ADE20K-Part-234 part PNGs (mapped to IGNORE_LABEL)."""

KINDS = ("synthparts", "pascal_part_116", "ade20k_part_234", "partimagenet")

_IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".JPEG", ".JPG", ".PNG")
_TRAIN_SPLITS = ("train", "training")
_KIND_ALIASES = {
    "synthparts": "synthparts", "synth": "synthparts",
    "pascalpart116": "pascal_part_116", "pascalpart": "pascal_part_116", "pascal": "pascal_part_116",
    "voc": "pascal_part_116",
    "ade20kpart234": "ade20k_part_234", "adepart234": "ade20k_part_234", "ade20k": "ade20k_part_234",
    "ade": "ade20k_part_234",
    "partimagenet": "partimagenet", "pin": "partimagenet",
}
# Folder names a dataset root may carry (the OV-PARTS code and README disagree on dashes).
_ROOT_SUBDIRS = {
    "pascal_part_116": ("PascalPart116", "Pascal-Part-116", "pascal_part_116"),
    "ade20k_part_234": ("ADE20KPart234", "ADE20K-Part-234", "ade20k_part_234"),
    "partimagenet": ("PartImageNet", "partimagenet"),
    "synthparts": ("SynthParts", "synthparts"),
}


class DatasetError(UserError, ValueError):
    """A dataset folder or annotation file is missing, malformed, or holds invalid labels."""


@dataclass(frozen=True)
class SampleRecord:
    """Where one sample's data lives (picklable, small).

    Attributes:
        image: image file path.
        name: sample id.
        part: part label PNG path (None for PartImageNet, whose parts are in ``annotations``).
        obj: object label PNG path (Pascal layout) or None.
        object_value: per-object samples: the raw object value (Pascal/SynthParts) kept; else None.
        annotations: COCO annotations used by this sample as (raw category id, segmentation)
            pairs: object instances (ADE20K) or parts (PartImageNet).
        size: (height, width) stated by a COCO JSON, checked against the image; or None.
    """

    image: str
    name: str
    part: str | None = None
    obj: str | None = None
    object_value: int | None = None
    annotations: tuple[tuple[int, Any], ...] | None = None
    size: tuple[int, int] | None = None


# ---------------------------------------------------------------------------------------------
# file readers
# ---------------------------------------------------------------------------------------------
def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image file as (H, W, 3) uint8 RGB (EXIF orientation applied, like detectron2)."""
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
    except FileNotFoundError:
        raise DatasetError(f"image file not found: {path}") from None
    except (OSError, Image.DecompressionBombError) as e:
        raise DatasetError(f"cannot read image {path}: {e}") from e


def read_label_png(path: str | os.PathLike) -> np.ndarray:
    """Read a single-channel label PNG (8-bit L/P or 16-bit I;16) as an (H, W) int64 array of its
    raw pixel values (palette PNGs give their indices, not colours)."""
    try:
        with Image.open(path) as im:
            mode = im.mode
            arr = np.asarray(im)
    except FileNotFoundError:
        raise DatasetError(f"label file not found: {path}") from None
    except (OSError, Image.DecompressionBombError) as e:
        raise DatasetError(f"cannot read label PNG {path}: {e}") from e
    if arr.ndim != 2:
        raise DatasetError(
            f"{path}: expected a single-channel label PNG (mode L, P or I;16 holding class "
            f"indices), got mode {mode} with shape {arr.shape}")
    return arr.astype(np.int64)


# ---------------------------------------------------------------------------------------------
# COCO segmentation decoding (no pycocotools)
# ---------------------------------------------------------------------------------------------
def _rle_counts_from_string(s: str | bytes) -> list[int]:
    """Decode the compressed COCO RLE string (pycocotools maskApi.c ``rleFrString``)."""
    data = s.encode("ascii") if isinstance(s, str) else bytes(s)
    counts: list[int] = []
    p = 0
    while p < len(data):
        x = 0
        k = 0
        more = True
        while more:
            if p >= len(data):
                raise DatasetError("truncated compressed RLE string")
            c = data[p] - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def decode_rle(rle: Mapping[str, Any]) -> np.ndarray:
    """Decode a COCO RLE ``{"size": [h, w], "counts": str | bytes | list[int]}`` to (h, w) bool.

    Counts alternate background/foreground runs in column-major order, starting with background.
    """
    try:
        h, w = (int(v) for v in rle["size"])
        counts = rle["counts"]
    except (KeyError, TypeError, ValueError) as e:
        raise DatasetError(f"malformed RLE segmentation {rle!r:.80}: needs size and counts") from e
    cnts = list(counts) if isinstance(counts, (list, tuple)) else _rle_counts_from_string(counts)
    cnts_arr = np.asarray(cnts, dtype=np.int64)
    if (cnts_arr < 0).any() or int(cnts_arr.sum()) != h * w:
        raise DatasetError(f"RLE counts sum to {int(cnts_arr.sum())}, expected h*w = {h * w}")
    flat = np.repeat((np.arange(len(cnts_arr)) % 2).astype(bool), cnts_arr)
    return flat.reshape(w, h).T.copy()


def rasterize_polygons(polygons: Sequence[Sequence[float]], height: int, width: int) -> np.ndarray:
    """Rasterize COCO polygons ``[[x1, y1, x2, y2, ...], ...]`` to an (height, width) bool mask.

    COCO coordinates are continuous (pixel (r, c) covers [c, c+1] x [r, r+1]); a pixel is set when
    its centre lies inside a polygon (even-odd rule per polygon, polygons of one annotation are
    merged by union, like pycocotools). Polygons with fewer than 3 points are skipped.
    """
    mask = np.zeros((height, width), dtype=bool)
    for poly in polygons:
        pts = np.asarray(poly, dtype=np.float64).reshape(-1)
        if pts.size < 6 or pts.size % 2:
            continue
        pts = pts.reshape(-1, 2)
        x0, y0 = pts[:, 0], pts[:, 1]
        x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
        r_lo = max(0, int(np.ceil(y0.min() - 0.5)))
        r_hi = min(height - 1, int(np.floor(y0.max() - 0.5)))
        if r_hi < r_lo:
            continue
        rows = np.arange(r_lo, r_hi + 1)
        yc = rows[:, None] + 0.5
        cross = ((y0 <= yc) & (yc < y1)) | ((y1 <= yc) & (yc < y0))
        dy = np.where(y1 == y0, 1.0, y1 - y0)
        with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
            xs = np.where(cross, x0 + (yc - y0) * (x1 - x0) / dy, np.inf)
        xs.sort(axis=1)
        n_cross = cross.sum(axis=1)
        for i in np.nonzero(n_cross)[0]:
            xr = xs[i, : n_cross[i]]
            for a, b in zip(xr[0::2], xr[1::2]):
                c0 = max(0, int(np.ceil(a - 0.5)))
                c1 = min(width, int(np.ceil(b - 0.5)))
                if c1 > c0:
                    mask[rows[i], c0:c1] = True
    return mask


def segmentation_to_mask(segm: Any, height: int, width: int) -> np.ndarray:
    """COCO ``segmentation`` (polygon list, uncompressed or compressed RLE) -> (H, W) bool mask."""
    if isinstance(segm, (list, tuple)):
        if segm and isinstance(segm[0], (int, float)):
            segm = [segm]
        return rasterize_polygons(segm, height, width)
    if isinstance(segm, Mapping):
        mask = decode_rle(segm)
        if mask.shape != (height, width):
            raise DatasetError(f"RLE size {mask.shape} differs from the image size "
                               f"{(height, width)}")
        return mask
    raise DatasetError(f"unsupported COCO segmentation of type {type(segm).__name__}")


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def normalize_kind(kind: str) -> str:
    """Canonical dataset kind from a loose spelling ("Pascal-Part-116" -> "pascal_part_116")."""
    key = str(kind).strip().lower().replace("-", "").replace("_", "").replace(" ", "")
    if key not in _KIND_ALIASES:
        raise DatasetError(f"unknown dataset kind {kind!r}; expected one of {list(KINDS)}")
    return _KIND_ALIASES[key]


def _require_dir(path: Path, what: str, layout: str) -> Path:
    if not path.is_dir():
        raise DatasetError(f"missing folder {path} ({what}). Expected layout:\n{layout}")
    return path


def _require_file(path: Path, what: str, layout: str) -> Path:
    if not path.is_file():
        raise DatasetError(f"missing file {path} ({what}). Expected layout:\n{layout}")
    return path


def _files_by_stem(folder: Path, exts: Sequence[str]) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.suffix in exts and not p.name.startswith("."):
            out.setdefault(p.stem, p)
    return out


def _load_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path} is not valid JSON: {e}") from e


def _check_labels(arr: np.ndarray, n: int, ignore: Sequence[int], path: str, what: str) -> None:
    bad = (arr < 0) | (arr >= n)
    for v in ignore:
        bad &= arr != v
    if bad.any():
        vals = np.unique(arr[bad])
        shown = ", ".join(str(int(v)) for v in vals[:8]) + (" ..." if vals.size > 8 else "")
        raise DatasetError(
            f"{path}: {what} label value(s) {shown} outside the {n} {what} classes "
            f"[0, {n}) and not the ignore value{'s' if len(ignore) > 1 else ''} "
            f"{', '.join(str(v) for v in ignore)}")


def _check_size(ref: tuple[int, ...], arr: np.ndarray, ref_path: str, path: str) -> None:
    if tuple(arr.shape[:2]) != tuple(ref[:2]):
        raise DatasetError(f"size mismatch: {path} is {arr.shape[1]}x{arr.shape[0]} (WxH) but the "
                           f"image {ref_path} is {ref[1]}x{ref[0]}")


def _lut(mapping: Mapping[int, int], size: int) -> np.ndarray:
    """Lookup table raw value -> mapped value (IGNORE_LABEL where unmapped), for values < size."""
    lut = np.full(size, IGNORE_LABEL, dtype=np.int64)
    for k, v in mapping.items():
        if 0 <= k < size:
            lut[k] = v
    return lut


_PASCAL_LAYOUT = """  ROOT/images/{split}/*.jpg
  ROOT/annotations_detectron2_part/{split}/*.png   (uint8 class index, 255 = ignore)
  ROOT/annotations_detectron2_obj/{split}/*.png    (uint8 object index, 255 = background)"""
_SYNTH_LAYOUT = _PASCAL_LAYOUT + """
  ROOT/classes.json  {"dataset": "SynthParts", "format_version": 1, "vocabulary": {...}}"""
_ADE_LAYOUT = """  ROOT/images/{training,validation}/*.jpg
  ROOT/annotations_detectron2_part/{training,validation}/*.png   (uint16 class index, 65535 = ignore)
  ROOT/ade20k_instance_{train,val}.json                        (COCO object instances)"""
_PIN_LAYOUT = """  ROOT/images/{split}/<file_name>
  ROOT/annotations/{split}.json  (or ROOT/{split}.json)   (COCO part annotations)"""


# ---------------------------------------------------------------------------------------------
# the dataset
# ---------------------------------------------------------------------------------------------
class OVPartsDataset:
    """Indexable, lazily-reading, picklable part-segmentation dataset (see the module docstring).

    Args:
        kind: "synthparts", "pascal_part_116", "ade20k_part_234" or "partimagenet" (loose
            spellings such as "Pascal-Part-116" accepted).
        root: dataset folder (or its parent holding e.g. ``PascalPart116/``).
        split: "train" or "val" ("training"/"validation" accepted; PartImageNet also "test").
        per_object: one sample per (image, object) as in the OV-PARTS evaluation; None = True
            for every split except train. PartImageNet images hold one object: always per image.
        ade_val_with_train_unseen: ADE20K-Part-234 per-object val only: also evaluate the
            instances of unseen objects in the training images (OV-PARTS protocol).
        unseen_objects: PartImageNet only: objects (lower-case supercategories) held out.
        validate: check label values against the class list on every read (cheap; on by default).

    Attributes:
        kind, root, split, per_object, vocabulary, samples (list of SampleRecord).
    """

    def __init__(
        self,
        kind: str,
        root: str | os.PathLike,
        split: str = "train",
        *,
        per_object: bool | None = None,
        ade_val_with_train_unseen: bool = True,
        unseen_objects: Sequence[str] = (),
        validate: bool = True,
    ) -> None:
        self.kind = normalize_kind(kind)
        self.split = str(split)
        self.root = self._resolve_root(Path(root))
        self.per_object = (self.split not in _TRAIN_SPLITS) if per_object is None else bool(per_object)
        self.validate = bool(validate)
        # raw object value -> vocabulary object index (Pascal obj PNG values / ADE category ids)
        self._obj_map: dict[int, int] = {}
        # raw part category id -> class index (PartImageNet)
        self._part_map: dict[int, int] = {}
        self.vocabulary: Vocabulary
        self.samples: list[SampleRecord]
        if self.kind == "pascal_part_116":
            self._init_pascal()
        elif self.kind == "synthparts":
            self._init_synthparts()
        elif self.kind == "ade20k_part_234":
            self._init_ade(ade_val_with_train_unseen)
        else:
            self.per_object = False  # one object per PartImageNet image
            self._init_partimagenet(unseen_objects)
        if not self.samples:
            raise DatasetError(f"no samples found for {self.kind} split {self.split!r} in {self.root}")

    # -- construction ---------------------------------------------------------------------------
    def _resolve_root(self, root: Path) -> Path:
        if not root.is_dir():
            raise DatasetError(f"dataset root {root} does not exist or is not a folder")
        if (root / "images").is_dir() or (root / "classes.json").is_file():
            return root
        for sub in _ROOT_SUBDIRS[self.kind]:
            if (root / sub / "images").is_dir():
                return root / sub
        return root  # the layout checks below name what is missing

    def _pascal_layout_records(self, layout: str, split_dir: str) -> list[SampleRecord]:
        img_dir = _require_dir(self.root / "images" / split_dir, "images", layout)
        part_dir = _require_dir(self.root / "annotations_detectron2_part" / split_dir,
                                "part label PNGs", layout)
        obj_dir = _require_dir(self.root / "annotations_detectron2_obj" / split_dir,
                               "object label PNGs", layout)
        images = _files_by_stem(img_dir, _IMAGE_EXTS)
        parts = _files_by_stem(part_dir, (".png", ".PNG"))
        objs = _files_by_stem(obj_dir, (".png", ".PNG"))
        if not parts:
            raise DatasetError(f"no part label PNGs in {part_dir}. Expected layout:\n{layout}")
        stems = sorted(set(parts) & set(images))
        if len(stems) != len(parts) or len(stems) != len(images):
            warnings.warn(f"{img_dir} has {len(images)} images and {part_dir} {len(parts)} part "
                          f"PNGs; using the {len(stems)} names present in both", stacklevel=3)
        missing_obj = [s for s in stems if s not in objs]
        if missing_obj:
            raise DatasetError(f"{len(missing_obj)} object label PNG(s) missing in {obj_dir}, e.g. "
                               f"{missing_obj[0]}.png. Expected layout:\n{layout}")
        return [SampleRecord(image=str(images[s]), name=s, part=str(parts[s]), obj=str(objs[s]))
                for s in stems]

    def _expand_per_object(self, records: list[SampleRecord], counts: Mapping[str, Sequence[int]] | None,
                           ) -> list[SampleRecord]:
        """One record per (image, object value present), objects outside the vocabulary skipped."""
        out: list[SampleRecord] = []
        for r in records:
            if counts is not None and Path(r.part or "").name in counts:
                values = sorted(int(v) for v in counts[Path(r.part or "").name])
            else:
                arr = read_label_png(r.obj or "")
                values = [int(v) for v in np.unique(arr) if v != IGNORE_LABEL]
            for v in values:
                if v not in self._obj_map:
                    if self.kind == "synthparts" or not 0 <= v < len(PASCAL_PART_116_OBJ_CLASS_NAMES):
                        raise DatasetError(
                            f"{r.obj}: object label value {v} outside the "
                            f"{self._num_raw_objects()} object classes and not the background 255")
                    continue  # a VOC object without part classes (boat, chair, ...)
                name = self.vocabulary.objects[self._obj_map[v]]
                out.append(SampleRecord(image=r.image, name=f"{r.name}#{name}", part=r.part,
                                        obj=r.obj, object_value=v))
        return out

    def _num_raw_objects(self) -> int:
        if self.kind == "pascal_part_116":
            return len(PASCAL_PART_116_OBJ_CLASS_NAMES)
        if self.kind == "ade20k_part_234":
            return len(ADE20K_PART_234_OBJ_CLASS_NAMES)
        return len(self.vocabulary.objects)

    def _init_pascal(self) -> None:
        self.vocabulary = PASCAL_PART_116
        self._obj_map = {i: self.vocabulary.objects.index(n)
                         for i, n in enumerate(PASCAL_PART_116_OBJ_CLASS_NAMES)
                         if n in self.vocabulary.objects}
        split_dir = {"training": "train", "validation": "val"}.get(self.split, self.split)
        records = self._pascal_layout_records(_PASCAL_LAYOUT, split_dir)
        if self.per_object:
            count_file = self.root / "annotations_detectron2_part" / f"{split_dir}_obj_label_count.json"
            counts = _load_json(count_file) if count_file.is_file() else None
            records = self._expand_per_object(records, counts)
        self.samples = records

    def _init_synthparts(self) -> None:
        meta_path = _require_file(self.root / "classes.json", "SynthParts class list", _SYNTH_LAYOUT)
        meta = _load_json(meta_path)
        if not isinstance(meta, dict) or "vocabulary" not in meta:
            raise DatasetError(f"{meta_path}: expected an object with a 'vocabulary' entry")
        version = meta.get("format_version")
        if version != 1:
            raise DatasetError(f"{meta_path}: unsupported format_version {version!r} (this loader "
                               "reads format_version 1)")
        try:
            self.vocabulary = Vocabulary.from_dict(meta["vocabulary"])
        except VocabularyError as e:
            raise DatasetError(f"{meta_path}: {e}") from e
        self._obj_map = {i: i for i in range(len(self.vocabulary.objects))}
        records = self._pascal_layout_records(_SYNTH_LAYOUT, self.split)
        if self.per_object:
            records = self._expand_per_object(records, None)
        self.samples = records

    def _init_ade(self, with_train_unseen: bool) -> None:
        self.vocabulary = ADE20K_PART_234
        is_train = self.split in _TRAIN_SPLITS
        if not is_train and self.split not in ("val", "validation"):
            raise DatasetError(f"ADE20K-Part-234 has splits train/val, not {self.split!r}")
        records = self._ade_records("train" if is_train else "val", self.per_object, None)
        if self.per_object and not is_train and with_train_unseen:
            unseen = {i for i, n in enumerate(ADE20K_PART_234_OBJ_CLASS_NAMES)
                      if n in self.vocabulary.unseen_objects}
            try:
                records += self._ade_records("train", True, unseen)
            except DatasetError as e:
                raise DatasetError(f"{e}\n(the OV-PARTS val protocol also evaluates the unseen-object "
                                   "instances of the training images; pass "
                                   "ade_val_with_train_unseen=False to skip them)") from e
        self.samples = records

    def _ade_records(self, split: str, per_object: bool, only_raw: set[int] | None) -> list[SampleRecord]:
        sub = "training" if split == "train" else "validation"
        img_dir = _require_dir(self.root / "images" / sub, "images", _ADE_LAYOUT)
        part_dir = _require_dir(self.root / "annotations_detectron2_part" / sub, "16-bit part PNGs",
                                _ADE_LAYOUT)
        json_path = _require_file(self.root / f"ade20k_instance_{split}.json",
                                  "COCO object instances", _ADE_LAYOUT)
        coco = _load_json(json_path)
        self._obj_map = self._ade_object_map(coco, json_path)
        anns_by_image: dict[Any, list[dict]] = {}
        for a in coco.get("annotations", []):
            anns_by_image.setdefault(a.get("image_id"), []).append(a)
        out: list[SampleRecord] = []
        for img in sorted(coco.get("images", []), key=lambda d: d["id"]):
            fname = str(img["file_name"])
            image_path = img_dir / fname
            stem = os.path.splitext(fname)[0]
            part_path = part_dir / (stem + ".png")
            size = (int(img["height"]), int(img["width"])) if "height" in img else None
            anns = []
            for a in anns_by_image.get(img["id"], []):
                cat = int(a["category_id"])
                if cat not in self._obj_map:
                    raise DatasetError(f"{json_path}: annotation {a.get('id')} has category_id {cat} "
                                       f"outside the {len(ADE20K_PART_234_OBJ_CLASS_NAMES)} objects")
                if a.get("segmentation"):
                    anns.append((a.get("id"), cat, a["segmentation"]))
            name = Path(stem).name
            if not per_object:
                out.append(SampleRecord(image=str(image_path), name=name, part=str(part_path),
                                        annotations=tuple((c, s) for _, c, s in anns), size=size))
                continue
            for ann_id, cat, segm in anns:
                if only_raw is not None and cat not in only_raw:
                    continue
                obj_name = self.vocabulary.objects[self._obj_map[cat]]
                out.append(SampleRecord(image=str(image_path), name=f"{name}#{obj_name}#{ann_id}",
                                        part=str(part_path), annotations=((cat, segm),), size=size))
        return out

    def _ade_object_map(self, coco: Mapping[str, Any], json_path: Path) -> dict[int, int]:
        """category_id -> vocabulary object index. OV-PARTS uses category_id as a 0-based index into
        the 44-object list; if the JSON's own categories name vocabulary objects, trust them."""
        cats = coco.get("categories") or []
        objects = self.vocabulary.objects
        if cats and all(str(c.get("name", "")) in objects for c in cats):
            return {int(c["id"]): objects.index(str(c["name"])) for c in cats}
        return {i: objects.index(n) for i, n in enumerate(ADE20K_PART_234_OBJ_CLASS_NAMES)}

    def _init_partimagenet(self, unseen_objects: Sequence[str]) -> None:
        img_dir = _require_dir(self.root / "images" / self.split, "images", _PIN_LAYOUT)
        candidates = [self.root / "annotations" / f"{self.split}.json", self.root / f"{self.split}.json"]
        json_path = next((p for p in candidates if p.is_file()), None)
        if json_path is None:
            raise DatasetError(f"missing file {candidates[0]} (or {candidates[1]}): PartImageNet COCO "
                               f"part annotations. Expected layout:\n{_PIN_LAYOUT}")
        coco = _load_json(json_path)
        cats = list(coco.get("categories") or [])
        # The official JSON lists the 40 part categories ("Quadruped Head", supercategory
        # "Quadruped"). PartCLIPSeg's preprocessing replaces `categories` by its object-specific
        # class map ("impala's head") but keeps the official part ids in the annotations.
        official = bool(cats) and all("'s " not in str(c.get("name", "")) for c in cats)
        if not official:
            cats = [dict(c) for c in PARTIMAGENET_CATEGORIES]
        try:
            self.vocabulary = partimagenet_vocabulary(cats, unseen_objects)
        except VocabularyError as e:
            raise DatasetError(f"{json_path}: {e}") from e
        ordered = sorted(cats, key=lambda c: int(c["id"]))
        self._part_map = {int(c["id"]): k for k, c in enumerate(ordered)}
        anns_by_image: dict[Any, list[dict]] = {}
        for a in coco.get("annotations", []):
            anns_by_image.setdefault(a.get("image_id"), []).append(a)
        out: list[SampleRecord] = []
        for img in sorted(coco.get("images", []), key=lambda d: d["id"]):
            fname = str(img["file_name"])
            anns = []
            for a in anns_by_image.get(img["id"], []):
                cat = int(a["category_id"])
                if cat not in self._part_map:
                    raise DatasetError(f"{json_path}: annotation {a.get('id')} has category_id {cat}, "
                                       f"not one of the {len(self._part_map)} part categories")
                if a.get("segmentation"):
                    anns.append((cat, a["segmentation"]))
            size = (int(img["height"]), int(img["width"])) if "height" in img else None
            out.append(SampleRecord(image=str(img_dir / fname), name=Path(fname).stem,
                                    annotations=tuple(anns), size=size))
        self.samples = out

    # -- access ---------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.samples)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for i in range(len(self)):
            yield self[i]

    def __repr__(self) -> str:
        return (f"OVPartsDataset(kind={self.kind!r}, root={str(self.root)!r}, split={self.split!r}, "
                f"per_object={self.per_object}, samples={len(self)}, "
                f"classes={self.vocabulary.num_classes})")

    def __getitem__(self, index: int) -> dict[str, Any]:
        """Sample ``index`` in the common format (see the module docstring)."""
        n = len(self.samples)
        if not isinstance(index, (int, np.integer)):
            raise TypeError(f"dataset indices must be integers, not {type(index).__name__}")
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for a dataset of {n} samples")
        rec = self.samples[int(index)]
        image = read_image(rec.image)
        if self.kind in ("pascal_part_116", "synthparts"):
            part, obj = self._read_pascal_layout(rec, image.shape)
        elif self.kind == "ade20k_part_234":
            part, obj = self._read_ade(rec, image.shape)
        else:
            part, obj = self._read_partimagenet(rec, image.shape)
        return {"image": image, "part": part, "object": obj, "name": rec.name}

    def _read_pascal_layout(self, rec: SampleRecord, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
        assert rec.part is not None and rec.obj is not None
        part = read_label_png(rec.part)
        raw_obj = read_label_png(rec.obj)
        _check_size(shape, part, rec.image, rec.part)
        _check_size(shape, raw_obj, rec.image, rec.obj)
        if self.validate:
            _check_labels(part, self.vocabulary.num_classes, (IGNORE_LABEL,), rec.part, "part")
            _check_labels(raw_obj, self._num_raw_objects(), (IGNORE_LABEL,), rec.obj, "object")
        lut = _lut(self._obj_map, 256)
        obj = lut[np.clip(raw_obj, 0, 255)]
        obj[(raw_obj < 0) | (raw_obj > 255)] = IGNORE_LABEL
        part = np.where((part >= 0) & (part < self.vocabulary.num_classes), part, IGNORE_LABEL)
        if rec.object_value is not None:
            keep = raw_obj == rec.object_value
            part = np.where(keep, part, IGNORE_LABEL)
            obj = np.where(keep, obj, IGNORE_LABEL)
        return part.astype(np.int64), obj.astype(np.int64)

    def _coco_size(self, rec: SampleRecord, shape: tuple[int, ...], source: str) -> tuple[int, int]:
        h, w = int(shape[0]), int(shape[1])
        if rec.size is not None and tuple(rec.size) != (h, w):
            raise DatasetError(f"size mismatch: {source} says {rec.size[1]}x{rec.size[0]} (WxH) for "
                               f"{rec.image}, which is {w}x{h}")
        return h, w

    def _read_ade(self, rec: SampleRecord, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
        assert rec.part is not None
        raw = read_label_png(rec.part)
        _check_size(shape, raw, rec.image, rec.part)
        ignore = (ADE_IGNORE_VALUE, IGNORE_LABEL) if raw.max(initial=0) <= 255 else (ADE_IGNORE_VALUE,)
        if self.validate:
            _check_labels(raw, self.vocabulary.num_classes, ignore, rec.part, "part")
        part = np.where((raw >= 0) & (raw < self.vocabulary.num_classes), raw, IGNORE_LABEL)
        h, w = self._coco_size(rec, shape, "the instance JSON")
        obj = np.full((h, w), IGNORE_LABEL, dtype=np.int64)
        for cat, segm in rec.annotations or ():
            obj[segmentation_to_mask(segm, h, w)] = self._obj_map[cat]
        if self.per_object:
            part = np.where(obj != IGNORE_LABEL, part, IGNORE_LABEL)
        return part.astype(np.int64), obj

    def _read_partimagenet(self, rec: SampleRecord, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
        h, w = self._coco_size(rec, shape, "the COCO JSON")
        part = np.full((h, w), IGNORE_LABEL, dtype=np.int64)
        for cat, segm in rec.annotations or ():
            part[segmentation_to_mask(segm, h, w)] = self._part_map[cat]
        class_obj = np.asarray(self.vocabulary.class_objects + (IGNORE_LABEL,), dtype=np.int64)
        obj = class_obj[np.where(part == IGNORE_LABEL, len(class_obj) - 1, part)]
        return part, obj


def load_dataset(kind: str, root: str | os.PathLike, split: str = "train", **kwargs: Any) -> OVPartsDataset:
    """Build a dataset: ``kind`` in KINDS, ``root`` its folder, ``split`` "train"/"val"; keyword
    arguments go to ``OVPartsDataset`` (``per_object``, ``ade_val_with_train_unseen``, ...)."""
    return OVPartsDataset(kind, root, split, **kwargs)
