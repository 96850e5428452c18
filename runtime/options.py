"""Command-line options every runtime command shares: which bundle, backend, device and
precision, and the argparse types of counts. One definition, so `predict`, `serve` and the
export commands spell each concept the same way."""

from __future__ import annotations

import argparse
from typing import Any, Callable

__all__ = ["add_backend_arguments", "add_verify_argument", "load_segmenter", "positive_int",
           "nonneg_int"]


def positive_int(v: str) -> int:
    """argparse type: an integer >= 1."""
    n = int(v)
    if n <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {v}")
    return n


def nonneg_int(v: str) -> int:
    """argparse type: an integer >= 0."""
    n = int(v)
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
    return n


def add_backend_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """--bundle, --backend, --device, --precision: what `Segmenter.load` takes."""
    p.add_argument("--bundle", required=True, help="bundle folder written by export")
    p.add_argument("--backend", default="auto",
                   choices=["auto", "tensorrt", "onnxruntime", "torch"])
    p.add_argument("--device", choices=["cpu", "cuda"])
    p.add_argument("--precision", choices=["fp16", "fp32", "int8"],
                   help="graph precision (default: fp16 on CUDA, fp32 on the CPU; int8: the "
                   "bundle's INT8 graphs, CPU)")
    return p


def add_verify_argument(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """--no-verify: skip the bundle's check at load (`load_segmenter`)."""
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip running the bundle's check images at load (default: run them "
                   "and refuse to start when this machine's labels differ from the exporter's "
                   "beyond the bundle's threshold; see partclipseg check)")
    return p


def load_segmenter(a: argparse.Namespace, log: Callable[[str], None] = print) -> Any:
    """`Segmenter.load` with the options of `add_backend_arguments` (and `add_verify_argument`):
    verified at load when the bundle has check images and --no-verify was not given; a bundle
    exported before check sets loads unverified, with one line saying so."""
    from .bundle import read_manifest
    from .segmenter import Segmenter

    verify = getattr(a, "verify", False)
    if verify and read_manifest(a.bundle).check is None:
        log(f"not verified: {a.bundle} has no check images (re-export it to get them)")
        verify = False
    seg = Segmenter.load(a.bundle, backend=a.backend, device=a.device, precision=a.precision,
                         verify=verify)
    if verify:
        log(f"verified: {seg.verified.line()}")
    return seg
