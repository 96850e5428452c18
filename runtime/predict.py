"""`partclipseg predict --bundle B INPUTS... --out DIR` (also `python -m runtime.predict`).

Images: DIR/<stem>.png (image | prediction overlay | legend). Videos (.mp4, .mov, .avi, .mkv,
.webm; decoded with PyAV): DIR/<stem>.mp4, the overlay of every frame, and DIR/<stem>.json, one
record per frame. DIR/predictions.json: per input, per-class pixel counts and timing.
`--classes` / `--classes-file` may name classes the bundle was not exported with ("cup's
handle"): the bundle's text side encodes them. Needs numpy, Pillow, a backend (and PyAV for
video); never torch.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .errors import run_command
from .io import atomic_write, atomic_write_text

__all__ = ["add_arguments", "run", "build_parser", "main", "VIDEO_SUFFIXES"]

VIDEO_SUFFIXES = (".mp4", ".mov", ".avi", ".mkv", ".webm")


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The predict options, on `p` (this module's parser, or `partclipseg predict`'s)."""
    p.add_argument("images", nargs="+", metavar="INPUT",
                   help="image files (any format Pillow reads) or video files (PyAV)")
    p.add_argument("--bundle", required=True, help="bundle folder written by export")
    p.add_argument("--out", required=True, help="output folder")
    names = p.add_mutually_exclusive_group()
    names.add_argument("--classes", nargs="+", metavar="NAME",
                       help="classes to predict over, \"object's part\" (default: the bundle's); "
                       "new names need a bundle exported with its text side")
    names.add_argument("--classes-file", metavar="FILE",
                       help="the same from a file: one \"object's part\" per line")
    p.add_argument("--backend", default="auto",
                   choices=["auto", "tensorrt", "onnxruntime", "torch"])
    p.add_argument("--device", choices=["cpu", "cuda"])
    p.add_argument("--precision", choices=["fp16", "fp32", "int8"],
                   help="graph precision (default: fp16 on CUDA, fp32 on the CPU; int8: the "
                   "bundle's INT8 graphs, CPU)")
    return p


def build_parser() -> argparse.ArgumentParser:
    return add_arguments(argparse.ArgumentParser(prog="python -m runtime.predict",
                                                 description=__doc__.splitlines()[0]))


def run(a: argparse.Namespace) -> int:
    """Segment `a.images` with `a.bundle`; user errors raise (see `main`)."""
    from .segmenter import Segmenter
    from .vocabulary import read_class_file

    seg = Segmenter.load(a.bundle, backend=a.backend, device=a.device, precision=a.precision)
    if a.classes_file:
        vocab = read_class_file(a.classes_file)
        seg.set_vocabulary(vocab.class_names, unseen_objects=sorted(vocab.unseen_objects))
    elif a.classes:
        seg.set_vocabulary(a.classes)  # checked and encoded once, before any input is read
    print(f"predict: {seg}")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"bundle": str(a.bundle), "backend": seg.backend_name,
                              "classes": list(seg.vocabulary.class_names), "inputs": {}}
    for path in a.images:
        if Path(path).suffix.lower() in VIDEO_SUFFIXES:
            report["inputs"][str(path)] = _predict_video(seg, Path(path), out)
        else:
            report["inputs"][str(path)] = _predict_image(seg, Path(path), out)
    atomic_write_text(out / "predictions.json", json.dumps(report, indent=2))
    return 0


def _predict_image(seg: Any, path: Path, out: Path) -> dict[str, Any]:
    from PIL import Image, UnidentifiedImageError

    from .overlay import panel
    from .preprocess import InputError

    try:
        with Image.open(path) as im:
            image = np.asarray(im.convert("RGB"))
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as e:
        raise InputError(f"cannot read image {path}: {e}") from e
    pred = seg.predict(image)
    picture = out / f"{path.stem}.png"
    overlay = panel(image, pred.class_names, pred.labels,
                    title=f"{path.name}  ({seg.backend_name}, Pred-All)")
    atomic_write(picture, lambda tmp: overlay.save(tmp, format="PNG"))
    print(f"  {path} -> {picture}: " + ", ".join(
        f"{k} {v}" for k, v in sorted(pred.counts().items(), key=lambda kv: -kv[1])[:5]))
    return {"overlay": str(picture), "pixels": pred.counts(), "timing_ms": pred.timing_ms}


def _predict_video(seg: Any, path: Path, out: Path) -> dict[str, Any]:
    """Every frame of `path` -> an overlay video (H.264 when available, else MPEG-4 Part 2)
    and a per-frame JSON, both written atomically (a failed video leaves neither)."""
    try:
        import av
    except ImportError as e:
        raise ImportError("video input needs PyAV: pip install av") from e
    from tqdm import tqdm

    from .overlay import overlay
    from .preprocess import InputError

    video_out, frames_out = out / f"{path.stem}.mp4", out / f"{path.stem}.json"
    records: list[dict[str, Any]] = []
    k = seg.vocabulary.num_classes

    def write(tmp: str) -> None:
        try:
            src = av.open(str(path))
        except (av.error.FFmpegError, OSError) as e:
            raise InputError(f"cannot read video {path}: {e}") from e
        with src:
            if not src.streams.video:
                raise InputError(f"{path} has no video stream")
            stream = src.streams.video[0]
            rate = stream.average_rate or 25
            codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
            with av.open(tmp, mode="w", format="mp4") as dst:
                enc = None
                bar = tqdm(total=stream.frames or None, desc=path.name, unit="frame")
                for i, frame in enumerate(src.decode(stream)):
                    rgb = frame.to_ndarray(format="rgb24")
                    pred = seg.predict(rgb)
                    picture = overlay(rgb, pred.labels, k)
                    if enc is None:  # even sides: yuv420p needs them
                        enc = dst.add_stream(codec, rate=rate)
                        enc.width, enc.height = rgb.shape[1] // 2 * 2, rgb.shape[0] // 2 * 2
                        enc.pix_fmt = "yuv420p"
                    picture = picture[:enc.height, :enc.width]
                    for packet in enc.encode(av.VideoFrame.from_ndarray(picture, format="rgb24")):
                        dst.mux(packet)
                    records.append({"frame": i, "time_s": None if frame.time is None
                                    else round(float(frame.time), 4),
                                    "pixels": pred.counts(), "timing_ms": pred.timing_ms})
                    bar.update(1)
                bar.close()
                if enc is None:
                    raise InputError(f"{path} has no decodable frames")
                for packet in enc.encode():  # flush
                    dst.mux(packet)

    atomic_write(video_out, write)
    atomic_write_text(frames_out, json.dumps({"video": str(path), "frames": records}, indent=1))
    print(f"  {path} -> {video_out} ({len(records)} frames), {frames_out}")
    return {"overlay": str(video_out), "frames": str(frames_out), "num_frames": len(records)}


def main(argv: Sequence[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    return run_command("predict", lambda: run(a))


if __name__ == "__main__":
    sys.exit(main())
