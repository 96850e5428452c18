"""Live streams (issue "Live streams"): 1 and 4 loopback sources at 30 fps through one
Segmenter (ONNX Runtime FP32 on the CPU), measured by `benchmarks.stream_bench.measure`.

Targets:
- speed (reported; fail only under --targets):
  - 1 source: latency p50 <= bare `predict` p50 + one frame interval (33 ms): with the newest
    frame winning, the frame picked is never older than one interval;
  - the stream's own overhead (latency - waited - bare predict of its batch size) p50 <= 5 ms;
  - 4 sources give >= 0.9x the total fps of one source.
- correctness (fail): no frame taken for labelling older than max_age_ms (its labels come
  infer_ms later); each of the 4 sources within 20% of their mean fps (served in turn).
"""

from __future__ import annotations

from typing import Any, Callable

import pytest

from benchmarks.conftest import BenchOptions, BenchReport, Route
from benchmarks.stream_bench import FPS, MAX_AGE_MS, measure
from benchmarks.targets import Target, TargetBook

pytest.importorskip("av")

OVERHEAD_MS = 5.0
FOUR_VS_ONE = 0.9
FAIRNESS = 0.2


@pytest.fixture(scope="module")
def runs(bench_options: BenchOptions, open_segmenter: Callable[[Route], Any]
         ) -> dict[int, dict[str, Any]]:
    if bench_options.device != "cpu":
        pytest.skip("the stream benchmark runs on the CPU route")
    seg = open_segmenter(Route("onnxruntime", "fp32"))
    seconds = 3.0 if bench_options.quick else 5.0
    return {n: measure(seg, n, seconds) for n in (1, 4)}


def _note(report: BenchReport, run: dict[str, Any]) -> None:
    report.notes.append(
        f"stream, {run['sources']} source(s) at {FPS:g} fps: {run['total_fps']:.1f} fps total, "
        f"latency p50 {run['latency_ms']['p50']:.1f} / p99 {run['latency_ms']['p99']:.1f} ms, "
        f"bare predict {run['bare_predict_ms']} ms, overhead p50 "
        f"{run['overhead_ms']['p50']:.1f} ms, batches {run['batch_sizes']}, the model alone "
        f"allows {run['model_bound_fps']:.1f} fps")


@pytest.mark.parametrize("sources", [1, 4])
def test_stream_latency(runs: dict[int, dict[str, Any]], sources: int, targets: TargetBook,
                        bench_report: BenchReport) -> None:
    run = runs[sources]
    _note(bench_report, run)
    targets.check(Target(f"stream {sources} src: oldest frame taken vs max_age_ms",
                         goal=MAX_AGE_MS, measured=run["waited_ms"]["max"], unit="ms",
                         higher=False))
    if sources == 1:
        bare = run["bare_predict_ms"]["1"]
        targets.check(Target("stream 1 src: latency p50 vs bare predict + 1 frame",
                             goal=round(bare + 1e3 / FPS, 2), measured=run["latency_ms"]["p50"],
                             unit="ms", higher=False, speed=True))
    targets.check(Target(f"stream {sources} src: runtime overhead p50", goal=OVERHEAD_MS,
                         measured=run["overhead_ms"]["p50"], unit="ms", higher=False,
                         speed=True))


def test_four_sources_share_one_segmenter(runs: dict[int, dict[str, Any]],
                                          targets: TargetBook) -> None:
    one, four = runs[1], runs[4]
    targets.check(Target("stream 4 src vs 1: total fps", goal=FOUR_VS_ONE,
                         measured=round(four["total_fps"] / one["total_fps"], 3), unit="x",
                         speed=True))
    targets.check(Target("stream 4 src: fps spread from the mean", goal=FAIRNESS,
                         measured=four["fps_spread"], higher=False),
                  detail=str({k: v["fps"] for k, v in four["per_source"].items()}))
