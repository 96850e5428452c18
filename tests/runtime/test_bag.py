"""ROS bags in and out (runtime.bag): bags written here with rosbags (ROS 2 MCAP and sqlite3,
ROS 1), run through `partclipseg predict --out-bag` and `Stream`, and read back."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pytest

pytest.importorskip("rosbags")

from rosbags.highlevel import AnyReader  # noqa: E402
from rosbags.rosbag1 import Writer as Writer1  # noqa: E402
from rosbags.rosbag2 import StoragePlugin, Writer  # noqa: E402
from rosbags.typesys import Stores, get_typestore  # noqa: E402

from runtime.bag import BACKGROUND_LABEL, BagImages, LabelBag  # noqa: E402
from runtime.stream import Source, SourceError, Stream  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TOPIC = "/camera/image_raw"
N = 30


@pytest.fixture(scope="module")
def frames() -> list[np.ndarray]:
    """30 SynthParts frames, 64 px (the micro model's input size)."""
    from partclipseg.data.synthparts import render_sample

    return [render_sample(0, "val", i, image_size=64)[0] for i in range(N)]


def stamp(i: int) -> tuple[int, int]:
    """Frame i's header stamp (sec, nanosec): not the record time, so a test can tell them
    apart."""
    return 1_700_000_000 + i // 10, (i % 10) * 100_000_000 + 7


def image_msg(ts: Any, rgb: np.ndarray, encoding: str, i: int, ros1: bool = False) -> Any:
    """A sensor_msgs Image (or CompressedImage for "jpeg"/"png") of `rgb` in `encoding`."""
    t = ts.types
    sec, nsec = stamp(i)
    time = t["builtin_interfaces/msg/Time"](sec, nsec)
    header = (t["std_msgs/msg/Header"](i, time, "camera_optical") if ros1
              else t["std_msgs/msg/Header"](time, "camera_optical"))
    if encoding in ("jpeg", "png"):
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, format=encoding.upper(), quality=95, subsampling=0)
        return t["sensor_msgs/msg/CompressedImage"](header, encoding,
                                                    np.frombuffer(buf.getvalue(), np.uint8))
    pixels = {"rgb8": rgb, "bgr8": rgb[..., ::-1], "mono8": rgb[..., :1],
              "rgba8": np.dstack([rgb, np.full(rgb.shape[:2], 9, np.uint8)]),
              "bgra8": np.dstack([rgb[..., ::-1], np.full(rgb.shape[:2], 9, np.uint8)]),
              "16UC1": rgb[..., :2]}[encoding]
    h, w, c = pixels.shape
    pad = 4  # rows padded past their pixels: step is honoured, not assumed
    rows = np.zeros((h, w * c + pad), np.uint8)
    rows[:, :w * c] = np.ascontiguousarray(pixels).reshape(h, w * c)
    return t["sensor_msgs/msg/Image"](header, h, w, encoding, 0, w * c + pad, rows.reshape(-1))


def write_bag(path: Path, topics: dict[str, tuple[Sequence[np.ndarray], str]],
              kind: str = "mcap") -> Path:
    """A bag at `path` ("mcap" / "sqlite3": a ROS 2 folder; "ros1": a .bag file) with, per
    topic, its frames in one encoding, recorded 50 ms after their stamps."""
    ros1 = kind == "ros1"
    ts = get_typestore(Stores.ROS1_NOETIC if ros1 else Stores.ROS2_HUMBLE)
    if ros1:
        writer: Any = Writer1(path)
    else:
        writer = Writer(path, version=9, storage_plugin=StoragePlugin.MCAP if kind == "mcap"
                        else StoragePlugin.SQLITE3)
    with writer:
        string = ts.types["std_msgs/msg/String"].__msgtype__
        other = writer.add_connection("/rosout_text", string, typestore=ts)
        conns = {}
        for topic, (_, encoding) in topics.items():
            msgtype = ("sensor_msgs/msg/CompressedImage" if encoding in ("jpeg", "png")
                       else "sensor_msgs/msg/Image")
            conns[topic] = writer.add_connection(topic, msgtype, typestore=ts)
        serialize = ts.serialize_ros1 if ros1 else ts.serialize_cdr
        for i in range(max(len(f) for f, _ in topics.values())):
            sec, nsec = stamp(i)
            log_time = sec * 10**9 + nsec + 50_000_000
            writer.write(other, log_time, serialize(ts.types["std_msgs/msg/String"]("x"),
                                                    string))
            for topic, (fs, encoding) in topics.items():
                if i < len(fs):
                    msg = image_msg(ts, fs[i], encoding, i, ros1)
                    writer.write(conns[topic], log_time, serialize(msg, msg.__msgtype__))
    return path


def read_topic(path: Path, topic: str) -> list[Any]:
    """(log time, message) of every message on `topic`."""
    with AnyReader([path], default_typestore=get_typestore(Stores.ROS2_HUMBLE)) as r:
        conns = [c for c in r.connections if c.topic == topic]
        if not conns:  # messages(()) would give every topic's
            return []
        return [(t, r.deserialize(raw, c.msgtype)) for c, t, raw in r.messages(conns)]


def labels_of(msg: Any) -> np.ndarray:
    """(H, W) int32 labels of a 16UC1 label image, -1 = background."""
    assert msg.encoding == "16UC1" and msg.step == 2 * msg.width and not msg.is_bigendian
    u16 = np.frombuffer(np.asarray(msg.data, np.uint8).tobytes(), "<u2")
    u16 = u16.reshape(msg.height, msg.width)
    return np.where(u16 == BACKGROUND_LABEL, -1, u16).astype(np.int32)


def predict(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "partclipseg.cli", "predict", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))


@pytest.mark.parametrize("kind,encoding", [("mcap", "rgb8"), ("sqlite3", "bgr8")])
def test_predict_reads_a_bag_and_writes_its_labels_as_a_bag(micro_bundle, micro_seg, frames,
                                                              tmp_path, kind, encoding):
    """The issue's command on a ROS 2 bag of 30 SynthParts frames: every message in order, the
    labels read back equal in-process predict, with the input's stamps and frame_id; the class
    names once, latched; the overlay on request (MCAP)."""
    pytest.importorskip("onnxruntime")
    bag = write_bag(tmp_path / "drive", {TOPIC: (frames, encoding),
                                         "/camera/other": (frames[:3], "mono8")}, kind)
    if kind == "mcap":
        bag = bag / "drive.mcap"  # a lone MCAP file; the sqlite3 case reads the bag folder
    out = tmp_path / "out"
    out_bag = out / ("labels.mcap" if kind == "mcap" else "labels")
    extra = ["--out-bag-overlay"] if kind == "mcap" else []
    r = predict(["--bundle", str(micro_bundle), "--backend", "onnxruntime", "--no-verify",
                 str(bag), "--topic", TOPIC, "--out", str(out), "--out-bag", str(out_bag),
                 *extra])
    assert r.returncode == 0, r.stderr
    assert out_bag.is_file() if kind == "mcap" else (out_bag / "metadata.yaml").is_file()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no staging left
    got = read_topic(out_bag, f"{TOPIC}/labels")
    assert len(got) == N
    for i, (log_time, msg) in enumerate(got):
        sec, nsec = stamp(i)
        assert (msg.header.stamp.sec, msg.header.stamp.nanosec) == (sec, nsec)
        assert msg.header.frame_id == "camera_optical" and log_time == sec * 10**9 + nsec
        np.testing.assert_array_equal(labels_of(msg), micro_seg.predict(frames[i]).labels)
    names = read_topic(out_bag, f"{TOPIC}/class_names")
    assert len(names) == 1  # once: the vocabulary did not change
    meta = json.loads(names[0][1].data)
    assert meta == {"class_names": list(micro_seg.vocabulary.class_names),
                    "encoding": "16UC1", "background": 65535}
    with AnyReader([out_bag]) as reader:  # latched: transient_local, as `ros2 bag play` needs
        qos = {c.topic: c.ext.offered_qos_profiles for c in reader.connections}
    assert qos[f"{TOPIC}/class_names"][0].durability.name == "TRANSIENT_LOCAL"
    overlays = read_topic(out_bag, f"{TOPIC}/overlay")
    assert len(overlays) == (N if kind == "mcap" else 0)
    if overlays:
        from PIL import Image

        assert overlays[0][1].format == "jpeg"
        assert Image.open(io.BytesIO(overlays[0][1].data.tobytes())).size == (64, 64)
    lines = (out / "frames.jsonl").read_text().splitlines()
    assert [json.loads(x)["frame"] for x in lines] == list(range(N))
    assert json.loads(lines[0])["pts"] == pytest.approx(stamp(0)[0] + stamp(0)[1] / 1e9)


def test_every_encoding_becomes_the_same_rgb(frames, tmp_path):
    """rgb8, bgr8, rgba8, bgra8, mono8 (rows padded past their pixels), PNG and JPEG, from a
    ROS 1 bag: the RGB the camera saw (JPEG within its loss), every message, header stamps."""
    encodings = ["rgb8", "bgr8", "rgba8", "bgra8", "mono8", "png", "jpeg"]
    bag = write_bag(tmp_path / "drive.bag",
                    {f"/cam/{e}": (frames[:4], e) for e in encodings}, "ros1")
    for e in encodings:
        got = list(BagImages(bag, f"/cam/{e}").frames())
        assert [f.index for f in got] == [0, 1, 2, 3]
        assert [f.stamp_ns for f in got] == [s * 10**9 + n for s, n in map(stamp, range(4))]
        for f, want in zip(got, frames):
            want = np.repeat(want[..., :1], 3, axis=2) if e == "mono8" else want
            if e == "jpeg":  # within JPEG's loss, and in RGB order (BGR would be far off)
                err = np.abs(f.rgb.astype(int) - want).mean()
                assert err < 6 < np.abs(f.rgb[..., ::-1].astype(int) - want).mean(), err
            else:
                np.testing.assert_array_equal(f.rgb, want)


def test_a_ros1_bag_through_a_stream_and_out_as_a_ros1_bag(micro_seg, frames, tmp_path):
    """The API: Stream(seg, [Source(bag, topic=...)]) gives every message in order with its
    stamp; LabelBag("x.bag") writes ROS 1 label images that read back equal."""
    bag = write_bag(tmp_path / "drive.bag", {TOPIC: (frames[:5], "rgb8")}, "ros1")
    results: list[Any] = []
    Stream(micro_seg, [Source(bag, topic=TOPIC)]).run(results.append)
    assert [r.frame for r in results] == list(range(5))
    assert [r.stamp_ns for r in results] == [s * 10**9 + n for s, n in map(stamp, range(5))]
    assert {r.frame_id for r in results} == {"camera_optical"}
    with LabelBag(tmp_path / "labels.bag") as out:
        for r in results:
            out.write(TOPIC, r.prediction.labels, r.prediction.class_names, r.stamp_ns,
                      r.frame_id)
    back = read_topic(tmp_path / "labels.bag", f"{TOPIC}/labels")
    assert len(back) == 5
    for (_, msg), r in zip(back, results):
        np.testing.assert_array_equal(labels_of(msg), r.prediction.labels)


def one_line(stderr: str) -> str:
    lines = [x for x in stderr.splitlines() if x.strip()]
    assert len(lines) == 1, stderr
    return lines[0]


def test_a_bag_without_the_topic_is_named_and_nothing_is_written(micro_bundle, frames,
                                                                 tmp_path):
    bag = write_bag(tmp_path / "drive", {"/front/image": (frames[:2], "rgb8"),
                                         "/rear/image": (frames[:2], "jpeg")})
    out = tmp_path / "out"
    r = predict(["--bundle", str(micro_bundle), str(bag), "--topic", TOPIC, "--out", str(out),
                 "--out-bag", str(out / "labels.mcap")])
    line = one_line(r.stderr)
    assert r.returncode == 2 and TOPIC in line and "/front/image, /rear/image" in line, line
    assert not out.exists()
    with pytest.raises(SourceError, match="2 image topics .*name one with --topic"):
        Source(bag)  # no topic, two to choose from


@pytest.mark.parametrize("kind", ["mcap", "sqlite3", "ros1"])
def test_a_bag_cut_in_half_is_named_and_the_previous_output_stays(micro_bundle, frames,
                                                                   tmp_path, kind):
    """A bag copied halfway: one line naming the file and where it ends; the previous
    --out-bag, frames.jsonl and videos are untouched, nothing new is written."""
    bag = write_bag(tmp_path / ("drive.bag" if kind == "ros1" else "drive"),
                    {TOPIC: (frames[:10], "rgb8")}, kind)
    data = bag if kind == "ros1" else next(p for p in bag.iterdir() if p.suffix != ".yaml")
    size = data.stat().st_size
    with open(data, "r+b") as f:
        f.truncate(size // 2)
    out = tmp_path / "out"
    out.mkdir()
    previous = out / "labels.mcap"
    previous.write_bytes(b"the previous run's bag")
    r = predict(["--bundle", str(micro_bundle), str(bag), "--topic", TOPIC, "--out", str(out),
                 "--out-bag", str(previous)])
    line = one_line(r.stderr)
    assert r.returncode == 2 and str(bag) in line and f"ends at byte {size // 2}" in line, line
    assert sorted(p.name for p in out.iterdir()) == ["labels.mcap"]
    assert previous.read_bytes() == b"the previous run's bag"


def test_an_unknown_encoding_is_named_with_the_encodings_seen(frames, tmp_path):
    bag = write_bag(tmp_path / "depth", {"/depth": (frames[:2], "16UC1")})
    with pytest.raises(SourceError, match=r"'16UC1' is not supported \(encodings seen: "
                                          r"16UC1; supported: sensor_msgs/Image in rgb8"):
        Source(bag, topic="/depth")


def test_a_label_bag_is_whole_or_absent(frames, tmp_path):
    """Until close() the bag lives under a hidden temporary name (a killed run leaves the
    previous one); abort() removes it; close() replaces the previous bag (a folder too)."""
    labels = np.full((8, 8), -1, np.int32)
    labels[2:4, 2:4] = 1
    for name in ("labels.mcap", "labels"):
        path = tmp_path / name
        LabelBag(path).close()  # no frames: nothing
        assert not path.exists()
        first = LabelBag(path)
        first.write(TOPIC, labels, ["a", "b"], 5, "cam")
        assert not path.exists() and len(list(tmp_path.glob(f".{name}.*.tmp"))) == 1
        first.close()
        second = LabelBag(path)
        second.write(TOPIC, labels + 1, ["a", "b", "c"], 6, "cam")
        second.abort()  # an error mid-run: the first bag stays
        assert not list(tmp_path.glob(f".{name}.*"))
        msgs = read_topic(path, f"{TOPIC}/labels")
        assert len(msgs) == 1 and msgs[0][0] == 5
        np.testing.assert_array_equal(labels_of(msgs[0][1]), labels)
        with LabelBag(path) as third:
            third.write(TOPIC, labels, ["a", "b"], 7, "cam")
            third.write(TOPIC, labels, ["a", "c"], 8, "cam")  # new classes: sent again
        assert [t for t, _ in read_topic(path, f"{TOPIC}/labels")] == [7, 8]
        assert [json.loads(m.data)["class_names"] for _, m in
                read_topic(path, f"{TOPIC}/class_names")] == [["a", "b"], ["a", "c"]]
        shutil.rmtree(path) if path.is_dir() else path.unlink()
