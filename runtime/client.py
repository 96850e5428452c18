"""`SegmentationClient`: one camera's side of `partclipseg serve`, over Triton's HTTP or gRPC.

    from runtime.client import SegmentationClient
    with SegmentationClient("127.0.0.1:8001", protocol="grpc") as client:
        labels, class_names = client.predict(frame)                      # the bundle's classes
        labels, class_names = client.predict(frame, ["dog's head", "dog's leg"])

Needs `tritonclient[http,grpc]` and numpy (`pip install partclipseg-deploy[serve]`); no torch,
no bundle. Not thread-safe (tritonclient's HTTP client is not): give each thread its own
client, as the tests and the benchmark do.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from .errors import UserError
from .serve import CLASS_NAMES, CLASSES, ERROR, IMAGE, LABELS, MODEL_NAME

__all__ = ["SegmentationClient", "ServerError", "PROTOCOLS"]

PROTOCOLS = ("http", "grpc")


class ServerError(UserError):
    """The server refused a request (a bad image or class name) or could not be reached.

    message: the server's reason, one line (a Triton error's text, or the model's `error`
        output for a request the model refused); detail: the whole text it sent.
    """

    def __init__(self, message: str, detail: str = ""):
        super().__init__(message)
        self.detail = detail or message


class SegmentationClient:
    """Requests to a `partclipseg serve` model over HTTP ("host:8000") or gRPC ("host:8001").

    timeout_s: per-request network timeout (HTTP: connection and read; gRPC: the deadline).
    """

    def __init__(self, url: str, protocol: str = "http", model: str = MODEL_NAME,
                 timeout_s: float = 60.0):
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
        try:
            if protocol == "http":
                import tritonclient.http as tc
            else:
                import tritonclient.grpc as tc
        except ImportError as e:
            raise ImportError(f"SegmentationClient needs tritonclient: pip install "
                              f"'tritonclient[http,grpc]' ({e})") from e
        self.url, self.protocol, self.model, self.timeout_s = url, protocol, model, timeout_s
        self._tc = tc
        if protocol == "http":
            self._client = tc.InferenceServerClient(url, connection_timeout=timeout_s,
                                                    network_timeout=timeout_s)
        else:
            self._client = tc.InferenceServerClient(url)

    def __repr__(self) -> str:
        return f"SegmentationClient({self.url!r}, protocol={self.protocol!r})"

    def __enter__(self) -> "SegmentationClient":
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()

    def close(self) -> None:
        self._client.close()

    def _deadline(self) -> dict[str, float]:
        # gRPC calls have no deadline unless given one; the HTTP client's timeouts are set
        # once, in its constructor.
        return {"client_timeout": self.timeout_s} if self.protocol == "grpc" else {}

    def live(self) -> bool:
        """Triton's liveness (`/v2/health/live`)."""
        return bool(self._call(self._client.is_server_live, **self._deadline()))

    def ready(self) -> bool:
        """Triton and the model ready (`/v2/health/ready` and the model's ready endpoint)."""
        return bool(self._call(self._client.is_server_ready, **self._deadline())
                    and self._call(self._client.is_model_ready, self.model,
                                   **self._deadline()))

    def predict(self, image: np.ndarray, classes: Sequence[str] | None = None
                ) -> tuple[np.ndarray, tuple[str, ...]]:
        """Segment one (H, W, 3) uint8 RGB frame.

        classes: "object's part" names to predict over (default: the server bundle's).
        Returns labels (H, W) int32 (an index into class_names, -1 = background) and the
        class names. Raises ServerError with the server's reason when it refuses the request.
        The image is sent as it is (any dtype or shape): checking it is the server's job.
        """
        image = np.asarray(image)
        inputs = [self._input(IMAGE, image[None])]
        if classes is not None:
            names = np.array([[c.encode("utf-8") for c in classes]], dtype=np.object_)
            inputs.append(self._input(CLASSES, names))
        outputs = [self._tc.InferRequestedOutput(name) for name in (LABELS, CLASS_NAMES, ERROR)]
        result = self._call(self._client.infer, self.model, inputs, outputs=outputs,
                            **self._deadline())
        # The model refuses a request (a bad class name, an oversized frame) by answering it
        # with its reason in `error`, not with a Triton error: PyTriton would fail every
        # request batched with it (runtime.serve).
        error = result.as_numpy(ERROR)
        if error is None:
            raise ServerError(f"{self.url}: the answer has no {ERROR!r} output: is this a "
                              "partclipseg serve of this version?")
        reason = error.reshape(-1)[0] if error.size else b""
        if reason:
            text = reason.decode("utf-8", "replace") if isinstance(reason, bytes) else str(reason)
            raise ServerError(text)
        labels = result.as_numpy(LABELS)[0]
        names = tuple(n.decode("utf-8") if isinstance(n, bytes) else str(n)
                      for n in result.as_numpy(CLASS_NAMES)[0])
        return labels, names

    def _input(self, name: str, array: np.ndarray) -> Any:
        from tritonclient.utils import np_to_triton_dtype

        dtype = "BYTES" if array.dtype == np.object_ else np_to_triton_dtype(array.dtype)
        if dtype is None:
            raise ValueError(f"{name}: numpy dtype {array.dtype} has no Triton type")
        x = self._tc.InferInput(name, list(array.shape), dtype)
        x.set_data_from_numpy(array)
        return x

    def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        from http.client import HTTPException

        from tritonclient.utils import InferenceServerException

        try:
            return fn(*args, **kwargs)
        except InferenceServerException as e:
            text = e.message() or str(e)
            raise ServerError(_reason(text), text) from None
        except (OSError, HTTPException) as e:  # HTTP: refused, reset, closed mid-answer
            raise ServerError(f"{self.url} ({self.protocol}): {type(e).__name__}: {e}") from e


def _reason(text: str) -> str:
    """PyTriton's error text is the model's traceback, then Triton's "At:" trailer: the last
    line before it, less the exception's module path, is the reason ("InputError: image is
    5000 x 8, over ..."). Triton's own refusals are one line already."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    if "At:" in lines:
        lines = lines[:lines.index("At:")]
    if not lines:
        return "the server gave no reason"
    last = lines[-1]
    head, sep, rest = last.partition(": ")
    if sep and "." in head and " " not in head:  # "runtime.preprocess.InputError: ..."
        last = f"{head.rsplit('.', 1)[1]}: {rest}"
    return last
