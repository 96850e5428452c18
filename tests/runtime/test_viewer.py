"""The live viewer (runtime.viewer, `predict --view`): the Rerun web viewer's page is served on
127.0.0.1, its log server receives every frame's image, labels, legend and time series, a busy
port is one line, and headless Chromium renders the page (skipped without chromium)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

rr = pytest.importorskip("rerun", reason="the viewer needs rerun-sdk (the [viz] extra)")

from benchmarks.loopback import LoopbackSender, free_ports, free_udp_port  # noqa: E402
from runtime.viewer import Viewer, ViewerError  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
NAMES = ("red quadruped's head", "red quadruped's leg", "blue bird's wing")


def result(i: int) -> Any:
    """A StreamResult stand-in: frame i of source "cam", a 32 px image with a labelled square."""
    labels = np.full((32, 32), -1, np.int32)
    labels[8:24, 8:24] = i % 3
    return SimpleNamespace(source="cam", frame=i, captured=1.7e9 + i / 30, stamp_ns=None,
                           image=np.full((32, 32, 3), 10 * i, np.uint8), latency_ms=20.0 + i,
                           dropped=i // 2,
                           prediction=SimpleNamespace(labels=labels, class_names=NAMES))


def page(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as r:
        assert r.status == 200
        return r.read().decode(errors="replace")


def recorded(viewer: Viewer, tmp: Path) -> Any:
    """What the viewer's log server holds, as a late visitor gets it: `rerun URL --save` pulls
    it into an .rrd file, read back with rerun's dataframe API."""
    if not hasattr(rr, "dataframe"):
        pytest.skip(f"rerun-sdk {rr.__version__} has no rerun.dataframe to read a recording")
    import rerun_cli  # rerun-sdk's viewer executable lives beside it

    rrd = tmp / "seen.rrd"
    grpc = f"rerun+http://127.0.0.1:{viewer.grpc_port}/proxy"
    # It hosts a server of its own too: on a free loopback port, not the default 9876.
    binary = os.path.join(os.path.dirname(rerun_cli.__file__), "rerun")
    p = subprocess.Popen([binary, grpc, "--save", str(rrd), "--bind", "127.0.0.1", "--port",
                          str(free_ports(1)[0])],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while not (rrd.exists() and rrd.stat().st_size > 10_000):
            assert time.monotonic() < deadline and p.poll() is None, "nothing reached the file"
            time.sleep(0.2)
        time.sleep(1.0)  # the rest of the backlog
    finally:
        p.terminate()
        p.wait(10)
    return rr.dataframe.load_recording(str(rrd))


def other_address() -> str | None:
    """This machine's address on its default route (a UDP connect sends nothing), if any."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))
        except OSError:
            return None
        host = s.getsockname()[0]
    return None if host.startswith("127.") else host


def test_the_page_is_served_on_loopback_and_the_log_server_gets_every_frame(tmp_path):
    port = free_ports(1)[0]
    with Viewer(port=port) as viewer:
        assert viewer.url.startswith(f"http://127.0.0.1:{port}/?url=rerun%2Bhttp")
        assert "Rerun" in page(viewer.url)  # the bundled web viewer's page
        host = other_address()
        if host is not None:  # loopback only: not on this machine's other address
            with pytest.raises(OSError):
                socket.create_connection((host, port), timeout=1).close()
        for i in range(6):
            viewer.log(result(i))
        rec = recorded(viewer, tmp_path)
    columns = {(c.entity_path, c.component_name.split(".")[-1])
               for c in rec.schema().component_columns()}
    for want in [("/cam", "AnnotationContext"), ("/cam/image", "ImageBuffer"),
                 ("/cam/image/labels", "SegmentationImageIndicator"),
                 ("/cam/latency_ms", "Scalar"), ("/cam/dropped", "Scalar")]:
        assert want in columns, sorted(columns)
    table = rec.view(index="frame", contents="/cam/**").select().read_all()
    assert table.column("frame").to_pylist() == list(range(6))
    latency = table.column("/cam/latency_ms:Scalar").to_pylist()
    assert [x[0] for x in latency] == [20.0 + i for i in range(6)]
    legend = str(rec.view(index="frame", contents="/cam").select_static().read_all())
    assert all(name in legend for name in NAMES) and "background" in legend


def test_a_busy_port_is_one_line(micro_bundle, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(ViewerError, match=f"port {port} on 127.0.0.1 is in use"):
            Viewer(port=port)
        r = subprocess.run([sys.executable, "-m", "partclipseg.cli", "predict", "--bundle",
                            str(micro_bundle), f"udp://127.0.0.1:{free_udp_port()}", "--out",
                            str(tmp_path / "out"), "--view", "--view-port", str(port)],
                           cwd=ROOT, capture_output=True, text=True, timeout=120,
                           env=dict(os.environ, PYTHONPATH=str(ROOT)))
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert r.returncode == 2 and len(lines) == 1 and f"port {port}" in lines[0], r.stderr
    assert "--view-port" in lines[0] and not (tmp_path / "out").exists()


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    pytest.skip("no chromium here (Debian: apt-get install chromium)")


def screenshot(url: str, png: Path, wait_s: float = 25.0, size: str = "1400,850") -> str:
    """Headless Chromium's picture of `url` after `wait_s` seconds of real time (the viewer's
    WebAssembly loads, connects and draws: --virtual-time-budget does not wait for it), taken
    through the DevTools protocol; returns the page's text (the viewer draws on a canvas, so
    text means its error page). Software WebGL (SwiftShader): no GPU here."""
    aiohttp = pytest.importorskip("aiohttp", reason="the DevTools client needs aiohttp")
    import asyncio
    import base64
    import json

    async def drive(ws_url: str) -> str:
        async with aiohttp.ClientSession() as session, \
                session.ws_connect(ws_url, max_msg_size=0) as ws:
            ids = iter(range(1, 100))

            async def call(method: str, **params: Any) -> Any:
                n = next(ids)
                await ws.send_json({"id": n, "method": method, "params": params})
                async for msg in ws:
                    if (data := json.loads(msg.data)).get("id") == n:
                        return data["result"]

            await call("Page.navigate", url=url)
            await asyncio.sleep(wait_s)
            shot = await call("Page.captureScreenshot", format="png")
            png.write_bytes(base64.b64decode(shot["data"]))
            text = await call("Runtime.evaluate", expression="document.body.innerText")
            return str(text["result"].get("value", ""))

    port = free_ports(1)[0]
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as profile:
        p = subprocess.Popen(
            [chromium(), "--headless", "--no-sandbox", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", "--use-angle=swiftshader",
             "--enable-unsafe-swiftshader", f"--window-size={size}",
             f"--remote-debugging-port={port}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list",
                                                timeout=1) as r:
                        pages = [x for x in json.load(r) if x["type"] == "page"]
                    if pages:
                        break
                except OSError:
                    pass
                assert time.monotonic() < deadline, "chromium's DevTools never answered"
                time.sleep(0.2)
            return asyncio.run(drive(pages[0]["webSocketDebuggerUrl"]))
        finally:
            p.terminate()
            p.wait(10)


def test_predict_view_on_a_loopback_stream_renders_in_chromium(micro_bundle, tmp_path):
    """`predict --view` on a 30 fps UDP stream: the URL is printed, the page is served while the
    stream runs and after it ends (until Ctrl-C, which exits 0), and headless Chromium draws
    it: the picture is not one flat colour. (What it shows is looked at by a person: see
    docs/runtime.md, "Robots".)"""
    chromium()
    if tuple(int(x) for x in rr.__version__.split(".")[:2]) < (0, 24):
        pytest.skip(f"rerun-sdk {rr.__version__} (what [dev] resolves to beside numpy < 2) does "
                    "not render in headless Chromium's software WebGL; the screenshot in "
                    "docs/runtime.md was taken with rerun-sdk 0.41")
    port = free_ports(1)[0]
    png = tmp_path / "viewer.png"
    with LoopbackSender(free_udp_port(), size=96) as sender:
        p = subprocess.Popen([sys.executable, "-m", "partclipseg.cli", "predict", "--bundle",
                              str(micro_bundle), "--backend", "onnxruntime", "--no-verify",
                              sender.url, "--out", str(tmp_path / "out"), "--max-frames", "90",
                              "--view", "--view-port", str(port)],
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                             text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
        try:
            url = None
            for line in p.stdout:  # type: ignore[union-attr]
                if "viewer at " in line:
                    url = line.split("viewer at ", 1)[1].strip()
                if "the viewer stays" in line:
                    break
            assert url and url.startswith(f"http://127.0.0.1:{port}/"), url
            # WebGL: SwiftShader offers no WebGPU worth the name.
            text = screenshot(url + "&renderer=webgl", png)
            assert "Rerun" in page(url)
            p.send_signal(signal.SIGINT)
            assert p.wait(30) == 0
        finally:
            p.kill()
    if "error occurred" in text:  # the viewer's own page: its renderer refused this browser
        pytest.skip(f"rerun-sdk {rr.__version__}'s web viewer does not start on headless "
                    f"Chromium's software WebGL: {' '.join(text.split()[:16])}")
    from PIL import Image

    pixels = np.asarray(Image.open(png).convert("RGB"))
    assert pixels.shape[:2] == (850, 1400) and pixels.reshape(-1, 3).std(0).max() > 10
