"""Runtime reliability: bad input, damaged bundle files, threads.

Every bad input to a Segmenter gets a named exception (InputError, VocabularyError, BundleError)
or a CLI exit code 2 with a message, never a crash, a hang or a half-written output. Corruption
is fuzzed with hypothesis (byte flips and truncations at chosen offsets). Export, checkpoint,
loader and training robustness: tests/export/ and tests/partclipseg/test_robustness.py.

Most tests use the "micro" bundle (3-block 64-wide ViT at 64 px, ~5 ms a prediction) so the
fuzzing and the 1000-prediction thread test stay fast on 2 CPU cores.
"""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from export.bundle import update_manifest  # noqa: E402
from runtime import BundleError, InputError, Segmenter, VocabularyError  # noqa: E402
from runtime import bundle as spec  # noqa: E402

from ..support import FUZZ, MUTATION, VOCAB, copy_bundle, mutate, random_image  # noqa: E402

K = VOCAB.num_classes


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
def test_any_array_is_segmented_or_refused_by_name(micro_seg, image):
    valid = (image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
             and image.shape[0] > 0 and image.shape[1] > 0)
    if not valid:
        with pytest.raises(InputError):
            micro_seg.predict(image)
        return
    p = micro_seg.predict(image)
    assert p.labels.shape == image.shape[:2] and p.labels.dtype == np.int32
    assert p.labels.min() >= -1 and p.labels.max() < K


@pytest.mark.parametrize("bad", [None, "frame.jpg", b"\x00" * 12, {"image": 1}, 3.5,
                                 [[[0, 0, 0]]]])
def test_non_arrays_are_refused(micro_seg, bad):
    with pytest.raises(InputError, match="numpy array"):
        micro_seg.predict(bad)
    with pytest.raises(InputError):
        micro_seg.predict_batch([random_image(), bad])


def test_float_images_with_nan_and_inf_are_refused_with_the_conversion(micro_seg):
    for v in (np.nan, np.inf, -np.inf, 0.5):
        with pytest.raises(InputError, match=r"uint8.*np\.clip"):
            micro_seg.predict(np.full((20, 20, 3), v, np.float32))


def test_odd_memory_layouts_give_the_same_labels(micro_seg):
    image = random_image(40, 52, 3)
    ref = micro_seg.predict(image).labels
    fortran = np.asfortranarray(image)
    readonly = image.copy()
    readonly.flags.writeable = False
    padded = np.zeros((40, 52, 4), np.uint8)
    padded[..., :3] = image
    for variant in (fortran, readonly, padded[..., :3], image[::-1][::-1], image[:, ::1]):
        np.testing.assert_array_equal(micro_seg.predict(variant).labels, ref)
    np.testing.assert_array_equal(micro_seg.predict(image[::-1]).labels, micro_seg.predict(
        np.ascontiguousarray(image[::-1])).labels)


@pytest.mark.parametrize("shape", [(1, 1, 3), (1, 700, 3), (700, 1, 3)])
def test_degenerate_sizes_work(micro_seg, shape):
    p = micro_seg.predict(np.full(shape, 128, np.uint8))
    assert p.labels.shape == shape[:2]


def test_a_12_megapixel_frame_works(micro_seg):
    """4000 x 3000: resized in, label map out at full resolution (no crash, no hang)."""
    image = np.random.default_rng(0).integers(0, 256, (3000, 4000, 3), dtype=np.uint8)
    p = micro_seg.predict(image)
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
def test_object_masks_work_or_are_refused_by_name(micro_seg, mask):
    image = random_image(30, 40, 1)
    valid = mask.shape == (30, 40) and (mask.dtype == bool or (
        mask.dtype.kind in "iu" and mask.min() >= 0 and mask.max() <= 1))
    if not valid:
        with pytest.raises(InputError):
            micro_seg.predict(image, object_mask=mask, object_class="blue bird")
        return
    p = micro_seg.predict(image, object_mask=mask, object_class="blue bird")
    assert (p.labels[~mask.astype(bool)] == -1).all()
    bird = set(VOCAB.object_classes(VOCAB.object_index("blue bird")))
    assert set(np.unique(p.labels)) - {-1} <= bird


@pytest.mark.parametrize("obj, err", [(7, InputError), (-1, InputError), (1.0, InputError),
                                      ("", VocabularyError), ("blue", VocabularyError),
                                      (None, InputError), (b"blue bird", InputError)])
def test_bad_object_classes_are_named(micro_seg, obj, err):
    mask = np.ones((30, 40), bool)
    with pytest.raises(err):
        micro_seg.predict(random_image(30, 40), object_mask=mask, object_class=obj)


_NAMES = list(VOCAB.class_names)


@FUZZ
@given(classes=st.lists(st.one_of(st.sampled_from(_NAMES), st.text(max_size=12),
                                  st.sampled_from(["", " ", "blue bird's", "'s", "BLUE BIRD'S WING",
                                                   "blue bird's wing "]),
                                  st.integers(), st.none()), max_size=6))
def test_class_requests_work_or_are_refused_by_name(micro_seg, classes):
    """Any list of "object's part" strings is a vocabulary (names the bundle lacks are encoded
    by its text side); anything else is refused by name."""
    pairs = _expected_pairs(classes)
    if pairs is None:
        with pytest.raises((VocabularyError, InputError)) as e:
            micro_seg.predict(random_image(), classes=classes)
        assert str(e.value)
        return
    p = micro_seg.predict(random_image(), classes=classes)
    assert p.class_names == tuple(f"{o}'s {q}" for o, q in pairs)
    assert p.labels.max() < len(classes)


def _expected_pairs(classes: list) -> list[tuple[str, str]] | None:
    """The (object, part) pairs a valid request names (whitespace runs folded), else None."""
    pairs = []
    for c in classes:
        if not isinstance(c, str) or "'s " not in c:
            return None
        o, q = (" ".join(x.split()) for x in c.rsplit("'s ", 1))
        if not o or not q:
            return None
        pairs.append((o, q))
    return pairs if pairs and len(set(pairs)) == len(pairs) else None


@pytest.mark.parametrize("classes", [[["blue bird", "wing", "x"]], [["blue bird", 3]],
                                     ["blue bird's wing", "blue bird's wing", 3, 3]])
def test_malformed_class_lists_are_named(micro_seg, classes):
    with pytest.raises((VocabularyError, InputError)):
        micro_seg.predict(random_image(), classes=classes)


def test_a_single_string_as_classes_is_refused(micro_seg):
    with pytest.raises((VocabularyError, InputError)):
        micro_seg.predict(random_image(), classes="blue bird's wing")


# -- float32 image bundles ---------------------------------------------------------------------
def test_float32_bundle_takes_the_same_uint8_frames_and_refuses_nan(micro_ckpt, micro_seg,
                                                                    tmp_path):
    from export.onnx import export_onnx

    export_onnx(micro_ckpt, tmp_path / "f", image_dtype="float32", fp16=False)
    fseg = Segmenter.load(tmp_path / "f", backend="onnxruntime", threads=1)
    assert fseg.backend.session.get_inputs()[0].type == "tensor(float)"
    images = [random_image(seed=s) for s in range(3)]
    for im in images:
        np.testing.assert_array_equal(fseg.predict(im).labels, micro_seg.predict(im).labels)
    for bad in (np.full((16, 16, 3), np.nan, np.float32), np.full((16, 16, 3), np.inf)):
        with pytest.raises(InputError, match="uint8"):
            fseg.predict(bad)


def test_non_finite_vocabulary_vectors_are_refused(micro_bundle, tmp_path):
    b = copy_bundle(micro_bundle, tmp_path / "b")
    with np.load(b / spec.VOCAB_FILE) as z:
        arrays = {k: z[k] for k in z.files}
    for value in (np.nan, np.inf):
        bad = dict(arrays)
        bad["class_film_add"] = arrays["class_film_add"].copy()
        bad["class_film_add"][1, 2] = value
        with open(b / "vocab-bad.npz", "wb") as f:
            np.savez(f, **bad)
        update_manifest(b, {"vocab": "vocab-bad.npz"})  # consistent size + hash
        with pytest.raises(BundleError, match="finite"):
            Segmenter.load(b, backend="onnxruntime")
    bad = dict(arrays, class_part=arrays["class_part"].astype(np.float32))
    with open(b / "vocab-bad.npz", "wb") as f:
        np.savez(f, **bad)
    update_manifest(b, {"vocab": "vocab-bad.npz"})
    with pytest.raises(BundleError, match="integer"):
        Segmenter.load(b, backend="onnxruntime")


# == 2. corrupt and foreign files ===============================================================
@FUZZ
@given(**MUTATION)
def test_fuzzed_manifest_is_named_or_harmless(micro_bundle, fuzz_dir, offset, xor, truncate):
    """A damaged manifest.json: BundleError (or VocabularyError for a damaged class list that
    is still a valid one) at load, or a bundle that still predicts valid labels."""
    b = fuzz_dir / "manifest"
    if not b.exists():
        copy_bundle(micro_bundle, b)
    data = (micro_bundle / spec.MANIFEST).read_bytes()
    (b / spec.MANIFEST).write_bytes(mutate(data, offset, xor, truncate))
    try:
        s = Segmenter.load(b, backend="onnxruntime", threads=1)
    except (BundleError, VocabularyError) as e:
        assert str(e)
        return
    p = s.predict(random_image())
    assert p.labels.shape == (48, 56) and -1 <= p.labels.min() and p.labels.max() < len(
        p.class_names)


@pytest.mark.parametrize("key", ["onnx_fp32", "onnx_fp16", "vocab"])
@FUZZ
@given(**MUTATION)
def test_fuzzed_bundle_files_are_always_named(micro_bundle, fuzz_dir, key, offset, xor,
                                              truncate):
    """Any flipped byte or truncation of a graph or vocab.npz: BundleError before a backend
    parses it (the manifest records every file's size and SHA-256)."""
    b = fuzz_dir / key
    if not b.exists():
        copy_bundle(micro_bundle, b)
    name = spec.read_manifest(micro_bundle).files[key].path
    (b / name).write_bytes(mutate((micro_bundle / name).read_bytes(), offset, xor, truncate))
    with pytest.raises(BundleError, match="truncated|corrupt"):
        Segmenter.load(b, backend="onnxruntime",
                       precision="fp16" if key == "onnx_fp16" else "fp32")
    (b / name).write_bytes((micro_bundle / name).read_bytes())


@FUZZ
@given(**MUTATION)
def test_fuzzed_engine_is_named_before_tensorrt_sees_it(micro_bundle, fuzz_dir, offset, xor,
                                                        truncate):
    b = fuzz_dir / "engine"
    engine = bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8))
    if not b.exists():
        copy_bundle(micro_bundle, b)
        (b / spec.ENGINE).write_bytes(engine)
        info = spec.EngineInfo(flavour="tensorrt", version="10.9.0",
                               gpu={"name": "NVIDIA H100", "compute_capability": "9.0"},
                               precision="fp16", onnx="model_fp16.onnx", profiles=(),
                               max_classes=16, max_batch=1)
        update_manifest(b, {"engine": spec.ENGINE}, engine=info)
    (b / spec.ENGINE).write_bytes(mutate(engine, offset, xor, truncate))
    with pytest.raises(BundleError, match="truncated|corrupt"):
        Segmenter.load(b, backend="tensorrt")


@pytest.mark.parametrize("path", ["../vocab.npz", "/etc/passwd", "", "sub/../../x", "."])
def test_manifest_cannot_point_outside_the_bundle(micro_bundle, tmp_path, path):
    b = copy_bundle(micro_bundle, tmp_path / "b")
    m = json.loads((b / spec.MANIFEST).read_text())
    m["files"]["vocab"]["path"] = path
    (b / spec.MANIFEST).write_text(json.dumps(m))
    with pytest.raises(BundleError, match="inside the bundle"):
        Segmenter.load(b, backend="onnxruntime")


@pytest.mark.parametrize("change, match", [
    ({"mode": ""}, "mode"), ({"image_dtype": "uint9"}, "image_dtype"),
    ({"input_size": 96}, "inputs.image"), ({"input_size": -64}, "input_size"),
    ({"format_version": spec.FORMAT_VERSION + 1}, "upgrade"), ({"format_version": "1"}, "upgrade"),
])
def test_inconsistent_or_newer_manifest_is_refused_everywhere(micro_bundle, micro_ckpt, tmp_path,
                                                               capsys, change, match):
    from export.vocab import main as vocab_main
    from partclipseg.cli import main as cli_main
    from PIL import Image

    b = copy_bundle(micro_bundle, tmp_path / "b")
    m = json.loads((b / spec.MANIFEST).read_text())
    (b / spec.MANIFEST).write_text(json.dumps({**m, **change}))
    before = sorted((p.name, p.stat().st_size) for p in b.iterdir())
    with pytest.raises(BundleError, match=match):
        Segmenter.load(b)
    Image.fromarray(random_image()).save(tmp_path / "x.png")
    assert cli_main(["predict", "--bundle", str(b), str(tmp_path / "x.png"),
                     "--out", str(tmp_path / "o")]) == 2
    (tmp_path / "c.txt").write_text("red quadruped's head\n")
    assert vocab_main(["--bundle", str(b), "--ckpt", str(micro_ckpt), "--classes",
                       str(tmp_path / "c.txt")]) == 2
    assert match in capsys.readouterr().err
    assert sorted((p.name, p.stat().st_size) for p in b.iterdir()) == before


# -- the predict CLI --------------------------------------------------------------------------
def test_predict_cli_with_one_bad_image_writes_no_report(micro_bundle, tmp_path):
    from PIL import Image

    from partclipseg.cli import main

    Image.fromarray(random_image()).save(tmp_path / "good.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    out = tmp_path / "out"
    assert main(["predict", "--bundle", str(micro_bundle), str(tmp_path / "good.png"),
                 str(tmp_path / "bad.png"), "--out", str(out), "--backend", "onnxruntime"]) == 2
    assert not (out / "predictions.json").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files
    # The overlay written before the failure is a whole PNG.
    assert Image.open(out / "good.png").size[0] > 56


# == 3. threads =================================================================================
def test_eight_threads_sharing_one_segmenter_match_one_thread(micro_bundle):
    """1000 predictions from 8 threads on one Segmenter (fresh: its selection cache is filled
    concurrently) give exactly the single-thread labels, for all three request kinds."""
    images = [random_image(56 + s % 5, 64 - s % 7, s) for s in range(25)]
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
