"""`partclipseg predict --bundle B SOURCE... --out DIR` (also `python -m runtime.predict`).

SOURCE: an image (any format Pillow reads), a video file, a stream URL (udp://, tcp://,
rtsp://, http(s)://, anything FFmpeg opens), a camera (/dev/videoN) or a ROS bag (a .mcap,
.db3 or .bag file, or a ROS 2 bag folder; its image topic is --topic, default its only one).

- Images: DIR/<stem>.png (image | prediction overlay | legend).
- Videos, streams and cameras, all read at once (one reader thread each, their frames batched
  through one Segmenter): DIR/<name>.mp4, the overlay of every processed frame at its own time,
  and DIR/frames.jsonl, one JSON line per processed frame, flushed as it goes (source, frame,
  pts, latency_ms, dropped, counts). Live sources drop frames to stay current (newest frame
  wins, none older than --max-age-ms); a video file gives every frame unless --realtime.
  A status line per source on stderr shows fps, latency p50/p99 and drops. Ctrl-C finishes
  every output: the videos stay playable.
- DIR/predictions.json: per SOURCE, per-class pixel counts (images) or a summary (videos).
- --out-bag FILE.mcap | FILE.bag | FOLDER: the label maps as a ROS bag (runtime/bag.py), with
  each input's header stamp and frame_id; written beside and renamed when whole.
- --view: the Rerun web viewer on http://127.0.0.1:9090 (--view-port), fed frame by frame
  (runtime/viewer.py); it stays up after the sources end, until Ctrl-C.

`--classes` / `--classes-file` may name classes the bundle was not exported with ("cup's
handle"): the bundle's text side encodes them. Needs numpy, Pillow, a backend (and PyAV for
video); never torch.
"""

from __future__ import annotations

import argparse
import collections
import json
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .errors import run_command
from .io import atomic_write, atomic_write_text
from .options import add_backend_arguments, add_verify_argument, load_segmenter, positive_int

__all__ = ["add_arguments", "run", "build_parser", "main"]


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The predict options, on `p` (this module's parser, or `partclipseg predict`'s)."""
    p.add_argument("inputs", nargs="+", metavar="SOURCE",
                   help="image files, video files, stream URLs (udp://, rtsp://, ...), "
                   "cameras (/dev/videoN) or ROS bags (.mcap, .db3, .bag, a bag folder)")
    add_verify_argument(add_backend_arguments(p))
    p.add_argument("--out", required=True, help="output folder")
    names = p.add_mutually_exclusive_group()
    names.add_argument("--classes", nargs="+", metavar="NAME",
                       help="classes to predict over, \"object's part\" (default: the bundle's); "
                       "new names need a bundle exported with its text side")
    names.add_argument("--classes-file", metavar="FILE",
                       help="the same from a file: one \"object's part\" per line")
    v = p.add_argument_group("videos, streams and cameras")
    v.add_argument("--max-frames", type=positive_int, metavar="N",
                   help="stop each video source after N processed frames (default: its end; "
                   "a live stream runs until Ctrl-C)")
    v.add_argument("--max-age-ms", type=float, default=500.0, metavar="MS",
                   help="drop a live frame older than MS when the model is free (default 500)")
    v.add_argument("--realtime", action="store_true",
                   help="read video files as a camera delivers them: at their frame rate, "
                   "newest frame wins (default: every frame, in order)")
    v.add_argument("--source-option", action="append", default=[], metavar="KEY=VALUE",
                   help="FFmpeg input option for every video source, repeatable "
                   "(video_size=640x480, input_format=mjpeg, rtsp_transport=tcp)")
    r = p.add_argument_group("robots: ROS bags and the live viewer")
    r.add_argument("--topic", metavar="TOPIC",
                   help="the image topic of every bag SOURCE (sensor_msgs/Image or "
                   "CompressedImage; default: the bag's only image topic)")
    r.add_argument("--out-bag", metavar="PATH",
                   help="also write the label maps as a ROS bag: PATH.mcap (ROS 2 MCAP), "
                   "PATH.bag (ROS 1) or a folder (ROS 2 sqlite3); per frame "
                   "<topic>/labels (sensor_msgs/Image 16UC1, 65535 = background, the input's "
                   "stamp and frame_id) and <topic>/class_names (std_msgs/String JSON, latched)")
    r.add_argument("--out-bag-overlay", action="store_true",
                   help="with --out-bag: also each frame's overlay on <topic>/overlay "
                   "(sensor_msgs/CompressedImage, JPEG)")
    r.add_argument("--view", action="store_true",
                   help="serve the Rerun web viewer on 127.0.0.1 and show every processed frame "
                   "there (needs the [viz] extra); it stays up after the sources end, until "
                   "Ctrl-C")
    r.add_argument("--view-port", type=positive_int, default=9090, metavar="PORT",
                   help="the viewer's HTTP port (default 9090)")
    return p


def build_parser() -> argparse.ArgumentParser:
    return add_arguments(argparse.ArgumentParser(prog="python -m runtime.predict",
                                                 description=__doc__.splitlines()[0]))


def _is_image(location: str) -> bool:
    from PIL import Image

    path = Path(location)
    return path.is_file() and path.suffix.lower() in Image.registered_extensions()


def run(a: argparse.Namespace) -> int:
    """Segment `a.inputs` with `a.bundle`; user errors raise (see `main`)."""
    from .bag import is_bag, out_bag_kind
    from .stream import Source

    options = dict(_key_value(o) for o in a.source_option)
    images = [x for x in a.inputs if _is_image(x)]
    bags = [x for x in a.inputs if is_bag(x)]
    if a.topic is not None and not bags:
        raise ValueError(f"--topic {a.topic} names a bag's image topic, and no SOURCE is a bag "
                         "(.mcap, .db3, .bag or a bag folder)")
    if a.out_bag_overlay and not a.out_bag:
        raise ValueError("--out-bag-overlay writes into the --out-bag bag: give --out-bag too")
    if a.out_bag:
        out_bag_kind(a.out_bag)  # a .db3 name, or no rosbags: said before the model loads
    if (a.out_bag or a.view) and len(images) == len(a.inputs):
        raise ValueError("--out-bag and --view take video, stream, camera or bag SOURCEs; "
                         "every SOURCE here is an image")
    # Every video source and bag is checked (a missing file, a bad URL, a bag without the
    # topic or cut short) before the model loads: an error writes nothing.
    videos = [Source(x, options=options, live=True if a.realtime else None,
                     topic=a.topic if x in bags else None)
              for x in a.inputs if x not in images]
    viewer = None
    if a.view:
        from .viewer import Viewer

        viewer = Viewer(port=a.view_port)  # a busy port fails here, before the model loads
        print(f"predict: viewer at {viewer.url}", flush=True)
    try:
        return _run(a, images, videos, viewer)
    finally:
        if viewer is not None:
            viewer.close()


def _run(a: argparse.Namespace, images: list[str], videos: list[Any], viewer: Any) -> int:
    from .vocabulary import read_class_file

    seg = load_segmenter(a, log=lambda line: print(f"predict: {line}"))
    if a.classes_file:
        vocab = read_class_file(a.classes_file)
        seg.set_vocabulary(vocab.class_names, unseen_objects=sorted(vocab.unseen_objects))
    elif a.classes:
        seg.set_vocabulary(a.classes)  # checked and encoded once, before any input is read
    print(f"predict: {seg}")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"bundle": str(a.bundle), "backend": seg.backend_name,
                              "classes": list(seg.vocabulary.class_names), "inputs": {}}
    for path in images:
        report["inputs"][str(path)] = _predict_image(seg, Path(path), out)
    interrupted = False
    if videos:
        summary, interrupted = _predict_videos(
            seg, videos, out, a.max_frames, a.max_age_ms, out_bag=a.out_bag,
            bag_overlay=a.out_bag_overlay, viewer=viewer)
        report["inputs"].update(summary)
    atomic_write_text(out / "predictions.json", json.dumps(report, indent=2))
    if interrupted:
        print("predict: interrupted; every output is whole", file=sys.stderr)
        return 130
    if viewer is not None:
        print(f"predict: done; the viewer stays at {viewer.url} until Ctrl-C", flush=True)
        viewer.wait()
    return 0


def _key_value(option: str) -> tuple[str, str]:
    key, sep, value = option.partition("=")
    if not sep or not key:
        raise ValueError(f"--source-option wants KEY=VALUE (video_size=640x480), got {option!r}")
    return key, value


def _predict_image(seg: Any, path: Path, out: Path) -> dict[str, Any]:
    from PIL import Image, UnidentifiedImageError

    from .overlay import panel
    from .preprocess import InputError

    try:
        with Image.open(path) as im:
            image = np.asarray(im.convert("RGB"))
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as e:
        raise InputError(f"cannot read image {path}: {e}") from e
    pred = seg.predict(image)
    picture = out / f"{path.stem}.png"
    overlay = panel(image, pred.class_names, pred.labels,
                    title=f"{path.name}  ({seg.backend_name}, Pred-All)")
    atomic_write(picture, lambda tmp: overlay.save(tmp, format="PNG"))
    print(f"  {path} -> {picture}: " + ", ".join(
        f"{k} {v}" for k, v in sorted(pred.counts().items(), key=lambda kv: -kv[1])[:5]))
    return {"overlay": str(picture), "pixels": pred.counts(), "timing_ms": pred.timing_ms}


def _bag_topics(sources: list[Any]) -> dict[str, str]:
    """The topic each source's labels go under in --out-bag: a bag's own image topic (unless
    two sources share it), else /<source name>."""
    from .bag import topic_name

    topics = [s.topic for s in sources if s.topic is not None]
    return {s.name: s.topic if s.topic is not None and topics.count(s.topic) == 1
            else topic_name(s.name) + (s.topic or "") for s in sources}


def _predict_videos(seg: Any, sources: list[Any], out: Path, max_frames: int | None,
                    max_age_ms: float, out_bag: str | None = None, bag_overlay: bool = False,
                    viewer: Any = None) -> tuple[dict[str, Any], bool]:
    """Every source through one `Stream`: overlay videos, frames.jsonl, a status line each, and
    on request a bag of label maps and the viewer. Returns a summary per source and whether
    Ctrl-C ended it (the outputs are whole either way)."""
    from .overlay import overlay
    from .stream import Stream
    from .video import VideoWriter

    k = seg.vocabulary.num_classes
    stream = Stream(seg, sources, max_age_ms=max_age_ms, max_frames=max_frames)
    names = [s.name for s in stream.sources]  # made unique by Stream: they name the files
    live = {s.name: s.live for s in stream.sources}
    written = dict.fromkeys(names, 0)
    writers: dict[str, VideoWriter] = {}
    first: dict[str, float] = {}
    log_path = out / "frames.jsonl"
    bag = None
    if out_bag:
        from .bag import LabelBag

        bag = LabelBag(out_bag, overlay=bag_overlay)
        bag_topic = _bag_topics(stream.sources)
    log_file = open(log_path, "w", encoding="utf-8")  # this run's frames, not a previous run's
    status = _Status(names, max_frames)
    stop = _GracefulInterrupt(stream)
    ok = False
    try:
        with stop, stream:
            for r in stream:  # Ctrl-C ends the loop between frames: every output stays whole
                record = {"source": r.source, "frame": r.frame, "pts": r.pts,
                          "captured": round(r.captured, 4), "latency_ms": round(r.latency_ms, 2),
                          "waited_ms": round(r.waited_ms, 2), "infer_ms": round(r.infer_ms, 2),
                          "dropped": r.dropped, "counts": r.prediction.counts()}
                log_file.write(json.dumps(record) + "\n")
                log_file.flush()  # a reader (or a crash) sees every frame so far
                if r.source not in writers:
                    writers[r.source] = VideoWriter(out / f"{r.source}.mp4")
                # A file's frames keep their own times; a live source's, their capture times.
                t = r.pts if r.pts is not None and not live[r.source] else r.captured
                t0 = first.setdefault(r.source, t)
                picture = overlay(r.image, r.prediction.labels, k)
                writers[r.source].write(picture, t - t0)
                if bag is not None:  # a live frame: stamped with its capture time
                    bag.write(bag_topic[r.source], r.prediction.labels, r.prediction.class_names,
                              r.stamp_ns if r.stamp_ns is not None else int(r.captured * 1e9),
                              r.frame_id if r.frame_id is not None else r.source,
                              picture if bag_overlay else None)
                if viewer is not None:
                    viewer.log(r)
                written[r.source] += 1
                status.update(r, stream.stats()[r.source])
        ok = True
    except KeyboardInterrupt:  # a second Ctrl-C: out now, but with the videos so far
        ok = True
        raise
    finally:
        status.close()
        log_file.close()
        if not any(written.values()):
            log_path.unlink(missing_ok=True)
        for w in writers.values():
            # An error drops the videos (a failed file leaves none); the end, Ctrl-C and a lost
            # live source keep what was recorded, playable.
            w.close() if ok else w.abort()
        if bag is not None:  # the same for the bag
            bag.close() if ok else bag.abort()
    summary = {}
    stats = stream.stats()
    for s in stream.sources:
        st = stats[s.name]
        video = writers[s.name].path if s.name in writers else None
        key = s.location if s.location not in summary else s.name  # the same URL twice
        summary[key] = {
            "name": s.name, "overlay": video and str(video), "frames": str(log_path),
            "processed": written[s.name], "decoded": st.decoded, "dropped": st.dropped,
            "corrupt": st.corrupt, "reconnects": st.reconnects, **status.summary(s.name)}
        if bag is not None:
            summary[key].update(bag=str(bag.path) if bag.frames else None, topic=s.topic,
                                labels_topic=f"{bag_topic[s.name]}/labels")
        print(f"  {s.location} -> {video} ({written[s.name]} frames, {st.dropped} dropped), "
              f"{log_path}")
    return summary, stop.interrupted


class _GracefulInterrupt:
    """While active, the first Ctrl-C (SIGINT) asks `stream` to stop between frames instead
    of raising wherever the main thread happens to be; a second one raises KeyboardInterrupt
    as usual. Only in the main thread (where Python delivers signals)."""

    def __init__(self, stream: Any):
        self.stream, self.interrupted, self._previous = stream, False, None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.interrupted:
            raise KeyboardInterrupt
        self.interrupted = True
        self.stream.stop()

    def __enter__(self) -> "_GracefulInterrupt":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


class _Status:
    """A tqdm line per source on stderr: frames, fps, latency p50/p99 (last 1000), drops."""

    def __init__(self, names: list[str], total: int | None):
        from tqdm import tqdm

        self._bars = {n: tqdm(desc=n, total=total, unit="frame", position=i, leave=True,
                              dynamic_ncols=True) for i, n in enumerate(names)}
        self._latency = {n: collections.deque(maxlen=1000) for n in names}
        self._start = {n: time.monotonic() for n in names}

    def update(self, r: Any, stats: Any) -> None:
        self._latency[r.source].append(r.latency_ms)
        bar = self._bars[r.source]
        bar.set_postfix_str(self._line(r.source, stats.dropped, stats.reconnects), refresh=False)
        bar.update(1)

    def _p50_p99(self, name: str) -> tuple[float, float]:
        p50, p99 = np.percentile(self._latency[name], [50, 99])
        return float(p50), float(p99)

    def _line(self, name: str, dropped: int, reconnects: int) -> str:
        p50, p99 = self._p50_p99(name)
        return (f"latency p50 {p50:.0f} ms p99 {p99:.0f} ms, dropped {dropped}"
                + (f", reconnects {reconnects}" if reconnects else ""))

    def summary(self, name: str) -> dict[str, Any]:
        lat = self._latency[name]
        seconds = time.monotonic() - self._start[name]
        if not lat:
            return {"fps": 0.0, "latency_ms": None}
        p50, p99 = self._p50_p99(name)
        return {"fps": round(self._bars[name].n / seconds, 2),
                "latency_ms": {"p50": round(p50, 2), "p99": round(p99, 2)}}

    def close(self) -> None:
        for bar in self._bars.values():
            bar.close()


def main(argv: Sequence[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    return run_command("predict", lambda: run(a))


if __name__ == "__main__":
    sys.exit(main())
