"""`partclipseg serve --bundle B` (also `python -m runtime.serve`): a bundle behind Triton
Inference Server, for many cameras or a fleet sharing one box.

PyTriton (`pip install partclipseg-deploy[serve]`) runs Triton Inference Server with this
process's `Segmenter` as the model `partclipseg`; Triton brings the HTTP and gRPC endpoints, the
dynamic batcher, health and readiness, and Prometheus metrics. No torch.

    image        input,  UINT8 (H, W, 3) RGB, per request row (batch dim first on the wire)
    classes      input,  BYTES (K,) "object's part" names, optional (default: the bundle's)
    labels       output, INT32 (H, W): an index into class_names, -1 = background
    class_names  output, BYTES (K,)

Triton batches only requests whose inputs have the same shapes, so a batch holds frames of one
size; `SegmentationModel` splits it further by class list and runs one `predict_batch` per
group. A request Triton cannot take (wrong dtype, wrong rank, not 3 channels) is refused by
Triton before it reaches a batch; one this model refuses (an unknown class name, an image side
over --max-image-side) fails its batch with a message naming the problem. PyTriton answers a
failed batch with that one error for every request in it (it has no per-request error), so
`SegmentationModel` checks every request before running any, and the error names which request
of the batch was bad: a good request shares that fate only when it was batched with a bad one of
the same image size and the same number of class names (see docs/serving.md).

SIGTERM (docker stop, kill PID): Triton stops taking requests, answers those in flight (for
up to 30 s), then the command exits 0. Send it to this process alone: a signal to the whole
process group (Ctrl+C in a terminal, systemd's default KillMode=control-group) also reaches
Triton's backend processes, and requests in flight then fail (systemd: KillMode=mixed).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import sysconfig
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from .errors import run_command
from .options import add_backend_arguments, nonneg_int, positive_int
from .preprocess import InputError
from .vocabulary import VocabularyError

__all__ = ["MODEL_NAME", "DEFAULT_MAX_IMAGE_SIDE", "IMAGE", "CLASSES", "LABELS", "CLASS_NAMES",
           "SegmentationModel", "ServeOptions", "add_arguments", "build_parser", "run", "main",
           "python_library_env", "check_port_free", "serve"]

MODEL_NAME = "partclipseg"
# 4096 px a side: past 4K video (3840 x 2160); a 4096^2 frame is 48 MiB in and 64 MiB of labels
# out, about what Triton's default request and shared-memory sizes carry comfortably.
DEFAULT_MAX_IMAGE_SIDE = 4096
IMAGE, CLASSES, LABELS, CLASS_NAMES = "image", "classes", "labels", "class_names"


class SegmentationModel:
    """PyTriton's inference callable: a batch of Triton requests -> one response per request.

    Each request is a mapping of input name -> array with the batch dimension first:
    image (N, H, W, 3) uint8 and, optionally, classes (N, K) bytes (one class list per row).
    Each response: labels (N, H, W) int32 (-1 = background) and class_names (N, K) bytes.
    Rows of the whole batch are grouped by (image size, class list), one `predict_batch` each.
    Thread-safe (the Segmenter is), so one object serves every model instance.
    """

    def __init__(self, segmenter: Any, max_image_side: int = DEFAULT_MAX_IMAGE_SIDE):
        self.segmenter = segmenter
        self.max_image_side = max_image_side

    def __call__(self, requests: Sequence[Mapping[str, np.ndarray]]
                 ) -> list[dict[str, np.ndarray]]:
        rows = self._checked_rows(requests)
        groups: OrderedDict[tuple[Any, ...], list[tuple[int, int, np.ndarray]]] = OrderedDict()
        for i, request_rows in enumerate(rows):
            for j, (image, classes) in enumerate(request_rows):
                groups.setdefault((image.shape, classes), []).append((i, j, image))
        labels: list[list[np.ndarray | None]] = [[None] * len(r) for r in rows]
        names: list[list[tuple[str, ...] | None]] = [[None] * len(r) for r in rows]
        for (_, classes), members in groups.items():
            preds = self.segmenter.predict_batch([m[2] for m in members],
                                                 classes=None if classes is None else
                                                 list(classes))
            for (i, j, _), p in zip(members, preds):
                labels[i][j], names[i][j] = p.labels, p.class_names
        return [{LABELS: np.stack(lab).astype(np.int32, copy=False),
                 CLASS_NAMES: np.array([[n.encode("utf-8") for n in row] for row in nam],
                                       dtype=object)}
                for lab, nam in zip(labels, names)]

    def _checked_rows(self, requests: Sequence[Mapping[str, np.ndarray]]
                      ) -> list[list[tuple[np.ndarray, tuple[str, ...] | None]]]:
        """Every request's rows as (image, class names or None), each checked before any runs:
        one bad request fails the batch (PyTriton has no per-request error), so its message
        says which request it was and what is wrong."""
        rows, errors = [], []
        for i, request in enumerate(requests):
            try:
                rows.append(self._rows(request))
            except (InputError, VocabularyError) as e:
                errors.append((i, e))
        if len(requests) == 1 and errors:
            raise errors[0][1]
        if errors:
            raise InputError("; ".join(f"request {i + 1} of {len(requests)} in this batch: {e}"
                                       for i, e in errors))
        return rows

    def _rows(self, request: Mapping[str, np.ndarray]
              ) -> list[tuple[np.ndarray, tuple[str, ...] | None]]:
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
            try:
                classes = [tuple(_text(x) for x in row) for row in raw]
            except UnicodeDecodeError as e:
                raise InputError(f"{CLASSES} must be UTF-8 text: {e}") from None
            for names in set(classes):
                try:
                    self.segmenter.feeds(list(names))  # parses, encodes new names (cached)
                except (InputError, VocabularyError) as e:
                    raise type(e)(f"{CLASSES}: {e}") from None
        return list(zip(images, classes))


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


def serve(segmenter: Any, options: ServeOptions = ServeOptions()) -> None:
    """Serve `segmenter` as the Triton model `partclipseg` until SIGTERM / SIGINT, which
    drain the requests in flight before this returns."""
    _import_pytriton()
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig

    o = options
    # PyTriton starts tritonserver (and through it the Python backend stub) with a copy of
    # os.environ, so the stub's library path is set here, before the server starts.
    os.environ.update(python_library_env(os.environ))
    config = TritonConfig(http_address=o.address, http_port=o.http_port,
                          grpc_address=o.address, grpc_port=o.grpc_port,
                          metrics_address=o.address, metrics_port=o.metrics_port,
                          allow_metrics=True)
    model = SegmentationModel(segmenter, o.max_image_side)
    # SIGTERM (docker stop, systemd, Kubernetes) takes the same path as Ctrl+C: PyTriton's
    # serve() catches KeyboardInterrupt and stops Triton with SIGINT, which refuses new
    # requests and answers those in flight before it exits.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        with Triton(config=config) as triton:
            triton.bind(
                model_name=MODEL_NAME,
                infer_func=[model] * o.instances,
                inputs=[Tensor(name=IMAGE, dtype=np.uint8, shape=(-1, -1, 3)),
                        Tensor(name=CLASSES, dtype=bytes, shape=(-1,), optional=True)],
                outputs=[Tensor(name=LABELS, dtype=np.int32, shape=(-1, -1)),
                         Tensor(name=CLASS_NAMES, dtype=bytes, shape=(-1,))],
                config=ModelConfig(max_batch_size=o.max_batch, batcher=DynamicBatcher(
                    max_queue_delay_microseconds=o.max_queue_delay_us)),
                strict=True)
            print(f"serve: model {MODEL_NAME!r} ({segmenter.backend_name}) on "
                  f"http://{o.address}:{o.http_port}, grpc {o.address}:{o.grpc_port}, metrics "
                  f"http://{o.address}:{o.metrics_port}/metrics; SIGTERM or Ctrl+C stops",
                  flush=True)
            triton.serve()
    finally:
        signal.signal(signal.SIGTERM, previous)
    print("serve: stopped", flush=True)


def _interrupt(signum: int, frame: Any) -> None:
    # Once: a second SIGTERM during the drain would raise inside PyTriton's stop() and leave
    # tritonserver behind.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt


def _port(v: str) -> int:
    n = int(v)
    if not 0 < n < 65536:
        raise argparse.ArgumentTypeError(f"must be a port number (1-65535), got {v}")
    return n


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The serve options, on `p` (this module's parser, or `partclipseg serve`'s)."""
    d = ServeOptions()
    add_backend_arguments(p)
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
    return p


def build_parser() -> argparse.ArgumentParser:
    return add_arguments(argparse.ArgumentParser(prog="python -m runtime.serve",
                                                 description=__doc__.splitlines()[0]))


def run(a: argparse.Namespace) -> int:
    """Load `a.bundle` and serve it until SIGTERM; user errors raise (see `main`)."""
    from .segmenter import Segmenter

    _import_pytriton()  # before the bundle loads: a missing extra is the first thing to say
    ports = {"--http-port": a.http_port, "--grpc-port": a.grpc_port,
             "--metrics-port": a.metrics_port}
    if len(set(ports.values())) < len(ports):
        raise ValueError(f"the ports must differ, got {ports}")
    for flag, port in ports.items():
        check_port_free(a.address, port, flag)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(levelname)s: %(message)s")
    seg = Segmenter.load(a.bundle, backend=a.backend, device=a.device, precision=a.precision)
    serve(seg, ServeOptions(a.address, a.http_port, a.grpc_port, a.metrics_port, a.max_batch,
                            a.max_queue_delay_us, a.instances, a.max_image_side))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    return run_command("serve", lambda: run(a))


if __name__ == "__main__":
    sys.exit(main())
