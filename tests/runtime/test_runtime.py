"""Runtime: the three backends agree, subsets/chunks/Oracle-Obj behave, bad input is named."""

from __future__ import annotations

import json
import shutil
from dataclasses import FrozenInstanceError

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from runtime import (BundleError, InputError, Prediction, Segmenter,  # noqa: E402
                     VocabularyError)
from runtime import bundle as spec  # noqa: E402
from runtime.preprocess import resize_image  # noqa: E402


def _image(h=96, w=128, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def seg(tiny_bundle):
    return Segmenter.load(tiny_bundle, backend="onnxruntime", device="cpu")


def test_backends_agree(tiny_bundle, seg, torch):
    images = [_image(seed=s) for s in range(3)]
    ref = [p.labels for p in Segmenter.load(tiny_bundle, backend="torch").predict_batch(images)]
    fp32 = [p.labels for p in seg.predict_batch(images)]
    fp16 = [p.labels for p in Segmenter.load(tiny_bundle, backend="onnxruntime",
                                             precision="fp16").predict_batch(images)]
    agree = lambda a, b: np.mean([np.mean(x == y) for x, y in zip(a, b)])  # noqa: E731
    assert agree(fp32, ref) >= 0.999
    assert agree(fp16, ref) >= 0.99


def test_prediction_fields(seg):
    p = seg.predict(_image(70, 90), scores=True)
    assert isinstance(p, Prediction) and p.labels.shape == (70, 90) and p.labels.dtype == np.int32
    assert p.class_names == seg.vocabulary.class_names
    assert p.labels.min() >= -1 and p.labels.max() < len(p.class_names)
    assert p.scores.shape == (len(p.class_names) + 1, 70, 90)
    assert 0 <= p.scores.min() and p.scores.max() <= 1
    assert set(p.timing_ms) == {"pre", "infer", "post"} and p.timing_ms["infer"] > 0
    assert sum(p.counts().values()) == int((p.labels >= 0).sum())
    with pytest.raises(FrozenInstanceError):
        p.labels = None


def test_batch_equals_single_and_bgr(seg):
    images = [_image(80, 100, 1), _image(64, 64, 2)]
    batch = seg.predict_batch(images)
    for im, p in zip(images, batch):
        np.testing.assert_array_equal(p.labels, seg.predict(im).labels)
    bgr = np.ascontiguousarray(images[0][..., ::-1])
    np.testing.assert_array_equal(seg.predict(bgr, bgr=True).labels, batch[0].labels)


def test_class_subset(seg):
    names = ["blue bird's wing", "red quadruped's head"]
    p = seg.predict(_image(), classes=names)
    assert p.class_names == tuple(names)
    assert set(np.unique(p.labels)) <= {-1, 0, 1}
    # A name the bundle lacks is a new class (open vocabulary), typos included.
    assert seg.predict(_image(), classes=["blue brid's wing"]).class_names == ("blue brid's wing",)
    with pytest.raises(VocabularyError, match="empty"):
        seg.predict(_image(), classes=[])
    with pytest.raises(VocabularyError, match="duplicate"):
        seg.predict(_image(), classes=names + names[:1])


def test_subset_logits_equal_full_vocabulary_logits(seg):
    """Conditions never interact, so a class's logits do not depend on the other classes."""
    image = _image()
    names = ["blue bird's wing", "red quadruped's eye"]
    batch = resize_image(image, seg.input_size)[None]
    lf = seg.backend.run({"image": batch, **seg.feed()})["logits"]
    ls = seg.backend.run({"image": batch, **seg.feed(names)})["logits"]
    k_wing, k_eye = (seg.vocabulary.index(n) for n in names)
    np.testing.assert_allclose(ls[0, :2], lf[0, [k_wing, k_eye]], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(ls[0, -1], lf[0, -1], rtol=1e-4, atol=1e-4)


def test_chunked_vocabulary_gives_the_same_labels(tiny_bundle, seg):
    chunked = Segmenter.load(tiny_bundle, backend="onnxruntime", max_classes=4)
    assert len(chunked.feeds()) == 2
    images = [_image(seed=s) for s in range(2)]
    for a, b in zip(chunked.predict_batch(images), seg.predict_batch(images)):
        np.testing.assert_array_equal(a.labels, b.labels)


def test_oracle_obj_stays_inside_the_object(seg):
    image = _image()
    mask = np.zeros(image.shape[:2], bool)
    mask[10:60, 20:90] = True
    p = seg.predict(image, object_mask=mask, object_class="blue bird")
    assert (p.labels[~mask] == -1).all()
    own = set(seg.vocabulary.object_classes(seg.vocabulary.object_index("blue bird")))
    assert set(np.unique(p.labels[mask])) - {-1} <= own
    with pytest.raises(InputError, match="resolution"):
        seg.predict(image, object_mask=mask[:-1], object_class="blue bird")
    with pytest.raises(VocabularyError, match="did you mean"):
        seg.predict(image, object_mask=mask, object_class="blue brid")
    with pytest.raises(InputError, match="both"):
        seg.predict(image, object_mask=mask)


@pytest.mark.parametrize("bad, match", [
    (np.zeros((32, 32, 3), np.float32), "uint8"),
    (np.zeros((32, 32), np.uint8), "shape"),
    (np.zeros((32, 32, 4), np.uint8), "alpha"),
    (np.zeros((0, 32, 3), np.uint8), "empty"),
    ([[1, 2, 3]], "numpy array"),
])
def test_bad_images_are_named(seg, bad, match):
    with pytest.raises(InputError, match=match):
        seg.predict(bad)


def test_bad_bundles_are_named(tiny_bundle, tmp_path):
    with pytest.raises(BundleError, match="not a bundle"):
        Segmenter.load(tmp_path)
    b = tmp_path / "b"
    shutil.copytree(tiny_bundle, b)
    manifest = json.loads((b / spec.MANIFEST).read_text())

    newer = dict(manifest, format_version=spec.FORMAT_VERSION + 1)
    (b / spec.MANIFEST).write_text(json.dumps(newer))
    with pytest.raises(BundleError, match="upgrade"):
        Segmenter.load(b)
    (b / spec.MANIFEST).write_text(json.dumps(manifest)[:200])
    with pytest.raises(BundleError, match="corrupt or truncated"):
        Segmenter.load(b)
    (b / spec.MANIFEST).write_text(json.dumps(manifest))
    onnx_path = b / spec.graph_file("fp32")[1]
    onnx_path.write_bytes(onnx_path.read_bytes()[:1000])
    with pytest.raises(BundleError, match="truncated"):
        Segmenter.load(b, backend="onnxruntime")
    (b / spec.VOCAB_FILE).unlink()
    with pytest.raises(BundleError, match="missing"):
        Segmenter.load(b)


def test_bad_arguments(tiny_bundle):
    with pytest.raises(ValueError, match="backend"):
        Segmenter.load(tiny_bundle, backend="tflite")
    with pytest.raises(ValueError, match="precision"):
        Segmenter.load(tiny_bundle, precision="int4")


def test_tensorrt_backend_without_engine_is_explained(tiny_bundle):
    with pytest.raises((BundleError, ImportError), match="engine|TensorRT"):
        Segmenter.load(tiny_bundle, backend="tensorrt")


def test_auto_picks_onnxruntime_cpu_here(tiny_bundle, caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="runtime"):
        s = Segmenter.load(tiny_bundle)
    assert s.backend_name.startswith("onnxruntime:") and "picked" in caplog.text


def test_predict_cli_writes_overlays_and_counts(tiny_bundle, tmp_path):
    from PIL import Image

    from partclipseg.cli import main

    Image.fromarray(_image()).save(tmp_path / "frame.png")
    out = tmp_path / "out"
    assert main(["predict", "--bundle", str(tiny_bundle), str(tmp_path / "frame.png"),
                 "--out", str(out), "--backend", "onnxruntime"]) == 0
    report = json.loads((out / "predictions.json").read_text())
    entry = report["inputs"][str(tmp_path / "frame.png")]
    assert Image.open(entry["overlay"]).size[0] > 128
    assert sum(entry["pixels"].values()) <= 96 * 128
    assert main(["predict", "--bundle", str(tiny_bundle), str(tmp_path / "nope.png"),
                 "--out", str(out)]) == 2


def test_runtime_predicts_without_torch(tiny_bundle):
    """A whole ONNX Runtime prediction in a fresh process never imports torch."""
    import subprocess
    import sys

    code = ("import sys, numpy as np; from runtime import Segmenter; "
            f"s = Segmenter.load({str(tiny_bundle)!r}, backend='onnxruntime'); "
            "s.predict(np.zeros((40, 50, 3), np.uint8)); "
            "bad = [m for m in ('torch', 'open_clip', 'partclipseg') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_fast_labels_match_the_exact_path_at_model_resolution(tiny_bundle, seg):
    """The label-map graph (Pred-All in the graph) gives the exact path's labels when the
    image comes at the model's input size, for ONNX Runtime and the torch reference."""
    images = [_image(seg.input_size, seg.input_size, s) for s in range(3)]
    exact = [p.labels for p in seg.predict_batch(images)]
    for backend in ("onnxruntime", "torch"):
        fast = Segmenter.load(tiny_bundle, backend=backend, fast_labels=True)
        got = [p.labels for p in fast.predict_batch(images)]
        assert np.mean([np.mean(a == b) for a, b in zip(got, exact)]) >= 0.999, backend
        assert fast.predict(_image(50, 70)).labels.shape == (50, 70)
    with pytest.raises(InputError, match="Pred-All"):
        fast.predict(images[0], scores=True)
    with pytest.raises(VocabularyError, match="fast_labels"):
        Segmenter.load(tiny_bundle, backend="onnxruntime", fast_labels=True,
                       max_classes=4).predict(images[0])


def test_class_subset_cache_is_bounded(tiny_bundle):
    from runtime.selection import Selections

    manifest = spec.read_manifest(tiny_bundle)
    sels = Selections(manifest, spec.read_vocab(manifest), None, encode=None)
    names = manifest.vocabulary.class_names
    requests = [[a, b] for a in names for b in names if a != b]
    assert len(requests) > Selections.CACHE
    first = sels.get(requests[0])
    for r in requests:
        sels.get(r)
    assert len(sels) == Selections.CACHE
    assert sels.get(requests[-1]) is sels.get(requests[-1])  # kept
    assert sels.get(requests[0]) is not first  # the oldest was evicted


def test_io_binding_path_gives_the_plain_run_outputs(tiny_bundle, seg):
    """The CUDA default (I/O binding, resident vocabulary values) run on the CPU provider."""
    from runtime.backends.onnxruntime import OnnxRuntimeBackend

    bound = OnnxRuntimeBackend(str(seg.manifest.file("onnx_fp32")), "cpu", io_binding=True)
    feed = {spec.IMAGE: resize_image(_image(), seg.input_size)[None], **seg.feed()}
    plain = seg.backend.run(feed)
    for _ in range(2):  # the second call reuses the resident vocabulary values
        got = bound.run(feed)
        for name, value in plain.items():
            np.testing.assert_array_equal(got[name], value)


def test_one_class_name_grammar_for_training_data_class_files_and_requests(tmp_path):
    """"a's b's c" is the part "c" of the object "a's b" everywhere (split at the last "'s ")."""
    from partclipseg.data.vocabularies import vocabulary_from_class_names
    from runtime.selection import parse_classes
    from runtime.vocabulary import (Vocabulary, class_name, read_class_file,
                                    split_class_name)

    name, want = "person's child's  hand", ("person's child", "hand")
    assert split_class_name(name) == want and class_name(*want) == "person's child's hand"
    assert parse_classes([name]) == (want,)
    (tmp_path / "classes.txt").write_text(name + " *\n")
    for v in (read_class_file(tmp_path / "classes.txt"), vocabulary_from_class_names([name])):
        assert (v.objects, v.parts) == (("person's child",), ("hand",))
    with pytest.raises(VocabularyError, match="part names cannot contain"):
        Vocabulary.from_names([("dog", "owner's hand")])
    for bad in ("hand", "'s hand", "dog's  "):
        with pytest.raises(VocabularyError):
            split_class_name(bad)
