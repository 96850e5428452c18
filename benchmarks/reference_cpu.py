"""End-to-end `predict` at the reference size on the CPU: random-init ViT-B/16 @352,
Pascal-Part-116, one 640x480 uint8 frame, batch 1 (and with --batch8 a batch of 8), every route
in alternation (torch eager FP32, ONNX Runtime exact / label-map graph / fast slot graph in
FP32, and with --int8 the same ONNX Runtime routes in INT8).

    python -m benchmarks.reference_cpu --out /tmp/refb --runs 3           # ~10 min on 2 cores
    python -m benchmarks.reference_cpu --out /tmp/refb --runs 3 --int8    # + INT8 routes

Writes OUT/reference_cpu.json (medians in ms and the speed-up of each route over torch).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from runtime.errors import run_command
from runtime.io import atomic_write_text

__all__ = ["build_parser", "main"]

SLOTS = {"max_parts": 48, "max_objects": 16, "max_classes": 120}  # Pascal-Part-116 fits


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.reference_cpu",
                                description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bundles/reference_cpu", help="work folder (bundle, JSON)")
    p.add_argument("--runs", type=int, default=3, help="timed runs per route (alternating)")
    p.add_argument("--int8", action="store_true", help="also the INT8 graphs (export --int8)")
    p.add_argument("--int8-method", choices=["static", "dynamic"], help="INT8 method "
                   "(default: export's)")
    p.add_argument("--batch8", action="store_true", help="also a batch of 8 frames")
    p.add_argument("--routes", nargs="+", metavar="ROUTE",
                   help="time only these routes besides torch (e.g. ort-labels "
                   "ort-labels-int8: fewer sessions for batch 8 at this size)")
    p.add_argument("--reuse", action="store_true", help="time the bundle already in OUT/bundle "
                   "(with INT8 graphs if --int8) instead of exporting it again")
    return p


def _main(argv: Sequence[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    import onnxruntime
    import torch

    from benchmarks.reference import build_bundle
    from runtime import Segmenter
    from runtime.bundle import read_manifest

    out = Path(a.out)
    # Random weights: latency only. Their labels are near-ties that INT8 flips by the percent,
    # so export's agreement check is recorded (int8_parity), not enforced. One fast graph, for
    # batch 1: a batch of 8 runs through it 8 times (calibrating a batch-8 ViT-B/16 graph keeps
    # every attention map of 8 images and ran out of 24 GB, 2026-12-06).
    b = out / "bundle"
    old = read_manifest(b) if (b / "manifest.json").is_file() and a.reuse else None
    if old is not None and (not a.int8 or "int8" in old.precisions):
        checkpoint, manifest = Path(old.checkpoint.path), old
    else:
        built = build_bundle(b, config="vit_b16", fp16=False, check_batch=1, fast=(1,),
                             slots=SLOTS, int8=a.int8, int8_method=a.int8_method,
                             int8_min_agreement=0.0)
        checkpoint, manifest = built.checkpoint, built.manifest
    frame = np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    routes = {"torch": dict(backend="torch", checkpoint=checkpoint),
              "ort-exact": dict(backend="onnxruntime"),
              "ort-labels": dict(backend="onnxruntime", fast_labels=True, slots=False),
              "ort-fast": dict(backend="onnxruntime", fast_labels=True, slots=True)}
    if a.int8:
        routes.update({f"{k}-int8": {**v, "precision": "int8"} for k, v in routes.items()
                       if k != "torch"})
    keep = set(a.routes or routes) | {"torch"}  # torch: every ratio's reference
    unknown = keep - set(routes)
    if unknown:
        raise ValueError(f"--routes {sorted(unknown)}: known routes are {sorted(routes)}")
    segs = {k: Segmenter.load(b, **v) for k, v in routes.items() if k in keep}
    record = {"date": _dt.date.today().isoformat(), "runs": a.runs,
              "versions": {"python": platform.python_version(), "torch": torch.__version__,
                           "onnxruntime": onnxruntime.__version__},
              "threads": torch.get_num_threads()}
    for batch in (1, 8) if a.batch8 else (1,):
        frames = [frame] * batch
        for seg in segs.values():
            seg.predict_batch(frames)  # warm-up
        times: dict[str, list[float]] = {k: [] for k in segs}
        for _ in range(a.runs):
            for name, seg in segs.items():
                t = time.perf_counter()
                seg.predict_batch(frames)
                times[name].append(1e3 * (time.perf_counter() - t))
        ms = {k: float(np.median(v)) for k, v in times.items()}
        record[f"b{batch}"] = {"ms": ms, "vs_torch": {k: ms["torch"] / v for k, v in ms.items()}}
        if a.int8:
            record[f"b{batch}"]["int8_vs_fp32"] = {
                k: ms[k.replace("-int8", "")] / ms[k] for k in ms
                if k.endswith("-int8") and k.replace("-int8", "") in ms}
            record["int8_parity"] = {k: v for k, v in manifest.onnx.parity.items()
                                     if k.startswith("int8")}
        # After every batch: a later one may not fit in memory (b8 at this size peaked at
        # 24 GB with every route loaded, 2026-12-06).
        atomic_write_text(out / "reference_cpu.json", json.dumps(record, indent=2) + "\n")
    print(json.dumps({k: v for k, v in record.items() if k.startswith("b")}, indent=1))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_command("benchmarks.reference_cpu", lambda: _main(argv))


if __name__ == "__main__":
    sys.exit(main())
