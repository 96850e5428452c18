"""`partclipseg predict --bundle B IMAGES... --out DIR` (also `python -m runtime.predict`).

Writes DIR/<image stem>.png (image | prediction overlay | legend) and DIR/predictions.json
(per image: per-class pixel counts, timing). Needs only numpy, Pillow and a backend.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import run_command
from .io import atomic_write, atomic_write_text

__all__ = ["add_arguments", "run", "build_parser", "main"]


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The predict options, on `p` (this module's parser, or `partclipseg predict`'s)."""
    p.add_argument("images", nargs="+", help="image files (any format Pillow reads)")
    p.add_argument("--bundle", required=True, help="bundle folder written by export")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--classes", nargs="+", help="class names to predict over (default: all)")
    p.add_argument("--backend", default="auto",
                   choices=["auto", "tensorrt", "onnxruntime", "torch"])
    p.add_argument("--device", choices=["cpu", "cuda"])
    p.add_argument("--precision", choices=["fp16", "fp32"])
    return p


def build_parser() -> argparse.ArgumentParser:
    return add_arguments(argparse.ArgumentParser(prog="python -m runtime.predict",
                                                 description=__doc__.splitlines()[0]))


def run(a: argparse.Namespace) -> int:
    """Segment `a.images` with `a.bundle`; user errors raise (see `main`)."""
    from PIL import Image, UnidentifiedImageError

    from .overlay import panel
    from .preprocess import InputError
    from .segmenter import Segmenter

    seg = Segmenter.load(a.bundle, backend=a.backend, device=a.device, precision=a.precision)
    print(f"predict: {seg}")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"bundle": str(a.bundle), "backend": seg.backend_name, "images": {}}
    for path in a.images:
        try:
            with Image.open(path) as im:
                image = np.asarray(im.convert("RGB"))
        except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as e:
            raise InputError(f"cannot read image {path}: {e}") from e
        pred = seg.predict(image, classes=a.classes)
        picture = out / f"{Path(path).stem}.png"
        overlay = panel(image, pred.class_names, pred.labels,
                        title=f"{Path(path).name}  ({seg.backend_name}, Pred-All)")
        atomic_write(picture, lambda tmp: overlay.save(tmp, format="PNG"))
        report["images"][str(path)] = {"overlay": str(picture), "pixels": pred.counts(),
                                       "timing_ms": pred.timing_ms}
        print(f"  {path} -> {picture}: " + ", ".join(
            f"{k} {v}" for k, v in sorted(pred.counts().items(), key=lambda kv: -kv[1])[:5]))
    atomic_write_text(out / "predictions.json", json.dumps(report, indent=2))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    return run_command("predict", lambda: run(a))


if __name__ == "__main__":
    sys.exit(main())
