"""Live streams through one Segmenter: latency from capture to labels, fps per source, and the
bare `predict_batch` time of the same frames (issue "Live streams").

    python -m benchmarks.stream_bench --bundle demo/bundle [--sources 1 4] [--seconds 10]
                                      [--json benchmarks/results/stream_cpu_DATE.json]

Each source is a `benchmarks.loopback` child process sending MPEG-TS over UDP on 127.0.0.1 at
30 fps (SynthParts val images when --images is given, else a test pattern). The stream reads
them live: the newest frame wins. The first second of results is left out (start-up: opening,
the first key frame, ONNX Runtime's first runs). Afterwards the same frames are timed alone,
`predict_batch` at each batch size the stream used, in the same process: the "bare" time.

Per frame: overhead = latency - waited - bare time of its batch size, i.e. what the stream adds
besides waiting for a free Segmenter and the model itself (decode-side copies, batching,
hand-over between threads, contention with the reader threads and the senders).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from benchmarks.loopback import LoopbackSender, free_udp_port
from benchmarks.timing import cpu_name
from runtime.io import atomic_write_text

__all__ = ["measure", "build_parser", "main", "FPS", "MAX_AGE_MS"]

FPS = 30.0
MAX_AGE_MS = 200.0
WARMUP_S = 1.0


def _percentiles(values: Sequence[float]) -> dict[str, float]:
    p50, p99 = np.percentile(values, [50, 99])
    return {"p50": round(float(p50), 2), "p99": round(float(p99), 2)}


def measure(seg: Any, sources: int, seconds: float, images: str | Path | None = None,
            size: int = 160, bare_runs: int = 20) -> dict[str, Any]:
    """`sources` loopback streams for `seconds` (after the warm-up) through `seg`."""
    from runtime.stream import Source, Stream

    senders = [LoopbackSender(free_udp_port(), FPS, images, size).start() for _ in range(sources)]
    results = []
    try:
        with Stream(seg, [Source(s.url) for s in senders], max_age_ms=MAX_AGE_MS) as stream:
            start = end = None
            for r in stream:
                now = time.monotonic()
                start = start or now + WARMUP_S
                if now >= start:
                    end = end or start + seconds
                    results.append(r)
                    if now >= end:
                        break
            stats = stream.stats()
    finally:
        for s in senders:
            s.kill()
    batches = sorted({r.batch for r in results})
    pool = [r.image for r in results]
    bare = {}
    for b in batches:  # the same frames, alone, at the batch sizes the stream used
        times = []
        for i in range(bare_runs):
            group = [pool[(i * b + j) % len(pool)] for j in range(b)]
            t0 = time.perf_counter()
            seg.predict_batch(group)
            times.append(1e3 * (time.perf_counter() - t0))
        bare[b] = float(np.median(times))
    overhead = [r.latency_ms - r.waited_ms - bare[r.batch] for r in results]
    per_source = {}
    for name in stats:
        mine = [r for r in results if r.source == name]
        per_source[name] = {"processed": len(mine), "fps": round(len(mine) / seconds, 2),
                            "dropped": stats[name].dropped, "corrupt": stats[name].corrupt,
                            "reconnects": stats[name].reconnects}
    fps = [v["fps"] for v in per_source.values()]
    return {
        "sources": sources, "seconds": seconds, "stream_fps": FPS, "max_age_ms": MAX_AGE_MS,
        "frame_size": size, "frames": len(results),
        "latency_ms": _percentiles([r.latency_ms for r in results]),
        "waited_ms": {**_percentiles([r.waited_ms for r in results]),
                      "max": round(max(r.waited_ms for r in results), 2)},
        "infer_ms": _percentiles([r.infer_ms for r in results]),
        "bare_predict_ms": {str(b): round(ms, 2) for b, ms in bare.items()},
        "batch_sizes": {str(b): sum(r.batch == b for r in results) for b in batches},
        "overhead_ms": _percentiles(overhead),
        "total_fps": round(sum(fps), 2),
        # What the model alone allows at the stream's batch sizes: the bound of total_fps.
        "model_bound_fps": round(min(1e3 * b / ms for b, ms in bare.items()), 2),
        "per_source": per_source,
        "fps_spread": round(max(abs(f / np.mean(fps) - 1) for f in fps), 4),
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.stream_bench",
                                description=__doc__.splitlines()[0])
    p.add_argument("--bundle", required=True, help="bundle folder (demo/bundle)")
    p.add_argument("--sources", type=int, nargs="+", default=[1, 4])
    p.add_argument("--seconds", type=float, default=10.0, help="measured seconds per run")
    p.add_argument("--images", help="frames to send (default: demo/synthparts/images/val when "
                   "it exists, else a test pattern)")
    p.add_argument("--size", type=int, default=160, help="frame side sent (default 160)")
    p.add_argument("--threads", type=int, help="ONNX Runtime threads (default: its own)")
    p.add_argument("--rounds", type=int, default=1, help="repeat the runs, alternating source "
                   "counts, to see the spread of a shared machine (default 1)")
    p.add_argument("--json", help="write the results here (after every run)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    from runtime import Segmenter

    images = a.images or ("demo/synthparts/images/val"
                          if Path("demo/synthparts/images/val").is_dir() else None)
    seg = Segmenter.load(a.bundle, backend="onnxruntime", device="cpu", threads=a.threads)
    record: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": cpu_name(), "bundle": str(a.bundle), "backend": seg.backend_name,
        "images": images or "test pattern", "runs": []}
    for k in range(a.rounds):
        for n in a.sources:
            run = {"round": k, **measure(seg, n, a.seconds, images, a.size)}
            record["runs"].append(run)
            print(json.dumps(run))
            if a.json:
                atomic_write_text(a.json, json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
