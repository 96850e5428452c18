"""A bundle checks itself where it runs: the checks behind `partclipseg check --bundle B`
(`runtime.check`) and `Segmenter.load(B, verify=True)`.

Export stores a few held-out images in the bundle (`check.npz`: images (N, S, S, 3) uint8 at
the model's input size, and the Pred-All labels (N, S, S) int16, -1 = background, that PyTorch
FP32 gave them on the exporting machine), with the least share of equal labels each precision
must reach (`runtime.bundle.CheckInfo`). Here those images run through a loaded `Segmenter` on
this machine, with whatever CPU, GPU and libraries it has, and the share of labels equal to the
exporter's is compared with that bar. Export runs the same code on the staged bundle, so the
bundle's numbers and this command's are measured alike.

Why: integer and half-precision arithmetic depends on the instruction set (an INT8 graph with
8-bit weights saturates on x86 CPUs without VNNI; docs/int8.md), a TensorRT engine is built on
the device, and nothing else compares the device's labels with the exporter's.
"""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from . import bundle as spec
from .errors import UserError

__all__ = ["CheckError", "CheckResult", "read_check_set", "check_segmenter", "verify",
           "machine", "saturating_int8", "likely_cause", "bundle_routes"]

# CPU features that change integer and half-precision results, as numpy's CPUID probe names
# them (x86; ARM's dot-product and FP16 ones). Read through CPUID, not /proc/cpuinfo, so an
# emulated CPU (qemu-x86_64 -cpu Haswell) reports its own. numpy does not probe AVX-VNNI
# (the 256-bit VNNI of Alder Lake and later).
CPU_FLAGS = ("AVX2", "AVX512F", "AVX512BW", "AVX512VNNI", "AVX512FP16", "F16C", "FMA3",
             "ASIMD", "ASIMDDP", "ASIMDHP")


class CheckError(UserError, RuntimeError):
    """A bundle's labels on this machine differ from the exporter's beyond its threshold."""


@dataclass(frozen=True)
class CheckResult:
    """One route's check: `agreement` is the share (0-1) of the check images' pixels whose
    label equals the exporter's; `passed` when it is >= `min_agreement`.

    route: "exact" (logits graph + numpy Pred-All), "labels" (label-map graph) or "fast" (the
    fast slot graphs); backend: `Segmenter.backend_name` ("onnxruntime:cpu:int8"); seconds:
    wall time of the check's predictions (the load not included)."""

    backend: str
    precision: str
    route: str
    agreement: float
    min_agreement: float
    images: int
    seconds: float

    @property
    def passed(self) -> bool:
        return self.agreement >= self.min_agreement  # False for NaN

    @property
    def key(self) -> str:
        """The manifest's name of this route: "int8", "int8/fast", "fp32/labels"."""
        return self.precision + ("" if self.route == "exact" else f"/{self.route}")

    def line(self) -> str:
        verdict = "ok" if self.passed else "FAILED"
        return (f"{self.backend:28s} {self.route:6s} {100 * self.agreement:7.2f}% of labels "
                f"equal to the exporter's (>= {100 * self.min_agreement:.1f}%) on "
                f"{self.images} images, {self.seconds:.2f} s: {verdict}")


def read_check_set(manifest: spec.Manifest) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, S, S, 3) uint8, labels (N, S, S) int16) of the bundle's check set;
    BundleError when it has none or it is damaged."""
    if manifest.check is None or not manifest.has("check"):
        raise spec.BundleError(f"{manifest.root} has no check images (exported before bundles "
                               "checked themselves): re-export it with python -m export.onnx")
    path = manifest.file("check")
    try:
        with np.load(path, allow_pickle=False) as z:
            images, labels = z["images"], z["labels"]
    except Exception as e:  # zipfile/KeyError/ValueError/OSError: all mean a damaged file
        raise spec.BundleError(f"{path} is corrupt ({type(e).__name__}: {e}); re-export the "
                               "bundle") from e
    s = manifest.input_size
    n = manifest.check.images
    if (images.dtype != np.uint8 or images.shape != (n, s, s, 3)
            or labels.shape != (n, s, s) or labels.dtype.kind != "i"):
        raise spec.BundleError(f"{path} holds images {images.dtype} {images.shape} and labels "
                               f"{labels.dtype} {labels.shape}, the manifest needs ({n}, {s}, "
                               f"{s}, 3) uint8 and ({n}, {s}, {s}) integers; re-export the bundle")
    return images, labels


def check_segmenter(seg: Any, batch: int = 8) -> CheckResult:
    """Run the bundle's check images through `seg` (a loaded `runtime.Segmenter`) and compare
    its labels with the exporter's. The images are at the model's input size, so no resize
    comes between the graph and the labels. Names outside the current vocabulary (after
    `export.vocab`) are encoded by the bundle's text side."""
    manifest = seg.manifest
    info = manifest.check
    images, want = read_check_set(manifest)
    classes = list(info.classes)
    request = None if list(seg.vocabulary.class_names) == classes else classes
    t = time.perf_counter()
    got = np.concatenate([np.stack([p.labels for p in seg.predict_batch(
        list(images[i:i + batch]), classes=request)]) for i in range(0, len(images), batch)])
    seconds = time.perf_counter() - t
    limit = info.min_agreement.get(seg.precision)
    if limit is None:
        raise spec.BundleError(f"{manifest.root}'s check set has no threshold for "
                               f"{seg.precision}; re-export the bundle")
    return CheckResult(seg.backend_name, seg.precision, seg.route, float(np.mean(got == want)),
                       float(limit), len(images), seconds)


def _cpu_flags() -> list[str] | None:
    """The CPU_FLAGS this CPU has, from numpy's CPUID probe (None: numpy does not expose it)."""
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as features  # numpy >= 2
    except ImportError:
        try:
            from numpy.core._multiarray_umath import __cpu_features__ as features
        except ImportError:
            return None
    return [f for f in CPU_FLAGS if features.get(f)]


def machine(backend: Any = None) -> dict[str, Any]:
    """What this machine's results depend on: CPU model (/proc/cpuinfo: an emulator shows its
    host's), the CPU_FLAGS it has (CPUID; None: unknown), architecture, GPU 0 (nvidia-smi; None
    without one), ONNX Runtime and numpy versions, and for a TensorRT backend its version."""
    model = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model", "Hardware"):
                model = value.strip()
                break
    except OSError:
        pass
    from .backends.tensorrt import current_gpu  # nvidia-smi; imports no TensorRT

    info: dict[str, Any] = {"cpu": model or platform.processor() or None,
                            "cpu_flags": _cpu_flags(), "arch": platform.machine(),
                            "gpu": current_gpu(), "numpy": np.__version__}
    try:
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    engine = getattr(backend, "engine", None)
    if engine is not None:
        info["tensorrt"] = f"{engine.flavour} {engine.version}"
    return info


def saturating_int8(flags: Sequence[str] | None) -> bool | None:
    """Whether ONNX Runtime's u8 x s8 products saturate on a CPU with these CPU_FLAGS: x86
    with AVX2 and without VNNI (VPMADDUBSW sums pairs into int16). None: flags unknown."""
    if flags is None:
        return None
    return "AVX2" in flags and "AVX512VNNI" not in flags


def likely_cause(result: CheckResult, manifest: spec.Manifest,
                 here: Mapping[str, Any]) -> str:
    """One sentence naming the most likely cause of a failed check, and the fix."""
    exported = manifest.check.machine if manifest.check else {}
    if result.agreement < 0.5:
        return ("most labels differ: the bundle's files or this backend's installation are "
                "broken; re-export the bundle or reinstall the runtime")
    if result.precision == "int8":
        bits = (manifest.onnx.parity.get("int8", {}) if manifest.onnx else {}).get("weight_bits", 8)
        if bits > 7 and saturating_int8(here.get("cpu_flags")):
            return ("this CPU has AVX2 but no VNNI, where ONNX Runtime's INT8 products of 8-bit "
                    "weights saturate; re-export the bundle with this version of export.onnx "
                    "--int8 (7-bit weights, exact on every CPU)")
        return (f"INT8 rounding here differs from the exporting machine's ({exported.get('cpu')}, "
                f"flags {exported.get('cpu_flags')}; here {here.get('cpu')}, flags "
                f"{here.get('cpu_flags')}): use precision fp32 on this machine, or re-export "
                "with calibration images like this deployment's")
    if result.backend.startswith("tensorrt"):
        return ("the TensorRT engine's labels differ from PyTorch's: rebuild it with "
                "python -m export.trt on this device, or run the ONNX graphs")
    versions = {k: (exported.get(k), here.get(k)) for k in ("onnxruntime", "numpy")}
    changed = {k: v for k, v in versions.items() if v[0] != v[1]}
    if changed:
        return ("library versions differ from the exporter's ("
                + ", ".join(f"{k} {a} at export, {b} here" for k, (a, b) in changed.items())
                + "): install the exporter's versions or re-export here")
    return (f"{result.precision} arithmetic on this machine differs from the exporter's: use "
            "precision fp32, or re-export the bundle here")


def verify(seg: Any) -> CheckResult:
    """`check_segmenter(seg)`, raising CheckError (naming the likely cause) below the bar."""
    result = check_segmenter(seg)
    if not result.passed:
        cause = likely_cause(result, seg.manifest, machine(seg.backend))
        raise CheckError(f"{seg.manifest.root}: {result.key} labels on this machine agree with "
                         f"the exporter's on {100 * result.agreement:.2f}% of the check images' "
                         f"pixels (< {100 * result.min_agreement:.1f}%). Likely cause: {cause}")
    return result


ROUTES = ("exact", "labels", "fast")


def bundle_routes(manifest: spec.Manifest, precision: str, route: str | None = None
                  ) -> list[str]:
    """The routes the bundle has graphs for at `precision` (or just `route`)."""
    have = ["exact"]
    if manifest.has(spec.graph_file(precision, labels=True)[0]):
        have.append("labels")
    if manifest.fast is not None and manifest.has(
            spec.graph_file(precision, fast_batch=manifest.fast.batches[0])[0]):
        have.append("fast")
    return [r for r in have if route in (None, r)]
