"""Fast slot graphs (`export.onnx --fast`): static, exact, any vocabulary that fits."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from runtime import Segmenter  # noqa: E402
from runtime import bundle as spec  # noqa: E402
from runtime.bundle import BundleError  # noqa: E402
from runtime.backends.slots import pad_to_slots  # noqa: E402

SLOTS = {"max_parts": 8, "max_objects": 4, "max_classes": 12}
NEW = ["cup's handle", "cup's body", "robot arm's gripper"]


@pytest.fixture(scope="module")
def fast_bundle(tmp_path_factory, tiny_ckpt):
    from export.onnx import export_onnx

    return export_onnx(tiny_ckpt, tmp_path_factory.mktemp("fast") / "b", labels=True,
                       fast=[1, 2], slots=SLOTS).root


def _frames(synth_root, size: int) -> list[np.ndarray]:
    """SynthParts val renders and random frames, at the model's input size (the fast graph's
    labels are at model resolution)."""
    from PIL import Image

    frames = [np.asarray(Image.open(p).convert("RGB").resize((size, size)))
              for p in sorted((synth_root / "images" / "val").glob("*.jpg"))]
    rng = np.random.default_rng(0)
    return frames + [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(3)]


def test_fast_graphs_are_static_with_no_shape_work(fast_bundle):
    """After constant folding: no Shape op, no symbolic dimension (batch included: one graph
    per batch size), for FP32 and FP16; the label-map graph for contrast has both."""
    from export.placement import structure

    m = spec.read_manifest(fast_bundle)
    assert m.fast.batches == (1, 2) and m.fast.max_classes == 12
    assert m.fast.agreement["fp32"] >= 0.999
    for b in (1, 2):
        for precision in ("fp32", "fp16"):
            s = structure(m.file(spec.graph_file(precision, fast_batch=b)[0]))
            assert s["shape_ops"] == 0 and s["dynamic"] == {}, s
    dynamic = structure(m.file(spec.graph_file("fp32", labels=True)[0]))
    assert dynamic["shape_ops"] > 0 and "image" in dynamic["dynamic"]


def test_fast_labels_equal_the_exact_path_at_model_size(fast_bundle, synth_root):
    """>= 99.9% equal labels (measured: all) on SynthParts val and random frames, FP32, for the
    bundle's vocabulary, a subset and new names; batches padded and split to the exported
    sizes (1 and 2) give the same labels."""
    fast = Segmenter.load(fast_bundle, backend="onnxruntime", fast_labels=True)
    exact = Segmenter.load(fast_bundle, backend="onnxruntime")
    assert type(fast.backend).__name__ == "SlotGraphs"
    frames = _frames(synth_root, fast.input_size)
    for classes in (None, list(exact.vocabulary.class_names[:3]), NEW):
        a = fast.predict_batch(frames, classes=classes)  # 7 frames: 2 + 2 + 2 + 1 (padded)
        b = exact.predict_batch(frames, classes=classes)
        same = np.mean([np.mean(x.labels == y.labels) for x, y in zip(a, b)])
        assert same >= 0.999, (classes, same)
        k = len(a[0].class_names)
        assert all(p.labels.max() < k for p in a)  # a padded slot never wins


def test_a_vocabulary_change_changes_slot_contents_not_shapes(fast_bundle):
    fast = Segmenter.load(fast_bundle, backend="onnxruntime", fast_labels=True)
    m = fast.manifest
    shapes = None
    for classes in (None, NEW, NEW[:1]):
        slots = pad_to_slots(fast.feed(classes), m.vocab_inputs, m.fast)
        now = {k: v.shape for k, v in slots.items()}
        assert shapes is None or now == shapes
        shapes = now
        k = len(classes) if classes else m.vocabulary.num_classes
        assert slots[spec.CLASS_VALID].sum() == k and not slots[spec.CLASS_VALID][k:].any()


def test_too_large_a_vocabulary_is_named(fast_bundle):
    fast = Segmenter.load(fast_bundle, backend="onnxruntime", fast_labels=True)
    many = [f"thing {i}'s part" for i in range(13)]
    with pytest.raises(BundleError, match="13 classes > 12.*--max-classes"):
        fast.predict(np.zeros((160, 160, 3), np.uint8), classes=many)


def test_clipseg_fast_graph(tiny_clipseg_ckpt, tmp_path, synth_root):
    from export.onnx import export_onnx

    b = export_onnx(tiny_clipseg_ckpt, tmp_path / "c", fp16=False, fast=[2], slots=SLOTS).root
    fast = Segmenter.load(b, backend="onnxruntime", fast_labels=True)
    exact = Segmenter.load(b, backend="onnxruntime")
    for x, y in zip(fast.predict_batch(_frames(synth_root, 160), classes=NEW),
                    exact.predict_batch(_frames(synth_root, 160), classes=NEW)):
        assert np.mean(x.labels == y.labels) >= 0.999


@pytest.mark.tensorrt
def test_fast_graphs_build_with_static_tensorrt_profiles(tensorrt_builder, fast_bundle,
                                                         tmp_path):
    """`export.trt --fast`: every FP16 fast graph parses strongly typed and builds with
    min = opt = max shapes; the engines are recorded in the manifest."""
    import shutil

    from export.trt import main, static_shapes

    b = tmp_path / "b"
    shutil.copytree(fast_bundle, b)
    path = spec.read_manifest(b).file(spec.graph_file("fp16", fast_batch=2)[0])
    assert static_shapes(path)["image"] == [[2, 160, 160, 3]] * 3
    assert main(["--out", str(b), "--fast"]) == 0
    m = spec.read_manifest(b)
    assert all(m.file(f"engine_fast_b{n}").stat().st_size > 100_000 for n in (1, 2))
    with pytest.raises(Exception, match="dynamic shape"):
        static_shapes(m.file(spec.graph_file("fp16", labels=True)[0]))


def test_slots_choose_between_the_fast_and_the_dynamic_label_graph(fast_bundle, tiny_bundle):
    pick = lambda b, **k: type(Segmenter.load(  # noqa: E731
        b, backend="onnxruntime", fast_labels=True, **k).backend).__name__
    assert pick(fast_bundle) == pick(fast_bundle, slots=True) == "SlotGraphs"
    assert pick(fast_bundle, slots=False) == pick(tiny_bundle) == "OnnxRuntimeBackend"
    with pytest.raises(BundleError, match="no fast slot graphs"):
        Segmenter.load(tiny_bundle, backend="onnxruntime", fast_labels=True, slots=True)


@pytest.mark.parametrize("chunk", [1, 3, 64])
def test_fused_tail_gives_the_whole_map_labels(tiny_ckpt, monkeypatch, chunk):
    """The fast graph's tail (stage 2 in class chunks, each reduced at once; no (B, K, S, S)
    tensor) gives exactly the labels of the whole-map argmax, for chunks of 1, 3 and all
    classes, with padded slots, on random frames (torch, FP32)."""
    torch = pytest.importorskip("torch")
    from partclipseg.checkpoint import load_model
    from partclipseg.model import deploy
    from runtime.io import CLIP_MEAN, CLIP_STD

    monkeypatch.setattr(deploy, "CLASS_CHUNK", chunk)
    model, vocab, _ = load_model(tiny_ckpt)
    arrays = deploy.vocab_arrays(model, vocab)
    fused_model = deploy.DeployModel(model, CLIP_MEAN, CLIP_STD, labels=True, slots=True)
    specs = {n: t for n, t in fused_model.input_specs().items() if n != spec.IMAGE}
    slots = pad_to_slots(arrays, specs, spec.FastInfo((1,), **SLOTS,
                                                      masks=fused_model.mask_specs()))
    images = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (3, 160, 160, 3),
                                                                 dtype=np.uint8))
    names = list(specs) + list(fused_model.mask_specs())
    with torch.no_grad():
        fused = fused_model(images, *(torch.from_numpy(slots[n]) for n in names))
        whole = deploy.DeployModel(model, CLIP_MEAN, CLIP_STD, labels=True)(
            images, *(torch.from_numpy(arrays[n]) for n in specs))
    assert torch.equal(fused[0], whole[0])
