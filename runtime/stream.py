"""Live video through a Segmenter: cameras, network streams and files in, labels out.

    seg = Segmenter.load("demo/bundle")
    with Stream(seg, ["udp://127.0.0.1:5000", "/dev/video0"], max_age_ms=500) as stream:
        for r in stream:                   # one StreamResult per processed frame
            r.prediction.labels            # (H, W) int32, -1 = background
            r.latency_ms, r.dropped        # capture -> labels; frames dropped so far

Sources: a video file, any URL FFmpeg opens (udp://, tcp://, rtsp://, http(s)://, ...), a
V4L2 camera (/dev/videoN) or a ROS bag's image topic (`Source("drive.mcap",
topic="/camera/image_raw")`, read by `runtime.bag`). Each is read by its own thread (PyAV,
rosbags), decoded as it arrives; a video frame becomes an RGB array only when it is picked.

Two ways to read (`live`):
- live (the default for URLs and cameras): the newest frame wins. A frame not yet picked when
  a newer one arrives is dropped; a frame older than `max_age_ms` when the Segmenter is free is
  dropped too. Each source holds at most one frame, whatever the consumer's speed. A file read
  live is paced at its own frame rate, as a camera would deliver it.
- complete (the default for files and bags): every frame, in order; the reader waits for the
  consumer. A bag's frames carry their header stamp (`StreamResult.stamp_ns`, `frame_id`).

Several sources share one Segmenter: the frames ready together run as one `predict_batch`, one
per source, the sources taken in turn. A live source that is lost (a read that times out, the
stream's end) is reopened with backoff, and says so in the log and in `stats()`; a source that
never opens raises `SourceError` naming it. Corrupt packets are counted and skipped. Torch-free.
"""

from __future__ import annotations

import collections
import itertools
import logging
import re
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from .bag import BagError, BagImages, is_bag
from .errors import UserError
from .selection import ClassRequest

__all__ = ["Stream", "Source", "StreamResult", "SourceStats", "SourceError"]

log = logging.getLogger("runtime.stream")

MAX_DEMUX_FAILURES = 100
# Stream.close() waits at most this long for all readers together. A reader blocked inside
# FFmpeg (an open that waits for a sender, up to open_timeout_s) cannot be interrupted: PyAV
# exposes no interrupt callback. Such a reader is left to finish on its own; it delivers
# nothing after close() (every hand-off checks the stop flag under the lock) and closes its
# container when FFmpeg returns.
CLOSE_WAIT_S = 0.5


class SourceError(UserError):
    """A source that cannot be opened (a wrong address, no sender, a busy camera)."""


@dataclass
class SourceStats:
    """Counters of one source, as of the moment `Stream.stats()` was called.

    decoded: frames decoded; processed: frames the Segmenter labelled;
    dropped_newer: frames replaced by a newer one before they were picked (live);
    dropped_stale: frames older than max_age_ms when they were picked (live);
    corrupt: packets FFmpeg flagged or failed to decode (skipped);
    reconnects: times a lost live source was opened again;
    state: "opening", "reading", "reconnecting", "ended", "failed" or "closed".
    """

    decoded: int = 0
    processed: int = 0
    dropped_newer: int = 0
    dropped_stale: int = 0
    corrupt: int = 0
    reconnects: int = 0
    state: str = "opening"

    @property
    def dropped(self) -> int:
        return self.dropped_newer + self.dropped_stale


@dataclass(frozen=True)
class StreamResult:
    """One processed frame.

    source: the source's name; frame: its index among the source's decoded frames (0-based);
    pts: the source's timestamp in seconds (None when the stream has none);
    captured: wall-clock time (time.time()) at which the frame was decoded;
    latency_ms: capture to labels; waited_ms: capture to the moment the Segmenter took it;
    infer_ms: the `predict_batch` call that labelled it; batch: the frames in that call;
    dropped: the source's dropped frames so far (newer + stale);
    image: (H, W, 3) uint8 RGB frame; prediction: the Segmenter's `Prediction`;
    stamp_ns, frame_id: a bag message's header stamp (ns, exact: `pts` is the same in seconds)
        and frame_id; None for other sources.
    """

    source: str
    frame: int
    pts: float | None
    captured: float
    latency_ms: float
    waited_ms: float
    infer_ms: float
    batch: int
    dropped: int
    image: np.ndarray = field(repr=False)
    prediction: Any = field(repr=False)
    stamp_ns: int | None = None
    frame_id: str | None = None


@dataclass(frozen=True)
class _Frame:
    # av.VideoFrame: turned into RGB only once picked (most live frames are not); a bag's
    # (H, W, 3) uint8 array: decoded by its reader thread (JPEG decoding beside the model).
    decoded: Any
    index: int
    pts: float | None
    captured: float  # time.time()
    t: float  # time.monotonic(), for ages and latencies
    stamp_ns: int | None = None
    frame_id: str | None = None


def _rgb(decoded: Any) -> np.ndarray:
    return decoded if isinstance(decoded, np.ndarray) else decoded.to_ndarray(format="rgb24")


def _is_url(location: str) -> bool:
    return re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", location) is not None


def _unique_names(sources: Sequence["Source"]) -> None:
    """Rename sources that share a name to name-1, name-2, ... (names key output files)."""
    names = collections.Counter(s.name for s in sources)
    seen: collections.Counter[str] = collections.Counter()
    for s in sources:
        if names[s.name] > 1:
            seen[s.name] += 1
            s.name = f"{s.name}-{seen[s.name]}"


def _default_name(location: str) -> str:
    """"udp://127.0.0.1:5000?x=1" -> "udp-127.0.0.1-5000"; "/dev/video0" -> "video0";
    "clips/a.mp4" -> "a": usable as a file name. A URL's user:password@ is left out: the name
    lands in file names, frames.jsonl and the log."""
    if _is_url(location):
        scheme, rest = location.split("://", 1)
        rest = rest.split("?")[0].split("#")[0]
        host, slash, path = rest.partition("/")
        name = re.sub(r"[^A-Za-z0-9.]+", "-", f"{scheme}-{host.rpartition('@')[2]}{slash}{path}")
        name = name.strip("-")
    else:
        name = Path(location).stem
    return name or "source"


class Source:
    """One video source and its reader thread. Give `Stream` these for per-source settings,
    or plain strings for the defaults.

    location: file path, URL, /dev/videoN or ROS bag (a .mcap, .db3 or .bag file, or a bag
        folder with metadata.yaml).
    name: a short name for results and output files (default: from the location).
    topic: a bag's image topic (default: the bag's only one); bags only. The bag is checked
        here (topic, encoding, damage): `SourceError` names what is wrong.
    live: newest frame wins (True) or every frame in order (False); default: False for a
        regular file or a bag, True otherwise. A bag read live is paced by its header stamps.
    format: FFmpeg input format (default: guessed; "v4l2" for /dev/video*).
    options: FFmpeg options of the input ({"video_size": "640x480", "input_format": "mjpeg"}
        for a camera, {"rtsp_transport": "tcp"} for RTSP, ...).
    open_timeout_s: the first open's limit; read_timeout_s: a live read's limit, after which the
        source counts as lost (and each reopen's limit).
    backoff_s: (first, longest) wait between reopen attempts; it doubles after each failure.
    """

    def __init__(self, location: str | Path, name: str | None = None, live: bool | None = None,
                 format: str | None = None, options: Mapping[str, str] | None = None,
                 open_timeout_s: float = 10.0, read_timeout_s: float = 2.0,
                 backoff_s: tuple[float, float] = (0.5, 8.0), topic: str | None = None):
        self.location = str(location)
        self.bag: BagImages | None = None
        if topic is not None or (not _is_url(self.location) and is_bag(self.location)):
            try:
                self.bag = BagImages(self.location, topic)  # checked now, before any model
            except BagError as e:
                raise SourceError(str(e)) from None
        self.topic = self.bag.topic if self.bag is not None else None
        is_file = self.bag is not None or (
            not _is_url(self.location) and Path(self.location).is_file())
        if not is_file and not _is_url(self.location) and not self.location.startswith("/dev/"):
            raise SourceError(f"{self.location}: no such file, and not a URL (udp://, rtsp://, "
                              "...) or a camera (/dev/videoN)")
        self.name = name or _default_name(self.location)
        self.live = (not is_file) if live is None else bool(live)
        self.is_file = is_file
        self.format = format or ("v4l2" if self.location.startswith("/dev/video") else None)
        self.options = dict(options or {})
        self.open_timeout_s, self.read_timeout_s = open_timeout_s, read_timeout_s
        self.backoff_s = backoff_s
        self.stats = SourceStats()
        self.error: SourceError | None = None
        self._slot: _Frame | None = None  # live: the newest frame not yet taken
        self._queue: collections.deque[_Frame] = collections.deque()  # complete: in order
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:
        return f"Source({self.location!r}, name={self.name!r}, live={self.live})"

    # -- the reader thread --------------------------------------------------------------------
    def start(self, cond: threading.Condition) -> None:
        """Start reading; `cond` is notified whenever a frame arrives or the source ends."""
        self._cond = cond
        self._thread = threading.Thread(target=self._read, name=f"source-{self.name}",
                                        daemon=True)
        self._thread.start()

    def request_stop(self) -> None:
        """Ask the reader to stop, without waiting for it."""
        with self._cond:
            self._stop.set()

    def stop(self, join_s: float | None = None) -> None:
        """Ask the reader to stop and wait for it, at most `join_s` (default: until a blocked
        open or read times out). It closes its container itself (PyAV containers are not
        shared across threads). Once this returns the source is "closed" (unless it had ended
        or failed) and holds no frame: a reader still
        blocked in FFmpeg delivers nothing more and closes its container when FFmpeg returns."""
        with self._cond:
            self._stop.set()
            self._cond.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(join_s if join_s is not None else
                              max(self.open_timeout_s, self.read_timeout_s) + 1.0)
        with self._cond:
            if self.stats.state in ("opening", "reading", "reconnecting"):
                self.stats.state = "closed"  # "ended" and "failed" say more: kept
            self._slot = None
            self._queue.clear()

    @property
    def finished(self) -> bool:
        """The reader has exited and no frame is left to take."""
        return (self._thread is not None and not self._thread.is_alive()
                and self._slot is None and not self._queue)

    def _open(self, timeout_s: float) -> Any:
        """The container, or av.error.FFmpegError / OSError."""
        import av

        # No timeout for a regular file: a read there never waits for a sender.
        return av.open(self.location, format=self.format, options=self.options,
                       timeout=None if self.is_file else (timeout_s, self.read_timeout_s))

    def _read(self) -> None:
        if self.bag is not None:
            self._read_bag()
            return
        import av

        backoff = self.backoff_s[0]
        opened_once = False
        index = itertools.count()
        while not self._stop.is_set():
            try:
                # Reopens too get open_timeout_s: opening waits for a key frame, and cameras
                # send one every few seconds.
                container = self._open(self.open_timeout_s)
            except (av.error.FFmpegError, OSError) as e:
                if self._stop.is_set():  # closed while opening: nothing to report
                    break
                if not opened_once:  # never opened: the address is wrong, say which
                    self._fail(SourceError(f"cannot open source {self.location!r}: {e} (check "
                                           "the address, that the sender is running, and that a "
                                           "camera exists and is free)"))
                    return
                self._set_state("reconnecting")
                log.warning("%s: reopen failed (%s); next try in %.1f s", self.name, e, backoff)
                self._stop.wait(backoff)
                backoff = min(2 * backoff, self.backoff_s[1])
                continue
            if self._stop.is_set():  # closed while opening: close what it opened, deliver none
                container.close()
                break
            if opened_once:
                self.stats.reconnects += 1
                log.warning("%s: reconnected (reconnect %d)", self.name, self.stats.reconnects)
            if not container.streams.video:
                container.close()
                self._fail(SourceError(f"source {self.location!r} has no video stream"))
                return
            opened_once = True
            backoff = self.backoff_s[0]
            self._set_state("reading")
            try:
                reason = self._decode(container, index)
            finally:
                container.close()
            if self._stop.is_set():
                break
            if self.is_file:  # a file ends, or fails, once
                if reason is not None:
                    self._fail(SourceError(f"cannot read {self.location!r}: {reason}"))
                    return
                break
            reason = reason or "the stream ended"  # a live sender may come back: reopen
            self._set_state("reconnecting")
            log.warning("%s: lost (%s); reconnecting", self.name, reason)
        self._set_state("closed" if self._stop.is_set() else "ended")

    def _read_bag(self) -> None:
        """Every message of the bag's topic, in order (paced by header stamps when live)."""
        assert self.bag is not None
        self._set_state("reading")
        t0: float | None = None
        frames = self.bag.frames()
        try:
            for f in frames:
                if self._stop.is_set():
                    break
                stamp_s = f.stamp_ns / 1e9
                if self.live:
                    t0 = time.monotonic() - stamp_s if t0 is None else t0
                    self._stop.wait(max(0.0, t0 + stamp_s - time.monotonic()))
                self._publish(_Frame(f.rgb, f.index, stamp_s, time.time(), time.monotonic(),
                                     f.stamp_ns, f.frame_id))
        except BagError as e:
            self._fail(SourceError(str(e)))
            return
        finally:
            frames.close()  # closes the bag's reader now, in this thread
        self._set_state("closed" if self._stop.is_set() else "ended")

    def _decode(self, container: Any, index: Iterator[int]) -> str | None:
        """Decode until the end (None) or a loss (its reason)."""
        import av

        stream = container.streams.video[0]
        # Frame threading would hold frames back (one per thread) to decode them in
        # parallel: throughput for a file, lag for a live source.
        stream.thread_type = "SLICE" if self.live else "AUTO"
        pace = self.live and self.is_file
        t0: float | None = None
        failures = 0  # demuxer errors in a row, without a packet between them
        while not self._stop.is_set():
            try:
                for packet in container.demux(stream):
                    failures = 0
                    if self._stop.is_set():
                        return None
                    if packet.is_corrupt:
                        self.stats.corrupt += 1
                    try:
                        frames = packet.decode()
                    except av.error.FFmpegError:  # a damaged packet: skip it, keep the stream
                        self.stats.corrupt += 1
                        continue
                    for frame in frames:
                        if pace and frame.time is not None:
                            t0 = time.monotonic() - frame.time if t0 is None else t0
                            self._stop.wait(max(0.0, t0 + frame.time - time.monotonic()))
                        self._publish(_Frame(frame, next(index),
                                             None if frame.time is None else float(frame.time),
                                             time.time(), time.monotonic()))
                return None  # the end of the stream (a file's, or a sender's)
            except av.error.InvalidDataError as e:
                self.stats.corrupt += 1  # the demuxer resyncs on the next call, mostly
                failures += 1
                if failures >= MAX_DEMUX_FAILURES:  # it does not: a damaged file, a dead feed
                    return f"{failures} unreadable packets in a row ({e})"
            except (av.error.FFmpegError, OSError) as e:
                return str(e)
        return None

    def _publish(self, frame: _Frame) -> None:
        with self._cond:
            if self._stop.is_set():  # closed (or stopping): nothing is handed over any more
                return
            self.stats.decoded += 1
            if self.live:
                if self._slot is not None:
                    self.stats.dropped_newer += 1
                self._slot = frame
            else:
                # Complete: at most two frames wait; the reader waits for the consumer.
                while len(self._queue) >= 2 and not self._stop.is_set():
                    self._cond.wait(0.1)
                if self._stop.is_set():
                    return
                self._queue.append(frame)
            self._cond.notify_all()

    def _fail(self, error: SourceError) -> None:
        with self._cond:
            if self._stop.is_set():  # a failure after close() is nobody's business
                return
            self.error = error
            self.stats.state = "failed"
            self._cond.notify_all()

    def _set_state(self, state: str) -> None:
        with self._cond:
            if self._stop.is_set() and state != "closed":
                return
            if self.stats.state != "failed":
                self.stats.state = state
            self._cond.notify_all()

    # -- the consumer's side (called with the condition held) ---------------------------------
    def take(self, now: float, max_age_s: float | None) -> _Frame | None:
        """The frame to process next, or None; a live frame older than max_age_s is dropped."""
        if not self.live:
            if not self._queue:
                return None
            self._cond.notify_all()  # room for the reader
            return self._queue.popleft()
        frame, self._slot = self._slot, None
        if frame is not None and max_age_s is not None and now - frame.t > max_age_s:
            self.stats.dropped_stale += 1
            return None
        return frame


class Stream:
    """Sources in, `StreamResult`s out, through one Segmenter (thread-safe to share).

    segmenter: a `runtime.Segmenter` (any backend).
    sources: locations (str / Path) or `Source`s.
    classes: the classes to predict over (default: the Segmenter's vocabulary); change them
        between frames with `set_classes`, or change the Segmenter's with `set_vocabulary`.
    max_age_ms: a live frame older than this when the Segmenter is free is dropped (None: no
        limit).
    max_frames: stop a source after this many processed frames (None: until it ends).
    live: override every source's reading (None: each source's default).
    max_batch: at most this many frames per `predict_batch` (default: one per source).
    """

    def __init__(self, segmenter: Any, sources: Sequence[str | Path | Source],
                 classes: ClassRequest | None = None, max_age_ms: float | None = 500.0,
                 max_frames: int | None = None, live: bool | None = None,
                 max_batch: int | None = None):
        if not sources:
            raise ValueError("Stream needs at least one source")
        if max_frames is not None and max_frames < 1:
            raise ValueError(f"max_frames must be >= 1, got {max_frames}")
        if max_age_ms is not None and max_age_ms <= 0:
            raise ValueError(f"max_age_ms must be > 0, got {max_age_ms}")
        if max_batch is not None and max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.segmenter = segmenter
        self.sources = [s if isinstance(s, Source) else Source(s) for s in sources]
        if live is not None:
            for s in self.sources:
                s.live = live
        _unique_names(self.sources)
        self.max_age_s = None if max_age_ms is None else max_age_ms / 1e3
        self.max_frames = max_frames
        self.max_batch = max_batch or len(self.sources)
        self._classes: ClassRequest | None = None
        if classes is not None:
            self.set_classes(classes)
        self._cond = threading.Condition()
        self._turn = 0  # the source served first in the next batch: fairness
        self._started = False
        self._stopping = threading.Event()

    def set_classes(self, classes: ClassRequest | None) -> None:
        """Predict over `classes` from the next batch on (None: the Segmenter's vocabulary).
        Names are checked, and new ones encoded, here, not mid-stream."""
        if classes is not None:
            self.segmenter.feeds(classes)  # raises VocabularyError naming a bad name
        self._classes = classes

    def start(self) -> "Stream":
        if not self._started:
            self._started = True
            for s in self.sources:
                s.start(self._cond)
        return self

    def stop(self) -> None:
        """End the iteration after the frames already taken are labelled. Returns at once;
        safe from another thread or a signal handler (it takes no lock the loop may hold)."""
        self._stopping.set()

    def close(self) -> None:
        """Stop every reader; returns within about CLOSE_WAIT_S (0.5 s), whatever each source
        is doing (opening, reading, reconnecting). Readers that stop in that time are joined
        and their containers closed; one blocked inside FFmpeg (an open waiting for a sender)
        finishes on its own within its timeout, delivers nothing after this returns, and
        closes its container. A source that had not ended or failed reads "closed".
        Idempotent."""
        self._stopping.set()
        for s in self.sources:  # all at once: their waits overlap instead of adding up
            s.request_stop()
        deadline = time.monotonic() + CLOSE_WAIT_S
        for s in self.sources:
            s.stop(join_s=max(0.0, deadline - time.monotonic()))
        with self._cond:
            self._cond.notify_all()

    def __enter__(self) -> "Stream":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def stats(self) -> dict[str, SourceStats]:
        """A copy of every source's counters, by name."""
        with self._cond:
            return {s.name: replace(s.stats) for s in self.sources}

    def run(self, callback: Callable[[StreamResult], object]) -> None:
        """Call `callback(result)` for every processed frame until the sources end (or
        max_frames); closes the stream at the end."""
        with self:
            for result in self:
                callback(result)

    def __iter__(self) -> Iterator[StreamResult]:
        self.start()
        while True:
            batch, picked = self._next_batch()
            if not batch:
                return
            yield from self._label(batch, picked)

    # -- internals ----------------------------------------------------------------------------
    def _active(self) -> list[Source]:
        return [s for s in self.sources if not s.finished and (
            self.max_frames is None or s.stats.processed < self.max_frames)]

    def _next_batch(self) -> tuple[list[tuple[Source, _Frame]], float]:
        """Wait until frames are ready, then take at most one per source, in turn. Returns them
        and the moment they were taken (their ages were checked against it)."""
        with self._cond:
            while True:
                if self._stopping.is_set():
                    return [], 0.0
                for s in self.sources:
                    if s.error is not None:
                        raise s.error
                active = self._active()
                if not active:
                    return [], 0.0
                n = len(self.sources)
                order = [self.sources[(self._turn + i) % n] for i in range(n)]
                now = time.monotonic()
                batch = []
                for s in order:
                    if s in active and len(batch) < self.max_batch:
                        frame = s.take(now, self.max_age_s)
                        if frame is not None:
                            batch.append((s, frame))
                if batch:
                    self._turn = (self.sources.index(batch[-1][0]) + 1) % n
                    return batch, now
                self._cond.wait(0.05)  # also polls readers that exited without notifying

    def _label(self, batch: list[tuple[Source, _Frame]], picked: float
               ) -> Iterator[StreamResult]:
        images = [_rgb(f.decoded) for _, f in batch]
        t0 = time.perf_counter()
        preds = self.segmenter.predict_batch(images, classes=self._classes)
        infer_ms = 1e3 * (time.perf_counter() - t0)
        done = time.monotonic()
        results = []
        with self._cond:
            for (s, f), image, pred in zip(batch, images, preds):
                s.stats.processed += 1
                if self.max_frames is not None and s.stats.processed >= self.max_frames:
                    s.request_stop()  # the reader ends; the stream stops taking from it
                results.append(StreamResult(
                    s.name, f.index, f.pts, f.captured, 1e3 * (done - f.t), 1e3 * (picked - f.t),
                    infer_ms, len(batch), s.stats.dropped, image, pred, f.stamp_ns, f.frame_id))
        yield from results
