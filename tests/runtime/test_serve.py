"""`partclipseg serve`: the bundle behind Triton Inference Server (PyTriton), on loopback ports.

In process, no Triton (numpy only): `SegmentationModel`, the inference callable, groups a batch
by image size and class list and answers like `Segmenter.predict`; a request it refuses gets its
reason in the `error` output and fails alone. The HTTP front's check of a body's declarations.
The command line: flags, port checks, the library path fix.

One server (`python -m runtime.serve` in a subprocess, the micro bundle) for the rest, skipped
with the reason when PyTriton is not installed: 8 concurrent clients over HTTP and gRPC get
the in-process labels, malformed requests among them get errors naming the problem while the
others succeed; a client whose every request is refused, batched with good ones, fails only
itself; malformed raw HTTP bodies (the one that aborted Triton 2.51 among them) and tritonclient
requests are refused and the next request is answered; each refused request is at most one log
line; health, readiness and metrics answer; SIGTERM answers the requests in flight, then exits 0
(that test stops the server). A second server is SIGKILLed under the serve command, which exits
non-zero naming it.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest

from runtime.serve import SegmentationModel, build_parser, check_port_free, python_library_env
from runtime.serve_http import RequestRefused, check_infer_json

ROOT = Path(__file__).resolve().parents[2]
MAX_SIDE = 2048  # the test server's --max-image-side


def _images(seed: int, shape: tuple[int, int], n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (*shape, 3), dtype=np.uint8) for _ in range(n)]


def _request(images: list[np.ndarray], classes: list[str] | None = None) -> dict[str, Any]:
    """A request as PyTriton hands it to the callable: batch dimension first, BYTES as object."""
    r: dict[str, Any] = {"image": np.stack(images)}
    if classes is not None:
        r["classes"] = np.array([[c.encode() for c in classes]] * len(images), dtype=object)
    return r


# -- in process ------------------------------------------------------------------------------------
def test_the_callable_groups_by_size_and_classes_and_answers_like_predict(micro_seg):
    model = SegmentationModel(micro_seg)
    names = list(micro_seg.vocabulary.class_names[:3])
    new = ["cat's tail", "robot's wheel"]  # outside the bundle: its text side encodes them
    reqs = [(_images(0, (40, 56), 2), None), (_images(1, (40, 56), 1), names),
            (_images(2, (33, 20), 3), None), (_images(3, (40, 56), 1), new)]
    out = model([_request(im, cl) for im, cl in reqs])
    assert len(out) == len(reqs)
    for (images, classes), response in zip(reqs, out):
        assert response["labels"].dtype == np.int32
        assert response["labels"].shape == (len(images), *images[0].shape[:2])
        for j, image in enumerate(images):
            ref = micro_seg.predict(image, classes=classes)
            np.testing.assert_array_equal(response["labels"][j], ref.labels)
            assert tuple(n.decode() for n in response["class_names"][j]) == ref.class_names


def test_a_refused_request_fails_alone_and_the_rest_of_its_batch_is_answered(micro_seg):
    """One batch: good requests (with and without classes) beside requests this model refuses.
    Nothing raises (PyTriton would fail the whole batch); each refused request gets its reason
    in `error` and placeholders, each good one the labels `predict` gives it alone."""
    model = SegmentationModel(micro_seg, max_image_side=64, max_classes=3)
    names = list(micro_seg.vocabulary.class_names[:2])
    reqs = [(_images(0, (40, 40), 2), None, None),
            (_images(1, (40, 40), 1), ["nocls", "cat's tail"], r"classes: 'nocls' names no part"),
            (_images(2, (40, 40), 1), names, None),
            (_images(3, (65, 8), 1), None, r"image is 65 x 8, over the server's --max-image-side"),
            (_images(4, (40, 40), 1), ["a's b", "a's b"], "duplicate class names"),
            (_images(5, (40, 40), 1), ["a's b"] * 4, "4 names, over the server's --max-classes 3"),
            (_images(6, (40, 40), 1), ["cat's " + "x" * 300], "a name of 306 characters"),
            (_images(7, (40, 40), 1), ["cat's tail"], None)]
    requests = [_request(im, cl) for im, cl, _ in reqs]
    requests.insert(3, {"image": np.zeros((1, 8, 8), np.uint8)})  # Triton's check, again here
    reqs.insert(3, (None, None, r"\(H, W, 3\) per row, got \(8, 8\)"))
    out = model(requests)
    assert len(out) == len(reqs)
    for (images, classes, refused), response in zip(reqs, out):
        error = response["error"]
        n = 1 if images is None else len(images)
        assert error.shape == (n, 1)
        if refused:
            assert re.search(refused, error[0, 0].decode()), error
            assert response["labels"].shape == (n, 1, 1) and (response["labels"] == -1).all()
            assert response["class_names"].tolist() == [[b""]] * n
            continue
        assert error.tolist() == [[b""]] * n
        for j, image in enumerate(images):
            ref = micro_seg.predict(image, classes=classes)
            np.testing.assert_array_equal(response["labels"][j], ref.labels)
            assert tuple(x.decode() for x in response["class_names"][j]) == ref.class_names


def _infer_json(*inputs: dict[str, Any], **extra: Any) -> bytes:
    return json.dumps({"inputs": list(inputs), **extra}).encode()


def test_the_http_front_refuses_declarations_the_body_does_not_carry():
    """`check_infer_json` reads only the JSON part: what Triton 2.51 would allocate from a
    declaration is compared with what was sent."""
    image = {"name": "image", "shape": [1, 2, 2, 3], "datatype": "UINT8", "data": [7] * 12}
    assert check_infer_json(_infer_json(image, id="cam-3"), None) == "cam-3"
    binary = {"name": "image", "shape": [1, 2, 2, 3], "datatype": "UINT8",
              "parameters": {"binary_data_size": 12}}
    names = {"name": "classes", "shape": [1, 2], "datatype": "BYTES",
             "parameters": {"binary_data_size": 20}}
    assert check_infer_json(_infer_json(binary, names), 32) is None
    huge = dict(image, shape=[1, 100000, 100000, 3], data=[1, 2, 3])
    cases = [(b"hello{", None, "not JSON"), (b"[1, 2]", None, "JSON object"),
             (_infer_json(), None, "no inputs"), (b"{}", None, "no inputs"),
             (_infer_json(huge), None, r"declares 30000000000 elements, its data holds 3"),
             (_infer_json(dict(image, data=[7] * 13)), None, "holds more than 12"),
             (_infer_json(dict(image, shape=[1, -2, 2, 3])), None, "dimension below 1"),
             (_infer_json(dict(image, shape=[1, 0, 2, 3], data=[])), None, "dimension below 1"),
             (_infer_json(dict(image, shape="1x2")), None, "list of integers"),
             (_infer_json(dict(image, shape=[1, 2.0, 2, 3])), None, "list of integers"),
             (_infer_json(dict(binary, shape=[1, 100000, 100000, 3])), 12, "does not fit its 12"),
             (_infer_json(binary), None, "without the Inference-Header-Content-Length"),
             (_infer_json(binary, names), 31, "declare 32 bytes of binary data, the body carries"),
             (_infer_json(dict(names, shape=[1, 10 ** 11])), 20, "does not fit"),
             (b"[" * 100000, None, "not JSON")]  # nested past Python's recursion limit
    for body, binary_bytes, reason in cases:
        with pytest.raises(RequestRefused, match=reason) as e:
            check_infer_json(body, binary_bytes)
        assert e.value.status == 400


def test_python_library_env_puts_the_interpreters_libdir_first(monkeypatch):
    import sysconfig

    libdir = sysconfig.get_config_var("LIBDIR")
    if not libdir or not os.path.isdir(libdir):
        pytest.skip(f"this interpreter has no library folder ({libdir!r})")
    env = python_library_env({"LD_LIBRARY_PATH": f"/x/lib:{libdir}:/y", "PATH": "/bin"})
    assert env["LD_LIBRARY_PATH"] == f"{libdir}:/x/lib:/y"  # first, and once
    assert env["PATH"] == "/bin"
    assert python_library_env({})["LD_LIBRARY_PATH"] == libdir


def test_cli_flags_and_a_busy_port_is_one_line_exit_2(tmp_path, capsys):
    from partclipseg.cli import main

    a = build_parser().parse_args(["--bundle", "b", "--max-batch", "4", "--instances", "2",
                                   "--max-queue-delay-us", "0", "--backend", "onnxruntime",
                                   "--max-classes", "9"])
    assert (a.address, a.http_port, a.grpc_port, a.metrics_port) == ("127.0.0.1", 8000, 8001,
                                                                      8002)
    assert (a.max_batch, a.instances, a.max_queue_delay_us, a.max_classes) == (4, 2, 0, 9)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--bundle", "b", "--http-port", "70000"])
    capsys.readouterr()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(OSError, match=f"--grpc-port {port}: cannot listen"):
            check_port_free("127.0.0.1", port, "--grpc-port")
        pytest.importorskip("pytriton", reason="the serve command checks for PyTriton first")
        rc = main(["serve", "--bundle", str(tmp_path), "--http-port", str(port)])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and f"--http-port {port}: cannot listen" in err


# -- one server, in a subprocess ----------------------------------------------------------------
@pytest.fixture(scope="module")
def server(micro_bundle, tmp_path_factory) -> Iterator[Any]:
    pytest.importorskip("pytriton", reason="needs the [serve] extra (nvidia-pytriton)")
    pytest.importorskip("tritonclient.grpc", reason="needs tritonclient[http,grpc]")
    from benchmarks.serving import start_server

    log = tmp_path_factory.mktemp("serve") / "server.log"
    with start_server(micro_bundle, ["--backend", "onnxruntime", "--max-batch", "8",
                                     "--max-queue-delay-us", "2000", "--max-image-side",
                                     str(MAX_SIDE)], log) as srv:
        yield srv


def settled(server: Any, name: str, want: float, reason: str | None = None) -> float:
    """Metric `name` once it reaches `want` (or after 10 s): Triton counts a request once its
    response is out, so the counters may lag the answer."""
    deadline = time.monotonic() + 10
    while (value := server.metric(name, reason)) < want and time.monotonic() < deadline:
        time.sleep(0.05)
    return value


def test_health_and_readiness_answer_on_both_protocols(server):
    from runtime.client import SegmentationClient

    for url, protocol in ((server.http, "http"), (server.grpc, "grpc")):
        with SegmentationClient(url, protocol) as client:
            assert client.live() and client.ready()
    with SegmentationClient(server.http, "http", model="no-such-model") as client:
        assert client.live() and not client.ready()  # readiness is per model, not a constant


def test_eight_concurrent_clients_get_in_process_labels_and_errors_name_the_problem(
        server, micro_bundle):
    """8 threads, HTTP and gRPC alternating, each a stream of good frames (three sizes, with and
    without classes, a new name) with the four kinds of malformed request among them."""
    from runtime import Segmenter
    from runtime.client import SegmentationClient, ServerError

    ref_seg = Segmenter.load(micro_bundle, backend="onnxruntime")  # the server's settings
    names = list(ref_seg.vocabulary.class_names[:3])
    good = [(_images(10, (48, 64), 1)[0], None), (_images(11, (48, 64), 1)[0], names),
            (_images(12, (64, 64), 1)[0], None), (_images(13, (30, 50), 1)[0],
                                                   ["cat's tail", "robot's wheel", names[0]])]
    want = {i: ref_seg.predict(im, classes=cl) for i, (im, cl) in enumerate(good)}
    # Triton refuses the dtype and rank before batching; the model answers the bad class list
    # and the oversized frame with their reasons in `error` (they count as Triton successes).
    bad = [(np.zeros((20, 20, 3), np.float32), None, "FP32.*expects 'UINT8'"),
           (np.zeros((20, 20), np.uint8), None, r"unexpected shape for input 'image'"),
           (_images(14, (21, 23), 1)[0], ["nocls"], r"classes: 'nocls' names no part"),
           (np.zeros((MAX_SIDE + 1, 8, 3), np.uint8), None, f"over the server's "
            f"--max-image-side {MAX_SIDE}")]
    success_before = server.metric("nv_inference_request_success")
    results: dict[tuple[int, int], Any] = {}

    def client_thread(k: int) -> None:
        protocol = "http" if k % 2 == 0 else "grpc"
        with SegmentationClient(server.http if protocol == "http" else server.grpc,
                                protocol) as client:
            for step in range(6):
                try:
                    if step == 3:  # one malformed request per thread, mid-stream
                        image, classes, _ = bad[k % len(bad)]
                    else:
                        image, classes = good[(k + step) % len(good)]
                    results[k, step] = client.predict(image, classes)
                except Exception as e:  # noqa: BLE001 - every outcome is checked below
                    results[k, step] = e

    threads = [threading.Thread(target=client_thread, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a client hung"
    assert len(results) == 8 * 6
    for (k, step), got in sorted(results.items()):
        if step == 3:
            _, _, pattern = bad[k % len(bad)]
            assert isinstance(got, ServerError), f"client {k}: malformed request answered {got}"
            assert re.search(pattern, str(got)), f"client {k}: {got}"
        else:
            assert not isinstance(got, Exception), f"client {k} step {step}: {got!r}"
            ref = want[(k + step) % len(good)]
            labels, class_names = got
            assert class_names == ref.class_names
            assert labels.dtype == np.int32
            np.testing.assert_array_equal(labels, ref.labels)
    model_refused = sum(k % len(bad) >= 2 for k in range(8))
    want_success = success_before + 8 * 5 + model_refused
    assert settled(server, "nv_inference_request_success", want_success) == want_success
    with SegmentationClient(server.grpc, "grpc") as client:  # and it goes on serving
        np.testing.assert_array_equal(client.predict(good[0][0])[0], want[0].labels)


def _failures(server: Any) -> float:
    """nv_inference_request_failure of the model, summed over every reason."""
    import urllib.request

    text = urllib.request.urlopen(f"http://{server.metrics}/metrics", timeout=10).read().decode()
    return sum(float(v) for v in re.findall(
        r'^nv_inference_request_failure\{model="partclipseg",[^}]*\} ([0-9.e+]+)$', text, re.M))


def test_metrics_count_model_refusals_as_answers(server):
    """A request the model refuses is an answer to Triton (its reason travels in `error`), so
    it counts in nv_inference_request_success; one Triton refuses before the model (a wrong
    dtype) counts nowhere in Triton 2.51's model metrics."""
    from runtime.client import SegmentationClient, ServerError

    ok, failed = server.metric("nv_inference_request_success"), _failures(server)
    with SegmentationClient(server.http, "http") as client:
        client.predict(np.zeros((16, 16, 3), np.uint8))
        with pytest.raises(ServerError, match="nocls"):
            client.predict(np.zeros((16, 16, 3), np.uint8), ["nocls"])
        with pytest.raises(ServerError, match="expects 'UINT8'"):
            client.predict(np.zeros((16, 16, 3), np.float32))
        client.predict(np.zeros((16, 16, 3), np.uint8))
    assert settled(server, "nv_inference_request_success", ok + 3) == ok + 3
    assert _failures(server) == failed


def post(url: str, body: bytes, headers: dict[str, str] | None = None,
         path: str = "/v2/models/partclipseg/infer") -> tuple[int, str]:
    """A raw HTTP POST on a fresh connection: (status, body text)."""
    host, port = url.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        headers = headers or {}
        conn.request("POST", path, body=body, headers=headers,
                     encode_chunked="Transfer-Encoding" in headers)
        response = conn.getresponse()
        return response.status, response.read().decode("utf-8", "replace")
    finally:
        conn.close()


GOOD_JSON = _infer_json({"name": "image", "shape": [1, 4, 5, 3], "datatype": "UINT8",
                         "data": list(range(60))})


def malformed_bodies() -> list[tuple[str, bytes, dict[str, str]]]:
    """(what, body, headers): the bodies of issue #31 as a raw HTTP client sends them."""
    image = {"name": "image", "shape": [1, 2, 2, 3], "datatype": "UINT8", "data": [1] * 12}
    header = _infer_json({"name": "image", "shape": [1, 100000, 100000, 3], "datatype": "UINT8",
                          "parameters": {"binary_data_size": 3}})
    return [
        ("[1, 100000, 100000, 3] with 3 bytes (JSON)",
         _infer_json(dict(image, shape=[1, 100000, 100000, 3], data=[1, 2, 3])), {}),
        ("[1, 100000, 100000, 3] with 3 bytes (binary)", header + b"abc",
         {"Inference-Header-Content-Length": str(len(header))}),
        ("not JSON", b"\x00\xffnot json{", {}),
        ("no inputs", b"{}", {}),
        ("empty inputs", _infer_json(), {}),
        ("shape not matching data", _infer_json(dict(image, data=[1, 2, 3])), {}),
        ("negative dimension", _infer_json(dict(image, shape=[1, -2, 2, 3])), {}),
        ("zero dimension", _infer_json(dict(image, shape=[1, 0, 2, 3], data=[])), {}),
        ("huge dimension", _infer_json(dict(image, shape=[1, 2 ** 62, 2, 3])), {}),
        ("wrong channels", _infer_json(dict(image, shape=[1, 2, 3, 2])), {}),
        ("unknown input", _infer_json(image, {"name": "mask", "shape": [1, 1],
                                               "datatype": "UINT8", "data": [1]}), {}),
        ("classes as INT32", _infer_json(image, {"name": "classes", "shape": [1, 1],
                                                  "datatype": "INT32", "data": [3]}), {}),
        ("batch over --max-batch", _infer_json(dict(image, shape=[9, 1, 1, 3], data=[1] * 27)),
         {}),
        ("chunked body", b"", {"Transfer-Encoding": "chunked"}),
    ]


def test_malformed_http_bodies_are_refused_and_the_next_request_is_answered(server):
    """Each body of issue #31, raw: a 4xx naming the problem, and a good request right after
    is answered (the JSON body declaring 30 GB aborted Triton 2.51 before the HTTP front)."""
    assert post(server.http, GOOD_JSON)[0] == 200
    for what, body, headers in malformed_bodies():
        if what == "chunked body":  # http.client frames it: a one-chunk body
            status, text = post(server.http, iter([GOOD_JSON]), headers)
        else:
            status, text = post(server.http, body, headers)
        assert 400 <= status < 500, f"{what}: {status} {text}"
        assert "error" in json.loads(text), f"{what}: {text}"
        status, text = post(server.http, GOOD_JSON)
        assert status == 200 and json.loads(text)["outputs"], f"after {what}: {status} {text}"
    assert server.process.poll() is None


def test_malformed_tritonclient_requests_are_refused_on_both_protocols(server):
    from runtime.client import SegmentationClient, ServerError

    names = [f"cat's part{i}" for i in range(10_000)]
    for url, protocol in ((server.http, "http"), (server.grpc, "grpc")):
        with SegmentationClient(url, protocol) as client:
            c = client._tc
            cases = [
                ([client._input("image", np.zeros((1, 8, 8, 4), np.uint8))], "unexpected shape"),
                ([client._input("image", np.zeros((1, 8, 8, 3), np.uint8)),
                  client._input("classes", np.zeros((1, 2), np.int32))], "expects 'BYTES'"),
                ([client._input("image", np.zeros((1, 8, 8, 3), np.uint8)),
                  client._input("mask", np.zeros((1, 8), np.uint8))], "unexpected inference input"),
            ]
            for inputs, reason in cases:
                with pytest.raises(ServerError, match=reason):
                    client._call(client._client.infer, client.model, inputs,
                                 outputs=[c.InferRequestedOutput("labels")], **client._deadline())
            with pytest.raises(ServerError, match="10000 names, over the server's --max-classes"):
                client.predict(np.zeros((8, 8, 3), np.uint8), names)
            # HTTP: the front refuses it. gRPC: PyTriton's shared-memory copy fails on an empty
            # tensor before the model sees it (docs/serving.md); refused all the same.
            empty = "cannot cast view with zeros" if protocol == "grpc" else "dimension below 1"
            with pytest.raises(ServerError, match=empty):
                client.predict(np.zeros((0, 8, 3), np.uint8))
            assert client.predict(np.zeros((8, 8, 3), np.uint8))[0].shape == (8, 8)


def test_a_client_refused_every_time_fails_only_itself(server, micro_bundle):
    """6 clients send good frames, a 7th the same frame size and class count with one unknown
    name, all at once: Triton batches them together (the mean batch is over 1), and only the
    7th client's requests fail."""
    from runtime import Segmenter
    from runtime.client import SegmentationClient, ServerError

    seg = Segmenter.load(micro_bundle, backend="onnxruntime")
    names = list(seg.vocabulary.class_names[:4])
    frames = _images(30, (32, 32), 6)
    want = [seg.predict(f, classes=names).labels for f in frames]
    bad_names = names[:3] + ["nocls"]
    outcomes: dict[int, list[Any]] = {k: [] for k in range(7)}
    start = threading.Barrier(7)
    inferences, executions = (server.metric("nv_inference_count"),
                              server.metric("nv_inference_exec_count"))

    def client_thread(k: int) -> None:
        with SegmentationClient(server.grpc, "grpc") as client:
            start.wait()
            for _ in range(12):
                try:
                    labels, _ = client.predict(frames[k % 6], bad_names if k == 6 else names)
                    outcomes[k].append(labels)
                except ServerError as e:
                    outcomes[k].append(e)

    threads = [threading.Thread(target=client_thread, args=(k,)) for k in range(7)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    inferences = settled(server, "nv_inference_count", inferences + 7 * 12) - inferences
    executions = server.metric("nv_inference_exec_count") - executions
    assert inferences / executions > 1.0, "no batching: the test shows nothing"
    for k in range(6):
        assert len(outcomes[k]) == 12
        for got in outcomes[k]:
            assert not isinstance(got, Exception), f"client {k}: {got}"
            np.testing.assert_array_equal(got, want[k])
    assert len(outcomes[6]) == 12 and all(
        isinstance(e, ServerError) and "'nocls' names no part" in str(e) for e in outcomes[6])


def _log_lines(server: Any) -> list[str]:
    return server.log.read_text(errors="replace").splitlines()


def test_each_refused_request_is_at_most_one_log_line(server):
    """100 refused requests (the HTTP front's, Triton's, the model's; HTTP and gRPC) add at
    most 100 lines to the server's log, and no traceback."""
    from runtime.client import SegmentationClient, ServerError

    before = len(_log_lines(server))
    bodies = malformed_bodies()
    refused = 0
    with SegmentationClient(server.grpc, "grpc") as grpc_client, \
            SegmentationClient(server.http, "http") as http_client:
        for i in range(100):
            kind = i % 4
            if kind < 2:  # raw HTTP bodies: refused by the front or by Triton
                what, body, headers = bodies[i % len(bodies)]
                if what == "chunked body":
                    body, headers = GOOD_JSON, {"Transfer-Encoding": "chunked"}
                    status, _ = post(server.http, iter([body]), headers)
                else:
                    status, _ = post(server.http, body, headers)
                refused += 400 <= status < 500
                continue
            client = grpc_client if kind == 2 else http_client
            with pytest.raises(ServerError):
                if i % 8 < 4:  # the model refuses it
                    client.predict(np.zeros((8, 8, 3), np.uint8), [f"nocls{i}"])
                else:  # Triton refuses it (gRPC: Triton logs nothing; HTTP: the front does)
                    client.predict(np.zeros((8, 8, 3), np.float32))
            refused += 1
        assert grpc_client.predict(np.zeros((8, 8, 3), np.uint8))[0].shape == (8, 8)
    assert refused == 100
    added = _log_lines(server)[before:]
    assert len(added) <= 100, "\n".join(added[-20:])
    assert not [ln for ln in added if "Traceback" in ln], added
    assert len([ln for ln in added if "refused a request" in ln]) >= 50  # they are logged
    assert any("nocls" in ln for ln in added) and any("from 127.0.0.1:" in ln for ln in added)


def test_sigterm_answers_the_requests_in_flight_then_exits_0(server):
    """Two big frames (~0.5 s each; other sizes, so other batches) and a small one: the first
    runs while the others wait in Triton's queue. Then SIGTERM: all three are answered, and the
    process exits 0. A request still uploading when the signal comes is not in flight (Triton
    closes it), so the test signals only once the queue holds both later requests."""
    from runtime.client import SegmentationClient

    shapes = [(MAX_SIDE, MAX_SIDE), (MAX_SIDE, MAX_SIDE - 2), (64, 48)]
    answers: dict[int, Any] = {}
    threads: list[threading.Thread] = []

    def send(k: int) -> None:
        with SegmentationClient(server.http, "http") as client:
            try:
                answers[k] = client.predict(np.full((*shapes[k], 3), 7 * k, np.uint8))[0]
            except Exception as e:  # noqa: BLE001 - checked below
                answers[k] = e

    def start(k: int) -> None:
        threads.append(threading.Thread(target=send, args=(k,), daemon=True))
        threads[-1].start()

    def start_and_wait_queued(k: int) -> None:
        """Send request k; return once k requests wait (the first one still running)."""
        start(k)
        deadline = time.monotonic() + 30
        while server.metric("nv_inference_pending_request_count") < k:
            assert not answers and time.monotonic() < deadline, \
                f"request {k} not seen waiting behind the first (answers: {list(answers)})"
            time.sleep(0.005)

    start(0)
    start_and_wait_queued(1)  # queued: request 0 holds the one instance, so both arrived
    start_and_wait_queued(2)
    server.process.send_signal(signal.SIGTERM)
    try:
        rc = server.process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the server did not exit within 60 s of SIGTERM:\n{server.output()}")
    assert rc == 0, server.output()
    for t in threads:
        t.join(timeout=30)
    for k in range(3):
        assert isinstance(answers.get(k), np.ndarray), f"request {k}: {answers.get(k)!r}"
        assert answers[k].shape == shapes[k]
    assert "serve: stopped" in server.output()


def test_killing_tritonserver_makes_serve_exit_nonzero_naming_it(micro_bundle, tmp_path):
    """SIGKILL to tritonserver (not our SIGTERM): readiness fails, and the serve command exits
    1 with a line naming the signal, so a supervisor's restart-on-failure restarts it."""
    pytest.importorskip("pytriton", reason="needs the [serve] extra (nvidia-pytriton)")
    pytest.importorskip("tritonclient.grpc", reason="needs tritonclient[http,grpc]")
    from benchmarks.serving import start_server
    from runtime.client import SegmentationClient

    with start_server(micro_bundle, ["--backend", "onnxruntime"], tmp_path / "s.log") as srv:
        children = subprocess.run(["pgrep", "-P", str(srv.process.pid)], capture_output=True,
                                  text=True).stdout.split()
        triton = [int(p) for p in children
                  if Path(f"/proc/{p}/comm").read_text().strip() == "tritonserver"]
        assert len(triton) == 1, children
        os.kill(triton[0], signal.SIGKILL)
        try:
            rc = srv.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"serve outlived tritonserver by 60 s:\n{srv.output()}")
        with SegmentationClient(srv.http, "http", timeout_s=5) as client:
            with pytest.raises(Exception):
                client.ready()
    assert rc == 1, srv.output()
    assert "tritonserver was killed by SIGKILL" in srv.output()
    assert "serve: stopped" not in srv.output()
