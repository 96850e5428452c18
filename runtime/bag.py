"""ROS bags in and out, without a ROS install (`rosbags`): camera images as a `Stream` source,
label maps as a bag a robot stack replays.

    images = BagImages("drive.mcap", "/camera/image_raw")  # checked now: topic, encoding, damage
    for f in images.frames():                                # every message, in the bag's order
        f.rgb, f.stamp_ns, f.frame_id                        # (H, W, 3) uint8; header stamp (ns)

    with LabelBag("out/labels.mcap", overlay=True) as bag:   # written beside, renamed when whole
        bag.write("/camera/image_raw", labels, class_names, f.stamp_ns, f.frame_id, overlay_rgb)

Bags read: a ROS 2 bag folder (metadata.yaml + sqlite3 or MCAP), a lone ROS 2 `.mcap` or `.db3`
file, a ROS 1 `.bag`. Images: `sensor_msgs/Image` in rgb8, bgr8, rgba8, bgra8 or mono8 (8UC1),
and `sensor_msgs/CompressedImage` in any format Pillow decodes (JPEG, PNG).

Bags written (`LabelBag`, by the path's suffix): `.mcap` a ROS 2 MCAP file, `.bag` a ROS 1 bag,
anything else a ROS 2 sqlite3 bag folder. Per frame, on `<topic>/labels`, the label map as a
`sensor_msgs/Image` in 16UC1 (class index, 65535 = background), with its input's header stamp
and frame_id; on `<topic>/class_names` a `std_msgs/String` of JSON, latched, written before the
first label map and again whenever the classes change; on request the overlay as a JPEG
`sensor_msgs/CompressedImage` on `<topic>/overlay`.

rosbags is imported only when a bag is opened: `import runtime.bag` needs numpy alone.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, NamedTuple, Sequence

import numpy as np

from .errors import UserError
from .io import StagedWriter

__all__ = ["BagImages", "BagFrame", "LabelBag", "BagError", "is_bag", "topic_name",
           "out_bag_kind", "LABEL_ENCODING", "BACKGROUND_LABEL", "IMAGE_TYPES", "ENCODINGS"]

IMAGE_TYPES = ("sensor_msgs/msg/Image", "sensor_msgs/msg/CompressedImage")
# encoding -> channels; each becomes RGB by a channel view (no colour maths: the model was
# trained on RGB, and a bgr8 camera's bytes only need their order reversed).
ENCODINGS = {"rgb8": 3, "bgr8": 3, "rgba8": 4, "bgra8": 4, "mono8": 1, "8UC1": 1}
# 16UC1, not 32SC1: rviz2 and Foxglove display 16UC1 (as mono16) and not 32SC1, and half the
# bytes. Class indexes stay far below 65535 (a vocabulary has hundreds of classes).
LABEL_ENCODING = "16UC1"
BACKGROUND_LABEL = 65535
SUPPORTED = ("sensor_msgs/Image in " + ", ".join(ENCODINGS)
             + "; sensor_msgs/CompressedImage in JPEG or PNG")
_INSTALL = "reading and writing bags needs rosbags: pip install 'partclipseg-deploy[ros]'"


class BagError(UserError):
    """A bag that cannot be read as asked (no such topic, an encoding not supported, a damaged
    or truncated file), or an output bag that cannot be written."""


class BagFrame(NamedTuple):
    """One image message: index (0-based, among the topic's messages), rgb (H, W, 3) uint8,
    stamp_ns (the header stamp in ns; the bag's receive time when the header's is zero),
    frame_id (the header's), log_time_ns (the bag's receive time)."""

    index: int
    rgb: np.ndarray
    stamp_ns: int
    frame_id: str
    log_time_ns: int


def is_bag(location: str | Path) -> bool:
    """A ROS bag by its name: a .mcap, .db3 or .bag file, or a folder with metadata.yaml."""
    path = Path(location)
    if path.is_dir():
        return (path / "metadata.yaml").is_file()
    return path.suffix.lower() in (".mcap", ".db3", ".bag") and path.is_file()


def _import_rosbags() -> Any:
    try:
        import rosbags.highlevel  # noqa: F401
        import rosbags.typesys
    except ImportError as e:
        raise ImportError(_INSTALL) from e
    return rosbags


def _damaged(path: Path, error: Exception) -> BagError:
    """The error of a bag rosbags cannot open: most often one cut short (a copy or a recording
    that did not finish), which lacks the end (MCAP's footer, ROS 1's index) or pages (sqlite3)."""
    files = [path] if path.is_file() else sorted(
        p for p in path.iterdir() if p.suffix in (".mcap", ".db3"))
    sizes = ", ".join(f"{p.name} ends at byte {p.stat().st_size}" for p in files)
    return BagError(f"cannot open bag {path}: {error} ({sizes}: cut short or damaged? copy it "
                    "again, or repair it with `ros2 bag reindex` / `rosbag reindex`)")


def _to_rgb(msg: Any, msgtype: str, seen: set[str]) -> np.ndarray:
    """(H, W, 3) uint8 RGB of a deserialized Image / CompressedImage; `seen` collects the
    encodings met so far, for the error message."""
    if msgtype.endswith("CompressedImage"):
        from PIL import Image, UnidentifiedImageError

        fmt = str(msg.format)
        seen.add(fmt)
        if "compressedDepth" in fmt:  # PNG of depth with a custom header: not a camera image
            raise BagError(f"CompressedImage format {fmt!r} is depth, not a camera image")
        try:
            with Image.open(io.BytesIO(np.asarray(msg.data, np.uint8).tobytes())) as im:
                return np.asarray(im.convert("RGB"))
        except (OSError, UnidentifiedImageError) as e:
            raise BagError(f"CompressedImage format {fmt!r} does not decode ({e}); formats "
                           f"seen: {', '.join(sorted(seen))}") from None
    enc = str(msg.encoding)
    seen.add(enc)
    if enc not in ENCODINGS:
        raise BagError(f"encoding {enc!r} is not supported (encodings seen: "
                       f"{', '.join(sorted(seen))}; supported: {SUPPORTED})")
    ch, h, w, step = ENCODINGS[enc], int(msg.height), int(msg.width), int(msg.step)
    data = np.asarray(msg.data, np.uint8).reshape(-1)
    if step < w * ch or data.size < h * step or h == 0 or w == 0:
        raise BagError(f"a {w}x{h} {enc} image needs step >= {w * ch} and {h} rows of it, got "
                       f"step {step} and {data.size} bytes")
    # step may pad each row: view the rows, then drop the padding.
    pixels = data[:h * step].reshape(h, step)[:, :w * ch].reshape(h, w, ch)
    if ch == 1:
        return np.repeat(pixels, 3, axis=2)
    if enc.startswith("bgr"):
        return np.ascontiguousarray(pixels[..., 2::-1])
    return np.ascontiguousarray(pixels[..., :3])


def _stamp_ns(msg: Any) -> int:
    return int(msg.header.stamp.sec) * 1_000_000_000 + int(msg.header.stamp.nanosec)


class BagImages:
    """The image messages of one topic of a bag, checked when made: the bag opens (a truncated
    or damaged one is named here, with its size), the topic exists and holds images, and its
    first message decodes. Raises `BagError` naming the problem and the fix.

    path: a bag (see `is_bag`); topic: its image topic (default: the bag's only one).
    """

    def __init__(self, path: str | Path, topic: str | None = None):
        self.path = Path(path)
        if not self.path.exists():
            raise BagError(f"{self.path}: no such bag")
        if not is_bag(self.path):
            raise BagError(f"{self.path} is not a ROS bag (a .mcap, .db3 or .bag file, or a "
                           "folder with metadata.yaml); a topic is given only with a bag")
        with self._open() as reader:
            topics = {name: info for name, info in reader.topics.items()}
            images = sorted(n for n, i in topics.items() if i.msgtype in IMAGE_TYPES)
            listed = ", ".join(images) or "none"
            if topic is None:
                if len(images) != 1:
                    raise BagError(f"{self.path} has {len(images)} image topics ({listed}): "
                                   "name one with --topic (Source(..., topic=...))")
                topic = images[0]
            if topic not in topics:
                raise BagError(f"{self.path} has no topic {topic!r}; its image topics: {listed}")
            if topics[topic].msgtype not in IMAGE_TYPES:
                raise BagError(f"topic {topic!r} of {self.path} is {topics[topic].msgtype}, not "
                               f"an image; its image topics: {listed}")
            self.topic, self.msgtype = topic, str(topics[topic].msgtype)
            self.count = int(topics[topic].msgcount)
            if self.count == 0:
                raise BagError(f"topic {topic!r} of {self.path} has no messages")
            first = next(self._frames(reader))  # an encoding we cannot read fails here, early
        self.size = first.rgb.shape[:2]

    def __repr__(self) -> str:
        return f"BagImages({str(self.path)!r}, {self.topic!r}, {self.count} messages)"

    def _open(self) -> Any:
        rosbags = _import_rosbags()
        from rosbags.highlevel import AnyReader, AnyReaderError

        # ROS 2 bags written before type descriptions were stored need a default typestore.
        store = rosbags.typesys.get_typestore(rosbags.typesys.Stores.ROS2_HUMBLE)
        try:
            reader = AnyReader([self.path], default_typestore=store)
            reader.open()
        except (AnyReaderError, OSError) as e:
            raise _damaged(self.path, e) from None
        return _Closing(reader)

    def frames(self) -> Iterator[BagFrame]:
        """Every message of the topic, in the bag's order, as RGB. A message that cannot be read
        raises `BagError` naming its index and the last stamp read."""
        with self._open() as reader:
            yield from self._frames(reader)

    def _frames(self, reader: Any) -> Iterator[BagFrame]:
        connections = [c for c in reader.connections if c.topic == self.topic]
        seen: set[str] = set()
        index, last = 0, None
        messages = reader.messages(connections=connections)
        while True:
            try:
                item = next(messages, None)
                if item is None:
                    return
                connection, log_time, raw = item
                msg = reader.deserialize(raw, connection.msgtype)
                rgb = _to_rgb(msg, connection.msgtype, seen)
            except BagError as e:
                raise BagError(f"{self.path} {self.topic} message {index}: {e}") from None
            except Exception as e:  # noqa: BLE001: rosbags, sqlite, lz4, zstd raise their own
                raise BagError(f"cannot read {self.path} {self.topic} at message {index} of "
                               f"{self.count} (after stamp {last}): {type(e).__name__}: {e} "
                               "(damaged? copy it again, or `ros2 bag reindex` it)") from None
            stamp = _stamp_ns(msg) or int(log_time)  # an unset header: the receive time
            last = stamp
            yield BagFrame(index, rgb, stamp, str(msg.header.frame_id), int(log_time))
            index += 1


class _Closing:
    """An opened AnyReader as a context manager that closes it (it is opened already)."""

    def __init__(self, reader: Any):
        self.reader = reader

    def __enter__(self) -> Any:
        return self.reader

    def __exit__(self, *exc: object) -> None:
        self.reader.close()


def topic_name(name: str) -> str:
    """A valid ROS topic name from a source name: "udp-127.0.0.1-5000" -> "/udp_127_0_0_1_5000"
    (ROS names allow letters, digits, "_" and "/", and no digit after a "/")."""
    clean = re.sub(r"[^A-Za-z0-9_/]", "_", name.strip("/")) or "source"
    return "/" + re.sub(r"(^|/)(\d)", r"\1_\2", clean)


def out_bag_kind(path: str | Path) -> str:
    """"mcap", "ros1" or "sqlite3": the bag `LabelBag(path)` writes, by the suffix. Raises
    BagError for a .db3 name (a sqlite3 bag is a folder) and ImportError without rosbags."""
    suffix = Path(path).suffix.lower()
    if suffix == ".db3":
        raise BagError(f"--out-bag {path}: a sqlite3 bag is a folder; give its name without "
                       ".db3 (or PATH.mcap for one MCAP file)")
    _import_rosbags()
    return {".mcap": "mcap", ".bag": "ros1"}.get(suffix, "sqlite3")


@dataclass
class _Connections:
    labels: Any
    class_names: Any
    overlay: Any | None
    classes: tuple[str, ...] | None = None  # the class names last written


class LabelBag(StagedWriter):
    """Label maps out as a bag, written under a temporary name beside `path` and renamed onto
    it by `close()`: a reader (or a run killed midway) finds the previous bag or none, never
    half of one. `abort()` (or an error inside `with`) removes the temporary files; Ctrl-C inside
    `with` finishes the bag, like an overlay video.

    path: `.mcap` (ROS 2, MCAP), `.bag` (ROS 1) or a folder (ROS 2, sqlite3).
    overlay: also write each frame's overlay, JPEG, on `<topic>/overlay`.
    """

    def __init__(self, path: str | Path, overlay: bool = False, jpeg_quality: int = 90):
        self.path = Path(path)
        self.kind = out_bag_kind(self.path)
        rosbags = _import_rosbags()
        ros1 = self.kind == "ros1"
        self._ts = rosbags.typesys.get_typestore(
            rosbags.typesys.Stores.ROS1_NOETIC if ros1 else rosbags.typesys.Stores.ROS2_HUMBLE)
        self.overlay, self.jpeg_quality = overlay, jpeg_quality
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Staged in a hidden sibling folder: same file system, so the final move is a rename.
        self._stage = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.", suffix=".tmp",
                                            dir=self.path.parent))
        try:
            if ros1:
                from rosbags.rosbag1 import Writer as Writer1

                self._writer: Any = Writer1(self._stage / self.path.name)
            else:
                from rosbags.rosbag2 import StoragePlugin, Writer

                plugin = StoragePlugin.MCAP if self.kind == "mcap" else StoragePlugin.SQLITE3
                self._writer = Writer(self._stage / self.path.stem, version=9,
                                      storage_plugin=plugin)
            self._writer.open()
        except BaseException:
            shutil.rmtree(self._stage, ignore_errors=True)
            raise
        self._topics: dict[str, _Connections] = {}
        self.frames = 0

    def __repr__(self) -> str:
        return f"LabelBag({str(self.path)!r}, {self.kind}, {self.frames} frames)"

    def _connect(self, topic: str) -> _Connections:
        if topic not in self._topics:
            t = self._ts.types
            image, string = t["sensor_msgs/msg/Image"], t["std_msgs/msg/String"]
            compressed = t["sensor_msgs/msg/CompressedImage"]
            if self.kind == "ros1":
                latched: dict[str, Any] = {"latching": 1}
            else:
                from rosbags.interfaces import (Qos, QosDurability, QosHistory, QosLiveliness,
                                                QosReliability, QosTime)

                # transient_local: `ros2 bag play` republishes it to late subscribers (latched).
                zero = QosTime(0, 0)
                latched = {"offered_qos_profiles": [Qos(
                    QosHistory.KEEP_LAST, 1, QosReliability.RELIABLE,
                    QosDurability.TRANSIENT_LOCAL, zero, zero, QosLiveliness.AUTOMATIC, zero,
                    False)]}
            add = self._writer.add_connection
            self._topics[topic] = _Connections(
                add(f"{topic}/labels", image.__msgtype__, typestore=self._ts),
                add(f"{topic}/class_names", string.__msgtype__, typestore=self._ts, **latched),
                add(f"{topic}/overlay", compressed.__msgtype__, typestore=self._ts)
                if self.overlay else None)
        return self._topics[topic]

    def _header(self, stamp_ns: int, frame_id: str) -> Any:
        t = self._ts.types
        stamp = t["builtin_interfaces/msg/Time"](stamp_ns // 1_000_000_000,
                                                 stamp_ns % 1_000_000_000)
        if self.kind == "ros1":
            return t["std_msgs/msg/Header"](self.frames, stamp, frame_id)  # ROS 1 has seq
        return t["std_msgs/msg/Header"](stamp, frame_id)

    def _put(self, connection: Any, stamp_ns: int, msg: Any) -> None:
        data = (self._ts.serialize_ros1(msg, msg.__msgtype__) if self.kind == "ros1"
                else self._ts.serialize_cdr(msg, msg.__msgtype__))
        self._writer.write(connection, stamp_ns, data)

    def write(self, topic: str, labels: np.ndarray, class_names: Sequence[str], stamp_ns: int,
              frame_id: str, overlay: np.ndarray | None = None) -> None:
        """One frame: labels (H, W) int (-1 = background) under `topic` ("/camera/image_raw"
        gives /camera/image_raw/labels), class_names the names its indexes point to, stamp_ns
        and frame_id the input's header (the bag's record time is the stamp too), overlay
        (H, W, 3) uint8 RGB when the bag was opened with overlay=True."""
        if len(class_names) >= BACKGROUND_LABEL:
            raise BagError(f"{len(class_names)} classes do not fit 16UC1 labels")
        c = self._connect(topic)
        t = self._ts.types
        header = self._header(int(stamp_ns), frame_id)
        names = tuple(class_names)
        if names != c.classes:  # once, and again when the vocabulary changes
            text = json.dumps({"class_names": list(names), "encoding": LABEL_ENCODING,
                               "background": BACKGROUND_LABEL})
            self._put(c.class_names, stamp_ns, t["std_msgs/msg/String"](text))
            c.classes = names
        h, w = labels.shape
        u16 = np.where(labels < 0, BACKGROUND_LABEL, labels).astype("<u2")  # little-endian
        self._put(c.labels, stamp_ns, t["sensor_msgs/msg/Image"](
            header, h, w, LABEL_ENCODING, 0, 2 * w, u16.view(np.uint8).reshape(-1)))
        if c.overlay is not None:
            if overlay is None:
                raise ValueError("this LabelBag writes overlays: pass overlay=")
            from PIL import Image

            buf = io.BytesIO()
            Image.fromarray(overlay).save(buf, format="JPEG", quality=self.jpeg_quality)
            self._put(c.overlay, stamp_ns, t["sensor_msgs/msg/CompressedImage"](
                header, "jpeg", np.frombuffer(buf.getvalue(), np.uint8)))
        self.frames += 1

    def close(self) -> Path | None:
        """Finish the bag and rename it onto `path` (None, and nothing written, without
        frames). A folder (sqlite3) replaces the previous one by two renames: between them
        there is none."""
        if self._writer is None:
            return self.path if self.frames else None
        try:
            self._writer.close()
            self._writer = None
            if not self.frames:
                return None
            if self.kind == "sqlite3":
                built = self._stage / self.path.stem
                for f in built.iterdir():
                    _fsync(f)
                if self.path.exists():
                    old = self._stage / "previous"
                    os.replace(self.path, old)  # moved aside, removed with the stage
                os.replace(built, self.path)
            else:
                built = (self._stage / self.path.name if self.kind == "ros1"
                         else self._stage / self.path.stem / f"{self.path.stem}.mcap")
                _fsync(built)
                os.replace(built, self.path)
            return self.path
        finally:
            self._writer = None
            shutil.rmtree(self._stage, ignore_errors=True)

    def abort(self) -> None:
        """Drop the bag: close the writer, remove the temporary files; `path` is untouched."""
        writer, self._writer = self._writer, None
        if writer is not None:
            try:
                writer.close() if self.kind == "ros1" else writer.abort()
            except Exception:  # noqa: BLE001: a half-written bag goes anyway
                pass
        shutil.rmtree(self._stage, ignore_errors=True)



def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())
