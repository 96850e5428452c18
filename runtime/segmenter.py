"""`Segmenter`: a bundle behind one call, numpy image in, label map out.

    seg = Segmenter.load("bundles/x")                # backend="auto": fastest available
    pred = seg.predict(frame)                         # Pred-All over the bundle's vocabulary
    pred = seg.predict(frame, classes=["dog's head"])  # a subset of it
    pred = seg.predict(frame, object_mask=m, object_class="dog")  # Oracle-Obj
    pred.labels                                       # (H, W) int32, -1 = background

Pre- and post-processing are the numpy functions evaluation uses, for every backend.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from . import bundle as spec
from .backends import Backend, BackendOptions, backend_class, open_backend, pick_backend
from .postprocess import (BACKGROUND, oracle_obj, pred_all, resize_bilinear, resize_nearest,
                          sigmoid)
from .preprocess import InputError, check_image, resize_image
from .selection import ClassRequest, Selection, Selections
from .text import TextSide
from .vocabulary import Vocabulary, VocabularyError

__all__ = ["Segmenter", "Prediction"]

log = logging.getLogger("runtime")


@dataclass(frozen=True)
class Prediction:
    """One image's result.

    labels: (H, W) int32 at the input resolution: an index into `class_names`, or -1 for
        background (and for everything outside the object mask in Oracle-Obj).
    class_names: the object-specific classes predicted over ("dog's head", ...).
    scores: (K + 1, H, W) float32 sigmoid probabilities, background last; only on request.
    timing_ms: {"pre", "infer", "post"} milliseconds (batch calls share pre/infer evenly).
    """

    labels: np.ndarray
    class_names: tuple[str, ...]
    scores: np.ndarray | None = None
    timing_ms: dict[str, float] = field(default_factory=dict)

    def mask(self, name: str) -> np.ndarray:
        """(H, W) bool mask of one class."""
        if name not in self.class_names:
            raise VocabularyError(f"{name!r} is not among this prediction's classes")
        return self.labels == self.class_names.index(name)

    def counts(self) -> dict[str, int]:
        """Pixels per predicted class (classes with none are left out)."""
        ids, n = np.unique(self.labels[self.labels != BACKGROUND], return_counts=True)
        return {self.class_names[i]: int(c) for i, c in zip(ids, n)}


class Segmenter:
    """A loaded bundle plus one backend. Thread-safe: share one across threads."""

    def __init__(self, manifest: spec.Manifest, arrays: dict[str, np.ndarray], backend: Backend,
                 max_classes: int | None = None, fast_labels: bool = False,
                 threads: int | None = None):
        self.manifest = manifest
        self.mode = manifest.mode
        self.input_size = manifest.input_size
        self.backend = backend
        self.precision = backend.precision
        self.max_classes = max_classes
        self.fast_labels = fast_labels
        # "exact" (logits + numpy Pred-All), "labels" (label-map graph), "fast" (slot graphs)
        self.route = getattr(backend, "route", "labels") if fast_labels else "exact"
        self.verified: Any = None  # the runtime.verification.CheckResult of load(verify=True)
        self._image_dtype = np.dtype(manifest.image_dtype)
        self._text: TextSide | None = None
        self._threads = threads  # CPU threads of the text encoder too
        self._lock = threading.Lock()
        self._selections = Selections(
            manifest, arrays, max_classes, self._encode,
            "label maps cannot be merged across chunks: load without fast_labels"
            if fast_labels else None)

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def load(cls, bundle: str | Path, backend: str = "auto", device: str | None = None,
             precision: str | None = None, checkpoint: str | Path | None = None,
             threads: int | None = None, max_classes: int | None = None,
             fast_labels: bool = False, slots: bool | None = None,
             verify: bool = False) -> "Segmenter":
        """Open a bundle folder.

        backend: "auto" (TensorRT engine if it can run here, else ONNX Runtime on CUDA, else on
            CPU; logs what it picked), "tensorrt", "onnxruntime" or "torch" (reference; needs the
            checkpoint: `checkpoint=` or the path recorded at export).
        device: "cuda" or "cpu" (default: cuda when the backend can use it).
        precision: "fp16", "fp32" or "int8" (default: fp16 on cuda, fp32 on cpu; an engine's is
            fixed). "int8" runs the bundle's INT8 graphs (`export.onnx --int8`) on the CPU; it
            is never picked by default, since its labels differ from FP32's on up to 1% of
            pixels (export checks >= 99% agreement): ask for it.
        max_classes: split larger vocabularies into chunks of at most this many classes (the
            TensorRT backend caps it at the engine's profile).
        fast_labels: run the bundle's label-map graph (`export.onnx --labels`): Pred-All in the
            graph at model resolution, the label map resized (nearest) to each image. The same
            labels when images come at the model's input size; near object boundaries they can
            differ otherwise (the exact path resizes logits, then takes the argmax). No
            Oracle-Obj, scores or chunking: the per-class maps never leave the graph.
            The bundle's fast slot graphs (`export.onnx --fast`, every dimension static) when it
            has them; `slots=False` picks the dynamic label-map graph instead.
        verify: run the bundle's check images through this backend before returning
            (`runtime.verification`): CheckError, naming the likely cause, when fewer of their labels
            than the bundle's threshold for this precision equal the exporter's PyTorch
            labels; BundleError when the bundle has no check images. Costs one batch of the
            bundle's check images (8 by default; measured in docs/runtime.md).
        """
        if device not in (None, "cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
        if precision not in (None, *spec.PRECISIONS):
            raise ValueError(f"precision must be one of {spec.PRECISIONS}, got {precision!r}")
        if backend != "auto":
            backend_class(backend)  # unknown names fail before any file is read
        manifest = spec.read_manifest(bundle)
        arrays = spec.read_vocab(manifest)
        if backend == "auto":
            backend, device = pick_backend(manifest, device)
            log.info("runtime: backend=auto picked %s on %s", backend, device)
        impl = open_backend(backend, manifest, BackendOptions(
            device, precision, threads, fast_labels, checkpoint, slots))
        limits = [n for n in (max_classes, impl.max_classes) if n]
        seg = cls(manifest, arrays, impl, min(limits) if limits else None, fast_labels, threads)
        if verify:
            from .verification import verify as run_check

            try:
                seg.verified = run_check(seg)
            except BaseException:
                seg.close()
                raise
            log.info("runtime: %s", seg.verified.line())
        return seg

    @property
    def backend_name(self) -> str:
        return f"{self.backend.name}:{self.backend.device}:{self.precision}"

    def __repr__(self) -> str:
        return (f"Segmenter({self.manifest.root}, {self.backend_name}, {self.mode}, "
                f"{self.vocabulary.num_classes} classes, input {self.input_size})")

    # -- vocabulary -----------------------------------------------------------------------------
    def feeds(self, classes: ClassRequest | None = None) -> list[dict[str, np.ndarray]]:
        """The graph's vocabulary inputs for `classes` (default: the whole vocabulary), one dict
        per backend call: more than one when the vocabulary exceeds `max_classes`. Add
        `{"image": (B, S, S, 3) batch}` to one and it is a complete feed for `backend.run`."""
        return [dict(c.feed) for c in self._selections.get(classes).chunks]

    def feed(self, classes: ClassRequest | None = None) -> dict[str, np.ndarray]:
        """`feeds(classes)` when it is one call (export checks, benchmarks, I/O binding)."""
        feeds = self.feeds(classes)
        if len(feeds) != 1:
            raise VocabularyError(f"this vocabulary runs in {len(feeds)} chunks of at most "
                                  f"{self.max_classes} classes; use feeds()")
        return feeds[0]

    @property
    def vocabulary(self) -> Vocabulary:
        """The default vocabulary: the bundle's, or the last `set_vocabulary`'s."""
        return self._selections.get(None).vocab

    def set_vocabulary(self, classes: ClassRequest, unseen_objects: Sequence[str] = ()) -> None:
        """Make `classes` the default of later calls (`predict(frame)` without `classes`).

        Names outside the bundle's vocabulary are encoded with the bundle's text side (once;
        cached). Thread-safe: a `predict` running meanwhile uses the old or the new vocabulary,
        whole. Errors leave the current default in place.
        """
        self._selections.set_default(classes, unseen_objects)

    def text_side(self) -> TextSide:
        """The bundle's text side (opened on first use): new class names without torch."""
        with self._lock:
            if self._text is None:
                self._text = TextSide.open(self.manifest, self._threads)
            return self._text

    def _encode(self, vocab: Vocabulary) -> Mapping[str, np.ndarray]:
        if self.manifest.text is None:  # exported before the text side existed
            full = self.manifest.vocabulary
            try:
                for n in vocab.class_names:
                    full.index(n)  # unknown: close matches suggested
            except VocabularyError as unknown:
                raise VocabularyError(
                    f"{unknown}; {self.manifest.root} was exported without its text side, so it "
                    "takes only the names it was exported with: re-export it with python -m "
                    "export.onnx to use new class names") from None
        return self.text_side().vocab_arrays(vocab)

    # -- inference ------------------------------------------------------------------------------
    def _infer(self, batch: np.ndarray, sel: Selection) -> dict[str, np.ndarray]:
        """(B, S, S, 3) images -> the graph's outputs over the whole selection: chunked calls
        merged along each output's vocabulary axis (the background, the same in every chunk,
        last)."""
        if len(sel.chunks) == 1:
            return self.backend.run({spec.IMAGE: batch, **sel.chunks[0].feed})
        sizes = spec.axis_sizes(sel.vocab)
        merged: dict[str, np.ndarray] = {}
        for chunk in sel.chunks:
            out = self.backend.run({spec.IMAGE: batch, **chunk.feed})
            for name, t in self.manifest.outputs.items():
                if name not in out or t.rows is None:
                    continue
                a = out[name]
                if name not in merged:
                    shape = list(a.shape)
                    shape[1] = sizes[t.rows] + t.background
                    merged[name] = np.empty(shape, a.dtype)
                idx = list(chunk.rows[t.rows])
                merged[name][:, idx] = a[:, :len(idx)]
                if t.background:
                    merged[name][:, -1] = a[:, -1]
        return merged

    def predict(self, image: np.ndarray, classes: Sequence[str] | None = None,
                object_mask: np.ndarray | None = None, object_class: str | int | None = None,
                bgr: bool = False, scores: bool = False) -> Prediction:
        """Segment one (H, W, 3) uint8 RGB image (`bgr=True` for OpenCV frames).

        classes: a subset of the bundle's class names (default: all).
        object_mask + object_class: Oracle-Obj (an (H, W) bool mask of the object and its
            object name or index in the selected vocabulary); without them: Pred-All.
        scores: also return sigmoid probabilities at the input resolution.
        """
        if (object_mask is None) != (object_class is None):
            raise InputError("Oracle-Obj needs both object_mask and object_class (or neither "
                             "for Pred-All)")
        return self._predict([image], classes, bgr, scores, object_mask, object_class)[0]

    def predict_batch(self, images: Sequence[np.ndarray], classes: Sequence[str] | None = None,
                      bgr: bool = False, scores: bool = False) -> list[Prediction]:
        """Pred-All on several images in one backend call (sizes may differ)."""
        if len(images) == 0:
            raise InputError("images is empty")
        return self._predict(list(images), classes, bgr, scores, None, None)

    def _predict(self, images: list[np.ndarray], classes: Sequence[str] | None, bgr: bool,
                 want_scores: bool, object_mask: np.ndarray | None,
                 object_class: str | int | None) -> list[Prediction]:
        if self.fast_labels and (object_mask is not None or want_scores):
            raise InputError("a fast_labels Segmenter gives Pred-All label maps only; load one "
                             "without fast_labels for Oracle-Obj or scores")
        sel = self._selections.get(classes)
        vocab = sel.vocab
        t0 = time.perf_counter()
        checked = [check_image(im, bgr) for im in images]
        oracle = None
        if object_mask is not None:
            oracle = self._oracle_args(vocab, checked[0].shape[:2], object_mask, object_class)
        batch = np.stack([resize_image(im, self.input_size) for im in checked])
        if batch.dtype != self._image_dtype:
            batch = batch.astype(self._image_dtype)
        t1 = time.perf_counter()
        if self.fast_labels:
            maps = self.backend.run({spec.IMAGE: batch, **sel.chunks[0].feed})[spec.LABELS]
        else:
            out = self._infer(batch, sel)
            logits, obj_logits = out[spec.LOGITS], out.get(spec.OBJECT_LOGITS)
        t2 = time.perf_counter()
        class_objects = np.asarray(vocab.class_objects)
        results = []
        for j, im in enumerate(checked):
            tp = time.perf_counter()
            size = im.shape[:2]
            if self.fast_labels:
                labels = resize_nearest(maps[j], size)
            elif oracle is not None:
                labels = oracle_obj(logits[j], class_objects, oracle[0], oracle[1])
            else:
                labels = pred_all(logits[j], class_objects, size,
                                  None if obj_logits is None else obj_logits[j])
            probs = sigmoid(resize_bilinear(logits[j], size)) if want_scores and not \
                self.fast_labels else None
            n = len(checked)
            timing = {"pre": 1e3 * (t1 - t0) / n, "infer": 1e3 * (t2 - t1) / n,
                      "post": 1e3 * (time.perf_counter() - tp)}
            results.append(Prediction(labels, vocab.class_names, probs, timing))
        return results

    @staticmethod
    def _oracle_args(vocab: Vocabulary, size: tuple[int, int], mask: np.ndarray,
                     object_class: str | int) -> tuple[np.ndarray, int]:
        mask = np.asarray(mask)
        if mask.shape != tuple(size):
            raise InputError(f"object_mask has shape {mask.shape}, the image is {tuple(size)}: "
                             "give a mask at the image's resolution")
        if mask.dtype != bool:
            if not np.issubdtype(mask.dtype, np.integer) or mask.min() < 0 or mask.max() > 1:
                raise InputError(f"object_mask must be bool (or 0/1 integers), got {mask.dtype}")
            mask = mask.astype(bool)
        if isinstance(object_class, str):
            obj = vocab.object_index(object_class)
        elif isinstance(object_class, (int, np.integer)) and 0 <= object_class < len(vocab.objects):
            obj = int(object_class)
        else:
            raise InputError(f"object_class must be an object name or an index below "
                             f"{len(vocab.objects)}, got {object_class!r}")
        return mask, obj

    def close(self) -> None:
        self.backend.close()
