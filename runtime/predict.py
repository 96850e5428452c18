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

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="partclipseg predict", description=__doc__.splitlines()[0])
    p.add_argument("images", nargs="+", help="image files (any format Pillow reads)")
    p.add_argument("--bundle", required=True, help="bundle folder written by export")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--classes", nargs="+", help="class names to predict over (default: all)")
    p.add_argument("--backend", default="auto",
                   choices=["auto", "tensorrt", "onnxruntime", "torch"])
    p.add_argument("--device", choices=["cpu", "cuda"])
    p.add_argument("--precision", choices=["fp16", "fp32"])
    return p


def main(argv: Sequence[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    from PIL import Image, UnidentifiedImageError

    from .bundle import BundleError
    from .overlay import panel
    from .preprocess import InputError
    from .segmenter import Segmenter
    from .vocabulary import VocabularyError

    try:
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
            tmp = out / f".{picture.name}.tmp"  # never a half-written PNG under its name
            panel(image, pred.class_names, pred.labels, title=f"{Path(path).name}  "
                  f"({seg.backend_name}, Pred-All)").save(tmp, format="PNG")
            tmp.replace(picture)
            report["images"][str(path)] = {"overlay": str(picture), "pixels": pred.counts(),
                                           "timing_ms": pred.timing_ms}
            print(f"  {path} -> {picture}: " + ", ".join(
                f"{k} {v}" for k, v in sorted(pred.counts().items(), key=lambda kv: -kv[1])[:5]))
        text = json.dumps(report, indent=2)
        tmp = out / ".predictions.json.tmp"
        tmp.write_text(text)
        tmp.replace(out / "predictions.json")
    except (BundleError, InputError, VocabularyError, ImportError, RuntimeError) as e:
        print(f"predict: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
