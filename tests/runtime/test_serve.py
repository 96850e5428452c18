"""`partclipseg serve`: the bundle behind Triton Inference Server (PyTriton), on loopback ports.

In process, no Triton (numpy only): `SegmentationModel`, the inference callable, groups a batch
by image size and class list and answers like `Segmenter.predict`; a bad request fails the batch
with a message naming it. The command line: flags, port checks, the library path fix.

One server (`python -m runtime.serve` in a subprocess, the micro bundle) for the rest, skipped
with the reason when PyTriton is not installed: 8 concurrent clients over HTTP and gRPC get
the in-process labels, malformed requests among them get errors naming the problem while the
others succeed, health, readiness and metrics answer, and SIGTERM answers the requests in flight,
then exits 0. The last test stops the server.
"""

from __future__ import annotations

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

from runtime import InputError, VocabularyError
from runtime.serve import SegmentationModel, build_parser, check_port_free, python_library_env

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


def test_a_bad_request_fails_its_batch_naming_which_and_why(micro_seg):
    model = SegmentationModel(micro_seg, max_image_side=64)
    good = _request(_images(0, (40, 40), 1))
    with pytest.raises(InputError, match=r"request 2 of 3 in this batch: classes: 'nocls' "
                       r"names no part.*request 3 of 3 in this batch: image is 65 x 8, over"):
        model([good, _request(_images(1, (40, 40), 1), ["nocls"]),
               _request(_images(2, (65, 8), 1))])
    with pytest.raises(VocabularyError, match="duplicate class names"):  # alone: its own type
        model([_request(_images(1, (40, 40), 1), ["a's b", "a's b"])])
    with pytest.raises(InputError, match="image must be UINT8"):
        model([{"image": np.zeros((1, 8, 8, 3), np.float32)}])
    with pytest.raises(InputError, match=r"\(H, W, 3\) per row, got \(8, 8\)"):
        model([{"image": np.zeros((1, 8, 8), np.uint8)}])
    assert model([good])[0]["labels"].shape == (1, 40, 40)  # still serving


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
                                   "--max-queue-delay-us", "0", "--backend", "onnxruntime"])
    assert (a.address, a.http_port, a.grpc_port, a.metrics_port) == ("127.0.0.1", 8000, 8001,
                                                                      8002)
    assert (a.max_batch, a.instances, a.max_queue_delay_us) == (4, 2, 0)
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
    # Each malformed request is one Triton cannot batch with a good one: Triton refuses the
    # dtype and rank before batching, the oversized frame and the bad class list come at sizes
    # no good request has. (PyTriton fails a whole batch on one error; a good request batched
    # with a bad one of its size and class count shares the error: docs/serving.md.)
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
    assert settled(server, "nv_inference_request_success", success_before + 8 * 5) == \
        success_before + 8 * 5
    with SegmentationClient(server.grpc, "grpc") as client:  # and it goes on serving
        np.testing.assert_array_equal(client.predict(good[0][0])[0], want[0].labels)


def test_metrics_count_successes_and_failures(server):
    from runtime.client import SegmentationClient, ServerError

    ok, failed = (server.metric("nv_inference_request_success"),
                  server.metric("nv_inference_request_failure", reason="BACKEND"))
    with SegmentationClient(server.http, "http") as client:
        client.predict(np.zeros((16, 16, 3), np.uint8))
        with pytest.raises(ServerError, match="nocls"):
            client.predict(np.zeros((16, 16, 3), np.uint8), ["nocls"])
    assert settled(server, "nv_inference_request_success", ok + 1) == ok + 1
    assert settled(server, "nv_inference_request_failure", failed + 1, "BACKEND") == failed + 1


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
