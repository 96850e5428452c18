"""Command-line options every runtime command shares: which bundle, backend, device and
precision, and the argparse types of counts. One definition, so `predict`, `serve` and the
export commands spell each concept the same way."""

from __future__ import annotations

import argparse

__all__ = ["add_backend_arguments", "positive_int", "nonneg_int"]


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
