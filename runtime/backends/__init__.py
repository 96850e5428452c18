"""Execution backends behind one protocol, found by name in a registry.

Each backend module registers its class with `@register(name)` when it is imported, and is
imported only when that backend is asked for (`backend_class`): `import runtime` pulls in no
onnxruntime, TensorRT or torch.

    impl = backend_class("onnxruntime").open(manifest, BackendOptions(device="cpu"))
    outputs = impl.run({"image": batch, **vocabulary_arrays})
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Protocol, Sequence

import numpy as np

from ..errors import DeviceError

if TYPE_CHECKING:
    from ..bundle import Manifest

log = logging.getLogger("runtime")

__all__ = ["Backend", "BackendOptions", "register", "backend_class", "open_backend",
           "pick_backend", "BACKENDS"]

# name -> module that registers it (imported on first use).
_MODULES = {"tensorrt": "runtime.backends.tensorrt", "onnxruntime": "runtime.backends.onnxruntime",
            "torch": "runtime.backends.torch"}
_VARIANTS = {"onnxruntime-slots": "runtime.backends.slots"}  # picked by `open_backend`
_REGISTRY: dict[str, type["Backend"]] = {}
BACKENDS = tuple(_MODULES)


@dataclass(frozen=True)
class BackendOptions:
    """What a caller may ask of a backend when opening a bundle.

    device: "cpu" | "cuda" | None (the backend's default); precision: "fp32" | "fp16" | None
    (fp16 on cuda, fp32 on cpu); threads: intra-op CPU threads (None: the library's default);
    labels: run a label-map graph (Pred-All in the graph); slots: with labels, the fast slot
    graphs (True), the dynamic label-map graph (False) or the first when the bundle has them
    (None); checkpoint: the torch backend's checkpoint (default: the one the manifest records).
    """

    device: str | None = None
    precision: str | None = None
    threads: int | None = None
    labels: bool = False
    checkpoint: str | Path | None = None
    slots: bool | None = None


class Backend(Protocol):
    """A bundle's graph, ready to run. `run` is thread-safe.

    name: registry name; device: "cpu" | "cuda"; precision: "fp32" | "fp16";
    input_names / output_names: the graph's tensors (`runtime.bundle` names them);
    max_classes: the largest class dimension the backend accepts (None: any).
    """

    name: str
    device: str
    precision: str
    input_names: Sequence[str]
    output_names: Sequence[str]
    max_classes: int | None

    @classmethod
    def open(cls, manifest: "Manifest", options: BackendOptions) -> "Backend":
        """Open the bundle's graph for `options`; BundleError / DeviceError say what is wrong."""
        ...

    def run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Inputs by name (numpy, host) -> outputs by name (numpy, host)."""
        ...

    def close(self) -> None:
        ...


def register(name: str) -> Callable[[type], type]:
    """Class decorator: make a backend class available as `name`."""
    def add(cls: type) -> type:
        _REGISTRY[name] = cls
        return cls
    return add


def backend_class(name: str) -> type[Backend]:
    """The backend class registered as `name`, importing its module on first use."""
    if name not in _REGISTRY:
        module = _MODULES.get(name) or _VARIANTS.get(name)
        if module is None:
            raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {name!r}")
        importlib.import_module(module)
    return _REGISTRY[name]


def open_backend(name: str, manifest: "Manifest", options: BackendOptions) -> Backend:
    """Open backend `name` on the bundle. ONNX Runtime label maps run the bundle's fast slot
    graphs when it has them (`export.onnx --fast`), unless `options.slots` is False."""
    if (name == "onnxruntime" and options.labels and options.slots is not False
            and manifest.fast is not None):
        name = "onnxruntime-slots"
    return backend_class(name).open(manifest, options)


def default_precision(device: str, precision: str | None) -> str:
    """FP16 on the GPU, FP32 on the CPU, unless asked."""
    return precision or ("fp16" if device == "cuda" else "fp32")


def pick_backend(manifest: "Manifest", device: str | None) -> tuple[str, str]:
    """(backend name, device) of `backend="auto"`: the fastest that can run here, TensorRT >
    ONNX Runtime CUDA > ONNX Runtime CPU; logs why a faster one was passed over."""
    if device != "cpu" and manifest.has("engine") and manifest.engine is not None:
        try:
            from .tensorrt import current_gpu, engine_mismatch, import_tensorrt

            trt, flavour = import_tensorrt(manifest.engine.flavour)
            problem = engine_mismatch(manifest.engine, flavour, trt.__version__, current_gpu())
            if problem is None:
                return "tensorrt", "cuda"
            log.info("runtime: not using the TensorRT engine: %s", problem)
        except ImportError as e:
            log.info("runtime: TensorRT unavailable (%s)", str(e).splitlines()[0])
    if device != "cpu":
        from .onnxruntime import cuda_available

        if cuda_available():
            return "onnxruntime", "cuda"
        if device == "cuda":
            raise DeviceError("device='cuda' but neither a runnable TensorRT engine nor "
                              "onnxruntime-gpu is available")
    return "onnxruntime", "cpu"
