"""The deployment bundle: what export writes and the runtime reads (docs/design.md, "The bundle").

A bundle folder holds
  manifest.json     this module's schema (FORMAT, FORMAT_VERSION)
  vocab.npz         the precomputed text side: one array per vocabulary input below
  model.onnx        FP32 graph       model_fp16.onnx   FP16 graph   (names: `graph_file`)
  model_int8.onnx   INT8 graph for CPUs (export --int8), optional, with its label-map and
                    fast versions
  model_labels.onnx, model_fp16_labels.onnx  label-map graphs (export --labels), optional
  model.engine      TensorRT FP16 engine (+ timing.cache), optional
  tokenizer.json, text.onnx, text_head.onnx  the text side: new class names at run time
  check.npz         held-out images with the exporter's PyTorch FP32 labels (`runtime.verification`)

Engine tensor names are defined here, once, and used by export.

The graph contract: the manifest describes every graph input and output once (`TensorSpec`):
its shape in symbols, its dtype, and the vocabulary axis its rows run over ("part", "object",
"class"; `rows`), with a background row last (`background`), or the axis its integer values
index (`indexes`). Export writes that description from the model's export wrapper
(`partclipseg.model.deploy.DeployModel`); the runtime's feeds, chunking and slot padding, the
TensorRT profiles and export's dynamic axes all read it, so no code outside the model knows a
model kind's inputs. Symbols: "B" batch; "P", "O", "K" the vocabulary's parts, objects and
classes; "+1" a background row. For example (D = decoder width, S = input size):
  image           (B, S, S, 3) uint8 RGB, already resized to S x S; normalization is in-graph
  part_film_mul   (P, D) float32       rows: part      stage-1 FiLM of the generalized parts
  object_film_mul (O+1, D) float32     rows: object + background
  class_film_mul  (K, D) float32       rows: class     stage-2 FiLM' of the classes
  class_part      (K,) int64           rows: class, indexes: part
  logits          (B, K+1, S, S) float32   rows: class + background (after the batch)
  object_logits   (B, O+1, S, S) float32   rows: object + background
  labels          (B, S, S) int32      Pred-All label map, -1 = background (label-map graphs)

Every file is listed in the manifest with its size and SHA-256, so a truncated or swapped file
is named at load time instead of failing deep inside a backend.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .errors import UserError
from .io import CLIP_MEAN, CLIP_STD, file_sha256
from .vocabulary import Vocabulary

__all__ = ["FORMAT", "FORMAT_VERSION", "MANIFEST", "VOCAB_FILE", "ENGINE", "TIMING_CACHE",
           "TOKENIZER_FILE", "TEXT_ONNX_FILE", "TEXT_HEAD_FILE", "TOKENS", "TEXT_FEATURES",
           "IMAGE", "LOGITS", "OBJECT_LOGITS", "LABELS", "PART_FILM", "OBJECT_FILM",
           "CLASS_FILM", "CLASS_INDEX", "OBJECT_VALID", "CLASS_VALID", "AXES",
           "axis_sizes", "graph_file", "BundleError", "FileEntry", "TensorSpec", "CheckpointRef",
           "OnnxInfo", "EngineInfo", "TextInfo", "FastInfo", "CheckInfo", "CHECK_FILE", "Manifest",
           "read_manifest", "read_vocab"]

FORMAT = "partclipseg-bundle"
# 2: the graph contract (TensorSpec rows / background / indexes); 3: the text head as a graph
# and its recipe as data (`TextInfo.inputs`)
FORMAT_VERSION = 3
MANIFEST, VOCAB_FILE = "manifest.json", "vocab.npz"
ENGINE, TIMING_CACHE = "model.engine", "timing.cache"
TOKENIZER_FILE, TEXT_ONNX_FILE, TEXT_HEAD_FILE = "tokenizer.json", "text.onnx", "text_head.onnx"
CHECK_FILE = "check.npz"

IMAGE = "image"
LOGITS = "logits"
OBJECT_LOGITS = "object_logits"
LABELS = "labels"  # (B, S, S) int32 Pred-All label map, -1 background (label-map graphs)
TOKENS = "tokens"  # text graph: (N, L) int64 token ids -> TEXT_FEATURES (N, E) float32
TEXT_FEATURES = "text_features"
PART_FILM = ("part_film_mul", "part_film_add")
OBJECT_FILM = ("object_film_mul", "object_film_add")
CLASS_FILM = ("class_film_mul", "class_film_add")
CLASS_INDEX = ("class_part", "class_object")
# Fast (slot) graphs only: which vocabulary slots hold a class (the rest are zero padding).
OBJECT_VALID, CLASS_VALID = "object_valid", "class_valid"

IMAGE_DTYPES = ("uint8", "float32")
PRECISIONS = ("fp32", "fp16", "int8")  # int8: CPU graphs (`export.onnx --int8`)
AXES = {"part": "P", "object": "O", "class": "K"}  # vocabulary axis -> its shape symbol
# Text recipe rules (`TextInfo.inputs`, followed by `runtime.text.recipe_feeds`): the keys a
# rule may have besides its kind ("text" or "index": a vocabulary axis).
RULE_KEYS = {"text": {"piece"}, "index": {"piece", "of"}}


def axis_sizes(vocab: Vocabulary) -> dict[str, int]:
    """Rows of each vocabulary axis for `vocab`: {"part": P, "object": O, "class": K}."""
    return {"part": len(vocab.parts), "object": len(vocab.objects), "class": vocab.num_classes}


def graph_file(precision: str, labels: bool = False, fast_batch: int | None = None
               ) -> tuple[str, str]:
    """(manifest key, file name) of an ONNX graph: the logits graph, the label-map graph
    (labels=True, `export.onnx --labels`) or the fast slot graph for one batch size
    (fast_batch=n, `export.onnx --fast`), FP32 or FP16. The one place graphs are named."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    suffix = f"_fast_b{int(fast_batch)}" if fast_batch else ("_labels" if labels else "")
    name = "model" + ("" if precision == "fp32" else f"_{precision}") + suffix + ".onnx"
    return f"onnx_{precision}{suffix}", name


class BundleError(UserError, RuntimeError):
    """A bundle is missing files, corrupt, or of an unsupported format version."""


# -- the manifest's parts ------------------------------------------------------------------------
@dataclass(frozen=True)
class FileEntry:
    """A bundle file: its name inside the bundle folder, size and SHA-256."""

    path: str
    bytes: int | None = None
    sha256: str | None = None

    @classmethod
    def of(cls, root: str | Path, name: str) -> "FileEntry":
        """The record of the file `root/name` as it is now."""
        p = Path(root) / name
        return cls(name, p.stat().st_size, file_sha256(p))

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "FileEntry":
        return cls(d.get("path"), d.get("bytes"), d.get("sha256"))


@dataclass(frozen=True)
class TensorSpec:
    """A graph input or output: the one description every reader of a bundle's graphs uses.

    shape: ints and symbols ("B" batch; "P", "O", "K" parts, objects, classes of the
        vocabulary, "+1" with the background row): see `runtime.bundle`'s docstring.
    dtype: numpy dtype name.
    rows: the vocabulary axis ("part" | "object" | "class") one dimension runs over, or None.
        That dimension (`row_dim`) holds one entry per row of the axis, in vocabulary order.
    background: that dimension has one more entry, the background, last.
    indexes: an integer tensor whose values are rows of this axis (class_part: "part").
    """

    shape: tuple[int | str, ...]
    dtype: str
    rows: str | None = None
    background: bool = False
    indexes: str | None = None

    @classmethod
    def over(cls, rows: str, rest: tuple[int | str, ...] = (), dtype: str = "float32",
             background: bool = False, indexes: str | None = None, batch: bool = False
             ) -> "TensorSpec":
        """A tensor whose dimension `rows` (after "B" when `batch`) comes first, then `rest`."""
        symbol = AXES[rows] + ("+1" if background else "")
        return cls((("B",) if batch else ()) + (symbol,) + tuple(rest), dtype, rows, background,
                   indexes)

    @property
    def row_dim(self) -> int | None:
        """The index of the `rows` dimension in `shape` (None: no vocabulary axis)."""
        if self.rows is None:
            return None
        return self.shape.index(AXES[self.rows] + ("+1" if self.background else ""))

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"shape": list(self.shape), "dtype": self.dtype}
        if self.rows is not None:
            d.update(rows=self.rows, background=self.background)
        if self.indexes is not None:
            d["indexes"] = self.indexes
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TensorSpec":
        t = cls(tuple(d["shape"]), str(d["dtype"]), d.get("rows"), bool(d.get("background")),
                d.get("indexes"))
        for axis in (t.rows, t.indexes):
            if axis is not None and axis not in AXES:
                raise ValueError(f"unknown vocabulary axis {axis!r} (known: {sorted(AXES)})")
        if t.rows is not None and AXES[t.rows] + ("+1" if t.background else "") not in t.shape:
            raise ValueError(f"shape {list(t.shape)} lacks the symbol of its rows {t.rows!r}")
        return t


@dataclass(frozen=True)
class CheckpointRef:
    """The checkpoint a bundle was exported from (the torch backend and export.vocab check it)."""

    path: str
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CheckpointRef":
        return cls(str(d["path"]), str(d["sha256"]))


@dataclass(frozen=True)
class OnnxInfo:
    """How the ONNX graphs were made: opset, ops kept FP32 in the FP16 graphs, and the parity
    export measured against PyTorch per graph ({"fp32": {"rel_error", ...}, ...})."""

    opset: int
    fp16_kept_fp32_ops: tuple[str, ...] = ()
    parity: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"opset": self.opset, "fp16_kept_fp32_ops": list(self.fp16_kept_fp32_ops),
                "parity": {k: dict(v) for k, v in self.parity.items()}}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "OnnxInfo":
        return cls(int(d["opset"]), tuple(d.get("fp16_kept_fp32_ops", ())),
                   dict(d.get("parity", {})))


@dataclass(frozen=True)
class EngineInfo:
    """A TensorRT engine: who built it (flavour, version, GPU), from which graph, and its
    optimization profile ({input: [min, opt, max] shape})."""

    flavour: str
    version: str
    gpu: Mapping[str, str] | None  # {"name", "compute_capability"}; None: built without a GPU
    precision: str
    onnx: str
    profiles: tuple[Mapping[str, Any], ...]
    max_classes: int
    max_batch: int
    strongly_typed: bool = True
    build_seconds: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"tensorrt": {"flavour": self.flavour, "version": self.version},
                "gpu": None if self.gpu is None else dict(self.gpu),
                "precision": self.precision, "strongly_typed": self.strongly_typed,
                "onnx": self.onnx, "profiles": [dict(p) for p in self.profiles],
                "max_classes": self.max_classes, "max_batch": self.max_batch,
                "build_seconds": self.build_seconds}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "EngineInfo":
        trt = d.get("tensorrt") or {}
        return cls(str(trt.get("flavour")), str(trt.get("version")), d.get("gpu"),
                   str(d.get("precision", "fp16")), str(d["onnx"]), tuple(d.get("profiles", ())),
                   int(d["max_classes"]), int(d["max_batch"]), bool(d.get("strongly_typed", True)),
                   d.get("build_seconds"))


@dataclass(frozen=True)
class FastInfo:
    """The fast slot graphs (`export.onnx --fast`): every dimension static; one graph per batch
    size in `batches`; vocabularies up to `max_parts` parts, `max_objects` objects and
    `max_classes` classes fill zero-padded slots (larger ones run the other graphs)."""

    batches: tuple[int, ...]
    max_parts: int
    max_objects: int
    max_classes: int
    agreement: Mapping[str, float] = field(default_factory=dict)  # vs the exact path, export
    # The validity masks the graphs take after the vocabulary inputs: bool, one entry per slot
    # of their `rows` axis (+ background), True where a slot holds a row.
    masks: Mapping[str, TensorSpec] = field(default_factory=dict)

    def replace(self, **changes: Any) -> "FastInfo":
        return dataclasses.replace(self, **changes)

    def slots(self, axis: str) -> int:
        """Slot count of a vocabulary axis."""
        return {"part": self.max_parts, "object": self.max_objects,
                "class": self.max_classes}[axis]

    def to_dict(self) -> dict[str, Any]:
        return {"batches": list(self.batches), "max_parts": self.max_parts,
                "max_objects": self.max_objects, "max_classes": self.max_classes,
                "agreement": dict(self.agreement),
                "masks": {k: v.to_dict() for k, v in self.masks.items()}}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "FastInfo":
        return cls(tuple(int(b) for b in d["batches"]), int(d["max_parts"]),
                   int(d["max_objects"]), int(d["max_classes"]), dict(d.get("agreement", {})),
                   {k: TensorSpec.from_dict(v) for k, v in (d.get("masks") or {}).items()})


@dataclass(frozen=True)
class TextInfo:
    """The text side, for names that are not in the bundle's vocabulary (`runtime.text`).

    Files (manifest keys): "tokenizer" (Hugging Face tokenizers JSON giving open_clip's BPE ids),
    "text_onnx" (token ids (N, context_length) int64 -> CLIP text features (N, E) float32) and
    "text_head" (the model's text head as an ONNX graph: the inputs below -> every vocabulary
    input of the image graph). `parity`: the ONNX tower and head vs PyTorch, measured at export.

    inputs: the text head's inputs in graph order, {name: rule}: how each is made from a
        vocabulary (text features of a list of names, or an index array), the model's text
        recipe as data; `runtime.text` documents the rules and follows them.
    """

    context_length: int
    embed_dim: int
    inputs: Mapping[str, Mapping[str, Any]]
    parity: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"context_length": self.context_length, "embed_dim": self.embed_dim,
                "inputs": {k: dict(v) for k, v in self.inputs.items()},
                "parity": dict(self.parity)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TextInfo":
        inputs = {str(k): dict(v) for k, v in dict(d["inputs"]).items()}
        for name, rule in inputs.items():
            kinds = [k for k in RULE_KEYS if k in rule]
            ok = (len(kinds) == 1 and rule[kinds[0]] in AXES
                  and set(rule) - {kinds[0]} <= RULE_KEYS[kinds[0]]
                  and rule.get("piece", 0) in (0, 1)
                  and ("of" not in rule or (rule[kinds[0]] == "class"
                                            and rule["of"] in ("part", "object")))
                  and (kinds[0] == "text" or ("piece" in rule) != ("of" in rule)))
            if not ok:
                raise ValueError(f"text input {name!r} has rule {rule}, which this runtime "
                                 "does not know (runtime/text.py lists the rules)")
        return cls(int(d["context_length"]), int(d["embed_dim"]), inputs,
                   dict(d.get("parity", {})))


@dataclass(frozen=True)
class CheckInfo:
    """The bundle's check set (file "check": `CHECK_FILE`), which `runtime.verification` runs where the
    bundle is deployed.

    images: how many held-out images (N) it holds, at the model's input size; classes: the
        class names their labels index (the export vocabulary: `export.vocab` may change the
        bundle's); source: where the images came from; min_agreement: {precision: least share
        (0-1) of labels equal to the exporter's}; exported: {route key ("int8", "fp32/fast"):
        the share measured on the exporting machine}; machine: that machine
        (`runtime.verification.machine`).
    """

    images: int
    classes: tuple[str, ...]
    source: str
    min_agreement: Mapping[str, float]
    exported: Mapping[str, float] = field(default_factory=dict)
    machine: Mapping[str, Any] = field(default_factory=dict)

    def replace(self, **changes: Any) -> "CheckInfo":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {"images": self.images, "classes": list(self.classes), "source": self.source,
                "min_agreement": dict(self.min_agreement), "exported": dict(self.exported),
                "machine": dict(self.machine)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CheckInfo":
        limits = {str(k): float(v) for k, v in dict(d["min_agreement"]).items()}
        if not all(0.0 <= v <= 1.0 for v in limits.values()):
            raise ValueError(f"check thresholds {limits} must lie in [0, 1]")
        return cls(int(d["images"]), tuple(str(c) for c in d["classes"]), str(d["source"]),
                   limits, {str(k): float(v) for k, v in dict(d.get("exported") or {}).items()},
                   dict(d.get("machine") or {}))


# -- the manifest ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Manifest:
    """manifest.json, typed. `to_dict`/`from_dict` are what export writes and the runtime reads.

    mode: the model kind, a label for people (the graph's interface is `inputs` / `outputs`,
    the text side's recipe `text.inputs`); input_size: the model's square input side
    S (pixels); image_dtype: "uint8" | "float32" (RGB 0-255 either way; normalization with
    mean/std is in-graph); inputs / outputs: the graph contract (`TensorSpec`), in graph order;
    files: {key: FileEntry} with keys "vocab", `graph_file(...)[0]`, "engine", ...
    """

    mode: str
    input_size: int
    vocabulary: Vocabulary
    files: Mapping[str, FileEntry]
    image_dtype: str = "uint8"
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    inputs: Mapping[str, TensorSpec] = field(default_factory=dict)
    outputs: Mapping[str, TensorSpec] = field(default_factory=dict)
    model_config: Mapping[str, Any] = field(default_factory=dict)  # ModelConfig.to_dict()
    checkpoint: CheckpointRef | None = None
    onnx: OnnxInfo | None = None
    precisions: tuple[str, ...] = ("fp32",)
    producer: Mapping[str, str] = field(default_factory=dict)  # package versions
    engine: EngineInfo | None = None
    text: TextInfo | None = None  # None: exported before the text side was (re-export for it)
    fast: FastInfo | None = None  # the fast slot graphs, when exported with --fast
    check: CheckInfo | None = None  # None: exported before bundles checked themselves
    created: str = ""
    format_version: int = FORMAT_VERSION
    path: Path | None = field(default=None, compare=False)  # where it was read from

    @property
    def root(self) -> Path:
        if self.path is None:
            raise BundleError("this manifest was not read from a bundle folder")
        return self.path.parent

    @property
    def model_name(self) -> str | None:
        return self.model_config.get("name")

    @property
    def vocab_inputs(self) -> dict[str, TensorSpec]:
        """The graph inputs other than the image: the vocabulary arrays, in graph order."""
        return {k: v for k, v in self.inputs.items() if k != IMAGE}

    def replace(self, **changes: Any) -> "Manifest":
        return dataclasses.replace(self, **changes)

    def with_files(self, root: str | Path, files: Mapping[str, str]) -> "Manifest":
        """This manifest with `files` ({key: file name in root}) recorded as they are now."""
        return self.replace(files={**self.files, **{k: FileEntry.of(root, n)
                                                    for k, n in files.items()}})

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "format": FORMAT, "format_version": self.format_version, "created": self.created,
            "mode": self.mode, "input_size": self.input_size, "image_dtype": self.image_dtype,
            "axes": axis_sizes(self.vocabulary),  # each symbol's size at this vocabulary
            "mean": list(self.mean), "std": list(self.std),
            "vocabulary": self.vocabulary.to_dict(), "model_config": dict(self.model_config),
            "checkpoint": None if self.checkpoint is None else self.checkpoint.to_dict(),
            "inputs": {k: v.to_dict() for k, v in self.inputs.items()},
            "outputs": {k: v.to_dict() for k, v in self.outputs.items()},
            "onnx": None if self.onnx is None else self.onnx.to_dict(),
            "precisions": list(self.precisions), "producer": dict(self.producer),
            "files": {k: v.to_dict() for k, v in self.files.items()},
        }
        if self.engine is not None:
            d["engine"] = self.engine.to_dict()
        if self.text is not None:
            d["text"] = self.text.to_dict()
        if self.fast is not None:
            d["fast"] = self.fast.to_dict()
        if self.check is not None:
            d["check"] = self.check.to_dict()
        return d

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], path: Path | None = None) -> "Manifest":
        """Parse and validate a manifest dict; BundleError names what is wrong."""
        where = path or "manifest"
        if not isinstance(raw, Mapping) or raw.get("format") != FORMAT:
            raise BundleError(f"{where} is not a {FORMAT} manifest")
        version = raw.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise BundleError(f"{where} has bundle format {version!r}; this runtime reads up to "
                              f"{FORMAT_VERSION}: upgrade partclipseg-deploy")
        if version < FORMAT_VERSION:
            raise BundleError(f"{where} has bundle format {version}, which this runtime no "
                              f"longer reads (format {FORMAT_VERSION}: the text head as a graph): "
                              "re-export it with python -m export.onnx")

        def opt(key: str, parse: Any) -> Any:
            return parse(raw[key]) if raw.get(key) else None
        try:
            m = cls(mode=raw["mode"], input_size=int(raw["input_size"]),
                    vocabulary=Vocabulary.from_dict(raw["vocabulary"]),
                    files={k: FileEntry.from_dict(v) for k, v in raw["files"].items()},
                    image_dtype=raw.get("image_dtype", "uint8"),
                    mean=tuple(raw["mean"]), std=tuple(raw["std"]),
                    inputs={k: TensorSpec.from_dict(v)
                            for k, v in (raw.get("inputs") or {}).items()},
                    outputs={k: TensorSpec.from_dict(v)
                             for k, v in (raw.get("outputs") or {}).items()},
                    model_config=dict(raw.get("model_config") or {}),
                    checkpoint=opt("checkpoint", CheckpointRef.from_dict),
                    onnx=opt("onnx", OnnxInfo.from_dict),
                    precisions=tuple(raw.get("precisions", ("fp32",))),
                    producer=dict(raw.get("producer") or {}),
                    engine=opt("engine", EngineInfo.from_dict),
                    text=opt("text", TextInfo.from_dict),
                    fast=opt("fast", FastInfo.from_dict),
                    check=opt("check", CheckInfo.from_dict),
                    created=str(raw.get("created", "")), format_version=version, path=path)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise BundleError(f"{where} lacks a valid field ({e!r}); re-export the bundle") from e
        m._check_consistent()
        return m

    def _check_consistent(self) -> None:
        """Fields the runtime relies on agree with each other (a damaged manifest is named here,
        not as a shape error inside a backend)."""
        bad = []
        if not isinstance(self.mode, str) or not self.mode:
            bad.append(f"mode {self.mode!r} (expected the model kind's name)")
        if self.input_size <= 0:
            bad.append(f"input_size {self.input_size}")
        if self.image_dtype not in IMAGE_DTYPES:
            bad.append(f"image_dtype {self.image_dtype!r} (expected one of {IMAGE_DTYPES})")
        image = self.inputs.get(IMAGE)
        if image is not None:
            want = ("B", self.input_size, self.input_size, 3)
            if tuple(image.shape) != want or image.dtype != self.image_dtype:
                bad.append(f"inputs.image {image.to_dict()} vs input_size {self.input_size} / "
                           f"image_dtype {self.image_dtype!r}")
        if len(self.mean) != 3 or len(self.std) != 3:
            bad.append("mean/std need 3 values")
        if self.inputs and IMAGE not in self.inputs:
            bad.append("inputs lack the image")
        if bad:
            raise BundleError(f"{self.path or 'manifest'} is inconsistent: " + "; ".join(bad) +
                              "; re-export the bundle")

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
        name = entry.path
        # Bundle files are plain names inside the bundle folder: a manifest cannot point the
        # runtime at files elsewhere ("../x", "/etc/x").
        if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
            raise BundleError(f"{self.path}: file {key!r} has path {name!r}, not a file name "
                              "inside the bundle folder; re-export the bundle")
        p = self.root / name
        if not p.is_file():
            raise BundleError(f"bundle file {p} is missing; re-export the bundle")
        size = p.stat().st_size
        if entry.bytes is not None and size != entry.bytes:
            raise BundleError(f"bundle file {p} has {size} bytes, the manifest says "
                              f"{entry.bytes}: it is truncated or was replaced; re-export the "
                              "bundle")
        if verify and entry.sha256 is not None:
            digest = file_sha256(p)
            if digest != entry.sha256:
                raise BundleError(f"bundle file {p} is corrupt: its SHA-256 {digest[:12]}... is "
                                  f"not the manifest's {str(entry.sha256)[:12]}... (damaged "
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
    return Manifest.from_dict(raw, path)


def read_vocab(manifest: Manifest) -> dict[str, np.ndarray]:
    """The precomputed text side (vocab.npz), checked against the manifest's vocabulary."""
    path = manifest.file("vocab")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as e:  # zipfile/ValueError/OSError: all mean a damaged file
        raise BundleError(f"{path} is corrupt or truncated ({type(e).__name__}: {e}); rebuild it "
                          "with `python -m export.vocab` or re-export the bundle") from e
    sizes = axis_sizes(manifest.vocabulary)
    specs = manifest.vocab_inputs
    missing = [n for n in specs if n not in arrays]
    if missing:
        raise BundleError(f"{path} lacks arrays {missing}")
    for n, t in specs.items():
        a = arrays[n]
        if t.indexes is not None:
            ok = (a.dtype.kind in "iu" and a.ndim == len(t.shape)
                  and bool(((a >= 0) & (a < sizes[t.indexes])).all()))
            what = f"integer index into the {sizes[t.indexes]} {t.indexes} rows"
        else:
            ok = (a.dtype.kind == "f" and a.ndim == len(t.shape)
                  and bool(np.isfinite(a).all()))
            what = "float array with finite values (NaN/Inf would give NaN logits)"
        if not ok:
            raise BundleError(f"{path}: array {n!r} ({a.dtype}, shape {a.shape}) is not a "
                              f"{len(t.shape)}-d {what}; rebuild it with "
                              "`python -m export.vocab`")
        want = tuple(sizes[t.rows] + t.background if d == t.row_dim else
                     (s if isinstance(s, int) else None) for d, s in enumerate(t.shape))
        if any(w is not None and w != g for w, g in zip(want, a.shape)):
            raise BundleError(f"{path}: array {n!r} has shape {a.shape}, the manifest's "
                              f"vocabulary ({sizes['class']} classes) needs {want}; rebuild it "
                              "with `python -m export.vocab`")
    return arrays
