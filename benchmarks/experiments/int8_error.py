"""Per-tensor INT8 error of a bundle's Q/DQ graph, with ONNX Runtime's `qdq_loss_debug`.

    python -m benchmarks.experiments.int8_error --bundle demo/bundle --images DIR --out err.json

For every activation the INT8 graph quantizes, the signal-to-quantization-noise ratio (dB) of
its dequantized value against the same tensor in the INT8 graph (`qdq_err`: the rounding
alone) and against the FP32 graph (`xmodel_err`: the error accumulated up to there). Low dB
names the tensors INT8 hurts most; docs/int8.md reads the result.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np

from runtime.errors import run_command
from runtime.io import atomic_write_text

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.experiments.int8_error",
                                description=__doc__.splitlines()[0])
    p.add_argument("--bundle", required=True, help="a bundle exported with --int8")
    p.add_argument("--images", required=True, help="folder of images to run")
    p.add_argument("--count", type=int, default=8, help="images (default 8)")
    p.add_argument("--out", required=True, help="JSON file to write")
    return p


def _main(argv: Sequence[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    from onnxruntime.quantization import CalibrationDataReader
    from onnxruntime.quantization.qdq_loss_debug import (collect_activations,
                                                         compute_activation_error,
                                                         create_activation_matching,
                                                         modify_model_output_intermediate_tensors)

    from export.int8 import calibration_feeds, calibration_images, split_images
    from runtime.bundle import read_manifest, read_vocab

    m = read_manifest(a.bundle)
    files, _ = split_images(calibration_images(a.images, {}), a.count, check=1, seed=1)
    feeds = calibration_feeds(files, m.input_size, read_vocab(m), m.image_dtype)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(feeds)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._it, None)

    with tempfile.TemporaryDirectory() as tmp:
        acts = {}
        for key in ("onnx_fp32", "onnx_int8"):
            aug = Path(tmp) / f"{key}.onnx"
            modify_model_output_intermediate_tensors(str(m.file(key)), str(aug))
            acts[key] = collect_activations(str(aug), Reader())
    errors = compute_activation_error(create_activation_matching(acts["onnx_int8"],
                                                                 acts["onnx_fp32"]))
    rows = sorted(({"tensor": t, **{k: float(v) for k, v in e.items()}}
                   for t, e in errors.items()), key=lambda r: r.get("xmodel_err", 1e9))
    atomic_write_text(a.out, json.dumps({"bundle": str(a.bundle), "images": len(feeds),
                                         "tensors": rows}, indent=1) + "\n")
    for r in rows[:10]:
        print(f"{r.get('xmodel_err', float('nan')):7.1f} dB vs FP32  "
              f"{r.get('qdq_err', float('nan')):7.1f} dB rounding  {r['tensor']}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_command("benchmarks.experiments.int8_error", lambda: _main(argv))


if __name__ == "__main__":
    sys.exit(main())
