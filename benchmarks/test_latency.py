"""Latency of every backend/precision at batch 1, 8, 32 (docs/design.md, "Targets"), with
PyTorch eager FP32 of the same model in the same run as the reference.

Two calls per route and batch, in one pytest-benchmark group "<backend>/<precision>/b<batch>":
  predict   `Segmenter.predict` (B = 1) / `predict_batch` (B > 1) end to end: (S, S, 3) uint8
            frames in, (S, S) int32 label maps out (checks, stacking, backend, Pred-All
            post-processing in numpy). Frames are at the model's input size S, so no resize.
  backend   the bare `seg.backend.run(feed)`: (B, S, S, 3) uint8 + the bundle's vocabulary
            arrays in, logits (B, K + 1, S, S) and object logits (B, O + 1, S, S) out.
`test_cpu_onnxruntime_vs_torch` measures the CPU ratio target with its own alternating-block
timing: a speed target (reported; fails only under --targets) with a gross-regression gate
(ONNX Runtime slower than torch eager) that fails on every run.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from benchmarks.conftest import REFERENCE, BenchReport, Route
from benchmarks.targets import Target, TargetBook
from benchmarks.timing import time_calls

# (warm-up calls, timed rounds) per batch; rounds shrink with the batch so b32 stays affordable.
ROUNDS = {1: (2, 10), 8: (1, 5), 32: (1, 3)}
QUICK_ROUNDS = {1: (1, 3), 8: (1, 2)}
CPU_RATIO_TARGET = 1.5  # docs/design.md: ONNX Runtime >= 1.5x faster than torch eager FP32
# Gross regression, failed on every machine: ONNX Runtime no faster than torch eager, each on
# one thread. Gated on one thread because the default-thread ratio is bimodal on a shared
# 2-core machine: in 3 runs of 10 (2026-12-06) ONNX Runtime's two-thread pool ran ~1.75x slower
# for a whole process, which took the best-vs-best ratio from ~1.47x to ~1.1x, while the
# one-thread ratio stayed at 1.52x-1.55x (docs/design.md, "Gates"). 1.0x is then far outside
# the noise, and only a real regression (a graph that lost its fusions, a slow op) crosses it.
CPU_RATIO_GATE = 1.0


def _rounds(quick: bool, batch: int) -> tuple[int, int]:
    return (QUICK_ROUNDS if quick else ROUNDS)[batch]


def _feed(seg: Any, images: np.ndarray) -> dict[str, np.ndarray]:
    """Graph inputs for the bundle's whole vocabulary: images + the precomputed text side."""
    from runtime import bundle as spec

    return {spec.IMAGE: images, **spec.read_vocab(seg.manifest)}


def _run(benchmark: Any, fn: Any, route: Route, batch: int, call: str, seg: Any,
         environment: dict[str, Any], bench_options: Any, report: BenchReport) -> None:
    warmup, rounds = _rounds(bench_options.quick, batch)
    benchmark.group = f"{route.backend}/{route.precision}/b{batch}"
    benchmark.extra_info.update(environment)
    benchmark.extra_info.update(backend=seg.backend_name, route=route.id, call=call, batch=batch,
                                chunks=len(seg.feeds()))
    result = benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=warmup)
    if benchmark.stats is not None:  # None under --benchmark-disable
        median_ms = 1e3 * benchmark.stats.stats.median
        benchmark.extra_info["images_per_s"] = 1e3 * batch / median_ms
        report.latency[(route.id, call, batch)] = median_ms
    return result


def test_predict(benchmark: Any, route: Route, batch: int, open_segmenter: Any,
                 frames: np.ndarray, environment: dict[str, Any], bench_options: Any,
                 bench_report: BenchReport) -> None:
    """End-to-end Segmenter.predict / predict_batch, Pred-All over the whole vocabulary."""
    seg = open_segmenter(route)
    images = list(frames[:batch])
    fn = (lambda: [seg.predict(images[0])]) if batch == 1 else (lambda: seg.predict_batch(images))
    out = _run(benchmark, fn, route, batch, "predict", seg, environment, bench_options,
               bench_report)
    s = seg.input_size
    assert len(out) == batch
    assert all(p.labels.shape == (s, s) and p.labels.dtype == np.int32 for p in out)


def test_backend(benchmark: Any, route: Route, batch: int, open_segmenter: Any,
                 frames: np.ndarray, environment: dict[str, Any], bench_options: Any,
                 bench_report: BenchReport) -> None:
    """The bare backend call on the bundle's own vocabulary."""
    from runtime import bundle as spec

    seg = open_segmenter(route)
    feed = _feed(seg, np.ascontiguousarray(frames[:batch]))
    out = _run(benchmark, lambda: seg.backend.run(feed), route, batch, "backend", seg,
               environment, bench_options, bench_report)
    k, s = seg.vocabulary.num_classes, seg.input_size
    assert out[spec.LOGITS].shape == (batch, k + 1, s, s)
    assert np.isfinite(out[spec.LOGITS]).all()


def test_cpu_onnxruntime_vs_torch(bench_options: Any, bench_bundle: Any, open_segmenter: Any,
                                  frames: np.ndarray, bench_report: BenchReport,
                                  targets: TargetBook, record_property: Any) -> None:
    """CPU target: ONNX Runtime FP32 >= 1.5x faster than PyTorch eager FP32 at batch 1,
    measured here in the same process, best thread setting against best; gate: >= 1.0x with
    one thread each.

    Checked on the bare backend call (graph vs eager model, as the CPU anchor measured):
    `Segmenter.predict` adds the same numpy pre/post-processing to both, which dilutes the
    engine ratio (tiny model: ~13 ms of Pred-All post-processing on ~17-30 ms of inference).
    The predict ratio is reported next to it.

    Each library runs with its default intra-op threads and with one thread, and the ratio is
    best torch median / best ONNX Runtime median: on a loaded machine two spinning threads can
    be many times slower than one (torch above all), and the target must not be met by
    handicapping the reference. Configurations are timed in alternating blocks so load from
    other processes hits all alike; the first call of every block is discarded, because each
    library's worker threads keep spinning for a while after a call and slow the next one.
    The ratio compares each configuration's fastest run: other processes on a shared machine
    only ever add time, and medians of 20 runs still moved the ratio from 1.36x to 1.63x
    between two runs of this test minutes apart (the fastest runs: 1.52x and 1.64x). Medians
    are reported next to it.
    """
    import torch

    from runtime import Segmenter

    if bench_options.device != "cpu":
        pytest.skip("the CPU ratio target applies to --device cpu")
    ort = {"default": open_segmenter(Route("onnxruntime", "fp32")),
           "1": Segmenter.load(bench_bundle.path, backend="onnxruntime", device="cpu",
                               precision="fp32", threads=1)}
    ref = open_segmenter(REFERENCE)
    default_threads = torch.get_num_threads()
    image = frames[0]
    feed = _feed(ref, frames[:1])
    blocks, per_block = (2, 2) if bench_options.quick else (10, 4)  # 40 runs: a noisy machine
    medians: dict[str, dict[str, float]] = {}  # call -> "lib/threads" -> ms
    fastest: dict[str, dict[str, float]] = {}
    try:
        for call in ("predict", "backend"):
            samples: dict[str, list[float]] = {}
            for _ in range(blocks):
                for threads in ("default", "1"):
                    torch.set_num_threads(default_threads if threads == "default" else 1)
                    for lib, seg in (("torch", ref), ("onnxruntime", ort[threads])):
                        fn = ((lambda seg=seg: seg.predict(image)) if call == "predict"
                              else (lambda seg=seg: seg.backend.run(feed)))
                        t = time_calls(fn, warmup=1, min_runs=per_block, max_runs=per_block)
                        samples.setdefault(f"{lib}/{threads}", []).extend(t.samples_ms)
            medians[call] = {k: float(np.median(v)) for k, v in samples.items()}
            fastest[call] = {k: float(np.min(v)) for k, v in samples.items()}
    finally:
        torch.set_num_threads(default_threads)
        ort["1"].close()

    def best_ratio(m: dict[str, float]) -> float:
        return (min(m["torch/default"], m["torch/1"])
                / min(m["onnxruntime/default"], m["onnxruntime/1"]))

    ratio = {call: best_ratio(m) for call, m in fastest.items()}
    for call, m in medians.items():
        bench_report.ratios.append(
            f"cpu b1 {call:<8}: medians torch-fp32 {m['torch/default']:.1f} ms "
            f"({default_threads} threads) / {m['torch/1']:.1f} ms (1 thread); onnxruntime-fp32 "
            f"{m['onnxruntime/default']:.1f} / {m['onnxruntime/1']:.1f} ms -> best vs best "
            f"{best_ratio(m):.2f}x on medians, {ratio[call]:.2f}x on fastest runs")
        record_property(f"ratio_{call}", ratio[call])
    detail = (f"Bare backend call; fastest of {blocks * per_block} runs, ms "
              f"{fastest['backend']}; medians {medians['backend']}. End-to-end predict: "
              f"{ratio['predict']:.2f}x")
    targets.check(Target("cpu b1 backend: ONNX Runtime FP32 vs torch eager FP32, best threads",
                         goal=CPU_RATIO_TARGET, measured=ratio["backend"], unit="x",
                         speed=True), detail=detail)
    one = fastest["backend"]["torch/1"] / fastest["backend"]["onnxruntime/1"]
    targets.check(Target("cpu b1 backend: ONNX Runtime FP32 vs torch eager FP32, one thread",
                         goal=CPU_RATIO_TARGET, measured=one, unit="x", speed=True,
                         gate=CPU_RATIO_GATE), detail=detail)
