"""The deployment bundle: what export writes and the runtime reads (DESIGN section 5).

A bundle folder holds
  manifest.json     this module's schema (FORMAT, FORMAT_VERSION)
  vocab.npz         the precomputed text side: one array per vocabulary input below
  model.onnx        FP32 graph       model_fp16.onnx   FP16 graph
  model.engine      TensorRT FP16 engine (+ timing.cache), optional

Engine tensor names are defined here, once, and used by export.

Graph inputs (D = decoder width, S = input size; P parts, O objects, K classes):
  image           (B, S, S, 3) uint8 RGB, already resized to S x S; normalization is in-graph
  part_film_mul   (P, D) float32   stage-1 FiLM of the generalized parts      [partclipseg]
  part_film_add   (P, D) float32
  object_film_mul (O + 1, D) float32  stage-1 FiLM of the objects, background last
  object_film_add (O + 1, D) float32  (clipseg mode: the K class names, background last)
  class_film_mul  (K, D) float32   stage-2 FiLM' of the object-specific classes [partclipseg]
  class_film_add  (K, D) float32
  class_part      (K,) int64       part index of each class                    [partclipseg]
  class_object    (K,) int64       object index of each class                  [partclipseg]
Graph outputs:
  logits          (B, K + 1, S, S) float32  classes, background last
  object_logits   (B, O + 1, S, S) float32  objects, background last           [partclipseg]

Every file is listed in the manifest with its size and SHA-256, so a truncated or swapped file
is named at load time instead of failing deep inside a backend.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import UserError
from .io import file_sha256
from .vocabulary import Vocabulary

__all__ = ["FORMAT", "FORMAT_VERSION", "IMAGE", "LOGITS", "OBJECT_LOGITS", "VOCAB_INPUTS",
           "LABELS", "inputs_for_mode", "outputs_for_mode", "BundleError", "Manifest", "read_manifest",
           "read_vocab", "file_entry", "MANIFEST", "VOCAB_FILE", "ONNX_FP32", "ONNX_FP16", "ONNX_FP32_LABELS", "ONNX_FP16_LABELS", "ENGINE",
           "TIMING_CACHE"]

FORMAT = "partclipseg-bundle"
FORMAT_VERSION = 1
MANIFEST, VOCAB_FILE = "manifest.json", "vocab.npz"
ONNX_FP32, ONNX_FP16, ENGINE, TIMING_CACHE = ("model.onnx", "model_fp16.onnx", "model.engine",
                                              "timing.cache")
# Optional label-map graphs (export --labels): Pred-All computed in the graph.
ONNX_FP32_LABELS, ONNX_FP16_LABELS = "model_labels.onnx", "model_fp16_labels.onnx"

IMAGE = "image"
LOGITS = "logits"
OBJECT_LOGITS = "object_logits"
LABELS = "labels"  # (B, S, S) int32 Pred-All label map, -1 background (label-map graphs)
PART_FILM = ("part_film_mul", "part_film_add")
OBJECT_FILM = ("object_film_mul", "object_film_add")
CLASS_FILM = ("class_film_mul", "class_film_add")
CLASS_INDEX = ("class_part", "class_object")
VOCAB_INPUTS = PART_FILM + OBJECT_FILM + CLASS_FILM + CLASS_INDEX


def inputs_for_mode(mode: str) -> tuple[str, ...]:
    """Graph input names, in order, for a model mode ("partclipseg" | "clipseg")."""
    if mode == "clipseg":
        return (IMAGE,) + OBJECT_FILM
    return (IMAGE,) + VOCAB_INPUTS


def outputs_for_mode(mode: str, labels: bool = False) -> tuple[str, ...]:
    if labels:
        return (LABELS,)
    return (LOGITS,) if mode == "clipseg" else (LOGITS, OBJECT_LOGITS)


MODES = ("partclipseg", "clipseg")
IMAGE_DTYPES = ("uint8", "float32")


class BundleError(UserError, RuntimeError):
    """A bundle is missing files, corrupt, or of an unsupported format version."""


@dataclass(frozen=True)
class Manifest:
    """Parsed manifest.json (the dict itself is kept in `raw`)."""

    path: Path
    mode: str
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    vocabulary: Vocabulary
    files: dict[str, dict[str, Any]]
    raw: dict[str, Any]

    @property
    def root(self) -> Path:
        return self.path.parent

    def file(self, key: str, verify: bool = True) -> Path:
        """Absolute path of a bundle file by its manifest key ("onnx_fp32", "engine", ...).

        Checks the size and (verify=True) the SHA-256 the manifest records: a truncated, damaged
        or swapped file is named here, before a backend parses it (one read of the file).
        """
        if key not in self.files:
            raise BundleError(f"bundle {self.root} has no {key!r} file (has: "
                              f"{sorted(self.files)}); re-export it with python -m export.onnx"
                              + (" / export.trt" if key == "engine" else ""))
        entry = self.files[key]
        name = entry.get("path")
        # Bundle files are plain names inside the bundle folder: a manifest cannot point the
        # runtime at files elsewhere ("../x", "/etc/x").
        if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
            raise BundleError(f"{self.path}: file {key!r} has path {name!r}, not a file name "
                              "inside the bundle folder; re-export the bundle")
        p = self.root / name
        if not p.is_file():
            raise BundleError(f"bundle file {p} is missing; re-export the bundle")
        size = p.stat().st_size
        if "bytes" in entry and size != entry["bytes"]:
            raise BundleError(f"bundle file {p} has {size} bytes, the manifest says "
                              f"{entry['bytes']}: it is truncated or was replaced; re-export the "
                              "bundle")
        if verify and "sha256" in entry:
            digest = file_sha256(p)
            if digest != entry["sha256"]:
                raise BundleError(f"bundle file {p} is corrupt: its SHA-256 {digest[:12]}... is "
                                  f"not the manifest's {str(entry['sha256'])[:12]}... (damaged "
                                  "or replaced after export); re-export the bundle")
        return p

    def has(self, key: str) -> bool:
        return key in self.files


def read_manifest(bundle: str | Path) -> Manifest:
    """Read and validate `bundle/manifest.json` with clear errors."""
    root = Path(bundle)
    path = root / MANIFEST if root.is_dir() or not root.suffix else root
    if not path.is_file():
        raise BundleError(f"no {MANIFEST} in {root}: not a bundle (export one with "
                          "`python -m export.onnx --ckpt best.pt --out BUNDLE`)")
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{path} is corrupt or truncated ({e}); re-export the bundle") from e
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise BundleError(f"{path} is not a {FORMAT} manifest")
    version = raw.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise BundleError(f"{path} has bundle format {version!r}; this runtime reads up to "
                          f"{FORMAT_VERSION}: upgrade partclipseg-deploy")
    try:
        manifest = Manifest(path=path, mode=raw["mode"], input_size=int(raw["input_size"]),
                            mean=tuple(raw["mean"]), std=tuple(raw["std"]),
                            vocabulary=Vocabulary.from_dict(raw["vocabulary"]),
                            files={k: dict(v) for k, v in raw["files"].items()}, raw=raw)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise BundleError(f"{path} lacks a valid field ({e!r}); re-export the bundle") from e
    _check_consistent(manifest)
    return manifest


def _check_consistent(m: Manifest) -> None:
    """Fields the runtime relies on agree with each other (a damaged manifest is named here,
    not as a shape error inside a backend)."""
    raw, bad = m.raw, []
    if m.mode not in MODES:
        bad.append(f"mode {m.mode!r} (expected one of {MODES})")
    if m.input_size <= 0:
        bad.append(f"input_size {m.input_size}")
    dtype = raw.get("image_dtype", "uint8")
    if dtype not in IMAGE_DTYPES:
        bad.append(f"image_dtype {dtype!r} (expected one of {IMAGE_DTYPES})")
    image = (raw.get("inputs") or {}).get(IMAGE) if isinstance(raw.get("inputs"), dict) else None
    if isinstance(image, dict):
        want = ["B", m.input_size, m.input_size, 3]
        if image.get("shape") != want or image.get("dtype", dtype) != dtype:
            bad.append(f"inputs.image {image} vs input_size {m.input_size} / image_dtype "
                       f"{dtype!r}")
    if len(m.mean) != 3 or len(m.std) != 3:
        bad.append("mean/std need 3 values")
    if bad:
        raise BundleError(f"{m.path} is inconsistent: " + "; ".join(bad) +
                          "; re-export the bundle")


def file_entry(root: Path, name: str) -> dict[str, Any]:
    """Manifest record of a bundle file: relative path, size and SHA-256."""
    path = Path(root) / name
    return {"path": name, "bytes": path.stat().st_size, "sha256": file_sha256(path)}


def read_vocab(manifest: Manifest) -> dict[str, np.ndarray]:
    """The precomputed text side (vocab.npz), checked against the manifest's vocabulary."""
    path = manifest.file("vocab")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as e:  # zipfile/ValueError/OSError: all mean a damaged file
        raise BundleError(f"{path} is corrupt or truncated ({type(e).__name__}: {e}); rebuild it "
                          "with `python -m export.vocab` or re-export the bundle") from e
    need = [n for n in inputs_for_mode(manifest.mode) if n != IMAGE]
    missing = [n for n in need if n not in arrays]
    if missing:
        raise BundleError(f"{path} lacks arrays {missing}")
    for n in need:
        a = arrays[n]
        if n in CLASS_INDEX:
            ok = a.dtype.kind in "iu" and a.ndim == 1
        else:
            ok = a.dtype.kind == "f" and a.ndim == 2 and bool(np.isfinite(a).all())
        if not ok:
            raise BundleError(f"{path}: array {n!r} ({a.dtype}, shape {a.shape}) is not a "
                              + ("1-d integer index" if n in CLASS_INDEX else
                                 "2-d array of finite floats (NaN/Inf would give NaN logits)")
                              + "; rebuild it with `python -m export.vocab`")
    v = manifest.vocabulary
    k, o = v.num_classes, len(v.objects)
    expect_obj = (k if manifest.mode == "clipseg" else o) + 1
    if arrays[OBJECT_FILM[0]].shape[0] != expect_obj or (
            manifest.mode != "clipseg" and (arrays[CLASS_FILM[0]].shape[0] != k
                                            or arrays[PART_FILM[0]].shape[0] != len(v.parts))):
        raise BundleError(f"{path} does not match the manifest's vocabulary ({k} classes); "
                          "rebuild it with `python -m export.vocab`")
    return arrays
