"""runtime.stream on real streams: MPEG-TS over UDP on 127.0.0.1 at 30 fps, sent by a child
process (benchmarks.loopback), read back through the micro bundle's Segmenter."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

av = pytest.importorskip("av")

from benchmarks.loopback import LoopbackSender, free_udp_port  # noqa: E402
from runtime.stream import Source, SourceError, Stream  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
FPS = 30.0


class Recording:
    """A Segmenter stand-in that records its batches and can be made slow."""

    def __init__(self, seg: Any, delay_s: float = 0.0):
        self.seg, self.delay_s, self.batches = seg, delay_s, []

    def predict_batch(self, images: list[np.ndarray], classes: Any = None) -> list[Any]:
        self.batches.append(len(images))
        time.sleep(self.delay_s)
        return self.seg.predict_batch(images, classes=classes)

    def feeds(self, classes: Any) -> Any:
        return self.seg.feeds(classes)


@pytest.fixture
def sender():
    with LoopbackSender(free_udp_port(), fps=FPS, size=96) as s:
        yield s


def live(url: str, **kw: Any) -> Source:
    """A live source with short timeouts: a lost sender shows within half a second."""
    return Source(url, read_timeout_s=kw.pop("read_timeout_s", 0.5),
                  backoff_s=kw.pop("backoff_s", (0.2, 0.5)), **kw)


def take(stream: Stream, n: int, timeout_s: float = 20.0) -> list[Any]:
    """The next n results; a stream that yields none for timeout_s fails instead of hanging."""
    results = []
    watchdog = threading.Timer(timeout_s, stream.stop)  # ends the iteration, not the stream
    watchdog.start()
    try:
        for r in stream:
            results.append(r)
            if len(results) == n:
                return results
    finally:
        watchdog.cancel()
    raise AssertionError(f"only {len(results)} of {n} frames in {timeout_s} s")


def test_a_slow_consumer_gets_the_newest_frames_and_counts_the_rest(micro_seg, sender):
    """Labelling takes 150 ms, frames come every 33 ms: about 4 in 5 are dropped, none waits,
    no backlog builds, and no frame older than max_age_ms is labelled."""
    slow = Recording(micro_seg, delay_s=0.15)
    with Stream(slow, [live(sender.url)], max_age_ms=100) as stream:
        results = take(stream, 12)
        stats = stream.stats()[results[0].source]
    gaps = np.diff([r.frame for r in results])
    assert (gaps >= 1).all() and np.median(gaps) >= 3, gaps  # the newest frame, not the next
    assert results[-1].dropped >= 2 * len(results)
    assert max(r.waited_ms for r in results) <= 100
    assert np.median([r.waited_ms for r in results]) < 1e3 / FPS + 20  # picked fresh
    # Bounded: every decoded frame was labelled, dropped, or is the one waiting.
    assert stats.decoded - stats.processed - stats.dropped <= 1
    assert all(r.latency_ms >= r.waited_ms + 150 for r in results)


def test_stale_frames_are_dropped_not_labelled(micro_seg, sender):
    """A max_age_ms shorter than the frame interval: frames that waited longer are counted as
    stale, and none is labelled."""
    with Stream(Recording(micro_seg, delay_s=0.05), [live(sender.url)],
                max_age_ms=15) as stream:
        results = take(stream, 5)
        stats = stream.stats()[results[0].source]
    assert stats.dropped_stale > 0
    assert max(r.waited_ms for r in results) <= 15


def test_a_killed_sender_is_reconnected_and_the_stream_goes_on(micro_seg, sender, caplog):
    with Stream(micro_seg, [live(sender.url)]) as stream:
        before = take(stream, 5)
        sender.kill()
        name = before[0].source
        deadline = time.monotonic() + 10
        while stream.stats()[name].state != "reconnecting":
            assert time.monotonic() < deadline, stream.stats()[name]
            time.sleep(0.05)
        sender.restart()
        after = take(stream, 5)
        stats = stream.stats()[name]
    assert stats.reconnects >= 1 and stats.state == "reading"
    assert after[-1].frame > before[-1].frame  # one source, indices keep counting
    assert any("lost" in m for m in caplog.messages)
    assert any("reconnected" in m for m in caplog.messages)


def ts_garbage(rng: np.random.Generator, pid: int = 0x100) -> bytes:
    """7 MPEG-TS packets (one datagram) of random payload on `pid` (FFmpeg's first stream),
    with random continuity counters: they pass the demuxer's sync check and break the video's
    packets, as a lossy link does."""
    out = bytearray()
    for _ in range(7):
        cc = int(rng.integers(0, 16))
        out += bytes([0x47, (pid >> 8) & 0x1F, pid & 0xFF, 0x10 | cc])
        out += rng.integers(0, 256, 184, dtype=np.uint8).tobytes()
    return bytes(out)


def test_garbage_on_the_port_is_skipped(micro_seg, sender):
    with Stream(micro_seg, [live(sender.url)]) as stream:
        first = take(stream, 3)
        rng = np.random.default_rng(0)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for _ in range(3):  # three bursts among the stream's own datagrams
                for _ in range(20):  # random bytes: the demuxer skips them
                    s.sendto(rng.integers(0, 256, 1316, dtype=np.uint8).tobytes(),
                             ("127.0.0.1", sender.port))
                for _ in range(10):  # TS packets on the video's PID: broken video packets
                    s.sendto(ts_garbage(rng), ("127.0.0.1", sender.port))
                time.sleep(0.1)
        later = take(stream, 10)
        stats = stream.stats()[first[0].source]
    assert later[-1].frame > first[-1].frame + 10
    assert stats.corrupt >= 1 and stats.reconnects == 0


def test_two_sources_share_one_segmenter_in_batches(micro_seg):
    rec = Recording(micro_seg, delay_s=0.05)
    with LoopbackSender(free_udp_port(), size=96) as a, LoopbackSender(free_udp_port(),
                                                                       size=64) as b:
        with Stream(rec, [live(a.url), live(b.url)]) as stream:
            results = take(stream, 40)
    per = {name: sum(r.source == name for r in results) for name in {r.source for r in results}}
    assert len(per) == 2 and min(per.values()) >= 18, per  # served in turn
    assert max(rec.batches) == 2  # frames ready together ran as one batch
    sizes = {r.source: r.prediction.labels.shape for r in results}
    assert sorted(sizes.values()) == [(64, 64), (96, 96)]  # labels at each source's size


def test_the_vocabulary_changes_mid_stream(micro_seg, sender):
    new = ["cup's handle", "cup's body"]
    with Stream(micro_seg, [live(sender.url)]) as stream:
        before = take(stream, 3)
        stream.set_classes(new)
        after = take(stream, 3)
        with pytest.raises(Exception, match="part"):
            stream.set_classes(["no part here"])  # refused at once, the stream unchanged
        again = take(stream, 2)
    assert before[0].prediction.class_names == micro_seg.vocabulary.class_names
    assert after[0].prediction.class_names == again[0].prediction.class_names == tuple(new)
    assert after[0].frame > before[-1].frame


def test_close_joins_every_reader(micro_seg, sender):
    stream = Stream(micro_seg, [live(sender.url)])
    take(stream, 2)
    stream.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("source-")]
    assert stream.stats()[stream.sources[0].name].state == "closed"


def test_close_returns_at_once_whatever_each_source_is_doing(micro_seg, sender):
    """One source reading, one still opening (nobody sends to its port, so its reader waits
    inside FFmpeg's open, up to open_timeout_s = 10 s): close() does not wait for it, nothing
    is delivered after close() returns, and both readers end and close what they opened."""
    silent = Source(f"udp://127.0.0.1:{free_udp_port()}", name="silent", open_timeout_s=10.0)
    opened: list[Any] = []
    open_container = silent._open

    def recording_open(timeout_s: float) -> Any:
        container = open_container(timeout_s)
        opened.append(container)
        return container

    silent._open = recording_open  # type: ignore[method-assign]
    stream = Stream(micro_seg, [live(sender.url), silent])
    results = take(stream, 3)
    assert stream.stats()["silent"].state == "opening"
    t0 = time.monotonic()
    stream.close()
    took = time.monotonic() - t0
    after = stream.stats()
    assert took < 1.0, f"close() took {took:.2f} s"
    assert {s.state for s in after.values()} == {"closed"}, after
    readers = [s._thread for s in stream.sources]
    deadline = time.monotonic() + 20  # the silent reader returns when its open times out
    while any(t.is_alive() for t in readers):
        assert time.monotonic() < deadline, "a reader thread outlived its open timeout"
        time.sleep(0.05)
    assert stream.stats() == after  # nothing decoded, delivered or changed after close()
    assert all(s._slot is None and not s._queue for s in stream.sources)
    assert results[0].source == stream.sources[0].name and not opened  # it never opened
    stream.close()  # idempotent


def test_a_source_closed_while_opening_closes_what_it_opens(micro_seg, sender):
    """close() lands while FFmpeg's open is under way; the open then succeeds: the reader
    closes that container at once and delivers no frame."""
    source = live(sender.url)
    closed: list[Any] = []
    gate, release = threading.Event(), threading.Event()
    open_container = source._open

    def slow_open(timeout_s: float) -> Any:
        container = open_container(timeout_s)
        gate.set()
        release.wait(10)  # close() happens here, after FFmpeg opened the stream
        real_close = container.close
        container_close = lambda: (closed.append(container), real_close())  # noqa: E731
        return _Closing(container, container_close)

    source._open = slow_open  # type: ignore[method-assign]
    stream = Stream(micro_seg, [source]).start()
    assert gate.wait(20), "the sender's stream never opened"
    stream.close()
    release.set()
    source._thread.join(10)
    assert not source._thread.is_alive()
    assert len(closed) == 1 and stream.stats()[source.name].decoded == 0


class _Closing:
    """A container whose close() is recorded."""

    def __init__(self, container: Any, close: Any):
        self._container, self.close = container, close

    def __getattr__(self, name: str) -> Any:
        return getattr(self._container, name)


def test_names_are_unique_and_keep_no_credentials(micro_seg):
    url = "rtsp://admin:secret@cam.local:554/live/1?token=x"
    assert Source(url).name == "rtsp-cam.local-554-live-1"
    stream = Stream(micro_seg, [url, url, Source(url, name="door")])
    assert [s.name for s in stream.sources] == ["rtsp-cam.local-554-live-1-1",
                                                "rtsp-cam.local-554-live-1-2", "door"]
    with pytest.raises(ValueError, match="max_batch"):
        Stream(micro_seg, [url], max_batch=0)


def test_a_source_that_does_not_exist_is_named(micro_seg, tmp_path):
    with pytest.raises(SourceError, match="no such file"):
        Source(tmp_path / "missing.mp4")
    url = f"udp://127.0.0.1:{free_udp_port()}"  # nobody sends
    stream = Stream(micro_seg, [Source(url, open_timeout_s=0.5)])
    with pytest.raises(SourceError, match=url.replace(".", r"\.")):
        next(iter(stream))
    stream.close()


def test_a_video_file_gives_every_frame_in_order(micro_seg, tmp_path):
    path = tmp_path / "clip.mp4"
    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=10)
        s.width = s.height = 64
        s.pix_fmt = "yuv420p"
        for i in range(12):
            for packet in s.encode(av.VideoFrame.from_ndarray(
                    np.full((64, 64, 3), 20 * i, np.uint8), format="rgb24")):
                c.mux(packet)
        for packet in s.encode():
            c.mux(packet)
    rec = Recording(micro_seg, delay_s=0.02)  # slower than the decoder: nothing may drop
    stream = Stream(rec, [path])
    frames: list[int] = []
    stream.run(lambda r: frames.append(r.frame))  # the callback form; closes the stream
    stats = stream.stats()["clip"]
    assert frames == list(range(12)) and stats.dropped == 0 and stats.state == "ended"
    assert not [t for t in threading.enumerate() if t.name.startswith("source-")]


def run_cli(args: list[str], **kw: Any) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "partclipseg.cli", "predict", *args],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)), **kw)


def decoded_frames(path: Path) -> int:
    with av.open(str(path)) as c:
        return sum(1 for _ in c.decode(video=0))


def test_predict_command_on_a_live_stream(micro_bundle, sender, tmp_path):
    """The issue's command: frames.jsonl lines with latency_ms and dropped, a video that
    decodes, a summary per source."""
    out = tmp_path / "out"
    p = run_cli(["--bundle", str(micro_bundle), sender.url, "--out", str(out),
                 "--max-frames", "60", "--backend", "onnxruntime"])
    _, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    lines = [json.loads(x) for x in (out / "frames.jsonl").read_text().splitlines()]
    assert len(lines) == 60
    assert all({"source", "frame", "pts", "latency_ms", "dropped", "counts"} <= set(x)
               for x in lines)
    name = lines[0]["source"]
    assert decoded_frames(out / f"{name}.mp4") == 60
    summary = json.loads((out / "predictions.json").read_text())["inputs"][sender.url]
    assert summary["processed"] == 60 and summary["latency_ms"]["p50"] > 0
    assert "latency p50" in err  # the status line


def test_ctrl_c_leaves_every_output_whole(micro_bundle, sender, tmp_path):
    out = tmp_path / "out"
    p = run_cli(["--bundle", str(micro_bundle), sender.url, "--out", str(out),
                 "--backend", "onnxruntime"])
    log = out / "frames.jsonl"
    deadline = time.monotonic() + 60
    while not (log.exists() and len(log.read_text().splitlines()) >= 10):
        assert p.poll() is None and time.monotonic() < deadline, p.communicate()
        time.sleep(0.1)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=30)
    assert p.returncode == 130, err
    n = len(log.read_text().splitlines())
    name = json.loads(log.read_text().splitlines()[0])["source"]
    assert decoded_frames(out / f"{name}.mp4") == n
    assert json.loads((out / "predictions.json").read_text())["inputs"][sender.url][
        "processed"] == n
    assert not list(out.glob(".*.tmp"))


def test_predict_command_names_a_source_that_never_opens(micro_bundle, tmp_path):
    url = f"udp://127.0.0.1:{free_udp_port()}"
    p = run_cli(["--bundle", str(micro_bundle), url, "--out", str(tmp_path / "o"),
                 "--source-option", "timeout=500000"])
    _, err = p.communicate(timeout=60)
    assert p.returncode == 2 and url in err, err
    assert not (tmp_path / "o" / "frames.jsonl").exists()
