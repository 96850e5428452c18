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

Soak (`--soak SECONDS`): `--clients` clients (default 16, gRPC and HTTP alternating) send good
frames with a class list for a fixed time; every `--malformed-every`-th request of each client
(default 8) is malformed instead, in turn: an unknown class name (the model refuses it, batched
with good requests of its size and class count), a float32 frame (Triton refuses it), a raw
HTTP body declaring [1, 100000, 100000, 3] with 3 bytes (the HTTP front refuses it; it aborted
Triton 2.51 before). `--bad-clients N` makes N more clients whose every request has the unknown
class name (the isolation check of issue #31). Reports good requests answered, failed and
answered with labels other than the in-process Segmenter's, malformed requests refused (and
any answered), and the RSS of the serve process and its children (tritonserver, the Python
backend) after the warm-up and at the end. Loopback only; bounded by time and clients.

    python -m benchmarks.serving --bundle B --soak 120 --json benchmarks/results/serve_soak.json
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

__all__ = ["Server", "start_server", "Load", "run_load", "in_process", "measure", "soak",
           "server_rss_mb", "build_parser", "main"]

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


def server_rss_mb(server: Server) -> dict[str, float]:
    """Resident memory (MB) of the serve process and of each of its descendants, by name."""
    def rss(pid: int) -> float:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    out = {"serve": rss(server.process.pid)}
    todo = [server.process.pid]
    while todo:
        pid = todo.pop()
        for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
            name = Path(f"/proc/{child}/comm").read_text().strip()
            key = name if name not in out else f"{name}-{child}"
            with contextlib.suppress(OSError):
                out[key] = rss(int(child))
            todo.append(int(child))
    out["total"] = sum(out.values())
    return {k: round(v, 1) for k, v in out.items()}


HUGE_JSON = json.dumps({"inputs": [{"name": "image", "shape": [1, 100000, 100000, 3],
                                    "datatype": "UINT8", "data": [1, 2, 3]}]}).encode()


def soak(server: Server, seg: Any, frames: np.ndarray, clients: int = 16,
         malformed_every: int = 8, bad_clients: int = 0, seconds: float = 120.0,
         warmup_s: float = 5.0) -> dict[str, Any]:
    """Mixed good and malformed traffic for `seconds` (after `warmup_s` of the same); see the
    module's docstring. Good labels are compared with `seg.predict` of the same frame."""
    import http.client

    from runtime.client import SegmentationClient, ServerError

    names = list(seg.vocabulary.class_names[:4])
    bad_names = names[:3] + ["nocls"]  # same count: batched with the good requests
    want = [seg.predict(f, classes=names).labels for f in frames]
    kinds = ("unknown class", "float32 frame", "raw HTTP [1,100000,100000,3] with 3 bytes")
    counts = {"good_answered": 0, "good_failed": 0, "good_wrong_labels": 0,
              "malformed_refused": 0, "malformed_answered": 0}
    by_kind = {k: 0 for k in kinds}
    failures: list[str] = []
    lock = threading.Lock()
    phase = {"count": False, "stop": False}

    def count(key: str, kind: str | None = None, note: str | None = None) -> None:
        if not phase["count"]:
            return
        with lock:
            counts[key] += 1
            if kind:
                by_kind[kind] += 1
            if note and len(failures) < 20:
                failures.append(note)

    def raw_huge() -> int:
        host, port = server.http.split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        try:
            conn.request("POST", "/v2/models/partclipseg/infer", body=HUGE_JSON)
            return conn.getresponse().status
        finally:
            conn.close()

    def client(k: int) -> None:
        protocol = "grpc" if k % 2 == 0 else "http"
        always_bad = k >= clients
        with SegmentationClient(server.grpc if protocol == "grpc" else server.http,
                                protocol) as c:
            i = 0
            while not phase["stop"]:
                i += 1
                frame_no = (k + i) % len(frames)
                malformed = always_bad or (malformed_every and (i + k) % malformed_every == 0)
                if not malformed:
                    try:
                        labels, _ = c.predict(frames[frame_no], names)
                    except Exception as e:  # noqa: BLE001 - counted, the soak goes on
                        count("good_failed", note=f"client {k} ({protocol}): {e}")
                        continue
                    if np.array_equal(labels, want[frame_no]):
                        count("good_answered")
                    else:
                        count("good_wrong_labels", note=f"client {k}: labels differ")
                    continue
                kind = kinds[0] if always_bad else kinds[(i // max(1, malformed_every)) % 3]
                try:
                    if kind == kinds[2]:
                        status = raw_huge()
                        refused = 400 <= status < 500
                    elif kind == kinds[1]:
                        c.predict(frames[frame_no].astype(np.float32), names)
                        refused = False
                    else:
                        c.predict(frames[frame_no], bad_names)
                        refused = False
                except ServerError:
                    refused = True
                count("malformed_refused" if refused else "malformed_answered", kind if refused
                      else None, None if refused else f"client {k}: {kind} answered")

    threads = [threading.Thread(target=client, args=(k,), daemon=True)
               for k in range(clients + bad_clients)]
    for t in threads:
        t.start()
    time.sleep(warmup_s)
    rss_before = server_rss_mb(server)
    phase["count"] = True
    t0 = time.perf_counter()
    time.sleep(seconds)
    phase["count"] = False
    wall = time.perf_counter() - t0
    rss_after = server_rss_mb(server)
    phase["stop"] = True
    for t in threads:
        t.join(timeout=60)
    return {"clients": clients, "bad_clients": bad_clients, "malformed_every": malformed_every,
            "seconds": round(wall, 1), **counts, "malformed_refused_by_kind": by_kind,
            "good_per_s": round(counts["good_answered"] / wall, 1),
            "rss_mb_before": rss_before, "rss_mb_after": rss_after,
            "rss_growth_mb": round(rss_after["total"] - rss_before["total"], 1),
            "server_alive": server.process.poll() is None, "failures": failures}


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
    p.add_argument("--soak", type=float, metavar="SECONDS",
                   help="run the soak (mixed good and malformed traffic) for this long instead")
    p.add_argument("--malformed-every", type=int, default=8,
                   help="soak: every Nth request of a client is malformed (0: none; default 8)")
    p.add_argument("--bad-clients", type=int, default=0,
                   help="soak: extra clients whose every request has an unknown class name")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from runtime.bundle import read_manifest
    from runtime.io import atomic_write_text

    a = build_parser().parse_args(argv)
    s = read_manifest(a.bundle).input_size
    frames = np.random.default_rng(0).integers(0, 256, (32, s, s, 3), dtype=np.uint8)
    load_before = os.getloadavg()
    if a.soak:
        return _soak_main(a, frames, load_before)
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


def _soak_main(a: argparse.Namespace, frames: np.ndarray, load_before: tuple[float, ...]
               ) -> int:
    from runtime import Segmenter
    from runtime.io import atomic_write_text

    clients = a.clients[-1] if a.clients != [1, 4, 16] else 16
    seg = Segmenter.load(a.bundle, backend="onnxruntime")
    extra = ["--backend", "onnxruntime", "--max-batch", str(a.max_batch),
             "--max-queue-delay-us", "2000"]
    with start_server(a.bundle, extra) as server:
        r = soak(server, seg, frames, clients, a.malformed_every, a.bad_clients, a.soak)
    r = {"machine": cpu_name(), "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
         "load_average_1min": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
         "bundle": str(a.bundle), "backend": seg.backend_name, "max_batch": a.max_batch, **r}
    print(json.dumps({k: v for k, v in r.items() if k != "failures"}, indent=1))
    for f in r["failures"]:
        print("failure:", f)
    if a.json:
        atomic_write_text(a.json, json.dumps(r, indent=2) + "\n")
    return 0 if r["good_failed"] == r["good_wrong_labels"] == r["malformed_answered"] == 0 \
        and r["server_alive"] else 1


if __name__ == "__main__":
    sys.exit(main())
