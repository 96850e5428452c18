"""`python -m export.trt --ckpt best.pt [--out BUNDLE]`: a strongly typed FP16 TensorRT engine.

The bundle folder defaults to `best_bundle/` beside the checkpoint, as for `export.onnx`. Its
ONNX graphs are exported first when the bundle is missing or was exported from another
checkpoint (the manifest records the checkpoint's SHA-256); `--out BUNDLE` alone builds from an
existing bundle. FP16 lives in the graph (model_fp16.onnx:
LayerNorm in FP32, the rest FP16) and the network is built strongly typed, the one way that works
on TensorRT 10, TensorRT 11 (no FP16 builder flag any more) and TensorRT-RTX. Optimization
profiles cover the batch and the class dimensions (parts, objects, classes), so a new
vocabulary needs no rebuild while it fits `--max-classes`; the runtime splits larger ones.
A persistent timing cache makes rebuilds fast. The manifest records the TensorRT flavour and
version and the GPU, which the runtime checks before it deserializes.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Sequence

from runtime import bundle as spec
from runtime.bundle import Manifest
from runtime.errors import UserError, run_command
from runtime.io import atomic_write

__all__ = ["build_engine", "engine_bytes", "profile_shapes", "static_shapes", "EngineBuildError",
           "build_parser", "main"]


class EngineBuildError(UserError, RuntimeError):
    """TensorRT parsed the graph but could not build an engine."""


def _log(msg: str) -> None:
    print(f"[export.trt] {msg}", flush=True)


def profile_shapes(manifest: Manifest, min_batch: int, opt_batch: int, max_batch: int,
                   max_classes: int) -> dict[str, list[list[int]]]:
    """{input: [min, opt, max] shapes} from the graph contract: "B" over [min, max] batch; each
    vocabulary axis over [1, max_classes] rows (+ 1 with the background row), optimal at the
    bundle's own vocabulary."""
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise ValueError(f"need 1 <= min-batch ({min_batch}) <= opt-batch ({opt_batch}) <= "
                         f"max-batch ({max_batch})")
    sizes = spec.axis_sizes(manifest.vocabulary)
    if max(sizes.values()) > max_classes:
        raise ValueError(f"--max-classes {max_classes} is below the bundle's own vocabulary "
                         f"({sizes['class']} classes, {sizes['part']} parts, "
                         f"{sizes['object']} objects)")
    shapes = {}
    for name, t in manifest.inputs.items():
        ranges = []
        for d, size in enumerate(t.shape):
            if d == t.row_dim:
                bg = int(t.background)
                ranges.append([1 + bg, sizes[t.rows] + bg, max_classes + bg])
            elif size == "B":
                ranges.append([min_batch, opt_batch, max_batch])
            else:
                ranges.append([int(size)] * 3)
        shapes[name] = [[r[i] for r in ranges] for i in range(3)]
    return shapes


def static_shapes(onnx_path: str | Path) -> dict[str, list[list[int]]]:
    """{input: [shape, shape, shape]}: the min = opt = max profile of a graph whose every
    dimension is fixed (a fast slot graph, `export.onnx --fast`)."""
    import onnx

    shapes = {}
    for t in onnx.load(str(onnx_path), load_external_data=False).graph.input:
        dims = [d.dim_value if d.HasField("dim_value") else None
                for d in t.type.tensor_type.shape.dim]
        if any(d is None or d <= 0 for d in dims):
            raise EngineBuildError(f"{onnx_path}: input {t.name!r} has dynamic shape {dims}: not "
                                   "a fast graph (export one with python -m export.onnx --fast)")
        shapes[t.name] = [dims] * 3
    return shapes


def engine_bytes(onnx_path: str | Path, shapes: dict[str, list[list[int]]],
                 workspace_gib: float = 4.0, timing_cache: str | Path | None = None) -> bytes:
    """Parse `onnx_path` strongly typed and build a serialized engine for the profile `shapes`
    ({input: [min, opt, max]}). `import_tensorrt` must have run first."""
    from polygraphy.backend.trt import (CreateConfig, EngineBytesFromNetwork,
                                        NetworkFromOnnxPath, Profile)
    from polygraphy.exception import PolygraphyException

    from runtime.backends.tensorrt import import_tensorrt

    trt, _ = import_tensorrt()
    profile = Profile()
    for name, (lo, opt, hi) in shapes.items():
        profile.add(name, lo, opt, hi)
    cache = Path(timing_cache) if timing_cache else None
    config = CreateConfig(
        profiles=[profile],
        memory_pool_limits={trt.MemoryPoolType.WORKSPACE: int(workspace_gib * (1 << 30))},
        load_timing_cache=str(cache) if cache and cache.is_file() else None)
    network = NetworkFromOnnxPath(str(onnx_path), strongly_typed=True)
    try:
        serialized = EngineBytesFromNetwork(
            network, config=config, save_timing_cache=str(cache) if cache else None)()
    except PolygraphyException as e:
        serialized, reason = None, str(e)
    else:
        reason = "no engine returned"
    if serialized is None:
        raise EngineBuildError(f"TensorRT could not build an engine from {onnx_path} ({reason}; "
                               "TensorRT's log above names the cause). Out of memory: lower "
                               "--max-batch / --max-classes or raise --workspace")
    if cache:
        cache.with_name(cache.name + ".lock").unlink(missing_ok=True)  # Polygraphy's file lock
    return bytes(serialized)


def build_engine(bundle: str | Path, ckpt: str | Path | None = None, min_batch: int = 1,
                 opt_batch: int = 1, max_batch: int = 8, max_classes: int = 128,
                 workspace_gib: float = 4.0, timing_cache: str | Path | None = None,
                 precision: str = "fp16", flavour: str | None = None, fast: bool = False
                 ) -> Manifest:
    """Build `bundle/model.engine` from the bundle's ONNX; returns the updated manifest.

    fast: build instead one engine per fast slot graph (`export.onnx --fast`), each with its
    static profile: `model_fast_b<N>.engine`, recorded as files "engine_fast_b<N>" (the runtime's
    TensorRT backend runs the logits engine; these are for applications that bind them)."""
    from runtime.backends.tensorrt import current_gpu, import_tensorrt

    from .bundle import update_manifest

    trt, flav = import_tensorrt(flavour)  # fails early, naming the pip extra
    bundle = Path(bundle)
    onnx_key, _ = spec.graph_file(precision)
    _export_if_needed(bundle, ckpt)
    manifest = spec.read_manifest(bundle)
    if fast:
        return _build_fast_engines(bundle, manifest, precision, workspace_gib, timing_cache)
    onnx_path = manifest.file(onnx_key)
    shapes = profile_shapes(manifest, min_batch, opt_batch, max_batch, max_classes)
    cache = Path(timing_cache) if timing_cache else bundle / spec.TIMING_CACHE
    _log(f"{onnx_path.name} -> {spec.ENGINE} with {flav} {trt.__version__} (strongly typed, "
         f"batch {min_batch}-{max_batch}, up to {max_classes} classes)")
    t = time.perf_counter()
    engine = engine_bytes(onnx_path, shapes, workspace_gib, cache)
    build_s = time.perf_counter() - t
    atomic_write(bundle / spec.ENGINE, lambda tmp: Path(tmp).write_bytes(engine))
    _log(f"  built in {build_s:.1f} s: {len(engine) / 1e6:.1f} MB")
    files = {"engine": spec.ENGINE}
    if cache.parent.resolve() == bundle.resolve() and cache.is_file():
        files["timing_cache"] = cache.name
    before = manifest
    manifest = update_manifest(bundle, files, engine=spec.EngineInfo(
        flavour=flav, version=trt.__version__,
        gpu=current_gpu(),  # None: built on a machine without a GPU (TensorRT-RTX)
        precision=precision, onnx=onnx_path.name, profiles=(shapes,), max_classes=max_classes,
        max_batch=max_batch, strongly_typed=True, build_seconds=round(build_s, 2)))
    _log(f"manifest updated: {bundle / spec.MANIFEST}")
    _check_engine(bundle, manifest, before)
    return manifest


def _check_engine(bundle: Path, manifest: Manifest, before: Manifest) -> None:
    """Run the bundle's check images through the new engine when it can run here: the code of
    `Segmenter.load(verify=True)` and `partclipseg check`, tested on ONNX Runtime. Below the
    threshold the engine leaves the bundle again (the manifest `before` is restored) and
    CheckError names the likely cause. Where the engine cannot run (TensorRT-RTX on a machine
    without a GPU) it is only logged."""
    from runtime.backends.tensorrt import TensorRTUnavailable
    from runtime.verification import CheckError
    from runtime.segmenter import Segmenter

    from .bundle import write_manifest

    if manifest.check is None:
        _log("  not checked: the bundle has no check images (re-export it with export.onnx)")
        return
    try:
        seg = Segmenter.load(bundle, backend="tensorrt", verify=True)
    except TensorRTUnavailable as e:
        _log(f"  not checked here ({str(e).splitlines()[0]}); on the device: partclipseg "
             f"check --bundle {bundle} --backend tensorrt")
        return
    except CheckError:
        write_manifest(bundle, before)
        (bundle / spec.ENGINE).unlink(missing_ok=True)
        raise
    _log(f"  check: {seg.verified.line()}")
    seg.close()


def _export_if_needed(bundle: Path, ckpt: str | Path | None) -> None:
    """Export `ckpt`'s ONNX bundle into `bundle` unless the bundle already holds that
    checkpoint's graphs (same SHA-256)."""
    from runtime.io import file_sha256

    from .onnx import export_onnx

    if ckpt is not None and not Path(ckpt).is_file():
        raise FileNotFoundError(f"checkpoint {ckpt} does not exist (--ckpt: a .pt written by "
                                "partclipseg train)")
    if not (bundle / spec.MANIFEST).is_file():
        if ckpt is None:
            raise FileNotFoundError(f"{bundle} is not a bundle and no --ckpt was given to "
                                    "export one: pass --ckpt CKPT")
        export_onnx(ckpt, bundle)
        return
    if ckpt is None:
        return
    ref = spec.read_manifest(bundle).checkpoint
    if ref is None or ref.sha256 != file_sha256(ckpt):
        _log(f"{bundle} was exported from another checkpoint than {ckpt}: exporting again")
        export_onnx(ckpt, bundle)


def _build_fast_engines(bundle: Path, manifest: Manifest, precision: str, workspace_gib: float,
                        timing_cache: str | Path | None) -> Manifest:
    from .bundle import update_manifest

    if manifest.fast is None:
        raise FileNotFoundError(f"{bundle} has no fast graphs: export them with python -m "
                                "export.onnx --fast 1 8 ...")
    cache = Path(timing_cache) if timing_cache else bundle / spec.TIMING_CACHE
    files = {}
    for b in manifest.fast.batches:
        onnx_path = manifest.file(spec.graph_file(precision, fast_batch=b)[0])
        t = time.perf_counter()
        engine = engine_bytes(onnx_path, static_shapes(onnx_path), workspace_gib, cache)
        name = f"model_fast_b{b}.engine"
        atomic_write(bundle / name, lambda tmp, engine=engine: Path(tmp).write_bytes(engine))
        files[f"engine_fast_b{b}"] = name
        _log(f"  {onnx_path.name} -> {name}: static profile, {time.perf_counter() - t:.1f} s, "
             f"{len(engine) / 1e6:.1f} MB")
    return update_manifest(bundle, files)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m export.trt", description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", help="checkpoint; its ONNX graphs are exported first unless the "
                   "bundle already holds them")
    p.add_argument("--out", help="bundle folder (default: CKPT_bundle/ beside the checkpoint, "
                   "e.g. best_bundle/ for best.pt)")
    p.add_argument("--min-batch", type=int, default=1)
    p.add_argument("--opt-batch", type=int, default=1)
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--max-classes", type=int, default=128,
                   help="largest class / part / object count of the profile (default 128)")
    p.add_argument("--workspace", type=float, default=4.0, help="builder workspace in GiB")
    p.add_argument("--timing-cache", help="timing cache file (default BUNDLE/timing.cache)")
    p.add_argument("--precision", choices=["fp16", "fp32", "int8"], default="fp16",
                   help="which ONNX graph to build (default fp16; int8: the explicit Q/DQ graph "
                   "of export.onnx --int8)")
    p.add_argument("--fast", action="store_true",
                   help="build one engine per fast slot graph (static profiles) instead")
    p.add_argument("--flavour", choices=["tensorrt", "tensorrt_rtx"],
                   help="TensorRT flavour (default: full TensorRT if installed, else RTX)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    if a.out is None and a.ckpt is None:
        parser.error("give --ckpt CKPT (its bundle goes to CKPT_bundle/ beside it) or --out "
                     "BUNDLE (an exported bundle)")

    def body() -> int:
        from .bundle import default_bundle_dir

        out = Path(a.out) if a.out else default_bundle_dir(a.ckpt)
        build_engine(out, a.ckpt, a.min_batch, a.opt_batch, a.max_batch, a.max_classes,
                     a.workspace, a.timing_cache, a.precision, a.flavour, a.fast)
        _log(f"bundle: {out.absolute()}")
        return 0
    return run_command("export.trt", body)


if __name__ == "__main__":
    sys.exit(main())
