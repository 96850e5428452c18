"""7-bit against 8-bit INT8 weights on one bundle: speed and labels, measured where this runs.

    python -m benchmarks.experiments.int8_bits --bundle B --calibration DIR --json out.json

Writes B's twin with 8-bit weights (`requantize`: the same calibration images, only the weight
range differs) beside it as B_w8, then times the label-map graph (or the logits graph when B
has none) of B in FP32, B in INT8 (7-bit weights, what export writes) and B_w8 in INT8, in
alternation on one 640x480 frame at batch 1, and runs both INT8 bundles' check sets
(`runtime.verification`). Under `qemu-x86_64 -cpu Haswell`, `partclipseg check` on both shows the
saturation of 8-bit weights; docs/int8.md reads the results.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from runtime.errors import run_command
from runtime.io import atomic_write_text

__all__ = ["requantize", "build_parser", "main"]


def requantize(bundle: str | Path, out: str | Path, bits: int, calibration: str | Path) -> Path:
    """A copy of `bundle` at `out` whose INT8 graphs have `bits`-bit weights, calibrated on the
    images of folder `calibration` (8: the graphs export wrote before 7-bit weights)."""
    import shutil

    from export.bundle import update_manifest
    from export.int8 import calibration_images, write_int8_graphs
    from runtime import bundle as spec

    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(bundle, out)
    m = spec.read_manifest(out)
    fp32 = {k: v.path for k, v in m.files.items() if k.startswith("onnx_fp32")}
    files, parity = write_int8_graphs(out, fp32, spec.read_vocab(m), m.vocab_inputs,
                                      calibration_images(calibration, {}), m.input_size,
                                      m.image_dtype, m.fast, weight_bits=bits,
                                      log=lambda line: None)
    merged = {k: {**m.onnx.parity.get(k, {}), **v} for k, v in parity.items()}
    update_manifest(out, files, onnx=dataclasses.replace(m.onnx,
                                                         parity={**m.onnx.parity, **merged}))
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.experiments.int8_bits",
                                description=__doc__.splitlines()[0])
    p.add_argument("--bundle", required=True, help="a bundle exported with --int8")
    p.add_argument("--calibration", required=True, help="its calibration images (folder)")
    p.add_argument("--runs", type=int, default=5, help="timed runs per route (alternating)")
    p.add_argument("--json", help="write the results here")
    return p


def _main(argv: Sequence[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    from runtime import Segmenter
    from runtime import bundle as spec
    from runtime.verification import check_segmenter, machine

    seven = Path(a.bundle)
    eight = requantize(seven, seven.with_name(seven.name + "_w8"), 8, a.calibration)
    labels = spec.read_manifest(seven).has(spec.graph_file("int8", labels=True)[0])
    kw = dict(backend="onnxruntime", fast_labels=labels, slots=False if labels else None)
    segs = {"fp32": Segmenter.load(seven, **kw),
            "int8_w7": Segmenter.load(seven, precision="int8", **kw),
            "int8_w8": Segmenter.load(eight, precision="int8", **kw)}
    frame = np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    times: dict[str, list[float]] = {k: [] for k in segs}
    for seg in segs.values():
        seg.predict(frame)  # warm-up
    for _ in range(a.runs):
        for name, seg in segs.items():
            t = time.perf_counter()
            seg.predict(frame)
            times[name].append(1e3 * (time.perf_counter() - t))
    ms = {k: float(np.median(v)) for k, v in times.items()}
    checks = {k: check_segmenter(s).agreement for k, s in segs.items()}
    result = {"bundle": str(seven), "route": segs["fp32"].route, "runs": a.runs,
              "machine": machine(), "ms": ms,
              "vs_fp32": {k: ms["fp32"] / v for k, v in ms.items()},
              "check_agreement": checks,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    print(json.dumps(result, indent=1))
    if a.json:
        atomic_write_text(a.json, json.dumps(result, indent=2) + "\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_command("int8_bits", lambda: _main(argv))


if __name__ == "__main__":
    sys.exit(main())
