"""End-to-end `predict` at the reference size on the CPU (issue "The GPU fast path"): random-init
ViT-B/16 @352, Pascal-Part-116, one 640x480 uint8 frame, batch 1, FP32, every route in
alternation (torch eager, ONNX Runtime exact / label-map graph / fast slot graph).

    python -m benchmarks.reference_cpu --out /tmp/refb --runs 3      # ~10 min on 2 cores

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
    return p


def _main(argv: Sequence[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    import onnxruntime
    import torch

    from benchmarks.reference import build_bundle
    from runtime import Segmenter

    out = Path(a.out)
    built = build_bundle(out / "bundle", config="vit_b16", fp16=False, check_batch=1, fast=(1,),
                         slots=SLOTS)
    frame = np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    b = out / "bundle"
    segs = {"torch": Segmenter.load(b, backend="torch", checkpoint=built.checkpoint),
            "ort-exact": Segmenter.load(b, backend="onnxruntime"),
            "ort-labels": Segmenter.load(b, backend="onnxruntime", fast_labels=True,
                                         slots=False),
            "ort-fast": Segmenter.load(b, backend="onnxruntime", fast_labels=True, slots=True)}
    for seg in segs.values():
        seg.predict(frame)  # warm-up
    times: dict[str, list[float]] = {k: [] for k in segs}
    for _ in range(a.runs):
        for name, seg in segs.items():
            t = time.perf_counter()
            seg.predict(frame)
            times[name].append(1e3 * (time.perf_counter() - t))
    ms = {k: float(np.median(v)) for k, v in times.items()}
    record = {"date": _dt.date.today().isoformat(), "runs": a.runs,
              "versions": {"python": platform.python_version(), "torch": torch.__version__,
                           "onnxruntime": onnxruntime.__version__},
              "threads": torch.get_num_threads(), "ms": ms,
              "vs_torch": {k: ms["torch"] / v for k, v in ms.items()}}
    atomic_write_text(out / "reference_cpu.json", json.dumps(record, indent=2) + "\n")
    print(json.dumps(record["vs_torch"], indent=1))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_command("benchmarks.reference_cpu", lambda: _main(argv))


if __name__ == "__main__":
    sys.exit(main())
