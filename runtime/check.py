"""`partclipseg check --bundle B` (also `python -m runtime.check`): run a bundle's check images
on this machine and compare its labels with the exporter's, per precision and route.

Exit 0 when every route reaches its threshold, 1 when one falls below (naming the likely
cause), 2 for a user error (a bundle without a check set: re-export it). The checks
themselves: `runtime.verification`. Needs numpy and a backend; never torch.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from typing import Any, Sequence

from . import bundle as spec
from .errors import run_command
from .options import add_backend_arguments
from .verification import ROUTES, bundle_routes, check_segmenter, likely_cause, machine, \
    read_check_set

__all__ = ["add_arguments", "run", "build_parser", "main"]


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The check options, on `p` (this module's parser, or `partclipseg check`'s)."""
    add_backend_arguments(p)
    p.add_argument("--route", choices=ROUTES,
                   help="check one route: exact (logits graph + numpy Pred-All), labels "
                   "(label-map graph) or fast (fast slot graphs); default: every one the bundle "
                   "has (ONNX Runtime), or the engine's (TensorRT)")
    p.add_argument("--json", metavar="FILE", help="also write the results and this machine's "
                   "description here")
    return p


def build_parser() -> argparse.ArgumentParser:
    return add_arguments(argparse.ArgumentParser(prog="python -m runtime.check",
                                                 description=__doc__.splitlines()[0]))


def run(a: argparse.Namespace) -> int:
    """Check every precision (or --precision) and route of the bundle that can run here; exit
    1 when any falls below its threshold (naming the likely cause), 0 when all pass."""
    from .io import atomic_write_text
    from .segmenter import Segmenter

    manifest = spec.read_manifest(a.bundle)
    read_check_set(manifest)  # no check set: one line, before any backend loads
    if a.backend == "tensorrt" or (a.backend == "auto" and a.device == "cuda"):
        plans = [(a.precision, None)]  # the backend decides its precision and route
    else:
        precisions = [a.precision] if a.precision else [
            p for p in manifest.precisions if p != "int8" or a.device != "cuda"]
        plans = [(p, r) for p in precisions for r in bundle_routes(manifest, p, a.route)]
    exported = manifest.check.machine
    print(f"bundle {manifest.root}: {manifest.check.images} check images from "
          f"{manifest.check.source}; exported on {exported.get('cpu')} "
          f"(flags {exported.get('cpu_flags')}, onnxruntime {exported.get('onnxruntime')})")
    results, failed = [], 0
    here: dict[str, Any] = {}
    for precision, route in plans:
        seg = Segmenter.load(a.bundle, backend=a.backend, device=a.device, precision=precision,
                             fast_labels=route in ("labels", "fast"),
                             slots=None if route is None else route == "fast")
        try:
            here = machine(seg.backend)
            r = check_segmenter(seg)
        finally:
            seg.close()
        print(r.line(), flush=True)
        entry = {**asdict(r), "passed": r.passed,
                 "exported": manifest.check.exported.get(r.key)}
        if not r.passed:
            failed += 1
            entry["likely_cause"] = likely_cause(r, manifest, here)
            print(f"  likely cause: {entry['likely_cause']}", flush=True)
        results.append(entry)
    gpu = here.get("gpu")
    print(f"this machine: {here.get('cpu')} ({here.get('arch')}), flags {here.get('cpu_flags')}, "
          f"GPU {gpu['name'] if gpu else 'none'}, onnxruntime {here.get('onnxruntime')}, numpy "
          f"{here.get('numpy')}" + (f", {here['tensorrt']}" if here.get("tensorrt") else ""))
    if a.json:
        atomic_write_text(a.json, json.dumps({"bundle": str(manifest.root), "machine": here,
                                              "exported_on": exported, "results": results},
                                             indent=2) + "\n")
    if failed:
        print(f"check: {failed} of {len(results)} routes FAILED", file=sys.stderr)
        return 1
    print(f"check: all {len(results)} routes agree with the exporter's labels")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    return run_command("check", lambda: run(a))


if __name__ == "__main__":
    sys.exit(main())
