"""Fast slot graphs (`export.onnx --fast`): every dimension static, the vocabulary in slots.

A fast graph takes each vocabulary input zero-padded to a fixed number of rows (the bundle's
`FastInfo`: part, object and class slots, the background row kept last) plus one validity mask
per axis it needs (`FastInfo.masks`), so a new vocabulary changes slot contents, never shapes.
`pad_to_slots` fills them from the graph contract (`runtime.bundle.TensorSpec`), for any model;
`SlotGraphs` runs one graph per exported batch size behind the backend interface.
"""

from __future__ import annotations

import threading
from typing import Any, Mapping

import numpy as np

from ..bundle import IMAGE, LABELS, BundleError, FastInfo, Manifest, TensorSpec, graph_file
from . import BackendOptions, default_precision, register
from .onnxruntime import OnnxRuntimeBackend

__all__ = ["pad_to_slots", "SlotGraphs"]

_PLURAL = {"part": "parts", "object": "objects", "class": "classes"}


def pad_to_slots(arrays: Mapping[str, np.ndarray], specs: Mapping[str, TensorSpec],
                 fast: FastInfo) -> dict[str, np.ndarray]:
    """A feed's vocabulary arrays ({name: array} described by `specs`) in the fast graphs'
    fixed slots: rows zero-padded to the slot count of their axis (the background row kept
    last; padded indices are 0), plus the masks `fast.masks` marking the real rows.
    Raises BundleError naming the axis when the vocabulary does not fit."""
    rows = {t.rows: arrays[n].shape[0] - t.background for n, t in specs.items() if t.rows}
    over = {axis: (n, fast.slots(axis)) for axis, n in rows.items() if n > fast.slots(axis)}
    if over:
        raise BundleError("the vocabulary does not fit the fast graphs' slots ("
                          + ", ".join(f"{n} {_PLURAL[axis]} > {lim}" for axis, (n, lim)
                                      in over.items())
                          + "): re-export with larger --max-parts / --max-objects / "
                          "--max-classes, or run the other graphs")
    out = {}
    for name, t in specs.items():
        a = arrays[name]
        if t.rows is None:
            out[name] = a
            continue
        n = rows[t.rows]
        padded = np.zeros((fast.slots(t.rows) + t.background,) + a.shape[1:], a.dtype)
        padded[:n] = a[:n]
        if t.background:
            padded[-1] = a[-1]
        out[name] = padded
    for name, t in fast.masks.items():
        valid = np.zeros(fast.slots(t.rows) + t.background, bool)
        valid[:rows[t.rows]] = True
        if t.background:
            valid[-1] = True
        out[name] = valid
    return out


@register("onnxruntime-slots")
class SlotGraphs:
    """A bundle's fast slot graphs (`export.onnx --fast`) behind the backend interface: one
    session per exported batch size (captured in a CUDA graph on the GPU). `run` pads the
    vocabulary into the slots and the batch up to the next exported size (larger batches in
    pieces of the largest), so every call has the shapes the graphs were built with.
    Output: {"labels": (B, S, S) int32}."""

    name = "onnxruntime"
    route = "fast"  # `Segmenter.route`
    max_classes = None  # the slots bound the vocabulary; `pad_to_slots` names an overflow

    @classmethod
    def open(cls, manifest: Manifest, options: BackendOptions) -> "SlotGraphs":
        device = options.device or "cpu"
        precision = default_precision(device, options.precision)
        if precision not in manifest.precisions:
            raise BundleError(f"{manifest.root} has no {precision} graphs; export them with "
                              "python -m export.onnx" + (" --int8" if precision == "int8" else ""))
        return cls(manifest, device, options.threads, precision)

    def __init__(self, manifest: Manifest, device: str, threads: int | None, precision: str):
        self.fast, self.specs = manifest.fast, manifest.vocab_inputs
        self.sessions = {
            b: OnnxRuntimeBackend(str(manifest.file(graph_file(precision, fast_batch=b)[0])),
                                  device, threads, precision=precision,
                                  cuda_graph=device == "cuda")
            for b in self.fast.batches}
        first = self.sessions[self.fast.batches[0]]
        self.device, self.precision = device, precision
        self.input_names, self.output_names = first.input_names, (LABELS,)
        self._slots: dict[int, tuple[Any, dict[str, np.ndarray]]] = {}
        self._lock = threading.Lock()

    def _padded(self, vocab: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Slot arrays of a selection's feed, kept while the same feed comes back."""
        key = id(vocab.get(next(iter(sorted(vocab)))))
        with self._lock:
            hit = self._slots.get(key)
            if hit is not None and all(hit[0][n] is vocab[n] for n in vocab):
                return hit[1]
        slots = pad_to_slots(vocab, self.specs, self.fast)
        with self._lock:
            if len(self._slots) > 64:
                self._slots.clear()
            self._slots[key] = (dict(vocab), slots)
        return slots

    def run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        image = feed[IMAGE]
        slots = self._padded({k: v for k, v in feed.items() if k != IMAGE})
        largest = self.fast.batches[-1]
        out = []
        for start in range(0, image.shape[0], largest):
            part = image[start:start + largest]
            b = next(s for s in self.fast.batches if s >= part.shape[0])
            if b > part.shape[0]:  # zero frames fill the static batch; their labels are dropped
                part = np.concatenate([part, np.zeros((b - part.shape[0],) + part.shape[1:],
                                                      part.dtype)])
            labels = self.sessions[b].run({IMAGE: part, **slots})[LABELS]
            out.append(labels[:min(largest, image.shape[0] - start)])
        return {LABELS: np.concatenate(out)}

    def close(self) -> None:
        for s in self.sessions.values():
            s.close()
