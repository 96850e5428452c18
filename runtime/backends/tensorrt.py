"""TensorRT: finding the installed flavour, checking an engine fits it, and running engines.

Shared by `export.trt` (building) and the runtime (running), so the lines that only a machine
with TensorRT and a supported GPU can execute stay few. Three flavours, one code path through
Polygraphy: TensorRT 10, TensorRT 11 (both module `tensorrt`) and TensorRT-RTX (module
`tensorrt_rtx_bindings`, which Polygraphy knows as `tensorrt_rtx`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from types import ModuleType

import numpy as np

from ..bundle import BundleError, EngineInfo, Manifest
from . import BackendOptions, register

__all__ = ["TensorRTUnavailable", "import_tensorrt", "current_gpu", "engine_mismatch",
           "TensorRTBackend", "INSTALL_HINT"]

INSTALL_HINT = ("install TensorRT with `pip install 'partclipseg-deploy[tensorrt]'` (NVIDIA GPU "
                "machines) or TensorRT-RTX with `pip install 'partclipseg-deploy[tensorrt-rtx]'` "
                "(builds engines on any machine, runs on RTX GPUs)")


_FLAVOUR: str | None = None  # Polygraphy binds one TensorRT module per process


class TensorRTUnavailable(ImportError):
    """No usable TensorRT installation (or no GPU to run an engine on)."""


def import_tensorrt(prefer: str | None = None) -> tuple[ModuleType, str]:
    """(module, flavour) with flavour "tensorrt" or "tensorrt_rtx"; Polygraphy is set up for it.

    Full TensorRT wins when both are installed, unless `prefer` names one. Must run before
    `polygraphy.backend.trt` is first imported (Polygraphy picks its module at import time).
    """
    global _FLAVOUR
    order = {"tensorrt": ["tensorrt"], "tensorrt_rtx": ["tensorrt_rtx"]}.get(
        prefer or "", ["tensorrt", "tensorrt_rtx"])
    if _FLAVOUR is not None and _FLAVOUR not in order:
        raise TensorRTUnavailable(f"this process already set Polygraphy up for {_FLAVOUR}; "
                                  f"{prefer} needs a new process")
    errors = []
    for flavour in ([_FLAVOUR] if _FLAVOUR else order):
        try:
            if flavour == "tensorrt":
                import tensorrt as trt
                if not hasattr(trt, "Builder"):  # PyPI's `tensorrt` without its libraries
                    raise ImportError("the `tensorrt` package is a stub without its libraries")
            else:
                import tensorrt_rtx_bindings as trt
                sys.modules.setdefault("tensorrt_rtx", trt)
        except (ImportError, OSError) as e:
            errors.append(f"{flavour}: {e}")
            continue
        os.environ["POLYGRAPHY_USE_TENSORRT_RTX"] = "1" if flavour == "tensorrt_rtx" else "0"
        from polygraphy import config as polygraphy_config
        polygraphy_config.USE_TENSORRT_RTX = flavour == "tensorrt_rtx"
        _FLAVOUR = flavour
        return trt, flavour
    raise TensorRTUnavailable("no TensorRT found (" + "; ".join(errors) + "): " + INSTALL_HINT)


def current_gpu() -> dict[str, str] | None:
    """{"name", "compute_capability"} of GPU 0 via nvidia-smi, or None without a GPU."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return None
    try:
        out = subprocess.run([smi, "--query-gpu=name,compute_cap", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    line = out.strip().splitlines()[0] if out.strip() else ""
    if "," not in line:
        return None
    name, cc = (s.strip() for s in line.split(",", 1))
    return {"name": name, "compute_capability": cc}


def engine_mismatch(engine: EngineInfo, flavour: str, version: str,
                    gpu: dict[str, str] | None) -> str | None:
    """Why an engine built as `engine` (the manifest's) cannot run here, or None."""
    rebuild = ("rebuild it on this machine: python -m export.trt --ckpt CHECKPOINT --out BUNDLE")
    if engine.flavour != flavour or engine.version != version:
        return (f"the engine was built with {engine.flavour} {engine.version}, this "
                f"process has {flavour} {version}; engines only run on the TensorRT version "
                f"that built them: {rebuild}")
    if gpu is None:
        return "no NVIDIA GPU is visible (nvidia-smi found none): TensorRT engines need one"
    want = engine.gpu or {}
    # TensorRT-RTX engines are portable across GPUs of supported compute capabilities.
    if flavour == "tensorrt" and want.get("compute_capability") != gpu["compute_capability"]:
        return (f"the engine was built for {want.get('name')} (compute capability "
                f"{want.get('compute_capability')}), this GPU is {gpu['name']} "
                f"({gpu['compute_capability']}): {rebuild}")
    return None


@register("tensorrt")
class TensorRTBackend:
    """Runs a bundle's engine with Polygraphy's TrtRunner (execute_async_v3 on TensorRT 10+).

    One execution context, guarded by a lock: a Segmenter may be shared between threads.
    Inputs and outputs are numpy arrays (host); Polygraphy copies them to and from the GPU.
    Not executed on our machines (no TensorRT where there is a GPU; TensorRT-RTX, which CI uses
    to build every graph, cannot run on Hopper): the checks before deserialization are tested,
    `__init__`'s last lines and `run` are not.
    """

    name = "tensorrt"

    @classmethod
    def open(cls, manifest: Manifest, options: BackendOptions) -> "TensorRTBackend":
        """The bundle's engine (its precision and profile are fixed at build time)."""
        if manifest.engine is None:
            raise BundleError(f"{manifest.root} has no TensorRT engine; build one with "
                              "python -m export.trt --out BUNDLE")
        if options.labels:
            raise ValueError("fast_labels runs ONNX label-map graphs; the TensorRT engine is "
                             "built from the logits graph")
        return cls(str(manifest.file("engine")), manifest.engine)

    def __init__(self, engine_path: str, engine: EngineInfo):
        trt, flavour = import_tensorrt(engine.flavour)
        problem = engine_mismatch(engine, flavour, trt.__version__, current_gpu())
        if problem:
            raise TensorRTUnavailable(f"{engine_path}: {problem}")
        from polygraphy.backend.common import BytesFromPath
        from polygraphy.backend.trt import EngineFromBytes, TrtRunner

        self._runner = TrtRunner(EngineFromBytes(BytesFromPath(engine_path)))
        self._runner.activate()
        self._lock = threading.Lock()
        self.device, self.precision, self.max_classes = "cuda", engine.precision, engine.max_classes
        self.input_names = self.output_names = ()  # the engine's own bindings (Polygraphy)

    def run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self._lock:
            out = self._runner.infer(feed, copy_outputs_to_host=True)
        return {k: np.asarray(v) for k, v in out.items()}

    def close(self) -> None:
        self._runner.deactivate()
