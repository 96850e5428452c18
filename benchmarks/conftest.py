"""Benchmark suite setup: options, the bundle under test, Segmenters per backend, a summary.

    pytest benchmarks/                          # CPU, tiny model, ~3 min on 2 cores
    pytest benchmarks/ --quick                  # batches 1 and 8, few rounds, smaller val split
    pytest benchmarks/ --device cuda            # GPU backends (torch FP16, ORT CUDA, TensorRT)
    pytest benchmarks/ --bundle bundles/reference --ckpt bundles/reference.pt

Options:
  --bundle PATH      bundle to benchmark. Default: one built once per session in a temp folder:
                     the checkpoint of --ckpt, else demo/run/best.pt (written by
                     `partclipseg demo`) when it exists, else a random-init `tiny` model with the
                     SynthParts vocabulary; exported with export.onnx (FP32 + FP16).
  --ckpt PATH        the checkpoint the torch reference backend runs (default: the one the
                     bundle's manifest records).
  --device cpu|cuda  where every backend runs (default cpu).
  --quick            batches 1 and 8 only, fewer rounds, 16 val images.

Every backend/precision of the device is a parameter ("route"); one that cannot run here (no
TensorRT engine in the bundle, no onnxruntime-gpu) is skipped with the reason, except the
routes the device must have (CPU: ONNX Runtime FP32/FP16/INT8 and torch FP32), which fail
instead. The default bundle has INT8 graphs (`export.onnx --int8`); a --bundle without them
fails the INT8 route: export it with --int8.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np
import pytest

from benchmarks.targets import TargetBook
from benchmarks.timing import cpu_name

DEMO_CHECKPOINT = Path("demo") / "run" / "best.pt"  # relative to the pytest rootdir


class Route(NamedTuple):
    """One backend at one precision, e.g. Route("onnxruntime", "fp16")."""

    backend: str
    precision: str

    @property
    def id(self) -> str:
        return f"{self.backend}-{self.precision}"


REFERENCE = Route("torch", "fp32")  # PyTorch eager FP32: every comparison's baseline
ROUTES = {
    "cpu": (Route("torch", "fp32"), Route("onnxruntime", "fp32"), Route("onnxruntime", "fp16"),
            Route("onnxruntime", "int8")),
    "cuda": (Route("torch", "fp32"), Route("torch", "fp16"), Route("onnxruntime", "fp32"),
             Route("onnxruntime", "fp16"), Route("tensorrt", "fp16")),
}
REQUIRED = {"cpu": set(ROUTES["cpu"]), "cuda": {Route("torch", "fp32"), Route("torch", "fp16")}}
# A random-init model's Pred-All labels are near-ties, so INT8 flips more of them than on a
# trained one; its export check uses this bar (a trained model's: export.int8.MIN_AGREEMENT).
RANDOM_INIT_INT8_AGREEMENT = 0.9
BATCHES, QUICK_BATCHES = (1, 8, 32), (1, 8)


@dataclass(frozen=True)
class BenchOptions:
    bundle: Path | None
    checkpoint: Path | None
    device: str
    quick: bool
    rootdir: Path

    @property
    def batches(self) -> tuple[int, ...]:
        return QUICK_BATCHES if self.quick else BATCHES


@dataclass(frozen=True)
class BenchBundle:
    """The bundle under test and the checkpoint the torch reference runs."""

    path: Path
    checkpoint: Path | None
    source: str  # "random-init tiny", "trained demo/run/best.pt", "--bundle ..."


@dataclass
class BenchReport:
    """What the tests measured, for the terminal summary."""

    latency: dict[tuple[str, str, int], float] = field(default_factory=dict)  # (route, call, B) -> ms
    ratios: list[str] = field(default_factory=list)
    parity: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


_REPORT = pytest.StashKey[BenchReport]()
_TARGETS = pytest.StashKey[TargetBook]()


def pytest_addoption(parser: pytest.Parser) -> None:
    g = parser.getgroup("partclipseg benchmarks")
    g.addoption("--bundle", default=None, help="bundle folder to benchmark (default: build a "
                "tiny one per session from --ckpt, demo/run/best.pt or random init)")
    g.addoption("--ckpt", default=None, help="checkpoint for the torch reference (and for "
                "the default bundle); default: the bundle manifest's")
    g.addoption("--device", default="cpu", choices=("cpu", "cuda"), help="cpu (default) or cuda")
    g.addoption("--quick", action="store_true", help="batches 1 and 8, few rounds")
    g.addoption("--targets", action="store_true", help="fail on missed speed targets too "
                "(default: report them; correctness targets and gates always fail)")


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_REPORT] = BenchReport()
    config.stash[_TARGETS] = TargetBook(enforce_speed=config.getoption("--targets"))


def _options(config: pytest.Config) -> BenchOptions:
    b, c = config.getoption("--bundle"), config.getoption("--ckpt")
    return BenchOptions(Path(b) if b else None, Path(c) if c else None,
                        config.getoption("--device"), config.getoption("--quick"),
                        Path(config.rootpath))


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """`route`: every backend/precision of --device; `batch`: 1, 8, 32 (--quick: 1, 8)."""
    opts = _options(metafunc.config)
    if "route" in metafunc.fixturenames:
        routes = ROUTES[opts.device]
        if getattr(metafunc.function, "_vs_reference", False):
            routes = tuple(r for r in routes if r != REFERENCE)
        metafunc.parametrize("route", routes, ids=[r.id for r in routes])
    if "batch" in metafunc.fixturenames:
        metafunc.parametrize("batch", opts.batches, ids=[f"b{b}" for b in opts.batches])


def versus_reference(fn: Callable) -> Callable:
    """Mark a test to be parametrized over every route except the torch FP32 reference."""
    fn._vs_reference = True
    return fn


@pytest.fixture(scope="session")
def bench_options(pytestconfig: pytest.Config) -> BenchOptions:
    opts = _options(pytestconfig)
    if opts.device == "cuda":
        torch = pytest.importorskip("torch")
        if not torch.cuda.is_available():
            pytest.fail("--device cuda but torch sees no CUDA device")
    return opts


@pytest.fixture(scope="session")
def bench_report(pytestconfig: pytest.Config) -> BenchReport:
    return pytestconfig.stash[_REPORT]


@pytest.fixture(scope="session")
def targets(pytestconfig: pytest.Config) -> TargetBook:
    """The session's `TargetBook`: `targets.check(Target(...))` records and gates a target."""
    return pytestconfig.stash[_TARGETS]


# Fast slot graphs of the bench bundle, with slots that fit SynthParts' 13 parts, 16 objects and
# 88 classes (`benchmarks/test_fast.py` compares them with the label-map graph).
FAST_BATCHES = (1, 8)
FAST_SLOTS = {"max_parts": 16, "max_objects": 16, "max_classes": 96}


@pytest.fixture(scope="session")
def bench_bundle(bench_options: BenchOptions, tmp_path_factory: pytest.TempPathFactory
                 ) -> BenchBundle:
    """The bundle under test: --bundle, or one exported once per session (see module doc)."""
    opts = bench_options
    if opts.bundle is not None:
        from runtime.bundle import read_manifest

        manifest = read_manifest(opts.bundle)  # clear BundleError when it is not a bundle
        ck = opts.checkpoint or Path(manifest.checkpoint.path if manifest.checkpoint else "")
        return BenchBundle(opts.bundle, ck if ck.is_file() else None, f"--bundle {opts.bundle}")
    from benchmarks.reference import build_bundle, synthparts_vocabulary

    out = tmp_path_factory.mktemp("bench") / "bundle"
    demo = opts.rootdir / DEMO_CHECKPOINT
    if opts.checkpoint is not None:
        if not opts.checkpoint.is_file():
            raise FileNotFoundError(f"--ckpt {opts.checkpoint} does not exist")
        built = build_bundle(out, checkpoint=opts.checkpoint, fast=FAST_BATCHES,
                             slots=FAST_SLOTS, int8=True)
        source = f"trained {opts.checkpoint}"
    elif demo.is_file():
        built = build_bundle(out, checkpoint=demo, fast=FAST_BATCHES, slots=FAST_SLOTS,
                             int8=True)
        source = f"trained {DEMO_CHECKPOINT}"
    else:
        built = build_bundle(out, config="tiny", vocab=synthparts_vocabulary(), check_batch=1,
                             fast=FAST_BATCHES, slots=FAST_SLOTS, int8=True,
                             int8_min_agreement=RANDOM_INIT_INT8_AGREEMENT)
        source = "random-init tiny"
    return BenchBundle(out, built.checkpoint, source)


@pytest.fixture(scope="session")
def open_segmenter(bench_options: BenchOptions, bench_bundle: BenchBundle
                   ) -> Callable[[Route], Any]:
    """route -> a `runtime.Segmenter` on --device (one per route per session).

    Skips routes this machine cannot run, unless the device requires them (REQUIRED).
    """
    from runtime import Segmenter
    from runtime.backends.tensorrt import TensorRTUnavailable
    from runtime.bundle import BundleError

    cache: dict[Route, Any] = {}
    device = bench_options.device

    def open_(route: Route) -> Any:
        if route not in cache:
            if route.backend == "torch" and bench_bundle.checkpoint is None:
                pytest.skip(f"torch reference needs the bundle's checkpoint: pass --ckpt "
                            f"(the manifest of {bench_bundle.path} names none that exists)")
            try:
                cache[route] = Segmenter.load(
                    bench_bundle.path, backend=route.backend, device=device,
                    precision=route.precision,
                    checkpoint=bench_bundle.checkpoint if route.backend == "torch" else None)
            except (TensorRTUnavailable, BundleError, RuntimeError, ImportError) as e:
                if route in REQUIRED[device]:
                    raise
                pytest.skip(f"{route.id} cannot run on {device}: {str(e).splitlines()[0]}")
        return cache[route]

    yield open_
    for seg in cache.values():
        seg.close()


def _device_name(device: str) -> str:
    if device == "cuda":
        import torch

        return torch.cuda.get_device_name(0)
    return cpu_name()


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for dist in ("numpy", "onnxruntime", "onnxruntime-gpu", "torch", "partclipseg-deploy",
                 "tensorrt", "pytest-benchmark"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return out


@pytest.fixture(scope="session")
def environment(bench_options: BenchOptions, bench_bundle: BenchBundle) -> dict[str, Any]:
    """What every benchmark records in `extra_info`: device, versions, model and vocabulary."""
    from runtime.bundle import read_manifest

    m = read_manifest(bench_bundle.path)
    v = m.vocabulary
    return {"device": bench_options.device, "device_name": _device_name(bench_options.device),
            "versions": _versions(), "model": m.model_name,
            "model_source": bench_bundle.source, "input_size": m.input_size,
            "vocabulary": {"classes": v.num_classes, "parts": len(v.parts),
                           "objects": len(v.objects)}}


@pytest.fixture(scope="session")
def frames(bench_bundle: BenchBundle) -> np.ndarray:
    """(32, S, S, 3) uint8 random RGB frames at the model's input size (no resize cost)."""
    from runtime.bundle import read_manifest

    s = read_manifest(bench_bundle.path).input_size
    return np.random.default_rng(0).integers(0, 256, (max(BATCHES), s, s, 3), dtype=np.uint8)


@pytest.hookimpl(trylast=True)  # after pytest-benchmark's tables: the target table ends the run
def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    report = config.stash.get(_REPORT, None)
    if report is not None:
        _write_report(terminalreporter, report)
    book = config.stash.get(_TARGETS, None)
    if book is not None and book.targets:
        tr = terminalreporter
        tr.section("targets")
        for line in book.table():
            tr.write_line("  " + line)
        reported = [t for t in book.targets if t.speed and not t.met and t.gate_met]
        if reported and not book.enforce_speed:
            tr.write_line(f"  {len(reported)} speed target(s) missed on this machine: reported, "
                          "not failed (pytest benchmarks/ --targets fails on them)")


def _write_report(tr: Any, report: BenchReport) -> None:
    if report.latency:
        tr.section("latency (median ms; speed-up vs torch-fp32 of the same call and batch)")
        ref = {(call, b): ms for (r, call, b), ms in report.latency.items() if r == REFERENCE.id}
        for (r, call, b), ms in sorted(report.latency.items(), key=lambda kv: (kv[0][1], kv[0][2],
                                                                             kv[0][0])):
            base = ref.get((call, b))
            x = f"{base / ms:6.2f}x" if base else "      -"
            tr.write_line(f"  {call:<8} b{b:<3} {r:<18} {ms:10.2f} ms  {1e3 * b / ms:9.1f} img/s"
                          f"  {x}")
    for title, rows in (("latency ratios", report.ratios), ("parity vs torch-fp32", report.parity),
                        ("notes", report.notes)):
        if rows:
            tr.section(title)
            for row in rows:
                tr.write_line("  " + row)


VAL_IMAGES, QUICK_VAL_IMAGES = 40, 16  # SynthParts val images of the parity checks


@pytest.fixture(scope="session")
def val_split(bench_options: BenchOptions, tmp_path_factory: pytest.TempPathFactory
              ) -> dict[str, Any]:
    """SynthParts val split (seed 0; 40 images, --quick 16) loaded for both settings."""
    from partclipseg.data.synthparts import generate
    from partclipseg.evaluation.evaluate import eval_dataset

    n = QUICK_VAL_IMAGES if bench_options.quick else VAL_IMAGES
    root = generate(tmp_path_factory.mktemp("synthparts") / "data", seed=0, n_train=0, n_val=n,
                    progress=False)
    return {s: eval_dataset("synthparts", str(root), "val", s) for s in ("oracle-obj", "pred-all")}
