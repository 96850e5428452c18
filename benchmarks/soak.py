"""Soak test: N predictions through one Segmenter; memory growth and latency drift.

    python -m benchmarks.soak --bundle bundles/x -n 10000 --json benchmarks/results/soak_cpu.json
    python -m benchmarks.soak --make micro -n 10000   # a random-init micro bundle (needs torch)

Every call goes through the public API (`Segmenter.predict`), cycling over a fixed pool of
images of different sizes and three request kinds: Pred-All over the whole vocabulary, Pred-All
over a fixed class subset, and Oracle-Obj. Reported:

- memory growth: resident set size (VmRSS from /proc/self/status) at the end minus right after
  warm-up, and the largest RSS seen; target: under 20 MB of growth after warm-up;
- latency drift: median latency of the last 10% of calls vs the first 10% after warm-up
  (ratio; 1.0 = no drift).

Prints a table and writes JSON. Exit code 1 when the memory growth exceeds --max-growth-mb.
Latency numbers live here (and in benchmarks/), never in unit tests.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from runtime.errors import run_command
from runtime.io import atomic_write_text

__all__ = ["rss_mb", "soak", "main"]


def rss_mb() -> float:
    """Current resident set size in MiB (VmRSS), or the peak where /proc is unavailable."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024.0 * 1024.0) if sys.platform == "darwin" else peak / 1024.0




def make_tiny_bundle(root: Path, model: str = "tiny") -> Path:
    """A random-init (seeded) "tiny" (configs/models/tiny.json, 160 px) or "micro" (64 px)
    PartCLIPSeg over the tests' 7-class vocabulary, exported to root/<model> (needs torch)."""
    import torch

    from export.onnx import export_onnx
    from partclipseg.checkpoint import save_checkpoint
    from partclipseg.model import build_model
    from runtime.vocabulary import Vocabulary

    vocab = Vocabulary.from_names(
        [("red quadruped", "head"), ("red quadruped", "leg"), ("red quadruped", "eye"),
         ("blue bird", "head"), ("blue bird", "wing"), ("blue bird", "beak"),
         ("blue bird", "eye")], unseen_objects=["blue bird"])
    torch.manual_seed(0)
    ckpt = save_checkpoint(root / f"{model}.pt", build_model(model), vocab)
    export_onnx(ckpt, root / model)
    return root / model


def _median(xs: Sequence[float]) -> float:
    return float(np.median(np.asarray(xs))) if len(xs) else float("nan")


def soak(bundle: str | Path, n: int = 10_000, warmup: int = 200, size: int = 64,
         backend: str = "onnxruntime", threads: int | None = None, sample_every: int = 100,
         seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """Run `n` predictions after `warmup` ones; returns the report dict (see module doc)."""
    from runtime import Segmenter

    rng = np.random.default_rng(seed)
    t_load = time.perf_counter()
    seg = Segmenter.load(bundle, backend=backend, threads=threads)
    load_s = time.perf_counter() - t_load
    vocab = seg.vocabulary
    subset = list(vocab.class_names[: max(1, vocab.num_classes // 2)])
    obj_name = vocab.objects[0]
    pool = []
    for i in range(16):
        h, w = int(size + rng.integers(-size // 4, size // 4 + 1)), int(size + rng.integers(-size // 4, size // 4 + 1))
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        mask = np.zeros((h, w), bool)
        mask[h // 4: 3 * h // 4, w // 4: 3 * w // 4] = True
        pool.append((image, mask))

    def call(i: int) -> None:
        image, mask = pool[i % len(pool)]
        kind = i % 3
        if kind == 0:
            p = seg.predict(image)
        elif kind == 1:
            p = seg.predict(image, classes=subset)
        else:
            p = seg.predict(image, object_mask=mask, object_class=obj_name)
        assert p.labels.shape == image.shape[:2]

    for i in range(warmup):
        call(i)
    rss_start = rss_mb()
    lat = np.empty(n, np.float64)
    samples: list[tuple[int, float]] = [(0, rss_start)]
    t0 = time.perf_counter()
    for i in range(n):
        t = time.perf_counter()
        call(warmup + i)
        lat[i] = time.perf_counter() - t
        if (i + 1) % sample_every == 0:
            samples.append((i + 1, rss_mb()))
            if progress and (i + 1) % max(sample_every, n // 10) == 0:
                print(f"  {i + 1:6d}/{n}  rss {samples[-1][1]:7.1f} MB  "
                      f"median {1e3 * np.median(lat[max(0, i - 999): i + 1]):6.2f} ms",
                      file=sys.stderr, flush=True)
    wall = time.perf_counter() - t0
    rss_end = rss_mb()
    tenth = max(1, n // 10)
    first, last = _median(lat[:tenth]), _median(lat[-tenth:])
    seg.close()
    return {
        "bundle": str(bundle), "backend": seg.backend_name, "n": n, "warmup": warmup,
        "image_size": size, "request_mix": ["pred-all", "pred-all subset", "oracle-obj"],
        "load_s": load_s, "wall_s": wall, "predictions_per_s": n / wall,
        "rss_mb": {"after_warmup": rss_start, "end": rss_end,
                   "max": max(r for _, r in samples + [(n, rss_end)]),
                   "growth": rss_end - rss_start,
                   "samples": [[i, round(r, 2)] for i, r in samples]},
        "latency_ms": {"median_first_10pct": 1e3 * first, "median_last_10pct": 1e3 * last,
                       "drift_ratio": last / first, "median": 1e3 * _median(lat),
                       "p99": 1e3 * float(np.percentile(lat, 99)), "max": 1e3 * float(lat.max())},
        "machine": {"python": platform.python_version(), "platform": platform.platform(),
                    "cpus": os.cpu_count(), "loadavg_1min_at_end": os.getloadavg()[0]},
    }


def format_report(r: dict[str, Any], max_growth_mb: float) -> str:
    m, lat = r["rss_mb"], r["latency_ms"]
    ok = m["growth"] <= max_growth_mb
    rows = [
        ("backend", r["backend"]),
        ("predictions (after warm-up)", f"{r['n']} (+{r['warmup']})"),
        ("throughput", f"{r['predictions_per_s']:.1f} /s ({r['wall_s']:.1f} s)"),
        ("RSS after warm-up", f"{m['after_warmup']:.1f} MB"),
        ("RSS at end / max", f"{m['end']:.1f} / {m['max']:.1f} MB"),
        ("memory growth", f"{m['growth']:+.2f} MB (target <= {max_growth_mb:g}: "
                          f"{'PASS' if ok else 'FAIL'})"),
        ("median latency first 10%", f"{lat['median_first_10pct']:.2f} ms"),
        ("median latency last 10%", f"{lat['median_last_10pct']:.2f} ms"),
        ("latency drift (last/first)", f"{lat['drift_ratio']:.3f}"),
        ("median / p99 / max latency", f"{lat['median']:.2f} / {lat['p99']:.2f} / "
                                       f"{lat['max']:.2f} ms"),
    ]
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"| {k:<{w}} | {v} |" for k, v in rows)


def _main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--bundle", help="bundle folder")
    src.add_argument("--make", choices=["tiny", "micro"],
                     help="export a random-init tiny (160 px) or micro (64 px) bundle to a temp "
                     "folder first (needs torch)")
    p.add_argument("-n", type=int, default=10_000, help="predictions after warm-up (10000)")
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--size", type=int, default=64, help="image side, +-25%% (64)")
    p.add_argument("--backend", default="onnxruntime")
    p.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads")
    p.add_argument("--max-growth-mb", type=float, default=20.0)
    p.add_argument("--json", help="write the report here")
    a = p.parse_args(argv)
    if a.n < 10:
        p.error("-n must be at least 10")
    with tempfile.TemporaryDirectory() as tmp:
        if a.make:  # in a child process: the soak process itself never imports torch
            code = ("import contextlib, io, sys; from pathlib import Path; "
                    "from benchmarks.soak import make_tiny_bundle; "
                    "f = io.StringIO(); ctx = contextlib.redirect_stdout(f); ctx.__enter__(); "
                    f"make_tiny_bundle(Path({tmp!r}), {a.make!r})")
            subprocess.run([sys.executable, "-c", code], check=True,
                           cwd=Path(__file__).resolve().parents[1])
            bundle = Path(tmp) / a.make
        else:
            bundle = Path(a.bundle)
        report = soak(bundle, a.n, a.warmup, a.size, a.backend, a.threads)
        report["torch_imported"] = "torch" in sys.modules
    report["model"] = a.make or "bundle"
    report["max_growth_mb"] = a.max_growth_mb
    report["pass"] = report["rss_mb"]["growth"] <= a.max_growth_mb
    print(format_report(report, a.max_growth_mb))
    if a.json:
        out = Path(a.json)
        atomic_write_text(out, json.dumps(report, indent=2) + "\n")
        print(f"written to {out}")
    return 0 if report["pass"] else 1


def main(argv: Sequence[str] | None = None) -> int:
    return run_command("benchmarks.soak", lambda: _main(argv))


if __name__ == "__main__":
    sys.exit(main())
