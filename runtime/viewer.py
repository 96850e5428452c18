"""A live view of a `Stream` in the browser: the Rerun web viewer, served from this machine.

    with Viewer(port=9090) as viewer:  # prints nothing; viewer.url is the page to open
        for r in stream:
            viewer.log(r)              # camera image, labels with the class legend, latency, drops

Per frame, under the source's name: `<source>/image` (the RGB frame), `<source>/image/labels`
(the label map as a segmentation image; the class names and the overlay's colours are the
annotation context of `<source>`, the viewer's legend, sent again when the classes change),
`<source>/latency_ms` and `<source>/dropped` (time series). Timelines: `frame` (the source's
frame index), `capture` (wall clock at decoding) and, for bag sources, `stamp` (header stamp).

The viewer runs as a child process (rerun-sdk's `rerun --serve-web`): its HTTP page and its gRPC
log server bind to 127.0.0.1 by default (the SDK's own `serve_grpc` / `serve_web_viewer` bind
every interface and take no address). The page holds the viewer (WebAssembly); it reads the log
from the gRPC server, which keeps what was logged for late visitors up to `memory_limit`.

rerun-sdk (the `[viz]` extra) is imported only when a Viewer is made.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any
from urllib.parse import quote

import numpy as np

from .errors import UserError

__all__ = ["Viewer", "ViewerError", "DEFAULT_PORT"]

DEFAULT_PORT = 9090  # Rerun's own default for its web viewer
_INSTALL = "the viewer needs rerun-sdk: pip install 'partclipseg-deploy[viz]'"


class ViewerError(UserError):
    """The viewer cannot start: a busy port, or its server exited."""


def _check_free(host: str, port: int, what: str) -> None:
    """Raise ViewerError when `port` on `host` is taken (a listener there, on any address)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # SO_REUSEADDR: a closed connection's TIME_WAIT is no reason to refuse; a listener is.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            why = "is in use" if e.errno == errno.EADDRINUSE else f"cannot be bound ({e})"
            raise ViewerError(f"port {port} on {host} {why} (another viewer?): pick another "
                              f"with {what}") from None


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _listening(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


def _rerun_binary() -> str:
    """The viewer's executable, as rerun-sdk ships it. Run directly, not through `python -m
    rerun`, whose wrapper starts it as a grandchild that would outlive a terminated wrapper."""
    import rerun_cli

    path = os.path.join(os.path.dirname(rerun_cli.__file__), "rerun")
    path = os.environ.get("RERUN_CLI_PATH", path)  # rerun's own override
    if not os.path.exists(path):
        raise ViewerError(f"rerun-sdk has no viewer executable at {path}: reinstall it "
                          "(pip install --force-reinstall rerun-sdk)")
    return path


def _numpy1_shim(rr: Any) -> None:
    """rerun-sdk 0.23.1, the last release that admits numpy 1 (which the [serve] extra holds),
    gives its datatypes `__array__` methods that pass `copy=` to np.asarray, an argument numpy 1
    lacks: every AnnotationContext (the legend) fails under numpy 1. Under numpy 1 only, the
    ones this module logs get an `__array__` without it (the same values)."""
    if np.lib.NumpyVersion(np.__version__) >= "2.0.0":
        return
    for name in ("ClassId", "Rgba32", "Float32", "Float64", "UInt16", "UInt32"):
        cls = getattr(rr.datatypes, name, None)
        field = {"ClassId": "id", "Rgba32": "rgba"}.get(name, "value")
        if cls is not None and not getattr(cls, "_numpy1_shim", False):
            cls.__array__ = (lambda f: lambda self, dtype=None, copy=None: np.asarray(
                getattr(self, f), dtype=dtype))(field)
            cls._numpy1_shim = True


def _die_with_parent() -> Any:
    """A preexec_fn (Linux): the child gets SIGTERM when this process dies, so a killed run
    leaves no server holding its ports. Looked up here: between fork and exec the child must
    not import."""
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return lambda: prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


class Viewer:
    """The Rerun web viewer at `url`, fed by `log(result)`; `close()` (or the context manager)
    stops it. Raises `ViewerError` (one line) when a port is taken or the server fails, and
    ImportError without rerun-sdk.

    port: the web page's port (`--view-port`); grpc_port: the log server's (default: a free
    one); host: the address both bind to (127.0.0.1: this machine only; "0.0.0.0" shows the
    viewer to the network); memory_limit: what the log server keeps for late visitors ("25%"
    of RAM, or "2GB"); the oldest frames go first.
    """

    def __init__(self, port: int = DEFAULT_PORT, host: str = "127.0.0.1",
                 grpc_port: int | None = None, memory_limit: str = "25%",
                 start_timeout_s: float = 30.0, application_id: str = "partclipseg"):
        try:
            import rerun as rr
        except ImportError as e:
            raise ImportError(_INSTALL) from e
        self._rr = rr
        _numpy1_shim(rr)
        local = "127.0.0.1" if host in ("0.0.0.0", "") else host  # where this process connects
        _check_free(host, port, "--view-port (Viewer(port=...))")
        grpc_port = grpc_port or _free_port(host)
        _check_free(host, grpc_port, "Viewer(grpc_port=...)")
        self.port, self.grpc_port, self.host = port, grpc_port, host
        grpc_url = f"rerun+http://{local}:{grpc_port}/proxy"
        self.url = f"http://{local}:{port}/?url={quote(grpc_url, safe='')}"
        self._log = tempfile.TemporaryFile()  # the server's output: read back if it fails
        self._proc: subprocess.Popen[bytes] | None = subprocess.Popen(
            [_rerun_binary(), "--serve-web", "--bind", host, "--port",
             str(grpc_port), "--web-viewer-port", str(port), "--hide-welcome-screen",
             "--server-memory-limit", memory_limit],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent() if sys.platform == "linux" else None)
        try:
            deadline = time.monotonic() + start_timeout_s
            while not (_listening(local, port) and _listening(local, grpc_port)):
                if self._proc.poll() is not None:
                    raise ViewerError(f"the viewer's server exited ({self._proc.returncode}): "
                                      f"{self._last_line()}")
                if time.monotonic() > deadline:
                    raise ViewerError(f"the viewer's server did not listen on ports {port} and "
                                      f"{grpc_port} within {start_timeout_s:.0f} s: "
                                      f"{self._last_line()}")
                time.sleep(0.1)
            self.recording = rr.RecordingStream(application_id)
            self.recording.connect_grpc(grpc_url)
        except BaseException:
            self.close()
            raise
        self._classes: dict[str, tuple[str, ...]] = {}

    def __repr__(self) -> str:
        return f"Viewer({self.url!r})"

    def _last_line(self) -> str:
        self._log.seek(0)
        lines = [x for x in self._log.read().decode(errors="replace").splitlines() if x.strip()]
        return lines[-1].strip() if lines else "no output"

    def log(self, result: Any) -> None:
        """Show one `StreamResult` (anything with its fields: source, frame, captured,
        stamp_ns, image (H, W, 3) uint8, prediction.labels (H, W) int with -1 = background,
        prediction.class_names, latency_ms, dropped)."""
        from .overlay import palette

        rr, rec, src = self._rr, self.recording, result.source
        rec.set_time("frame", sequence=int(result.frame))
        rec.set_time("capture", timestamp=float(result.captured))
        if getattr(result, "stamp_ns", None) is not None:
            rec.set_time("stamp", timestamp=result.stamp_ns / 1e9)
        names = tuple(result.prediction.class_names)
        if self._classes.get(src) != names:
            # Segmentation ids are unsigned: 0 is the background (transparent), class i is i + 1,
            # in the overlay videos' colours.
            colours = palette(len(names))
            rec.log(src, rr.AnnotationContext(
                [(0, "background", (0, 0, 0, 0))]
                + [(i + 1, n, tuple(int(v) for v in colours[i])) for i, n in enumerate(names)]),
                static=True)
            self._classes[src] = names
        labels = np.asarray(result.prediction.labels)
        rec.log(f"{src}/image", rr.Image(result.image))
        rec.log(f"{src}/image/labels", rr.SegmentationImage((labels + 1).astype(np.uint16)))
        rec.log(f"{src}/latency_ms", rr.Scalars(float(result.latency_ms)))
        rec.log(f"{src}/dropped", rr.Scalars(float(result.dropped)))

    def wait(self) -> None:
        """Block until Ctrl-C (returns) or the server exits: keeps the page up after a finite
        source ended."""
        try:
            while self._proc is not None and self._proc.poll() is None:
                time.sleep(0.2)
        except KeyboardInterrupt:
            pass

    def close(self) -> None:
        """Send what is buffered, stop the server. Idempotent."""
        rec = getattr(self, "recording", None)
        if rec is not None:
            try:
                rec.flush()
                rec.disconnect()
            except Exception:  # noqa: BLE001: a server already gone must not fail the close
                pass
            self.recording = None
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._log.close()

    def __enter__(self) -> "Viewer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
