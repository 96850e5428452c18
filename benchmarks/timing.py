"""Latency measurement: warm-up, then repeated timed calls; medians in milliseconds.

Two clocks:
* `time_calls`: host wall clock (`time.perf_counter`) around each call, with an optional
  `sync()` (e.g. `torch.cuda.synchronize`) before the clock is read, so asynchronous GPU work is
  inside the interval. Right for anything whose result ends up on the host (ONNX Runtime
  sessions, `Segmenter.predict`).
* `time_cuda`: CUDA events recorded on the current stream around each call: the GPU time of the
  work the call queued, free of host jitter after the call returns. Right for torch modules whose
  outputs stay on the GPU.

Both stop early once `min_runs` calls are timed and `budget_s` seconds have passed, so one slow
configuration (batch 32 on a CPU) cannot blow a suite's time limit.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

__all__ = ["Timing", "time_calls", "time_cuda", "cpu_name"]


@dataclass(frozen=True)
class Timing:
    """Milliseconds of each timed call (warm-up calls excluded)."""

    samples_ms: tuple[float, ...]

    def __post_init__(self) -> None:
        if not self.samples_ms:
            raise ValueError("a Timing needs at least one sample")

    @property
    def median_ms(self) -> float:
        return float(statistics.median(self.samples_ms))

    @property
    def min_ms(self) -> float:
        return float(min(self.samples_ms))

    @property
    def runs(self) -> int:
        return len(self.samples_ms)

    def throughput(self, batch: int) -> float:
        """Images per second at the median latency of a `batch`-image call."""
        return 1e3 * batch / self.median_ms

    def to_dict(self, batch: int | None = None) -> dict[str, Any]:
        d: dict[str, Any] = {"median_ms": self.median_ms, "min_ms": self.min_ms,
                             "runs": self.runs}
        if batch:
            d["images_per_s"] = self.throughput(batch)
        return d


def _check(warmup: int, min_runs: int, max_runs: int) -> None:
    if warmup < 0 or not 1 <= min_runs <= max_runs:
        raise ValueError(f"need warmup >= 0 and 1 <= min_runs <= max_runs, got {warmup}, "
                         f"{min_runs}, {max_runs}")


def time_calls(fn: Callable[[], Any], warmup: int = 2, min_runs: int = 5, max_runs: int = 50,
               budget_s: float = 5.0, sync: Callable[[], None] | None = None) -> Timing:
    """Wall-clock `fn()` after `warmup` untimed calls.

    Times at least `min_runs` calls and at most `max_runs`, stopping after `budget_s` seconds of
    timed calls. `sync` runs after each call, inside the interval (and before the first one).
    """
    _check(warmup, min_runs, max_runs)
    for _ in range(warmup):
        fn()
    if sync:
        sync()
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < max_runs and (len(samples) < min_runs
                                       or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        samples.append(1e3 * (time.perf_counter() - t0))
    return Timing(tuple(samples))


def time_cuda(fn: Callable[[], Any], warmup: int = 3, min_runs: int = 5, max_runs: int = 50,
              budget_s: float = 5.0) -> Timing:
    """GPU time of `fn()` by CUDA events on the current stream (torch), after `warmup` calls.

    Each call is bracketed by its own event pair and synchronized, so samples never overlap.
    """
    import torch

    _check(warmup, min_runs, max_runs)
    if not torch.cuda.is_available():
        raise RuntimeError("time_cuda needs a CUDA device (torch.cuda.is_available() is False)")
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    samples: list[float] = []
    start = time.perf_counter()
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    while len(samples) < max_runs and (len(samples) < min_runs
                                       or time.perf_counter() - start < budget_s):
        begin.record()
        fn()
        end.record()
        end.synchronize()
        samples.append(float(begin.elapsed_time(end)))
    return Timing(tuple(samples))


def cpu_name() -> str:
    """"AMD EPYC ... (2 logical cores)": the processor timings came from (/proc/cpuinfo's
    model name where it exists)."""
    import os
    import platform
    from pathlib import Path

    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name} ({os.cpu_count()} logical cores)"
