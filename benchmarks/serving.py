"""Load on `partclipseg serve`: N concurrent clients against in-process `predict_batch` on the
same frames at the server's batch size.

    python -m benchmarks.serving --bundle bundles/x --json benchmarks/results/serve_cpu.json

For each client count: every client (a thread with its own tritonclient connection) sends
frames back to back for `seconds` after a warm-up; throughput is answered frames per second of
wall time, latency the client-side time of each request (send, queue, batch, answer). The
server's mean batch comes from Triton's metrics (inferences / executions). The in-process
baseline: `Segmenter.predict_batch` of `max_batch` frames (and `predict` of one), same bundle,
backend and precision, timed with `benchmarks.timing.time_calls`. The largest client count and
the baseline alternate in `rounds` blocks and the best of each is compared (see `measure`). Clients and server share the
machine: on a small CPU the clients' own work (serialising frames, gRPC) is in the numbers.
`benchmarks/test_serve.py` runs this on the benchmark bundle and checks the target.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from benchmarks.loopback import free_ports
from benchmarks.timing import cpu_name, time_calls

__all__ = ["Server", "start_server", "Load", "run_load", "in_process", "measure", "build_parser",
           "main"]

ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 180


@dataclass(frozen=True)
class Server:
    """A running `python -m runtime.serve`: host:port of each endpoint, its log."""

    http: str
    grpc: str
    metrics: str
    process: subprocess.Popen
    log: Path | None = None

    def metric(self, name: str, reason: str | None = None) -> float:
        """The partclipseg model's sample of Prometheus metric `name` (`reason`: the failure
        counter's label)."""
        text = urllib.request.urlopen(f"http://{self.metrics}/metrics", timeout=10).read()
        labels = 'model="partclipseg",' + (f'reason="{reason}",' if reason else "") + \
            'version="1"'
        m = re.search(rf"^{name}\{{{labels}\}} ([0-9.e+]+)$", text.decode(), re.M)
        if not m:
            raise RuntimeError(f"{name}{{{labels}}} not in the server's metrics")
        return float(m.group(1))

    def output(self) -> str:
        """The end of the server's log ("" without one)."""
        return self.log.read_text(errors="replace")[-4000:] if self.log else ""


@contextlib.contextmanager
def start_server(bundle: str | Path, extra: Sequence[str] = (), log: Path | None = None
                 ) -> Iterator[Server]:
    """`python -m runtime.serve --bundle bundle *extra` on free loopback ports, ready; SIGTERM
    on exit."""
    from runtime.client import SegmentationClient

    http, grpc, metrics = free_ports(3)
    out = open(log, "wb") if log else subprocess.DEVNULL
    proc = subprocess.Popen(
        [sys.executable, "-m", "runtime.serve", "--bundle", str(bundle), "--http-port",
         str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics), *extra],
        cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    server = Server(f"127.0.0.1:{http}", f"127.0.0.1:{grpc}", f"127.0.0.1:{metrics}", proc,
                    log)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        with SegmentationClient(server.http, "http", timeout_s=5) as client:
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"the server exited with {proc.returncode}:\n"
                                       f"{server.output()}")
                with contextlib.suppress(Exception):
                    if client.ready():
                        break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the server was not ready in {START_TIMEOUT_S} s:\n"
                                       f"{server.output()}")
                time.sleep(0.5)
        yield server
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if log:
            out.close()


@dataclass(frozen=True)
class Load:
    """One client count's result."""

    clients: int
    protocol: str
    requests: int
    wall_s: float
    frames_per_s: float
    p50_ms: float
    p99_ms: float
    mean_batch: float  # frames per server execution (Triton's metrics)


def run_load(server: Server, frames: np.ndarray, clients: int, protocol: str = "grpc",
             seconds: float = 3.0, warmup_s: float = 0.5) -> Load:
    """`clients` threads, each sending frames back to back (client k starts at frame k)."""
    from runtime.client import SegmentationClient

    url = server.grpc if protocol == "grpc" else server.http
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors: list[BaseException] = []
    start = threading.Barrier(clients + 1)
    phase = {"measure": False, "stop": False}

    def client(k: int) -> None:
        try:
            with SegmentationClient(url, protocol) as c:
                i = k
                start.wait()
                while not phase["stop"]:
                    t = time.perf_counter()
                    c.predict(frames[i % len(frames)])
                    if phase["measure"]:
                        latencies[k].append(time.perf_counter() - t)
                    i += clients
        except BaseException as e:  # noqa: BLE001 - reported after the run
            errors.append(e)
            with contextlib.suppress(threading.BrokenBarrierError):
                start.abort()

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    time.sleep(warmup_s)
    inferences, executions = (server.metric("nv_inference_count"),
                              server.metric("nv_inference_exec_count"))
    phase["measure"] = True
    t0 = time.perf_counter()
    time.sleep(seconds)
    phase["measure"] = False  # requests answered after this are not counted
    wall = time.perf_counter() - t0
    inferences = server.metric("nv_inference_count") - inferences
    executions = server.metric("nv_inference_exec_count") - executions
    phase["stop"] = True
    for t in threads:
        t.join(timeout=60)
    if errors:
        raise RuntimeError(f"a client failed: {errors[0]!r}") from errors[0]
    lat = np.array([x for per in latencies for x in per]) * 1e3
    return Load(clients, protocol, int(lat.size), wall, lat.size / wall,
                float(np.percentile(lat, 50)), float(np.percentile(lat, 99)),
                inferences / executions if executions else float("nan"))


def in_process(segmenter: Any, frames: np.ndarray, batch: int) -> dict[str, float]:
    """`predict_batch` of `batch` frames (`predict` for 1): frames per second at the median."""
    images = list(frames[:batch])
    fn = (lambda: segmenter.predict(images[0])) if batch == 1 else \
        (lambda: segmenter.predict_batch(images))
    timing = time_calls(fn, warmup=2, min_runs=5, max_runs=50, budget_s=3.0)
    return {"batch": batch, "median_ms": timing.median_ms, "frames_per_s": timing.throughput(batch)}


def measure(bundle: str | Path, frames: np.ndarray, clients: Sequence[int] = (1, 4, 16),
            max_batch: int = 8, protocol: str = "grpc", seconds: float = 3.0,
            backend: str = "onnxruntime", device: str | None = None,
            precision: str | None = None, rounds: int = 3, log: Path | None = None
            ) -> dict[str, Any]:
    """One load per client count; the largest count (the target's) in `rounds` blocks that
    alternate with blocks of in-process `predict_batch` of `max_batch` frames, so both sides
    see the same spells of other work on a shared machine; the ratio is best block / best
    block. The in-process side runs while the server is idle (its process stays up)."""
    from runtime import Segmenter

    extra = ["--backend", backend, "--max-batch", str(max_batch), "--max-queue-delay-us", "2000"]
    if device:
        extra += ["--device", device]
    if precision:
        extra += ["--precision", precision]
    seg = Segmenter.load(bundle, backend=backend, device=device, precision=precision)
    with start_server(bundle, extra, log) as server:
        loads = [run_load(server, frames, n, protocol, seconds) for n in clients[:-1]]
        top, base = [], []
        for _ in range(rounds):
            base.append(in_process(seg, frames, max_batch))
            top.append(run_load(server, frames, clients[-1], protocol, seconds))
        single = in_process(seg, frames, 1)
    best = max(top, key=lambda x: x.frames_per_s)
    best_base = max(base, key=lambda x: x["frames_per_s"])
    return {"protocol": protocol, "max_batch": max_batch, "max_queue_delay_us": 2000,
            "backend": seg.backend_name, "input_size": seg.input_size, "rounds": rounds,
            "server": [asdict(x) for x in [*loads, best]],
            "in_process": [single, best_base],
            f"rounds_{clients[-1]}_clients": [asdict(x) for x in top],
            f"rounds_in_process_b{max_batch}": base,
            "ratio_at_most_clients": best.frames_per_s / best_base["frames_per_s"]}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.serving",
                                description=__doc__.splitlines()[0])
    p.add_argument("--bundle", required=True)
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--protocol", choices=["grpc", "http"], default="grpc")
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", help="write the results here")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from runtime.bundle import read_manifest
    from runtime.io import atomic_write_text

    a = build_parser().parse_args(argv)
    s = read_manifest(a.bundle).input_size
    frames = np.random.default_rng(0).integers(0, 256, (32, s, s, 3), dtype=np.uint8)
    load_before = os.getloadavg()
    r = measure(a.bundle, frames, a.clients, a.max_batch, a.protocol, a.seconds,
                rounds=a.rounds)
    r = {"machine": cpu_name(), "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
         # 1-minute load average before and after: other work on a shared machine shows here
         "load_average_1min": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
         "bundle": str(a.bundle), **r}
    for x in r["server"]:
        print(f"{x['clients']:3d} clients ({x['protocol']}): {x['frames_per_s']:7.1f} frames/s, "
              f"p50 {x['p50_ms']:7.1f} ms, p99 {x['p99_ms']:7.1f} ms, mean batch "
              f"{x['mean_batch']:.2f}")
    for b in r["in_process"]:
        print(f"in process b{b['batch']}: {b['frames_per_s']:7.1f} frames/s "
              f"({b['median_ms']:.1f} ms a call)")
    print(f"ratio at {a.clients[-1]} clients: {r['ratio_at_most_clients']:.2f}x")
    if a.json:
        atomic_write_text(a.json, json.dumps(r, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
