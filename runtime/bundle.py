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

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .vocabulary import Vocabulary

__all__ = ["FORMAT", "FORMAT_VERSION", "IMAGE", "LOGITS", "OBJECT_LOGITS", "VOCAB_INPUTS",
           "inputs_for_mode", "outputs_for_mode", "BundleError", "Manifest", "read_manifest",
           "read_vocab", "file_entry", "MANIFEST", "VOCAB_FILE", "ONNX_FP32", "ONNX_FP16", "ENGINE",
           "TIMING_CACHE"]

FORMAT = "partclipseg-bundle"
FORMAT_VERSION = 1
MANIFEST, VOCAB_FILE = "manifest.json", "vocab.npz"
ONNX_FP32, ONNX_FP16, ENGINE, TIMING_CACHE = ("model.onnx", "model_fp16.onnx", "model.engine",
                                              "timing.cache")

IMAGE = "image"
LOGITS = "logits"
OBJECT_LOGITS = "object_logits"
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


def outputs_for_mode(mode: str) -> tuple[str, ...]:
    return (LOGITS,) if mode == "clipseg" else (LOGITS, OBJECT_LOGITS)


class BundleError(RuntimeError):
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

    def file(self, key: str) -> Path:
        """Absolute path of a bundle file by its manifest key ("onnx_fp32", "engine", ...)."""
        if key not in self.files:
            raise BundleError(f"bundle {self.root} has no {key!r} file (has: "
                              f"{sorted(self.files)}); re-export it with python -m export.onnx"
                              + (" / export.trt" if key == "engine" else ""))
        entry = self.files[key]
        p = self.root / entry["path"]
        if not p.is_file():
            raise BundleError(f"bundle file {p} is missing; re-export the bundle")
        size = p.stat().st_size
        if "bytes" in entry and size != entry["bytes"]:
            raise BundleError(f"bundle file {p} has {size} bytes, the manifest says "
                              f"{entry['bytes']}: it is truncated or was replaced; re-export the "
                              "bundle")
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
        return Manifest(path=path, mode=raw["mode"], input_size=int(raw["input_size"]),
                        mean=tuple(raw["mean"]), std=tuple(raw["std"]),
                        vocabulary=Vocabulary.from_dict(raw["vocabulary"]),
                        files={k: dict(v) for k, v in raw["files"].items()}, raw=raw)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise BundleError(f"{path} lacks a valid field ({e!r}); re-export the bundle") from e


def file_entry(root: Path, name: str) -> dict[str, Any]:
    """Manifest record of a bundle file: relative path, size and SHA-256."""
    path = Path(root) / name
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return {"path": name, "bytes": path.stat().st_size, "sha256": h.hexdigest()}


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
    v = manifest.vocabulary
    k, o = v.num_classes, len(v.objects)
    expect_obj = (k if manifest.mode == "clipseg" else o) + 1
    if arrays[OBJECT_FILM[0]].shape[0] != expect_obj or (
            manifest.mode != "clipseg" and (arrays[CLASS_FILM[0]].shape[0] != k
                                            or arrays[PART_FILM[0]].shape[0] != len(v.parts))):
        raise BundleError(f"{path} does not match the manifest's vocabulary ({k} classes); "
                          "rebuild it with `python -m export.vocab`")
    return arrays
