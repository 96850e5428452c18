"""ONNX Runtime backend: CPU or CUDA execution provider, full graph optimizations."""

from __future__ import annotations

import logging
import threading
from typing import Any

import numpy as np

from ..bundle import BundleError, Manifest, graph_file
from ..errors import DeviceError
from . import BackendOptions, default_precision, register

__all__ = ["OnnxRuntimeBackend", "cuda_available"]

log = logging.getLogger("runtime")


def _session_kwargs(precision: str) -> dict[str, Any]:
    """INT8 graphs: keep ONNX Runtime from fusing a dequantized MatMul and its bias Add into a
    float Gemm before its Q/DQ fusion turns the MatMul into an integer kernel (static-shape
    graphs, e.g. the fast ones, lost their INT8 speed-up to it: 1335 vs 808 ms at the reference
    size, 2026-12-06)."""
    return {"disabled_optimizers": ["MatMulAddFusion"]} if precision == "int8" else {}


def cuda_available() -> bool:
    """True when the installed onnxruntime has the CUDA provider (onnxruntime-gpu)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    return "CUDAExecutionProvider" in ort.get_available_providers()


@register("onnxruntime")
class OnnxRuntimeBackend:
    """One InferenceSession (`session`, public for I/O binding and provider checks); `run` is
    thread-safe (ONNX Runtime sessions are).

    device "cpu" or "cuda" (needs `pip install onnxruntime-gpu`); threads: intra-op threads on
    CPU (default: ONNX Runtime's, one per physical core); precision: the graph's ("fp32" |
    "fp16"), recorded for reports.
    """

    name = "onnxruntime"
    max_classes = None  # dynamic class dimensions: any vocabulary in one call

    @classmethod
    def open(cls, manifest: Manifest, options: BackendOptions) -> "OnnxRuntimeBackend":
        """The bundle's FP32 or FP16 graph, or with `options.labels` its label-map graph (the
        fast slot graphs are `runtime.backends.slots`; `open_backend` picks)."""
        device = options.device or "cpu"
        precision = default_precision(device, options.precision)
        if precision == "int8" and device != "cpu":
            raise DeviceError("INT8 graphs run on the CPU provider (TensorRT builds its own "
                              "INT8 engine: python -m export.trt --precision int8); use "
                              "device='cpu'")
        if precision == "int8" and precision not in manifest.precisions:
            raise BundleError(f"{manifest.root} has no INT8 graphs; export them with "
                              "python -m export.onnx --int8")
        if options.slots:
            raise BundleError(f"{manifest.root} has no fast slot graphs; export them with "
                              "python -m export.onnx --fast 1 8 ...")
        key, _ = graph_file(precision, options.labels)
        if options.labels and not manifest.has(key):
            raise BundleError(f"{manifest.root} has no label-map graph; export it with "
                              "python -m export.onnx --labels")
        return cls(str(manifest.file(key)), device, options.threads, precision=precision)

    def __init__(self, path: str, device: str = "cpu", threads: int | None = None,
                 io_binding: bool | None = None, precision: str = "fp32",
                 cuda_graph: bool = False):
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise ImportError("the onnxruntime backend needs `pip install onnxruntime` "
                              "(or onnxruntime-gpu for CUDA)") from e
        if device == "cuda":
            if not cuda_available():
                raise DeviceError("device='cuda' needs onnxruntime-gpu (`pip install "
                                   "onnxruntime-gpu`); installed providers: "
                                   f"{ort.get_available_providers()}")
            providers: list[Any] = [("CUDAExecutionProvider", {"device_id": 0}),
                                    "CPUExecutionProvider"]
        elif device == "cpu":
            providers = ["CPUExecutionProvider"]
        else:
            raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        if threads:
            opts.intra_op_num_threads = threads
        # CUDA graphs (static graphs only): the whole graph replays as one launch; ONNX Runtime
        # refuses graphs with CPU nodes or dynamic shapes, and then this falls back, saying so.
        self._static: dict[str, Any] | None = None
        if cuda_graph and device == "cuda":
            try:
                self.session = ort.InferenceSession(path, opts, providers=[
                    ("CUDAExecutionProvider", {"device_id": 0, "enable_cuda_graph": "1"})])
                self._static = {}
            except Exception as e:  # capture refused at session creation
                log.warning("runtime: CUDA graph capture refused for %s (%s); running without",
                            path, str(e).splitlines()[0][:200])
        try:
            if self._static is None:
                self.session = ort.InferenceSession(path, opts, providers=providers,
                                                    **_session_kwargs(precision))
        except Exception as e:  # ORT raises its own Fail/InvalidProtobuf/... types
            raise BundleError(f"{path} cannot be loaded by ONNX Runtime ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:300]}); it is corrupt or truncated: "
                              "re-export the bundle with python -m export.onnx") from e
        if device == "cuda" and self.session.get_providers()[0] != "CUDAExecutionProvider":
            # ONNX Runtime falls back to the CPU silently when the CUDA libraries do not load.
            raise DeviceError(f"ONNX Runtime could not start its CUDA provider for {path} "
                               f"(running on {self.session.get_providers()}): check that the CUDA "
                               "and cuDNN libraries onnxruntime-gpu needs are installed")
        self.device, self.precision = device, precision
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        # On CUDA, I/O binding keeps the vocabulary on the GPU and copies each way once; on
        # the CPU a plain run returns its outputs without the binding's extra copy.
        self.io_binding = device == "cuda" if io_binding is None else io_binding
        self._ort = ort
        self._lock = threading.Lock()
        self._resident: dict[int, tuple[np.ndarray, Any]] = {}  # id(array) -> (array, OrtValue)

    def _value(self, array: np.ndarray) -> Any:
        """An OrtValue on the session's device. Vocabulary arrays are the same objects call
        after call: they are copied to the device once and stay there."""
        hit = self._resident.get(id(array))
        if hit is not None and hit[0] is array:
            return hit[1]
        value = self._ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), self.device, 0)
        if array.ndim <= 2 and array.nbytes < (1 << 24):  # vocabulary-sized, not images
            if len(self._resident) > 256:
                self._resident.clear()
            self._resident[id(array)] = (array, value)
        return value

    def _run_captured(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """CUDA graph replay: the same device buffers every call (inputs copied in place).

        Not executed on our machines (no GPU lent so far): the CPU tests run the same graphs
        through the plain path; `python -m benchmarks.gpu_bench` exercises this one."""
        ort = self._ort
        with self._lock:
            if not self._static:
                io = self.session.io_binding()
                for n in self.input_names:
                    v = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(feed[n]), "cuda", 0)
                    self._static[n] = v
                    io.bind_ortvalue_input(n, v)
                for o in self.session.get_outputs():
                    dtype = np.int32 if o.type == "tensor(int32)" else np.float32
                    v = ort.OrtValue.ortvalue_from_shape_and_type(o.shape, dtype, "cuda", 0)
                    self._static[o.name] = v
                    io.bind_ortvalue_output(o.name, v)
                self._binding = io
            else:
                for n in self.input_names:
                    self._static[n].update_inplace(np.ascontiguousarray(feed[n]))
            self.session.run_with_iobinding(self._binding)
            return {n: self._static[n].numpy() for n in self.output_names}

    def run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Inputs by name -> outputs by name. With I/O binding (the CUDA default) the image
        crosses to the GPU once, vocabulary vectors stay resident, outputs are allocated on the
        GPU and copied back once (a label-map graph copies only (B, S, S) int32)."""
        if self._static is not None:
            return self._run_captured(feed)
        if not self.io_binding:
            out = self.session.run(self.output_names, {n: feed[n] for n in self.input_names})
            return dict(zip(self.output_names, out))
        io = self.session.io_binding()  # one per call: bindings are not thread-safe
        for n in self.input_names:
            io.bind_ortvalue_input(n, self._value(feed[n]))
        for n in self.output_names:
            io.bind_output(n, self.device)
        self.session.run_with_iobinding(io)
        return dict(zip(self.output_names, io.copy_outputs_to_cpu()))

    def close(self) -> None:
        self.session = None
