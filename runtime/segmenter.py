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
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from . import bundle as spec
from .backends import Backend, BackendOptions, backend_class
from .errors import DeviceError
from .postprocess import (BACKGROUND, oracle_obj, pred_all, resize_bilinear, resize_nearest,
                          sigmoid)
from .preprocess import InputError, check_image, resize_image
from .text import TextSide
from .vocabulary import Vocabulary, VocabularyError, class_name

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


@dataclass(frozen=True)
class _Selection:
    """A vocabulary and the graph inputs for it, split into chunks the backend accepts."""

    vocab: Vocabulary
    chunks: tuple[tuple[tuple[int, ...], tuple[int, ...], dict[str, np.ndarray]], ...]
    # per chunk: (class indices in `vocab`, object indices in `vocab`, feed arrays)


ClassRequest = Sequence["str | tuple[str, str]"]  # "object's part" names or (object, part)


def _word_rows(a: dict[str, np.ndarray], objects: Sequence[int]) -> dict[str, np.ndarray]:
    """A colour-blind bundle's word inputs for some of its objects (indices into the rows of
    `a`'s object_words): the colour and body-plan word rows they use, and their matrix."""
    matrix = a[spec.OBJECT_WORDS][list(objects)]
    n_colour = a[spec.COLOUR_FILM[0]].shape[0]
    used = np.flatnonzero(matrix.any(0))
    colours, plans = used[used < n_colour], used[used >= n_colour] - n_colour
    bg = a[spec.OBJECT_FILM[0]].shape[0] - 1
    feed = {n: np.ascontiguousarray(a[n][colours]) for n in spec.COLOUR_FILM}
    feed.update({n: np.ascontiguousarray(a[n][np.append(plans, bg)]) for n in spec.OBJECT_FILM})
    feed[spec.OBJECT_WORDS] = np.ascontiguousarray(matrix[:, used])
    return feed


def _class_pairs(classes: ClassRequest) -> tuple[tuple[str, str], ...]:
    """Checked (object, part) pairs of a class request; InputError / VocabularyError name the
    first bad entry."""
    if isinstance(classes, (str, bytes)):
        raise InputError("classes must be a list of class names, not one string")
    try:
        items = list(classes)
    except TypeError as e:
        raise InputError(f"classes must be a list of class names, got {type(classes).__name__}"
                         ) from e
    if not items:
        raise VocabularyError("classes is empty: name at least one class, or pass None for "
                              "the default vocabulary")
    pairs = []
    for c in items:
        if isinstance(c, str):
            if not c.strip():
                raise VocabularyError(f"class name {c!r} is empty or whitespace only")
            if "'s " not in c:
                raise VocabularyError(f"{c!r} names no part: write \"object's part\" (e.g. "
                                      "\"cup's handle\") or an (object, part) pair")
            obj, part = c.rsplit("'s ", 1)
        elif (isinstance(c, (tuple, list)) and len(c) == 2
              and all(isinstance(x, str) for x in c)):
            obj, part = c
        else:
            raise InputError(f"classes must be \"object's part\" strings or (object, part) "
                             f"string pairs, got {type(c).__name__} {c!r}")
        obj, part = " ".join(obj.split()), " ".join(part.split())
        if not obj or not part:
            raise VocabularyError(f"{c!r} has an empty object or part name")
        pairs.append((obj, part))
    if len(set(pairs)) != len(pairs):
        dup = sorted({class_name(*q) for q in pairs if pairs.count(q) > 1})
        raise VocabularyError(f"duplicate class names in classes: {dup}")
    return tuple(pairs)


class Segmenter:
    """A loaded bundle plus one backend. Thread-safe: share one across threads."""

    SELECTION_CACHE = 32  # class subsets whose graph inputs are kept ready

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
        self._arrays = arrays
        self._image_dtype = np.dtype(manifest.image_dtype)
        self._selections: OrderedDict[tuple[tuple[str, str], ...], _Selection] = OrderedDict()
        self._default: _Selection | None = None  # the bundle's vocabulary, or set_vocabulary's
        self._text: TextSide | None = None
        self._threads = threads  # CPU threads of the text encoder too
        self._lock = threading.Lock()

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def load(cls, bundle: str | Path, backend: str = "auto", device: str | None = None,
             precision: str | None = None, checkpoint: str | Path | None = None,
             threads: int | None = None, max_classes: int | None = None,
             fast_labels: bool = False, slots: bool | None = None) -> "Segmenter":
        """Open a bundle folder.

        backend: "auto" (TensorRT engine if it can run here, else ONNX Runtime on CUDA, else on
            CPU; logs what it picked), "tensorrt", "onnxruntime" or "torch" (reference; needs the
            checkpoint: `checkpoint=` or the path recorded at export).
        device: "cuda" or "cpu" (default: cuda when the backend can use it).
        precision: "fp16" or "fp32" (default: fp16 on cuda, fp32 on cpu; an engine's is fixed).
        max_classes: split larger vocabularies into chunks of at most this many classes (the
            TensorRT backend caps it at the engine's profile).
        fast_labels: run the bundle's label-map graph (`export.onnx --labels`): Pred-All in the
            graph at model resolution, the label map resized (nearest) to each image. The same
            labels when images come at the model's input size; near object boundaries they can
            differ otherwise (the exact path resizes logits, then takes the argmax). No
            Oracle-Obj, scores or chunking: the per-class maps never leave the graph.
            The bundle's fast slot graphs (`export.onnx --fast`, every dimension static) when it
            has them; `slots=False` picks the dynamic label-map graph instead.
        """
        if device not in (None, "cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
        if precision not in (None, "fp16", "fp32"):
            raise ValueError(f"precision must be 'fp16' or 'fp32', got {precision!r}")
        if backend != "auto":
            impl_class = backend_class(backend)  # unknown names fail before any file is read
        manifest = spec.read_manifest(bundle)
        arrays = spec.read_vocab(manifest)
        if backend == "auto":
            backend, device = _pick_backend(manifest, device)
            log.info("runtime: backend=auto picked %s on %s", backend, device)
            impl_class = backend_class(backend)
        impl = impl_class.open(manifest, BackendOptions(device, precision, threads, fast_labels,
                                                        checkpoint, slots))
        limits = [n for n in (max_classes, impl.max_classes) if n]
        return cls(manifest, arrays, impl, min(limits) if limits else None, fast_labels, threads)

    @property
    def backend_name(self) -> str:
        return f"{self.backend.name}:{self.backend.device}:{self.precision}"

    def __repr__(self) -> str:
        return (f"Segmenter({self.manifest.root}, {self.backend_name}, {self.mode}, "
                f"{self.vocabulary.num_classes} classes, input {self.input_size})")

    # -- vocabulary -----------------------------------------------------------------------------
    def feeds(self, classes: Sequence[str] | None = None) -> list[dict[str, np.ndarray]]:
        """The graph's vocabulary inputs for `classes` (default: the whole vocabulary), one dict
        per backend call: more than one when the vocabulary exceeds `max_classes`. Add
        `{"image": (B, S, S, 3) batch}` to one and it is a complete feed for `backend.run`."""
        return [feed for _, _, feed in self._select(classes).chunks]

    def feed(self, classes: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """`feeds(classes)` when it is one call (export checks, benchmarks, I/O binding)."""
        feeds = self.feeds(classes)
        if len(feeds) != 1:
            raise VocabularyError(f"this vocabulary runs in {len(feeds)} chunks of at most "
                                  f"{self.max_classes} classes; use feeds()")
        return feeds[0]

    @property
    def vocabulary(self) -> Vocabulary:
        """The default vocabulary: the bundle's, or the last `set_vocabulary`'s."""
        return self._select(None).vocab

    def set_vocabulary(self, classes: ClassRequest, unseen_objects: Sequence[str] = ()) -> None:
        """Make `classes` the default of later calls (`predict(frame)` without `classes`).

        Names outside the bundle's vocabulary are encoded with the bundle's text side (once;
        cached). Thread-safe: a `predict` running meanwhile uses the old or the new vocabulary,
        whole. Errors leave the current default in place.
        """
        sel = self._build_selection(_class_pairs(classes), tuple(unseen_objects))
        with self._lock:
            self._default = sel

    def _select(self, classes: ClassRequest | None) -> _Selection:
        if classes is None:
            with self._lock:
                sel = self._default
            if sel is None:
                sel = self._build_selection(None)
                with self._lock:
                    self._default = self._default or sel
                    sel = self._default
            return sel
        key = _class_pairs(classes)
        with self._lock:
            sel = self._selections.get(key)
            if sel is not None:
                self._selections.move_to_end(key)
                return sel
        sel = self._build_selection(key)
        with self._lock:
            self._selections[key] = sel
            while len(self._selections) > self.SELECTION_CACHE:  # apps that vary requests
                self._selections.popitem(last=False)
        return sel

    def _text_side(self) -> TextSide:
        with self._lock:
            if self._text is None:
                self._text = TextSide.open(self.manifest, self._threads)
            return self._text

    def _build_selection(self, pairs: tuple[tuple[str, str], ...] | None,
                         unseen_objects: tuple[str, ...] = ()) -> _Selection:
        """The selection for `pairs` (None: the bundle's vocabulary). Names the bundle has take
        its precomputed rows; a request with any other name is encoded as a whole."""
        full, arrays = self.manifest.vocabulary, self._arrays
        if pairs is None:
            vocab = full
        else:
            names = [class_name(o, p) for o, p in pairs]
            known = set(full.class_names)
            new = [n for n in names if n not in known]
            if not new:
                vocab = full.subset([full.index(n) for n in names])
                if unseen_objects:
                    vocab = Vocabulary.from_names(pairs, unseen_objects)
            else:
                if self.manifest.text is None:  # exported before the text side existed
                    try:
                        full.index(new[0])  # unknown: close matches suggested
                    except VocabularyError as unknown:
                        raise VocabularyError(
                            f"{unknown}; {self.manifest.root} was exported without its text "
                            "side, so it takes only the names it was exported with: re-export "
                            "it with python -m export.onnx to use new class names") from None
                text = self._text_side()
                vocab = Vocabulary.from_names(pairs, unseen_objects)
                full, arrays = vocab, text.vocab_arrays(vocab)
        groups = self._chunk(vocab)
        if self.fast_labels and len(groups) > 1:
            raise VocabularyError(f"{vocab.num_classes} classes exceed max_classes "
                                  f"{self.max_classes}, and label maps cannot be merged across "
                                  "chunks: load without fast_labels")
        chunks = []
        for cls_idx, obj_idx in groups:
            chunks.append((cls_idx, obj_idx,
                           self._feed_arrays(full, arrays, vocab, cls_idx, obj_idx)))
        return _Selection(vocab, tuple(chunks))

    def _chunk(self, vocab: Vocabulary) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
        """Group classes by object so every chunk fits `max_classes` on each class dimension.

        Conditions never interact in the decoder, so chunked results equal one big run.
        """
        limit = self.max_classes
        if self.mode == "clipseg":
            k = vocab.num_classes
            step = limit or k
            return [(tuple(range(s, min(k, s + step))), ()) for s in range(0, k, step)]
        groups: list[tuple[list[int], list[int], set[int]]] = []
        for o in range(len(vocab.objects)):
            own = list(vocab.object_classes(o))
            if not own:
                continue
            parts = {vocab.classes[k][1] for k in own}
            if limit and len(own) > limit:
                raise VocabularyError(f"object {vocab.objects[o]!r} has {len(own)} classes, more "
                                      f"than the engine's profile maximum {limit}: rebuild with "
                                      "python -m export.trt --max-classes N")
            if groups:
                c, ob, pa = groups[-1]
                if not limit or (len(c) + len(own) <= limit and len(ob) + 1 <= limit
                                 and len(pa | parts) <= limit):
                    c.extend(own), ob.append(o), pa.update(parts)
                    continue
            groups.append((own, [o], set(parts)))
        return [(tuple(c), tuple(ob)) for c, ob, _ in groups]

    def _feed_arrays(self, full: Vocabulary, a: dict[str, np.ndarray], vocab: Vocabulary,
                     cls_idx: Sequence[int], obj_idx: Sequence[int]) -> dict[str, np.ndarray]:
        """Rows of `a` (the graph inputs of vocabulary `full`) for these classes of `vocab`."""
        names = [vocab.class_names[k] for k in cls_idx]
        rows = np.array([full.index(n) for n in names], np.int64)
        bg = a[spec.OBJECT_FILM[0]].shape[0] - 1
        if self.mode == "clipseg":
            obj_rows = np.append(rows, bg)
            return {n: np.ascontiguousarray(a[n][obj_rows]) for n in spec.OBJECT_FILM}
        full_cls = [full.classes[r] for r in rows]
        obj_full = sorted({o for o, _ in full_cls})
        part_full = sorted({p for _, p in full_cls})
        obj_rows = np.array(obj_full + [bg], np.int64)
        part_rows = np.array(part_full, np.int64)
        feed = {n: np.ascontiguousarray(a[n][part_rows]) for n in spec.PART_FILM}
        if self.mode == "colour_blind":  # object rows are words: keep those of these objects
            feed.update(_word_rows(a, obj_full))
        else:
            feed.update({n: np.ascontiguousarray(a[n][obj_rows]) for n in spec.OBJECT_FILM})
        feed.update({n: np.ascontiguousarray(a[n][rows]) for n in spec.CLASS_FILM})
        feed[spec.CLASS_INDEX[0]] = np.array([part_full.index(p) for _, p in full_cls], np.int64)
        feed[spec.CLASS_INDEX[1]] = np.array([obj_full.index(o) for o, _ in full_cls], np.int64)
        return feed

    # -- inference ------------------------------------------------------------------------------
    def _infer(self, batch: np.ndarray, sel: _Selection) -> tuple[np.ndarray, np.ndarray | None]:
        """(B, S, S, 3) images -> logits (B, K + 1, S, S), object logits (B, O + 1, S, S)."""
        vocab = sel.vocab
        k, o = vocab.num_classes, len(vocab.objects)
        b, s = batch.shape[0], self.input_size
        if len(sel.chunks) == 1:
            out = self.backend.run({spec.IMAGE: batch, **sel.chunks[0][2]})
            return out[spec.LOGITS], out.get(spec.OBJECT_LOGITS)
        logits = np.empty((b, k + 1, s, s), np.float32)
        obj_logits = None if self.mode == "clipseg" else np.empty((b, o + 1, s, s), np.float32)
        for cls_idx, obj_idx, feed in sel.chunks:
            out = self.backend.run({spec.IMAGE: batch, **feed})
            logits[:, list(cls_idx)] = out[spec.LOGITS][:, :-1]
            logits[:, k] = out[spec.LOGITS][:, -1]  # background: the same in every chunk
            if obj_logits is not None:
                obj_logits[:, list(obj_idx)] = out[spec.OBJECT_LOGITS][:, :-1]
                obj_logits[:, o] = out[spec.OBJECT_LOGITS][:, -1]
        return logits, obj_logits

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
        sel = self._select(classes)
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
            maps = self.backend.run({spec.IMAGE: batch, **sel.chunks[0][2]})[spec.LABELS]
        else:
            logits, obj_logits = self._infer(batch, sel)
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


def _pick_backend(manifest: spec.Manifest, device: str | None) -> tuple[str, str]:
    """The fastest backend that can run here: TensorRT > ONNX Runtime CUDA > ONNX Runtime CPU."""
    if device != "cpu" and manifest.has("engine") and manifest.engine is not None:
        try:
            from .backends.tensorrt import current_gpu, engine_mismatch, import_tensorrt

            trt, flavour = import_tensorrt(manifest.engine.flavour)
            problem = engine_mismatch(manifest.engine, flavour, trt.__version__, current_gpu())
            if problem is None:
                return "tensorrt", "cuda"
            log.info("runtime: not using the TensorRT engine: %s", problem)
        except ImportError as e:
            log.info("runtime: TensorRT unavailable (%s)", str(e).splitlines()[0])
    if device != "cpu":
        from .backends.onnxruntime import cuda_available

        if cuda_available():
            return "onnxruntime", "cuda"
        if device == "cuda":
            raise DeviceError("device='cuda' but neither a runnable TensorRT engine nor "
                               "onnxruntime-gpu is available")
    return "onnxruntime", "cpu"
