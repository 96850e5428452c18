"""The HTTP front of `partclipseg serve`: every HTTP request is checked here before Triton sees it.

Why a front: Triton 2.51's HTTP server reads tensor `data` given as JSON into a buffer of the
size the request *declares*, before it compares that with the data sent. A 60-byte JSON body
declaring `image` [1, 100000, 100000, 3] made it allocate 30 GB and abort (`std::bad_alloc`),
taking every client down; 2.51 has no option that bounds this (`--http-max-input-size` came
later). So `partclipseg serve` runs Triton's HTTP endpoint on a private loopback port and puts
this server on the public one. For an inference request (POST .../infer) it reads the JSON
part (at most MAX_JSON_BYTES) and refuses, with 400 and a reason, anything whose declared
tensors do not fit what was sent: a body that is not JSON, no inputs, a shape that is not a
list of integers >= 1, JSON data with another element count than the shape's, binary sizes
that do not add up. Bodies over the size the options allow get 413, chunked bodies 411. What
passes is forwarded as it came (the binary part streamed, not buffered), and so is every other
path (health, metadata, metrics stay on their own port). Triton's own refusals (wrong dtype,
channels, unknown input) pass back unchanged, 400.

Each refused request is one log line on the `runtime.serve` logger: the client's address, the
request id when the body has one, the status and the reason. gRPC does not come through here:
Triton's gRPC path checks the declared size against the bytes sent before it allocates
(tested), and its messages are capped at 2 GiB by Triton.

The front is a `ThreadingHTTPServer` (a thread per connection, at most MAX_CONNECTIONS; idle
connections close after IDLE_TIMEOUT_S); each connection keeps its own connection to Triton.
"""

from __future__ import annotations

import http.client
import json
import logging
import math
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["HttpFront", "RequestRefused", "check_infer_json", "MAX_JSON_BYTES",
           "MAX_CONNECTIONS", "one_line"]

log = logging.getLogger("runtime.serve")

MAX_JSON_BYTES = 8 << 20  # the JSON part of a request: a 640 x 480 frame as JSON text fits
MAX_CONNECTIONS = 512  # open client connections (a thread each); more are closed at once
IDLE_TIMEOUT_S = 120.0  # a client connection that sends nothing for this long is closed
UPSTREAM_TIMEOUT_S = 600.0  # a request Triton takes longer than this to answer fails (504)
CHUNK = 1 << 20
LINGER_S, LINGER_BYTES = 2.0, 64 << 20  # what a refused client may still send us (see _linger)
MAX_REASON_CHARS = 500  # a log line's reason; a reason quotes client text, which can be long
INFER_PATH = re.compile(r"^/v2/models/[^/?]+(/versions/[^/?]+)?/infer/?(\?.*)?$")
# Headers that describe one hop, not the request: the front sets its own.
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te",
              "trailer", "upgrade", "content-length", "host", "expect"}
ITEM_BYTES = {"BOOL": 1, "UINT8": 1, "INT8": 1, "UINT16": 2, "INT16": 2, "FP16": 2, "BF16": 2,
              "UINT32": 4, "INT32": 4, "FP32": 4, "UINT64": 8, "INT64": 8, "FP64": 8}


class RequestRefused(Exception):
    """A request the front answers itself: HTTP `status` with `reason`."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


def one_line(text: str, limit: int = MAX_REASON_CHARS) -> str:
    """`text` as one log line: line breaks escaped (a reason can quote client text), cut at
    `limit` characters."""
    text = text.replace("\r", "\\r").replace("\n", "\\n")
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} chars)"


def _count_leaves(data: Any, stop: int) -> int:
    """Scalars in nested JSON lists (iterative: no recursion limit); stops counting past `stop`."""
    n, stack = 0, [data]
    while stack and n <= stop:
        x = stack.pop()
        if isinstance(x, list):
            stack.extend(x)
        else:
            n += 1
    return n


def check_infer_json(head: bytes, binary_bytes: int | None) -> str | None:
    """Check the JSON part of an inference request; its request id (None without one).

    head: the JSON bytes; binary_bytes: the length of the binary part after it (None for a
    body that is all JSON). Raises RequestRefused(400, reason) for a request whose declared
    tensors do not match what was sent: what Triton 2.51 would otherwise allocate first.
    """
    try:
        request = json.loads(head)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise RequestRefused(400, f"the request is not JSON ({one_line(str(e), 120)}): send "
                             "the KServe v2 inference protocol, as tritonclient does") from None
    if not isinstance(request, dict):
        raise RequestRefused(400, "the request must be a JSON object with \"inputs\"")
    rid = request.get("id")
    rid = one_line(rid, 100) if isinstance(rid, str) and rid else None
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise RequestRefused(400, "the request has no inputs: send {\"inputs\": [{\"name\": "
                             "\"image\", \"shape\": [1, H, W, 3], \"datatype\": \"UINT8\", ...}]}")
    declared = 0
    for x in inputs:
        if not isinstance(x, dict) or not isinstance(x.get("name"), str):
            raise RequestRefused(400, "each input must be a JSON object with a \"name\"")
        name, shape, dtype = x["name"], x.get("shape"), x.get("datatype")
        what = f"input {one_line(name, 60)!r}"
        if not isinstance(shape, list) or not all(
                isinstance(d, int) and not isinstance(d, bool) for d in shape):
            raise RequestRefused(400, f"{what}: \"shape\" must be a list of integers, got "
                                 f"{one_line(json.dumps(shape), 80)}")
        if any(d < 1 for d in shape):
            raise RequestRefused(400, f"{what}: shape {shape} has a dimension below 1: every "
                                 "dimension must be at least 1")
        elements = math.prod(shape)
        params = x.get("parameters", {})
        if not isinstance(params, dict):
            raise RequestRefused(400, f"{what}: \"parameters\" must be a JSON object")
        size = params.get("binary_data_size")
        if "data" in x:
            if size is not None:
                raise RequestRefused(400, f"{what}: has both \"data\" and binary_data_size")
            held = _count_leaves(x["data"], elements)
            if held != elements:
                holds = f"more than {elements}" if held > elements else str(held)
                raise RequestRefused(400, f"{what}: shape {shape} declares {elements} elements, "
                                     f"its data holds {holds}")
        elif size is not None:
            if binary_bytes is None:
                raise RequestRefused(400, f"{what}: binary_data_size without the "
                                     "Inference-Header-Content-Length header")
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise RequestRefused(400, f"{what}: binary_data_size must be an integer >= 0")
            item = ITEM_BYTES.get(dtype) if isinstance(dtype, str) else None
            # BYTES: each element is a 4-byte length, then its bytes.
            if (item is not None and elements * item != size) or (
                    dtype == "BYTES" and elements * 4 > size):
                raise RequestRefused(400, f"{what}: shape {shape} of {dtype} does not fit its "
                                     f"{size} bytes of binary data")
            declared += size
        # Neither: a shared-memory input (registration is token-protected) or none: Triton's.
    if binary_bytes is not None and declared != binary_bytes:
        raise RequestRefused(400, f"the inputs declare {declared} bytes of binary data, the "
                             f"body carries {binary_bytes}")
    return rid


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: tritonclient reuses its connections
    timeout = IDLE_TIMEOUT_S
    server: "_Server"

    def setup(self) -> None:
        super().setup()
        self._upstream: http.client.HTTPConnection | None = None

    def finish(self) -> None:
        if self._upstream is not None:
            self._upstream.close()
        super().finish()

    # BaseHTTPRequestHandler logs every request to stderr: an access log nobody asked for.
    def log_message(self, format: str, *args: Any) -> None:
        pass

    def log_error(self, format: str, *args: Any) -> None:
        # send_error's one line: a request line or headers http.server could not parse.
        self._refused(one_line(format % args), None)

    def _refused(self, reason: str, rid: str | None) -> None:
        host, port = self.client_address[:2]
        log.warning("refused a request from %s:%s%s: %s", host, port,
                    f" (id {rid!r})" if rid else "", one_line(reason))

    def do_GET(self) -> None:
        self._forward()

    do_POST = do_PUT = do_DELETE = do_HEAD = do_OPTIONS = do_PATCH = do_GET

    def _answer(self, status: int, reason: str, close: bool = False) -> None:
        body = json.dumps({"error": reason}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        if close:
            self._linger()

    def _linger(self) -> None:
        """Let a client still sending the body we refused read our answer: closing a socket
        with unread data resets it, and the client sees a broken pipe instead of the reason.
        So: flush, stop writing, read and drop what still comes (at most LINGER_S and
        LINGER_BYTES), then close."""
        try:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_WR)
            self.connection.settimeout(LINGER_S)
            left = LINGER_BYTES
            while left > 0 and (chunk := self.connection.recv(min(CHUNK, left))):
                left -= len(chunk)
        except OSError:
            pass

    def _forward(self) -> None:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self._refused("a chunked body", None)
            return self._answer(411, "send the body with a Content-Length, not chunked",
                                close=True)
        try:
            length = int(self.headers.get("Content-Length", "0"))
            if length < 0:
                raise ValueError
        except ValueError:
            self._refused("a bad Content-Length", None)
            return self._answer(400, "Content-Length must be an integer >= 0", close=True)
        if length > self.server.max_body_bytes:
            reason = (f"the body is {length} bytes, over this server's {self.server.max_body_bytes}"
                      " (--max-batch frames of --max-image-side): send smaller frames")
            self._refused(reason, None)
            return self._answer(413, reason, close=True)
        head, rid = b"", None
        if self.command == "POST" and INFER_PATH.match(self.path):
            try:
                head, rid = self._check_infer(length)
            except RequestRefused as e:
                self._refused(f"{e.status} {e.reason}", rid)
                return self._answer(e.status, e.reason, close=True)
            except OSError:  # the client went away, or was idle past the timeout
                self.close_connection = True
                return None
        self._relay(head, length - len(head), rid)

    def _check_infer(self, length: int) -> tuple[bytes, str | None]:
        """The JSON part of an inference request, read and checked, and its id."""
        header = self.headers.get("Inference-Header-Content-Length")
        if header is None:
            if length > MAX_JSON_BYTES:
                raise RequestRefused(413, f"a JSON body is at most {MAX_JSON_BYTES} bytes, this "
                                     f"one is {length}: send tensors as binary data (tritonclient "
                                     "does by default)")
            json_len = length
        else:
            try:
                json_len = int(header)
            except ValueError:
                json_len = -1
            if not 0 < json_len <= min(length, MAX_JSON_BYTES):
                raise RequestRefused(400, f"Inference-Header-Content-Length {one_line(header, 40)}"
                                     f" must be between 1 and the body's length ({length}) and"
                                     f" at most {MAX_JSON_BYTES}")
        head = self.rfile.read(json_len)
        if len(head) < json_len:
            raise OSError("the client closed the connection mid-body")
        return head, check_infer_json(head, None if header is None else length - json_len)

    def _relay(self, head: bytes, rest: int, rid: str | None) -> None:
        """Send the request to Triton (`head` already read, `rest` bytes still to come from
        the client) and its answer back."""
        headers = [(k, v) for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP]
        try:
            up = self._upstream_connection()
            up.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            up.putheader("Host", f"127.0.0.1:{self.server.upstream_port}")
            for k, v in headers:
                up.putheader(k, v)
            up.putheader("Content-Length", str(len(head) + rest))
            up.endheaders(head or None)
            while rest > 0:
                chunk = self.rfile.read(min(CHUNK, rest))
                if not chunk:
                    raise ConnectionAbortedError("the client closed the connection mid-body")
                up.send(chunk)
                rest -= len(chunk)
            response = up.getresponse()
        except ConnectionAbortedError:
            self._drop_upstream()
            self.close_connection = True
            return
        except (OSError, http.client.HTTPException) as e:
            self._drop_upstream()
            if isinstance(e, socket.timeout):
                return self._answer(504, "the inference server did not answer in time",
                                    close=True)
            # Triton is gone (it died, or is stopping): not ready, and every request says so.
            return self._answer(503, "the inference server is not running", close=True)
        self._send_back(response, rid)

    def _send_back(self, response: http.client.HTTPResponse, rid: str | None) -> None:
        length = response.getheader("Content-Length")
        body = None
        if length is None or (400 <= response.status < 500 and int(length) <= 1 << 16):
            body = response.read()  # small, or of unknown length: whole
            if 400 <= response.status < 500 and INFER_PATH.match(self.path):
                self._refused(f"{response.status} {_error_text(body)}", rid)
        self.send_response(response.status, response.reason)
        for k, v in response.getheaders():
            if k.lower() not in HOP_BY_HOP:
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(body) if body is not None else length))
        self.end_headers()
        if body is not None:
            self.wfile.write(body)
            return
        while chunk := response.read(CHUNK):
            self.wfile.write(chunk)

    def _upstream_connection(self) -> http.client.HTTPConnection:
        if self._upstream is None:
            self._upstream = http.client.HTTPConnection("127.0.0.1", self.server.upstream_port,
                                                        timeout=UPSTREAM_TIMEOUT_S)
        return self._upstream

    def _drop_upstream(self) -> None:
        if self._upstream is not None:
            self._upstream.close()
            self._upstream = None


def _error_text(body: bytes) -> str:
    try:
        return str(json.loads(body)["error"])
    except (ValueError, KeyError, TypeError):
        return body[:200].decode("utf-8", "replace")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], upstream_port: int, max_body_bytes: int):
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.upstream_port, self.max_body_bytes = upstream_port, max_body_bytes
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        # A thread per connection, bounded: past MAX_CONNECTIONS a new one is closed at once
        # (the clients retry) rather than the process running out of threads.
        if not self._slots.acquire(blocking=False):
            log.warning("refused a connection from %s:%s: %d connections are open",
                        *client_address[:2], MAX_CONNECTIONS)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        import sys

        e = sys.exc_info()[1]
        if isinstance(e, OSError):  # a client that reset or timed out: not our bug
            return
        super().handle_error(request, client_address)  # our bug: the traceback


class HttpFront:
    """The checking front on `address`:`port`, forwarding to Triton's HTTP on 127.0.0.1:
    `upstream_port`. start() serves from a thread; close() stops listening."""

    def __init__(self, address: str, port: int, upstream_port: int, max_body_bytes: int):
        self._server = _Server((address, port), upstream_port, max_body_bytes)
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> "HttpFront":
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={
            "poll_interval": 0.2}, name="http-front", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(5)
        self._server.server_close()
