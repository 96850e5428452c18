"""`python -m export.report --bundle B --data DIR`: deployed accuracy and latency of a bundle.

Every backend that can run here (PyTorch FP32 reference, ONNX Runtime FP32 / FP16, TensorRT,
and the bundle's fast slot graphs when it has them, Pred-All)
is evaluated through `runtime.Segmenter` with the evaluation protocol (seen / unseen / h-IoU),
compared with the PyTorch FP32 reference (delta mIoU, pixel agreement), and timed end to end
(uint8 image in, label map out; batch 1, median after warm-up). Latency here is indicative:
benchmarks/ holds the real suite.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from runtime.errors import run_command
from runtime.io import atomic_write_text

__all__ = ["deployment_report", "format_report", "build_parser", "main"]

CANDIDATES = (("torch", "cpu", "fp32"), ("onnxruntime", "cpu", "fp32"),
              ("onnxruntime", "cpu", "fp16"), ("onnxruntime", "cpu", "int8"),
              ("onnxruntime", "cuda", "fp16"), ("tensorrt", "cuda", "fp16"))
EXACT = "onnxruntime:cpu:fp32"  # the fast slot graphs' labels are compared with this row's


def _latency_ms(seg: Any, image: np.ndarray, runs: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        seg.predict(image)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        seg.predict(image)
        times.append(1e3 * (time.perf_counter() - t))
    return statistics.median(times)


def deployment_report(bundle: str | Path, data: str | Path, kind: str = "synthparts",
                      split: str = "val", setting: str = "pred-all", limit: int | None = 100,
                      latency_runs: int = 20, checkpoint: str | Path | None = None,
                      progress: bool = True) -> list[dict[str, Any]]:
    """One row per backend that loads here; the first row is the PyTorch FP32 reference. A
    bundle with fast slot graphs (Pred-All only) adds their row, with `vs_exact`: the share of
    its labels equal to the exact ONNX Runtime FP32 path's."""
    from partclipseg.evaluation.evaluate import eval_dataset, evaluate_segmenter
    from runtime import Segmenter
    from runtime.bundle import read_manifest

    dataset = eval_dataset(kind, str(data), split, setting)
    image = dataset[0]["image"]
    rows: list[dict[str, Any]] = []
    ref_labels = None
    exact_labels = None
    candidates = [(b, d, p, False) for b, d, p in CANDIDATES]
    if read_manifest(bundle).fast is not None and setting == "pred-all":
        candidates.insert(3, ("onnxruntime", "cpu", "fp32", True))
    for backend, device, precision, fast in candidates:
        try:
            seg = Segmenter.load(bundle, backend=backend, device=device, precision=precision,
                                 checkpoint=checkpoint, fast_labels=fast)
        except (ImportError, RuntimeError, ValueError) as e:
            if backend == "torch":
                raise
            rows.append({"backend": f"{backend}:{device}:{precision}",
                         "skipped": str(e).splitlines()[0][:120]})
            continue
        m = evaluate_segmenter(seg, dataset, setting, limit=limit, progress=progress,
                               keep_labels=True)
        labels = m.pop("labels")
        row = {"backend": seg.backend_name + (" fast slots" if fast else ""),
               "seen": m["miou_seen"], "unseen": m["miou_unseen"],
               "h": m["h_iou"], "samples": m["samples"],
               "latency_ms": _latency_ms(seg, image, latency_runs)}
        if seg.backend_name == EXACT and not fast:
            exact_labels = labels
        if fast and exact_labels is not None:
            row["vs_exact"] = float(np.mean([np.mean(a == b)
                                             for a, b in zip(labels, exact_labels)]))
        if ref_labels is None:
            ref_labels, ref = labels, row
        else:
            row["pixel_agreement"] = float(np.mean([np.mean(a == b)
                                                    for a, b in zip(labels, ref_labels)]))
            row["d_miou_seen"] = row["seen"] - ref["seen"]
            row["d_miou_unseen"] = row["unseen"] - ref["unseen"]
            row["speedup"] = ref["latency_ms"] / row["latency_ms"]
        rows.append(row)
        seg.close()
    return rows


def format_report(rows: list[dict[str, Any]], setting: str) -> str:
    lines = [f"| backend ({setting}) | seen | unseen | h-IoU | dmIoU seen/unseen | pixel agr. "
             "| ms/img (b1) | vs torch |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "skipped" in r:
            why = r["skipped"].split(";")[0].split(" (")[0][:70]
            lines.append(f"| {r['backend']} | not here: {why} |  |  |  |  |  |  |")
            continue
        ref = "pixel_agreement" not in r
        d = "reference" if ref else f"{r['d_miou_seen']:+.2f} / {r['d_miou_unseen']:+.2f}"
        agree = "-" if ref else f"{100 * r['pixel_agreement']:.2f}%"
        speed = "1.00x" if ref else f"{r['speedup']:.2f}x"
        if "vs_exact" in r:
            agree += f" ({100 * r['vs_exact']:.3f}% = exact path)"
        lines.append(f"| {r['backend']} | {r['seen']:.2f} | {r['unseen']:.2f} | {r['h']:.2f} "
                     f"| {d} | {agree} | {r['latency_ms']:.1f} | {speed} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m export.report", description=__doc__.splitlines()[0])
    p.add_argument("--bundle", required=True)
    p.add_argument("--data", required=True, help="dataset folder (e.g. SynthParts)")
    p.add_argument("--kind", default="synthparts")
    p.add_argument("--split", default="val")
    p.add_argument("--setting", choices=["oracle-obj", "pred-all"], default="pred-all")
    p.add_argument("--limit", type=int, default=100, help="samples to evaluate (default 100)")
    p.add_argument("--ckpt", help="checkpoint for the torch reference (default: manifest's)")
    p.add_argument("--json", help="write the rows here")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    a = build_parser().parse_args(argv)

    def body() -> int:
        rows = deployment_report(a.bundle, a.data, a.kind, a.split, a.setting, a.limit,
                                 checkpoint=a.ckpt)
        print(format_report(rows, a.setting))
        if a.json:
            atomic_write_text(a.json, json.dumps(rows, indent=2))
        return 0
    return run_command("export.report", body)


if __name__ == "__main__":
    sys.exit(main())
