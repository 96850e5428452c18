"""INT8 labels on another CPU: a bundle's runtime labels against PyTorch FP32's, measured where
this runs (natively, or under an emulated CPU), without torch.

    # 1. natively, with torch: PyTorch FP32's Pred-All labels of the first N val images
    python -m benchmarks.experiments.int8_cpus --bundle demo/bundle --data demo/synthparts \\
        --reference ref.npz --write-reference
    # 2. anywhere, no torch: each precision's labels vs those, and its mIoU
    qemu-x86_64 -cpu Haswell .venv/bin/python -m benchmarks.experiments.int8_cpus \\
        --bundle demo/bundle --data demo/synthparts --reference ref.npz --json haswell.json

Step 2 reports, per precision (exact route, ONNX Runtime CPU): pixel agreement with PyTorch
FP32 over every pixel, Pred-All mIoU seen / unseen / h-IoU, their deltas against PyTorch's
(computed from the reference labels with the same evaluator), and the machine
(`runtime.verification.machine`: CPUID flags, so an emulated CPU reports its own). docs/int8.md
reads the results.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, Sequence

import numpy as np

from runtime.errors import run_command
from runtime.io import atomic_write, atomic_write_text

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.experiments.int8_cpus",
                                description=__doc__.splitlines()[0])
    p.add_argument("--bundle", required=True, help="a bundle of a SynthParts checkpoint")
    p.add_argument("--data", required=True, help="the SynthParts folder it was trained on")
    p.add_argument("--limit", type=int, default=60, help="val images (default 60)")
    p.add_argument("--reference", required=True, help="PyTorch FP32 labels (npz)")
    p.add_argument("--write-reference", action="store_true",
                   help="write --reference with the torch backend (needs torch) and stop")
    p.add_argument("--precisions", nargs="+", default=["fp32", "int8"])
    p.add_argument("--json", help="write the results here")
    return p


def _metrics(labels: Sequence[np.ndarray], samples: Sequence[dict], vocab: Any) -> dict:
    from partclipseg.evaluation.metrics import PartSegEvaluator

    ev = PartSegEvaluator(vocab.num_classes, vocab.class_seen, vocab.class_names)
    for pred, s in zip(labels, samples):
        ev.update(pred, s["part"])
    r = ev.compute()
    return {k: r[k] for k in ("miou_seen", "miou_unseen", "h_iou")}


def _main(argv: Sequence[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    from partclipseg.data.datasets import load_dataset
    from runtime import Segmenter
    from runtime.verification import machine

    dataset = load_dataset("synthparts", a.data, "val")
    samples = [dataset[i] for i in range(min(a.limit, len(dataset)))]
    images = [s["image"] for s in samples]
    if a.write_reference:
        seg = Segmenter.load(a.bundle, backend="torch", device="cpu")
        labels = [p.labels for i in range(0, len(images), 8)
                  for p in seg.predict_batch(images[i:i + 8])]

        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:
                np.savez_compressed(f, *labels)
        atomic_write(a.reference, write)
        print(f"reference: {len(labels)} PyTorch FP32 label maps -> {a.reference}")
        return 0
    with np.load(a.reference) as z:
        ref = [z[f"arr_{i}"] for i in range(len(z.files))]
    if len(ref) != len(images):
        raise ValueError(f"{a.reference} holds {len(ref)} maps for {len(images)} images: "
                         "write it again with the same --limit")
    torch_metrics = _metrics(ref, samples, dataset.vocabulary)
    rows = {}
    for precision in a.precisions:
        seg = Segmenter.load(a.bundle, backend="onnxruntime", device="cpu", precision=precision)
        t = time.perf_counter()
        labels = [p.labels for i in range(0, len(images), 8)
                  for p in seg.predict_batch(images[i:i + 8])]
        seconds = time.perf_counter() - t
        m = _metrics(labels, samples, dataset.vocabulary)
        agree = float(np.mean(np.concatenate([(x == y).ravel() for x, y in zip(labels, ref)])))
        rows[precision] = {"pixel_agreement": agree, **m,
                           "delta": {k: m[k] - torch_metrics[k] for k in m},
                           "seconds": seconds}
        print(f"{precision}: {100 * agree:.2f}% of pixels equal to PyTorch FP32's; dmIoU seen "
              f"{rows[precision]['delta']['miou_seen']:+.2f}, unseen "
              f"{rows[precision]['delta']['miou_unseen']:+.2f} ({len(images)} images, "
              f"{seconds:.1f} s)", flush=True)
    result = {"bundle": str(a.bundle), "images": len(images), "machine": machine(),
              "torch_fp32": torch_metrics, "routes": rows,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if a.json:
        atomic_write_text(a.json, json.dumps(result, indent=2) + "\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_command("int8_cpus", lambda: _main(argv))


if __name__ == "__main__":
    sys.exit(main())
