"""Reliability and security: bad input, corrupt files, killed processes, threads.

Every bad input gets a named exception (InputError, VocabularyError, BundleError,
CheckpointError, DatasetError, FileExistsError) or a CLI exit code 2 with a message, never a
crash, a hang or a half-written output. Corruption is fuzzed with hypothesis (byte flips and
truncations at chosen offsets). Killed processes: training killed inside a checkpoint write and
an export killed before its swap leave the previous files whole and usable.

Most runtime tests use a "micro" bundle (3-block 64-wide ViT at 64 px, ~5 ms a prediction) so
the fuzzing and the 1000-prediction thread test stay fast on 2 CPU cores.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from conftest import VOCAB  # noqa: E402
from export.bundle import clean_stale_staging, staged_bundle, update_manifest  # noqa: E402
from partclipseg.checkpoint import CheckpointError, load_checkpoint  # noqa: E402
from runtime import BundleError, InputError, Segmenter, VocabularyError  # noqa: E402
from runtime import bundle as spec  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FUZZ = settings(max_examples=25, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])
K = VOCAB.num_classes


def _image(h=48, w=56, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{ROOT}{os.pathsep}"
               + os.environ.get("PYTHONPATH", ""))
    return env


def _hidden(folder: Path, name: str) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(f".{name}."))


# -- fixtures -----------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def micro_ckpt(tmp_path_factory):
    from partclipseg.checkpoint import save_checkpoint
    from partclipseg.model import build_model

    torch.manual_seed(0)
    return save_checkpoint(tmp_path_factory.mktemp("micro") / "micro.pt",
                           build_model("micro"), VOCAB)


@pytest.fixture(scope="session")
def micro_bundle(tmp_path_factory, micro_ckpt):
    """FP32 + FP16 bundle of `micro_ckpt` (read-only: copy it before changing it)."""
    from export.onnx import export_onnx

    out = tmp_path_factory.mktemp("micro_bundle") / "micro"
    export_onnx(micro_ckpt, out)
    return out


@pytest.fixture(scope="session")
def seg(micro_bundle):
    return Segmenter.load(micro_bundle, backend="onnxruntime", threads=1)


@pytest.fixture(scope="session")
def fuzz_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


def _copy(src: Path, dst: Path) -> Path:
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    return dst


# == 1. bad input to the runtime ===============================================================
_DTYPES = st.sampled_from([np.uint8, np.int8, np.uint16, np.int32, np.int64, np.float16,
                           np.float32, np.float64, np.bool_, np.complex64])


@st.composite
def _arrays(draw):
    dtype = np.dtype(draw(_DTYPES))
    ndim = draw(st.integers(0, 4))
    shape = tuple(draw(st.integers(0, 9)) for _ in range(ndim))
    if ndim == 3 and draw(st.booleans()):
        shape = shape[:2] + (3,)  # often the right channel count
    if dtype.kind == "f":
        elements = st.floats(allow_nan=True, allow_infinity=True, width=dtype.itemsize * 8)
    else:
        elements = None
    return draw(hnp.arrays(dtype, shape, elements=elements))


@FUZZ
@given(image=_arrays())
def test_any_array_is_segmented_or_refused_by_name(seg, image):
    valid = (image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
             and image.shape[0] > 0 and image.shape[1] > 0)
    if not valid:
        with pytest.raises(InputError):
            seg.predict(image)
        return
    p = seg.predict(image)
    assert p.labels.shape == image.shape[:2] and p.labels.dtype == np.int32
    assert p.labels.min() >= -1 and p.labels.max() < K


@pytest.mark.parametrize("bad", [None, "frame.jpg", b"\x00" * 12, {"image": 1}, 3.5,
                                 [[[0, 0, 0]]]])
def test_non_arrays_are_refused(seg, bad):
    with pytest.raises(InputError, match="numpy array"):
        seg.predict(bad)
    with pytest.raises(InputError):
        seg.predict_batch([_image(), bad])


def test_float_images_with_nan_and_inf_are_refused_with_the_conversion(seg):
    for v in (np.nan, np.inf, -np.inf, 0.5):
        with pytest.raises(InputError, match=r"uint8.*np\.clip"):
            seg.predict(np.full((20, 20, 3), v, np.float32))


def test_odd_memory_layouts_give_the_same_labels(seg):
    image = _image(40, 52, 3)
    ref = seg.predict(image).labels
    fortran = np.asfortranarray(image)
    readonly = image.copy()
    readonly.flags.writeable = False
    padded = np.zeros((40, 52, 4), np.uint8)
    padded[..., :3] = image
    for variant in (fortran, readonly, padded[..., :3], image[::-1][::-1], image[:, ::1]):
        np.testing.assert_array_equal(seg.predict(variant).labels, ref)
    np.testing.assert_array_equal(seg.predict(image[::-1]).labels, seg.predict(
        np.ascontiguousarray(image[::-1])).labels)


@pytest.mark.parametrize("shape", [(1, 1, 3), (1, 700, 3), (700, 1, 3)])
def test_degenerate_sizes_work(seg, shape):
    p = seg.predict(np.full(shape, 128, np.uint8))
    assert p.labels.shape == shape[:2]


def test_a_12_megapixel_frame_works(seg):
    """4000 x 3000: resized in, label map out at full resolution (no crash, no hang)."""
    image = np.random.default_rng(0).integers(0, 256, (3000, 4000, 3), dtype=np.uint8)
    p = seg.predict(image)
    assert p.labels.shape == (3000, 4000)
    assert p.labels.min() >= -1 and p.labels.max() < K
    assert sum(p.counts().values()) == int((p.labels >= 0).sum())


@FUZZ
@given(mask=st.one_of(
    hnp.arrays(st.sampled_from([np.float32, np.float64]), (30, 40),
               elements=st.floats(allow_nan=True, allow_infinity=True, width=32)),
    hnp.arrays(st.sampled_from([np.int8, np.int64]), (30, 40), elements=st.integers(-2, 3)),
    hnp.arrays(np.uint8, (30, 40), elements=st.integers(0, 3)),
    hnp.arrays(np.bool_, st.sampled_from([(30, 40), (40, 30), (30, 40, 1), (30,), (30, 41)])),
))
def test_object_masks_work_or_are_refused_by_name(seg, mask):
    image = _image(30, 40, 1)
    valid = mask.shape == (30, 40) and (mask.dtype == bool or (
        mask.dtype.kind in "iu" and mask.min() >= 0 and mask.max() <= 1))
    if not valid:
        with pytest.raises(InputError):
            seg.predict(image, object_mask=mask, object_class="blue bird")
        return
    p = seg.predict(image, object_mask=mask, object_class="blue bird")
    assert (p.labels[~mask.astype(bool)] == -1).all()
    bird = set(VOCAB.object_classes(VOCAB.object_index("blue bird")))
    assert set(np.unique(p.labels)) - {-1} <= bird


@pytest.mark.parametrize("obj, err", [(7, InputError), (-1, InputError), (1.0, InputError),
                                      ("", VocabularyError), ("blue", VocabularyError),
                                      (None, InputError), (b"blue bird", InputError)])
def test_bad_object_classes_are_named(seg, obj, err):
    mask = np.ones((30, 40), bool)
    with pytest.raises(err):
        seg.predict(_image(30, 40), object_mask=mask, object_class=obj)


_NAMES = list(VOCAB.class_names)


@FUZZ
@given(classes=st.lists(st.one_of(st.sampled_from(_NAMES), st.text(max_size=12),
                                  st.sampled_from(["", " ", "blue bird's", "'s", "BLUE BIRD'S WING",
                                                   "blue bird's wing "]),
                                  st.integers(), st.none()), max_size=6))
def test_class_requests_work_or_are_refused_by_name(seg, classes):
    valid = (len(classes) > 0 and all(isinstance(c, str) and c in _NAMES for c in classes)
             and len(set(classes)) == len(classes))
    if not valid:
        with pytest.raises((VocabularyError, InputError)) as e:
            seg.predict(_image(), classes=classes)
        assert str(e.value)
        return
    p = seg.predict(_image(), classes=classes)
    assert p.class_names == tuple(classes) and p.labels.max() < len(classes)


@pytest.mark.parametrize("classes", [[["blue bird", "wing"]], ["blue bird's wing", "blue bird's wing", 3, 3]])
def test_malformed_class_lists_are_named(seg, classes):
    with pytest.raises((VocabularyError, InputError)):
        seg.predict(_image(), classes=classes)


def test_a_single_string_as_classes_is_refused(seg):
    with pytest.raises((VocabularyError, InputError)):
        seg.predict(_image(), classes="blue bird's wing")


# -- float32 image bundles ---------------------------------------------------------------------
def test_float32_bundle_takes_the_same_uint8_frames_and_refuses_nan(micro_ckpt, seg, tmp_path):
    from export.onnx import export_onnx

    export_onnx(micro_ckpt, tmp_path / "f", image_dtype="float32", fp16=False)
    fseg = Segmenter.load(tmp_path / "f", backend="onnxruntime", threads=1)
    assert fseg.backend.session.get_inputs()[0].type == "tensor(float)"
    images = [_image(seed=s) for s in range(3)]
    for im in images:
        np.testing.assert_array_equal(fseg.predict(im).labels, seg.predict(im).labels)
    for bad in (np.full((16, 16, 3), np.nan, np.float32), np.full((16, 16, 3), np.inf)):
        with pytest.raises(InputError, match="uint8"):
            fseg.predict(bad)


def test_non_finite_vocabulary_vectors_are_refused(micro_bundle, tmp_path):
    b = _copy(micro_bundle, tmp_path / "b")
    with np.load(b / spec.VOCAB_FILE) as z:
        arrays = {k: z[k] for k in z.files}
    for value in (np.nan, np.inf):
        bad = dict(arrays)
        bad["class_film_add"] = arrays["class_film_add"].copy()
        bad["class_film_add"][1, 2] = value
        with open(b / "vocab-bad.npz", "wb") as f:
            np.savez(f, **bad)
        update_manifest(b, {}, {"vocab": "vocab-bad.npz"})  # consistent size + hash
        with pytest.raises(BundleError, match="finite"):
            Segmenter.load(b, backend="onnxruntime")
    bad = dict(arrays, class_part=arrays["class_part"].astype(np.float32))
    with open(b / "vocab-bad.npz", "wb") as f:
        np.savez(f, **bad)
    update_manifest(b, {}, {"vocab": "vocab-bad.npz"})
    with pytest.raises(BundleError, match="integer"):
        Segmenter.load(b, backend="onnxruntime")


# == 2. corrupt and foreign files ===============================================================
def _mutate(data: bytes, offset: float, xor: int, truncate: bool) -> bytes:
    at = min(int(offset * len(data)), len(data) - 1)
    if truncate:
        return data[:at]
    b = bytearray(data)
    b[at] ^= xor
    return bytes(b)


_MUTATION = dict(offset=st.floats(0, 1, exclude_max=True), xor=st.integers(1, 255),
                 truncate=st.booleans())


@FUZZ
@given(**_MUTATION)
def test_fuzzed_manifest_is_named_or_harmless(micro_bundle, fuzz_dir, offset, xor, truncate):
    """A damaged manifest.json: BundleError (or VocabularyError for a damaged class list that
    is still a valid one) at load, or a bundle that still predicts valid labels."""
    b = fuzz_dir / "manifest"
    if not b.exists():
        _copy(micro_bundle, b)
    data = (micro_bundle / spec.MANIFEST).read_bytes()
    (b / spec.MANIFEST).write_bytes(_mutate(data, offset, xor, truncate))
    try:
        s = Segmenter.load(b, backend="onnxruntime", threads=1)
    except (BundleError, VocabularyError) as e:
        assert str(e)
        return
    p = s.predict(_image())
    assert p.labels.shape == (48, 56) and -1 <= p.labels.min() and p.labels.max() < len(
        p.class_names)


@pytest.mark.parametrize("key", ["onnx_fp32", "onnx_fp16", "vocab"])
@FUZZ
@given(**_MUTATION)
def test_fuzzed_bundle_files_are_always_named(micro_bundle, fuzz_dir, key, offset, xor,
                                              truncate):
    """Any flipped byte or truncation of a graph or vocab.npz: BundleError before a backend
    parses it (the manifest records every file's size and SHA-256)."""
    b = fuzz_dir / key
    if not b.exists():
        _copy(micro_bundle, b)
    name = spec.read_manifest(micro_bundle).files[key]["path"]
    (b / name).write_bytes(_mutate((micro_bundle / name).read_bytes(), offset, xor, truncate))
    with pytest.raises(BundleError, match="truncated|corrupt"):
        Segmenter.load(b, backend="onnxruntime",
                       precision="fp16" if key == "onnx_fp16" else "fp32")
    (b / name).write_bytes((micro_bundle / name).read_bytes())


@FUZZ
@given(**_MUTATION)
def test_fuzzed_engine_is_named_before_tensorrt_sees_it(micro_bundle, fuzz_dir, offset, xor,
                                                        truncate):
    b = fuzz_dir / "engine"
    engine = bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8))
    if not b.exists():
        _copy(micro_bundle, b)
        (b / spec.ENGINE).write_bytes(engine)
        info = {"tensorrt": {"flavour": "tensorrt", "version": "10.9.0"}, "max_classes": 16,
                "gpu": {"name": "NVIDIA H100", "compute_capability": "9.0"}}
        update_manifest(b, {"engine": info}, {"engine": spec.ENGINE})
    (b / spec.ENGINE).write_bytes(_mutate(engine, offset, xor, truncate))
    with pytest.raises(BundleError, match="truncated|corrupt"):
        Segmenter.load(b, backend="tensorrt")


@pytest.mark.parametrize("path", ["../vocab.npz", "/etc/passwd", "", "sub/../../x", "."])
def test_manifest_cannot_point_outside_the_bundle(micro_bundle, tmp_path, path):
    b = _copy(micro_bundle, tmp_path / "b")
    m = json.loads((b / spec.MANIFEST).read_text())
    m["files"]["vocab"]["path"] = path
    (b / spec.MANIFEST).write_text(json.dumps(m))
    with pytest.raises(BundleError, match="inside the bundle"):
        Segmenter.load(b, backend="onnxruntime")


@pytest.mark.parametrize("change, match", [
    ({"mode": "maskformer"}, "mode"), ({"image_dtype": "uint9"}, "image_dtype"),
    ({"input_size": 96}, "inputs.image"), ({"input_size": -64}, "input_size"),
    ({"format_version": spec.FORMAT_VERSION + 1}, "upgrade"), ({"format_version": "1"}, "upgrade"),
])
def test_inconsistent_or_newer_manifest_is_refused_everywhere(micro_bundle, micro_ckpt, tmp_path,
                                                               capsys, change, match):
    from export.vocab import main as vocab_main
    from partclipseg.cli import main as cli_main
    from PIL import Image

    b = _copy(micro_bundle, tmp_path / "b")
    m = json.loads((b / spec.MANIFEST).read_text())
    (b / spec.MANIFEST).write_text(json.dumps({**m, **change}))
    before = sorted((p.name, p.stat().st_size) for p in b.iterdir())
    with pytest.raises(BundleError, match=match):
        Segmenter.load(b)
    Image.fromarray(_image()).save(tmp_path / "x.png")
    assert cli_main(["predict", "--bundle", str(b), str(tmp_path / "x.png"),
                     "--out", str(tmp_path / "o")]) == 2
    (tmp_path / "c.txt").write_text("red quadruped's head\n")
    assert vocab_main(["--bundle", str(b), "--ckpt", str(micro_ckpt), "--classes",
                       str(tmp_path / "c.txt")]) == 2
    assert match in capsys.readouterr().err
    assert sorted((p.name, p.stat().st_size) for p in b.iterdir()) == before


# -- checkpoints --------------------------------------------------------------------------------
@FUZZ
@given(**_MUTATION)
def test_fuzzed_checkpoint_is_refused_or_loads_the_same_weights(micro_ckpt, fuzz_dir, offset,
                                                                xor, truncate):
    """torch.load does not check the zip CRCs; load_checkpoint does, so a flipped byte in the
    weights is a CheckpointError, never silently different weights."""
    data = micro_ckpt.read_bytes()
    bad = fuzz_dir / "ckpt.pt"
    bad.write_bytes(_mutate(data, offset, xor, truncate))
    try:
        record = load_checkpoint(bad)
    except CheckpointError as e:
        assert "corrupt" in str(e) or "truncated" in str(e) or "partclipseg" in str(e)
        return
    ref = load_checkpoint(micro_ckpt)["state_dict"]  # only padding bytes are not covered
    assert all(torch.equal(record["state_dict"][k], ref[k]) for k in ref)


class _Marker:
    """Unpickling it would create a file: proof of execution."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickled_payload_is_refused_and_never_executed(micro_ckpt, micro_bundle, tmp_path,
                                                       capsys):
    from export.onnx import main as export_main
    from partclipseg.checkpoint import load_model
    from partclipseg.cli import main as cli_main

    marker = tmp_path / "EXECUTED"
    record = load_checkpoint(micro_ckpt)
    evil = tmp_path / "evil.pt"
    torch.save({**record, "extra": _Marker(marker)}, evil)
    import pickle

    legacy = tmp_path / "evil.pkl"
    legacy.write_bytes(pickle.dumps({"format": "partclipseg-checkpoint", "x": _Marker(marker)}))
    for path in (evil, legacy):
        with pytest.raises(CheckpointError):
            load_model(path)
        assert export_main(["--ckpt", str(path), "--out", str(tmp_path / "b")]) == 2
        assert cli_main(["eval", "--ckpt", str(path), "--data", str(tmp_path)]) == 2
        assert cli_main(["import-weights", "--partclipseg", str(path), "--out",
                         str(tmp_path / "init.pt")]) == 2
        with pytest.raises(BundleError):  # the torch backend checks the hash first
            Segmenter.load(micro_bundle, backend="torch", checkpoint=path)
    err = capsys.readouterr().err
    assert "pickled objects" in err
    assert not marker.exists()
    assert not (tmp_path / "b").exists() and not (tmp_path / "init.pt").exists()
    assert not _hidden(tmp_path, "b")


@FUZZ
@given(**_MUTATION)
def test_export_of_a_corrupt_checkpoint_writes_nothing(micro_ckpt, fuzz_dir, offset, xor,
                                                       truncate):
    from export.onnx import main as export_main

    bad = fuzz_dir / "export_ckpt.pt"
    bad.write_bytes(_mutate(micro_ckpt.read_bytes(), offset, xor, truncate))
    out = fuzz_dir / "never"
    try:
        load_checkpoint(bad)
    except CheckpointError:
        assert export_main(["--ckpt", str(bad), "--out", str(out)]) == 2
        assert not out.exists() and not _hidden(fuzz_dir, "never")


def test_export_never_replaces_what_is_not_a_bundle(micro_ckpt, tmp_path, capsys):
    """`--out` = the checkpoint itself, or a training run folder: refused, nothing lost."""
    from export.onnx import main as export_main

    ckpt = tmp_path / "best.pt"
    shutil.copy(micro_ckpt, ckpt)
    run = tmp_path / "run"
    run.mkdir()
    (run / "last.pt").write_bytes(b"weights")
    for out in (ckpt, run):
        before = {p: p.read_bytes() for p in ([out] if out.is_file() else list(out.iterdir()))}
        assert export_main(["--ckpt", str(ckpt), "--out", str(out)]) == 2
        assert "refusing to replace" in capsys.readouterr().err
        for p, data in before.items():
            assert p.read_bytes() == data
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "run"]


# -- vocab class files, loaders, CLIs -----------------------------------------------------------
@FUZZ
@given(data=st.one_of(st.binary(max_size=200), st.text(max_size=200).map(str.encode),
                      st.lists(st.sampled_from(["red quadruped's head", "dog's", "'s leg",
                                                "# c", "", "cat's tail *", "cat's tail",
                                                "a's b's c", "\x00's \x00"]),
                               max_size=6).map(lambda ls: "\n".join(ls).encode())))
def test_class_files_parse_or_are_refused_with_a_line(fuzz_dir, data):
    from export.vocab import read_class_file

    path = fuzz_dir / "classes.txt"
    path.write_bytes(data)
    try:
        vocab = read_class_file(path)
    except VocabularyError as e:
        assert str(path) in str(e)
        return
    assert vocab.num_classes >= 1 and len(set(vocab.class_names)) == vocab.num_classes


def test_garbage_class_file_leaves_the_bundle_untouched(micro_bundle, micro_ckpt, tmp_path):
    from export.vocab import main

    b = _copy(micro_bundle, tmp_path / "b")
    before = {p.name: p.read_bytes() for p in b.iterdir()}
    for data in (b"\xff\xfe\x00garbage", b"", b"red quadruped's head\nred quadruped's head\n"):
        (tmp_path / "c.txt").write_bytes(data)
        assert main(["--bundle", str(b), "--ckpt", str(micro_ckpt), "--classes",
                     str(tmp_path / "c.txt")]) == 2
    assert {p.name: p.read_bytes() for p in b.iterdir()} == before


def _png_claiming(w: int, h: int) -> bytes:
    import struct
    import zlib

    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 8))
            + chunk(b"IEND", b""))


@pytest.fixture(scope="session")
def image_files(tmp_path_factory):
    import io

    from PIL import Image

    d = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    out = {}
    for fmt in ("PNG", "JPEG"):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(buf, fmt)
        out[fmt] = buf.getvalue()
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 9, (24, 32), dtype=np.uint8)).save(buf, "PNG")
    out["label"] = buf.getvalue()
    out["dir"] = d
    return out


@FUZZ
@given(kind=st.sampled_from(["PNG", "JPEG", "label"]), **_MUTATION)
def test_fuzzed_image_and_label_files_are_read_or_named(image_files, kind, offset, xor,
                                                         truncate):
    from partclipseg.data.datasets import DatasetError, read_image, read_label_png

    path = image_files["dir"] / f"x_{kind}"
    path.write_bytes(_mutate(image_files[kind], offset, xor, truncate))
    read = read_label_png if kind == "label" else read_image
    try:
        arr = read(path)
    except DatasetError as e:
        assert str(path) in str(e)
        return
    assert arr.ndim == (2 if kind == "label" else 3) and arr.size > 0


def test_decompression_bombs_are_named(micro_bundle, tmp_path, capsys):
    """A 30000 x 30000 PNG header (a few bytes): refused by name, not a traceback or 2.7 GB."""
    from partclipseg.cli import main
    from partclipseg.data.datasets import DatasetError, read_image, read_label_png

    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_claiming(30000, 30000))
    for read in (read_image, read_label_png):
        with pytest.raises(DatasetError, match="bomb"):
            read(bomb)
    out = tmp_path / "out"
    assert main(["predict", "--bundle", str(micro_bundle), str(bomb), "--out", str(out),
                 "--backend", "onnxruntime"]) == 2
    assert "bomb" in capsys.readouterr().err
    assert not (out / "predictions.json").exists()


def test_predict_cli_with_one_bad_image_writes_no_report(micro_bundle, tmp_path):
    from PIL import Image

    from partclipseg.cli import main

    Image.fromarray(_image()).save(tmp_path / "good.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    out = tmp_path / "out"
    assert main(["predict", "--bundle", str(micro_bundle), str(tmp_path / "good.png"),
                 str(tmp_path / "bad.png"), "--out", str(out), "--backend", "onnxruntime"]) == 2
    assert not (out / "predictions.json").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files
    # The overlay written before the failure is a whole PNG.
    assert Image.open(out / "good.png").size[0] > 56


@pytest.mark.parametrize("args", [
    ["eval", "--ckpt", "{missing}"],
    ["eval", "--ckpt", "{garbage}"],
    ["train", "--config", "{garbage}", "--out", "{tmp}/run"],
    ["train", "--config", "{yaml_list}", "--out", "{tmp}/run"],
    ["predict", "--bundle", "{tmp}", "{garbage}", "--out", "{tmp}/p"],
])
def test_cli_errors_are_exit_2_with_a_message(tmp_path, capsys, args):
    from partclipseg.cli import main

    (tmp_path / "garbage").write_bytes(b"\xff\x00\x13garbage\n" * 10)
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    fmt = {"missing": str(tmp_path / "nope.pt"), "garbage": str(tmp_path / "garbage"),
           "tmp": str(tmp_path), "yaml_list": str(tmp_path / "list.yaml")}
    assert main([a.format(**fmt) for a in args]) == 2
    assert "error" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


# == 3. killed processes ========================================================================
def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    t = time.monotonic()
    while not path.exists():
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"child exited early ({proc.returncode}): {out[-2000:]}"
                                 f"{err[-3000:]}")
        if time.monotonic() - t > timeout:
            proc.kill()
            raise AssertionError(f"timed out waiting for {path}")
        time.sleep(0.05)


@pytest.fixture(scope="session")
def synth_micro(tmp_path_factory):
    from partclipseg.data.synthparts import generate

    return generate(tmp_path_factory.mktemp("synth_rb"), seed=0, n_train=16, n_val=4,
                    image_size=64, progress=False)


def _train_cfg(root):
    from partclipseg.training.config import DataConfig, TrainConfig

    return TrainConfig(model="micro",
                       data=DataConfig(root=str(root), val_limit=4), steps=6, batch_size=4,
                       lr=1e-3, warmup_steps=2, grad_clip=1.0, eval_every=2, log_every=1,
                       num_workers=0, seed=0)


# Runs the training of `cfg` and, inside the second write of last.pt (step 4), writes half of
# the checkpoint to atomic_write's temp file, says so, and waits to be killed.
_KILL_IN_SAVE = r"""
import sys, time, yaml, torch
from pathlib import Path
import partclipseg.checkpoint as ck
from partclipseg.training.config import TrainConfig
from partclipseg.training.trainer import train

cfg = TrainConfig.from_dict(yaml.safe_load(Path(sys.argv[1]).read_text()))
out, ready = Path(sys.argv[2]), Path(sys.argv[3])
real_save, calls = torch.save, {"n": 0}

def save(obj, f, *a, **k):
    if Path(f).name.startswith(".last.pt."):
        calls["n"] += 1
        if calls["n"] == 2:
            real_save(obj, f, *a, **k)
            data = Path(f).read_bytes()
            Path(f).write_bytes(data[: len(data) // 2])  # the kill lands mid-write
            ready.write_text(str(obj["step"]))
            while True:
                time.sleep(1)
    return real_save(obj, f, *a, **k)

torch.save = save
torch.set_num_threads(1)
train(cfg, out, progress=False)
"""


def test_training_killed_inside_a_checkpoint_write_resumes_to_the_same_weights(
        synth_micro, tmp_path):
    import yaml

    from partclipseg.training.trainer import train

    cfg = _train_cfg(synth_micro)
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg.to_dict()))
    run, ready = tmp_path / "run", tmp_path / "ready"
    proc = subprocess.Popen([sys.executable, "-c", _KILL_IN_SAVE, str(cfg_path), str(run),
                             str(ready)], env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(ready, proc)
        assert ready.read_text() == "4"
        before = (run / "last.pt").read_bytes()  # step 2's, while step 4's is half written
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    temps = [p.name for p in run.iterdir() if p.name.startswith(".last.pt.")]
    assert len(temps) == 1 and temps[0].endswith(".tmp")  # the half-written file
    assert (run / "last.pt").read_bytes() == before  # untouched by the killed write
    with pytest.raises(CheckpointError):
        load_checkpoint(run / temps[0])
    assert load_checkpoint(run / "last.pt")["step"] == 2

    torch.set_num_threads(1)
    try:
        train(cfg, run, progress=False, resume=True)
        train(cfg, tmp_path / "straight", progress=False)
    finally:
        torch.set_num_threads(os.cpu_count() or 1)
    a = load_checkpoint(tmp_path / "straight" / "last.pt")
    b = load_checkpoint(run / "last.pt")
    assert a["step"] == b["step"] == 6
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    assert a["metrics"] == b["metrics"]
    assert sorted(p.name for p in run.iterdir()) == ["best.pt", "config.json", "last.pt",
                                                     "metrics.csv"]  # temp file cleaned


# Exports `ckpt` to `out`, but just before the manifest of the new bundle is written says so
# and waits to be killed.
_KILL_IN_EXPORT = r"""
import sys, time
from pathlib import Path
import export.bundle as eb
from export.onnx import export_onnx

ckpt, out, ready = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
def stall(root, manifest):
    ready.write_text(str(root))
    while True:
        time.sleep(1)
eb.write_manifest = stall
export_onnx(ckpt, out, fp16=False)
"""


def test_export_killed_midway_leaves_the_old_bundle_usable_and_is_cleaned(
        micro_ckpt, micro_bundle, seg, tmp_path):
    out = _copy(micro_bundle, tmp_path / "bundle")
    images = [_image(seed=s) for s in range(3)]
    ref = [p.labels for p in seg.predict_batch(images)]
    ready = tmp_path / "ready"
    proc = subprocess.Popen([sys.executable, "-c", _KILL_IN_EXPORT, str(micro_ckpt), str(out),
                             str(ready)], env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(ready, proc)
        stage = Path(ready.read_text())
        assert stage.parent == tmp_path and stage.name.startswith(".bundle.staging.")
        # While the export runs, a reader sees the old bundle, whole.
        live = Segmenter.load(out, backend="onnxruntime", threads=1)
        assert clean_stale_staging(out) == []  # a live export's staging is left alone
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    left = _hidden(tmp_path, "bundle")
    assert left == sorted([stage.name, stage.name + ".lock"])  # what SIGKILL leaves
    for p, r in zip(Segmenter.load(out, backend="onnxruntime", threads=1).predict_batch(images),
                    ref):
        np.testing.assert_array_equal(p.labels, r)
    assert live.predict(images[0]).labels.shape == images[0].shape[:2]
    with pytest.raises(BundleError, match="not a bundle"):  # the staging folder is no bundle
        Segmenter.load(stage)
    # The next export of that bundle removes the leftovers first.
    removed = clean_stale_staging(out)
    assert stage in removed and _hidden(tmp_path, "bundle") == []


def test_export_killed_between_the_two_renames_is_repaired(tmp_path):
    """Killed after the old bundle was parked and before the new one moved in: the next export
    (clean_stale_staging) puts the finished new bundle in place."""
    out = tmp_path / "b"
    stage = tmp_path / ".b.staging.abc123"
    (stage).mkdir()
    (stage / spec.MANIFEST).write_text("new")
    (tmp_path / ".b.staging.abc123.old" / "b").mkdir(parents=True)
    (tmp_path / ".b.staging.abc123.old" / "b" / spec.MANIFEST).write_text("old")
    (tmp_path / ".b.staging.abc123.lock").write_text("")
    clean_stale_staging(out)
    assert (out / spec.MANIFEST).read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_staged_bundle_failure_and_success_leave_no_hidden_files(tmp_path):
    out = tmp_path / "b"
    with pytest.raises(KeyboardInterrupt):
        with staged_bundle(out) as stage:
            (stage / "half").write_text("x")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
    (tmp_path / ".b.staging.legacy1").mkdir()  # an older writer's leftover, no lock
    with staged_bundle(out) as stage:
        (stage / spec.MANIFEST).write_text("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]
    with staged_bundle(out) as stage:  # replacing a bundle
        (stage / spec.MANIFEST).write_text('{"v": 2}')
    assert (out / spec.MANIFEST).read_text() == '{"v": 2}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


# == 4. threads =================================================================================
def test_eight_threads_sharing_one_segmenter_match_one_thread(micro_bundle):
    """1000 predictions from 8 threads on one Segmenter (fresh: its selection cache is filled
    concurrently) give exactly the single-thread labels, for all three request kinds."""
    images = [_image(56 + s % 5, 64 - s % 7, s) for s in range(25)]
    mask = [np.zeros(im.shape[:2], bool) for im in images]
    for m in mask:
        m[8:40, 10:50] = True
    subset = ["blue bird's wing", "red quadruped's head", "blue bird's eye"]

    def request(s, i):
        j, kind = i % len(images), i % 3
        if kind == 0:
            return s.predict(images[j]).labels
        if kind == 1:
            return s.predict(images[j], classes=subset).labels
        return s.predict(images[j], object_mask=mask[j], object_class="red quadruped").labels

    single = Segmenter.load(micro_bundle, backend="onnxruntime", threads=1)
    expected = {k: request(single, k) for k in range(75)}  # every (image, kind) pair
    shared = Segmenter.load(micro_bundle, backend="onnxruntime", threads=1)
    start = threading.Barrier(8)

    def worker(t):
        start.wait()
        return [(i, request(shared, i)) for i in range(t, 1000, 8)]

    with ThreadPoolExecutor(8) as pool:
        results = [r for rs in pool.map(worker, range(8)) for r in rs]
    assert len(results) == 1000
    for i, labels in results:
        np.testing.assert_array_equal(labels, expected[i % 75], err_msg=str(i))
