"""`partclipseg serve --bundle B` (also `python -m runtime.serve`): a bundle behind Triton
Inference Server, for many cameras or a fleet sharing one box.

PyTriton (`pip install partclipseg-deploy[serve]`) runs Triton Inference Server with this
process's `Segmenter` as the model `partclipseg`; Triton brings the gRPC endpoint, the dynamic
batcher, health and readiness, and Prometheus metrics. No torch.

    image        input,  UINT8 (H, W, 3) RGB, per request row (batch dim first on the wire)
    classes      input,  BYTES (K,) "object's part" names, optional (default: the bundle's)
    labels       output, INT32 (H, W): an index into class_names, -1 = background
    class_names  output, BYTES (K,)
    error        output, BYTES (1,): "" for an answered request, else why it was refused

Triton batches only requests whose inputs have the same shapes, so a batch holds frames of one
size; `SegmentationModel` splits it further by class list and runs one `predict_batch` per
group. A request Triton cannot take (wrong dtype, wrong rank, not 3 channels) is refused by
Triton before it reaches a batch. One this model refuses (an unknown class name, an image side
over --max-image-side, more than --max-classes names) fails alone: PyTriton 0.7 has no
per-request error (an exception fails every request of the batch), so the model answers it with
its reason in `error` (and placeholders: `labels` 1 x 1 of -1, one empty class name), and
answers the requests batched beside it as if they had come alone. `SegmentationClient` raises `ServerError` on it.

HTTP goes through `runtime.serve_http.HttpFront`, which refuses requests whose declared tensors
do not match the bytes sent before Triton 2.51 allocates them (see there). Each refused request
is one log line; a traceback means a bug here.

SIGTERM (docker stop, kill PID): Triton stops taking requests, answers those in flight (for
up to 30 s), then the command exits 0. Send it to this process alone: a signal to the whole
process group (Ctrl+C in a terminal, systemd's default KillMode=control-group) also reaches
Triton's backend processes, and requests in flight then fail (systemd: KillMode=mixed). If
tritonserver exits for any other reason (killed, crashed), the command exits 1 at once, naming
the cause, so a supervisor restarts it.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import socket
import sys
import sysconfig
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from .errors import run_command
from .options import (add_backend_arguments, add_verify_argument, load_segmenter, nonneg_int,
                      positive_int)
from .preprocess import InputError
from .serve_http import HttpFront, one_line
from .vocabulary import VocabularyError

__all__ = ["MODEL_NAME", "DEFAULT_MAX_IMAGE_SIDE", "DEFAULT_MAX_CLASSES", "IMAGE", "CLASSES",
           "LABELS", "CLASS_NAMES", "ERROR", "SegmentationModel", "ServeOptions", "add_arguments",
           "build_parser", "run", "main", "python_library_env", "check_port_free", "serve",
           "TRITON_DIED_EXIT"]

log = logging.getLogger("runtime.serve")

MODEL_NAME = "partclipseg"
# 4096 px a side: past 4K video (3840 x 2160); a 4096^2 frame is 48 MiB in and 64 MiB of labels
# out, about what Triton's default request and shared-memory sizes carry comfortably.
DEFAULT_MAX_IMAGE_SIDE = 4096
# New names are encoded by the bundle's text side, a few ms each on a CPU: 10,000 new names in
# one request held the model for over 20 s. 256 is past any part vocabulary we know (ADE20K-Part
# has 234 classes); the bundle's own vocabulary (no `classes` input) is never limited.
DEFAULT_MAX_CLASSES = 256
MAX_CLASS_NAME_CHARS = 200  # the text side reads 77 tokens at most; longer names are noise
IMAGE, CLASSES, LABELS, CLASS_NAMES, ERROR = "image", "classes", "labels", "class_names", "error"
TRITON_DIED_EXIT = 1  # tritonserver exited without being asked to: a supervisor restarts us


class SegmentationModel:
    """PyTriton's inference callable: a batch of Triton requests -> one response per request.

    Each request is a mapping of input name -> array with the batch dimension first:
    image (N, H, W, 3) uint8 and, optionally, classes (N, K) bytes (one class list per row).
    Each response: labels (N, H, W) int32 (-1 = background), class_names (N, K) bytes and
    error (N, 1) bytes, b"" for every row. A request this model refuses (any of its rows)
    gets its reason in error, labels (N, 1, 1) of -1 and class_names (N, 1) of b"" (placeholders);
    the others are answered
    as if alone (PyTriton 0.7 fails a whole batch on an exception, so refusals never raise).
    Rows of the answered requests are grouped by (image size, class list), one
    `predict_batch` each. Thread-safe (the Segmenter is), so one object serves every model
    instance.
    """

    def __init__(self, segmenter: Any, max_image_side: int = DEFAULT_MAX_IMAGE_SIDE,
                 max_classes: int = DEFAULT_MAX_CLASSES):
        self.segmenter = segmenter
        self.max_image_side = max_image_side
        self.max_classes = max_classes

    def __call__(self, requests: Sequence[Mapping[str, np.ndarray]]
                 ) -> list[dict[str, np.ndarray]]:
        checked: list[list[tuple[np.ndarray, tuple[str, ...] | None]] | str] = []
        for request in requests:
            try:
                checked.append(self._rows(request))
            except (InputError, VocabularyError) as e:
                checked.append(one_line(str(e), 1000))
                # The model does not see the client's address or request id (PyTriton
                # passes neither); the reason is what an operator needs.
                log.warning("refused a request: %s", one_line(str(e)))
        groups: OrderedDict[tuple[Any, ...], list[tuple[int, int, np.ndarray]]] = OrderedDict()
        for i, rows in enumerate(checked):
            if isinstance(rows, str):
                continue
            for j, (image, classes) in enumerate(rows):
                groups.setdefault((image.shape, classes), []).append((i, j, image))
        labels: list[list[Any]] = [[None] * len(r) if not isinstance(r, str) else []
                                   for r in checked]
        names: list[list[Any]] = [list(x) for x in labels]
        for (_, classes), members in groups.items():
            preds = self.segmenter.predict_batch([m[2] for m in members],
                                                 classes=None if classes is None else
                                                 list(classes))
            for (i, j, _), p in zip(members, preds):
                labels[i][j], names[i][j] = p.labels, p.class_names
        out = []
        for request, rows, lab, nam in zip(requests, checked, labels, names):
            if isinstance(rows, str):
                n = _batch_size(request)
                # Placeholders, 1 x 1 background and one empty name (never a real answer: an
                # empty name is refused): PyTriton's shared memory cannot carry empty arrays
                # ("memoryview: cannot cast view with zeros in shape").
                out.append({LABELS: np.full((n, 1, 1), -1, np.int32),
                            CLASS_NAMES: np.array([[b""]] * n, dtype=object),
                            ERROR: np.array([[rows.encode("utf-8")]] * n, dtype=object)})
            else:
                out.append({LABELS: np.stack(lab).astype(np.int32, copy=False),
                            CLASS_NAMES: np.array([[x.encode("utf-8") for x in row]
                                                   for row in nam], dtype=object),
                            ERROR: np.array([[b""]] * len(lab), dtype=object)})
        return out

    def _rows(self, request: Mapping[str, np.ndarray]
              ) -> list[tuple[np.ndarray, tuple[str, ...] | None]]:
        """The request's rows as (image, class names or None); InputError / VocabularyError
        naming the problem when the request is refused."""
        if IMAGE not in request:  # PyTriton's Request: `in` and [] (no .get)
            raise InputError(f"the request has no {IMAGE!r} input")
        images = np.asarray(request[IMAGE])
        # Triton refuses these before a batch forms (the model config declares them); checked
        # again for callers that skip Triton (tests, other servers).
        if images.dtype != np.uint8:
            raise InputError(f"{IMAGE} must be UINT8 (0-255 RGB), got {images.dtype}")
        if images.ndim != 4 or images.shape[-1] != 3:
            raise InputError(f"{IMAGE} must be (H, W, 3) per row, got {images.shape[1:]}")
        h, w = images.shape[1:3]
        if max(h, w) > self.max_image_side:
            raise InputError(f"{IMAGE} is {h} x {w}, over the server's --max-image-side "
                             f"{self.max_image_side}: send a smaller frame")
        if min(h, w) == 0:
            raise InputError(f"{IMAGE} is empty: {h} x {w}")
        classes: list[tuple[str, ...] | None] = [None] * len(images)
        if CLASSES in request and request[CLASSES] is not None:
            raw = np.asarray(request[CLASSES])
            if raw.ndim != 2 or raw.shape[0] != len(images):
                raise InputError(f"{CLASSES} must be (K,) names per row, got {raw.shape[1:]}")
            if raw.shape[1] > self.max_classes:
                raise InputError(f"{CLASSES}: {raw.shape[1]} names, over the server's "
                                 f"--max-classes {self.max_classes}: send fewer")
            try:
                classes = [tuple(_text(x) for x in row) for row in raw]
            except UnicodeDecodeError as e:
                raise InputError(f"{CLASSES} must be UTF-8 text: {e}") from None
            for names in set(classes):
                long = [n for n in names if len(n) > MAX_CLASS_NAME_CHARS]
                if long:
                    raise InputError(f"{CLASSES}: a name of {len(long[0])} characters, over "
                                     f"{MAX_CLASS_NAME_CHARS}: {long[0][:40]!r}...")
                try:
                    self.segmenter.feeds(list(names))  # parses, encodes new names (cached)
                except (InputError, VocabularyError) as e:
                    raise type(e)(f"{CLASSES}: {e}") from None
        return list(zip(images, classes))


def _batch_size(request: Mapping[str, np.ndarray]) -> int:
    """Rows of a request (Triton gives every input the same first dimension); 1 without an
    image."""
    for name in (IMAGE, CLASSES):
        if name in request and request[name] is not None and np.ndim(request[name]) >= 1:
            return int(np.shape(request[name])[0])
    return 1


def _text(x: Any) -> str:
    return x.decode("utf-8") if isinstance(x, (bytes, np.bytes_)) else str(x)


@dataclass(frozen=True)
class ServeOptions:
    """Where and how Triton serves (the command's options, minus the bundle's)."""

    address: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    max_batch: int = 8
    max_queue_delay_us: int = 1000
    instances: int = 1
    max_image_side: int = DEFAULT_MAX_IMAGE_SIDE
    max_classes: int = DEFAULT_MAX_CLASSES


def python_library_env(environ: Mapping[str, str]) -> dict[str, str]:
    """`environ` with this interpreter's library folder first on LD_LIBRARY_PATH.

    Triton's Python backend stub is a separate program that links `libpython3.X.so.1.0` and
    then imports this virtualenv's packages. Where the system has its own copy of that library
    (a distribution Python beside a pyenv or conda one), the loader picks the system's, whose
    build differs from this interpreter's, and the stub dies at start (seen: "'_thread.RLock'
    object has no attribute '_recursion_count'"). The interpreter's LIBDIR first makes the stub
    load the same libpython this process runs on.
    """
    env = dict(environ)
    libdir = sysconfig.get_config_var("LIBDIR")
    if libdir and os.path.isdir(libdir):
        rest = [p for p in env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p and p != libdir]
        env["LD_LIBRARY_PATH"] = os.pathsep.join([libdir, *rest])
    return env


def check_port_free(address: str, port: int, flag: str) -> None:
    """OSError naming `flag` when `address`:`port` cannot be bound. Checked before Triton
    starts: PyTriton's readiness probe would otherwise reach whatever already listens there."""
    import socket

    with socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET) as s:
        # As servers do: a port whose last connections are in TIME_WAIT is free to listen on,
        # one with a listener is not.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((address, port))
        except OSError as e:
            raise OSError(f"{flag} {port}: cannot listen on {address}:{port} ({e.strerror}); "
                          "is another server running there? pick another port") from None


def _import_pytriton() -> Any:
    try:
        import pytriton.triton
    except ImportError as e:
        raise ImportError(f"partclipseg serve needs PyTriton: pip install "
                          f"'partclipseg-deploy[serve]' ({e})") from e
    return pytriton


def _free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _max_body_bytes(o: ServeOptions) -> int:
    """The largest HTTP body the front takes: --max-batch frames at --max-image-side, plus
    room for the JSON header and class lists."""
    return o.max_batch * o.max_image_side ** 2 * 3 + 16 * (1 << 20)


def serve(segmenter: Any, options: ServeOptions = ServeOptions()) -> int:
    """Serve `segmenter` as the Triton model `partclipseg` until SIGTERM / SIGINT, which
    drain the requests in flight before this returns 0. Returns TRITON_DIED_EXIT, after a
    line on stderr naming the cause, when tritonserver (or the model's backend process) exits
    without being asked to."""
    _import_pytriton()
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig

    o = options
    # PyTriton starts tritonserver (and through it the Python backend stub) with a copy of
    # os.environ, so the stub's library path is set here, before the server starts.
    os.environ.update(python_library_env(os.environ))
    # Triton's HTTP endpoint listens on a private loopback port; the public one is the
    # checking front (runtime.serve_http: Triton 2.51 allocates what a JSON body declares).
    config = TritonConfig(http_address="127.0.0.1", http_port=_free_loopback_port(),
                          grpc_address=o.address, grpc_port=o.grpc_port,
                          metrics_address=o.address, metrics_port=o.metrics_port,
                          allow_metrics=True)
    model = SegmentationModel(segmenter, o.max_image_side, o.max_classes)
    asked = threading.Event()  # set by our SIGTERM / SIGINT: a stop we wanted
    exits: list[int] = []

    def interrupt(signum: int, frame: Any) -> None:
        # SIGTERM (docker stop, systemd, Kubernetes) takes the same path as Ctrl+C: PyTriton's
        # serve() catches KeyboardInterrupt and stops Triton with SIGINT, which refuses new
        # requests and answers those in flight before it exits. Once: a second signal during
        # the drain would raise inside PyTriton's stop() and leave tritonserver behind.
        asked.set()
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise KeyboardInterrupt

    previous = {s: signal.signal(s, interrupt) for s in (signal.SIGTERM, signal.SIGINT)}
    front: HttpFront | None = None
    try:
        with Triton(config=config) as triton:
            # PyTriton 0.7's handle on the tritonserver process (an `sh` command): its exit
            # code (negative: the signal) names the cause. Private, so read defensively: a
            # later PyTriton without it still exits 1, without the cause.
            process = getattr(triton, "_triton_server", None)
            triton.bind(
                model_name=MODEL_NAME,
                infer_func=[model] * o.instances,
                inputs=[Tensor(name=IMAGE, dtype=np.uint8, shape=(-1, -1, 3)),
                        Tensor(name=CLASSES, dtype=bytes, shape=(-1,), optional=True)],
                outputs=[Tensor(name=LABELS, dtype=np.int32, shape=(-1, -1)),
                         Tensor(name=CLASS_NAMES, dtype=bytes, shape=(-1,)),
                         Tensor(name=ERROR, dtype=bytes, shape=(1,))],
                config=ModelConfig(max_batch_size=o.max_batch, batcher=DynamicBatcher(
                    max_queue_delay_microseconds=o.max_queue_delay_us)),
                strict=True)
            front = HttpFront(o.address, o.http_port, config.http_port,
                              _max_body_bytes(o)).start()
            print(f"serve: model {MODEL_NAME!r} ({segmenter.backend_name}) on "
                  f"http://{o.address}:{o.http_port}, grpc {o.address}:{o.grpc_port}, metrics "
                  f"http://{o.address}:{o.metrics_port}/metrics; SIGTERM or Ctrl+C stops",
                  flush=True)
            triton.serve(monitoring_period_s=1.0)
            if not asked.is_set():
                with contextlib.suppress(Exception):
                    exits.append(int(process._tritonserver_running_cmd.process.exit_code))
                # Dead: stop answering HTTP at once (readiness fails) before PyTriton cleans up.
                front.close()
                front = None
                tail = [ln for ln in (process.logs() if process is not None and
                                      hasattr(process, "logs") else "").splitlines()
                        if ln.strip()][-1:]
                print(f"serve: error: {_death_cause(exits)}; the model is not served"
                      + (f" (its last line: {one_line(tail[0], 300)})" if tail else "")
                      + "; restart the command (a supervisor's restart-on-failure does)",
                      file=sys.stderr, flush=True)
                return TRITON_DIED_EXIT
    finally:
        if front is not None:
            front.close()
        for s, handler in previous.items():
            signal.signal(s, handler)
    print("serve: stopped", flush=True)
    return 0


def _death_cause(exits: Sequence[int]) -> str:
    """"tritonserver was killed by SIGKILL" and the like, from its exit code (sh reports a
    signal as its negative number)."""
    if not exits:
        return "the model's backend process or tritonserver stopped"
    code = exits[-1]
    if code < 0:
        try:
            return f"tritonserver was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"tritonserver was killed by signal {-code}"
    return f"tritonserver exited with status {code} without being asked to stop"


def _port(v: str) -> int:
    n = int(v)
    if not 0 < n < 65536:
        raise argparse.ArgumentTypeError(f"must be a port number (1-65535), got {v}")
    return n


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The serve options, on `p` (this module's parser, or `partclipseg serve`'s)."""
    d = ServeOptions()
    add_verify_argument(add_backend_arguments(p))
    p.add_argument("--address", default=d.address,
                   help=f"address every endpoint binds to (default {d.address}: this machine "
                   "only; 0.0.0.0 for the network)")
    p.add_argument("--http-port", type=_port, default=d.http_port)
    p.add_argument("--grpc-port", type=_port, default=d.grpc_port)
    p.add_argument("--metrics-port", type=_port, default=d.metrics_port,
                   help=f"Prometheus metrics at /metrics (default {d.metrics_port})")
    p.add_argument("--max-batch", type=positive_int, default=d.max_batch,
                   help=f"most frames Triton's dynamic batcher puts in one call (default "
                   f"{d.max_batch})")
    p.add_argument("--max-queue-delay-us", type=nonneg_int, default=d.max_queue_delay_us,
                   help="longest a request waits for others to batch with, microseconds "
                   f"(default {d.max_queue_delay_us})")
    p.add_argument("--instances", type=positive_int, default=d.instances,
                   help=f"model instances running batches at once (default {d.instances}); "
                   "they share one Segmenter")
    p.add_argument("--max-image-side", type=positive_int, default=d.max_image_side,
                   help=f"refuse larger frames (default {d.max_image_side} px)")
    p.add_argument("--max-classes", type=positive_int, default=d.max_classes,
                   help=f"refuse requests with more class names (default {d.max_classes}); "
                   "new names cost the text side's time")
    return p


def build_parser() -> argparse.ArgumentParser:
    return add_arguments(argparse.ArgumentParser(prog="python -m runtime.serve",
                                                 description=__doc__.splitlines()[0]))


def run(a: argparse.Namespace) -> int:
    """Load `a.bundle` and serve it until SIGTERM (0) or until tritonserver dies
    (TRITON_DIED_EXIT); user errors raise (see `main`)."""
    _import_pytriton()  # before the bundle loads: a missing extra is the first thing to say
    ports = {"--http-port": a.http_port, "--grpc-port": a.grpc_port,
             "--metrics-port": a.metrics_port}
    if len(set(ports.values())) < len(ports):
        raise ValueError(f"the ports must differ, got {ports}")
    for flag, port in ports.items():
        check_port_free(a.address, port, flag)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(levelname)s: %(message)s")
    # Verified before the first request: a server answers many clients with what it loads.
    seg = load_segmenter(a, log=lambda line: print(f"serve: {line}", flush=True))
    return serve(seg, ServeOptions(a.address, a.http_port, a.grpc_port, a.metrics_port,
                                   a.max_batch, a.max_queue_delay_us, a.instances,
                                   a.max_image_side, a.max_classes))


def main(argv: Sequence[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    return run_command("serve", lambda: run(a))


if __name__ == "__main__":
    sys.exit(main())
