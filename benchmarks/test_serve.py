"""`partclipseg serve` under load (issue "Serve many cameras from one box"), on the bundle under
test: throughput and p50/p99 latency at 1, 4 and 16 concurrent gRPC clients, against in-process
`predict_batch` on the same frames at the server's batch size (`benchmarks/serving.py` measures).

Target: at 16 clients the server answers at least 0.8x the frames per second of in-process
`predict_batch` of --max-batch (8) frames: Triton, its Python backend and the network cost at
most a fifth. The 16-client load and the in-process batches alternate in 3 blocks, best against
best, so both sides meet the same spells of other work on a shared machine (one block each
read 0.70x and 1.07x in two runs a minute apart on the 2-core machine, 2026-12-06). A speed
target (reported; fails only under --targets), without a gate: its spread is not measured yet. That every answer equals in-process labels is a correctness check
in tests/runtime/test_serve.py.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from benchmarks.conftest import BenchBundle, BenchOptions, BenchReport
from benchmarks.targets import Target, TargetBook

CLIENTS = (1, 4, 16)
MAX_BATCH = 8
THROUGHPUT_TARGET = 0.8  # server frames/s at 16 clients / in-process predict_batch at MAX_BATCH


def test_server_throughput_and_latency_against_in_process_batches(
        bench_bundle: BenchBundle, bench_options: BenchOptions, frames: np.ndarray,
        environment: dict[str, Any], bench_report: BenchReport, targets: TargetBook,
        tmp_path: Any) -> None:
    pytest.importorskip("pytriton", reason="needs the [serve] extra (nvidia-pytriton)")
    pytest.importorskip("tritonclient.grpc", reason="needs tritonclient[http,grpc]")
    from benchmarks.serving import measure

    seconds, rounds = (2.0, 2) if bench_options.quick else (2.5, 3)
    r = measure(bench_bundle.path, frames, CLIENTS, MAX_BATCH, "grpc", seconds,
                device=bench_options.device, rounds=rounds, log=tmp_path / "server.log")
    for x in r["server"]:
        bench_report.notes.append(
            f"serve {x['clients']:2d} clients (grpc): {x['frames_per_s']:6.1f} frames/s, p50 "
            f"{x['p50_ms']:6.1f} ms, p99 {x['p99_ms']:6.1f} ms, mean batch {x['mean_batch']:.2f}")
    for b in r["in_process"]:
        bench_report.notes.append(f"serve baseline: in-process b{b['batch']} "
                                  f"{b['frames_per_s']:6.1f} frames/s")
    assert [x["clients"] for x in r["server"]] == list(CLIENTS)
    assert all(x["requests"] > 0 and x["p99_ms"] >= x["p50_ms"] > 0 for x in r["server"])
    targets.check(Target(f"serve: {CLIENTS[-1]} clients / in-process predict_batch "
                         f"b{MAX_BATCH} (frames/s, {environment['device']})",
                         goal=THROUGHPUT_TARGET, measured=r["ratio_at_most_clients"], unit="x",
                         speed=True),
                  detail=f"server {r['server']}, in process {r['in_process']}")
