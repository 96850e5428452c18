"""A colour-blind model (`ModelConfig.colour_blind`) through export and the runtime: its graph
inputs fit the one contract (per-object rows on the object axis), backends agree, vocabulary
subsets, new names through the text side, fast slot graphs, engines."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from runtime import Segmenter  # noqa: E402
from runtime import bundle as spec  # noqa: E402
from partclipseg.model.deploy import COLOUR_FILM  # noqa: E402
from partclipseg.model.partclipseg import ObjectWords  # noqa: E402
from runtime.vocabulary import Vocabulary, VocabularyError, split_class_name  # noqa: E402


def _frames(n: int, size: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_object_words_split_names_into_colour_and_plan():
    w = ObjectWords.split(["red quadruped", "blue bird", "red bird"])
    assert w.colours == ("red", "blue") and w.plans == ("quadruped", "bird")
    assert w.words == ("red", "blue", "quadruped", "bird")
    assert w.matrix() == [[1, 0, 1, 0], [0, 1, 0, 1], [1, 0, 0, 1]]
    assert ObjectWords.split(["dark  green   sea turtle"]).plans == ("green   sea turtle",)
    with pytest.raises(VocabularyError, match="object 'car' is not two words"):
        ObjectWords.split(["red bird", "car"])


def test_bundle_inputs_are_per_object_rows(micro_cb_bundle, vocab):
    """The recipe stays inside the model: every vocabulary input runs over the part, object
    or class axis, like the plain model's; the colour rows are one per object."""
    m = spec.read_manifest(micro_cb_bundle)
    assert m.mode == "colour_blind" and m.model_config["colour_blind"] is True
    assert {t.rows for t in m.vocab_inputs.values()} == {"part", "object", "class"}
    colour = m.inputs[COLOUR_FILM[0]]
    assert (colour.shape[0], colour.rows, colour.background) == ("O", "object", False)
    assert m.inputs[spec.OBJECT_FILM[0]].shape[0] == "O+1"
    arrays = spec.read_vocab(m)
    assert arrays[spec.OBJECT_FILM[0]].shape[0] == 3 and arrays[COLOUR_FILM[0]].shape[0] == 2
    # export measured every graph against PyTorch and would have refused to write otherwise
    assert set(m.onnx.parity) == {"fp32", "fp16"}
    assert m.onnx.parity["fp32"]["rel_error"] <= 1e-4


def test_backends_agree(micro_cb_bundle, micro_cb_ckpt):
    frames = list(_frames(3))
    ort = Segmenter.load(micro_cb_bundle, backend="onnxruntime", threads=1)
    ref = Segmenter.load(micro_cb_bundle, backend="torch", checkpoint=micro_cb_ckpt)
    a, b = ort.predict_batch(frames, scores=True), ref.predict_batch(frames, scores=True)
    for x, y in zip(a, b):
        np.testing.assert_allclose(x.scores, y.scores, atol=1e-4)
        assert np.mean(x.labels == y.labels) > 0.999


def test_a_class_subset_feeds_only_its_objects(micro_cb_bundle, micro_cb_ckpt, vocab):
    """`classes=` keeps the rows of the requested objects; the result is the model's on the
    subset vocabulary."""
    from partclipseg.checkpoint import load_model
    from partclipseg.model.deploy import DeployModel, vocab_arrays
    from runtime.io import CLIP_MEAN, CLIP_STD

    seg = Segmenter.load(micro_cb_bundle, backend="onnxruntime", threads=1)
    names = [n for n in vocab.class_names if n.startswith("blue bird")][:2]
    feed = seg.feed(names)
    assert feed[COLOUR_FILM[0]].shape[0] == 1 and feed[spec.OBJECT_FILM[0]].shape[0] == 2
    model, _, _ = load_model(micro_cb_ckpt)
    sub = Vocabulary.from_names([split_class_name(n) for n in names])
    frame = _frames(1)
    deploy = DeployModel(model, CLIP_MEAN, CLIP_STD).eval()
    ref_feed = {spec.IMAGE: frame, **vocab_arrays(model, sub)}
    with torch.no_grad():
        ref = deploy(*(torch.from_numpy(ref_feed[n]) for n in deploy.input_specs()))[0].numpy()
    got = seg.backend.run({spec.IMAGE: frame, **feed})[spec.LOGITS]
    np.testing.assert_allclose(got, ref, atol=1e-4)


def test_new_names_through_the_text_side(micro_cb_bundle, micro_cb_ckpt):
    """A pair never exported ("green bird") is two words the text side encodes without torch."""
    from partclipseg.checkpoint import load_model
    from partclipseg.model.deploy import vocab_arrays
    from runtime.text import TextSide

    new = Vocabulary.from_names([("green bird", "head"), ("green bird", "wing"),
                                 ("red quadruped", "leg")])
    text = TextSide.open(spec.read_manifest(micro_cb_bundle), threads=1)
    got = text.vocab_arrays(new)
    model, _, _ = load_model(micro_cb_ckpt)
    ref = vocab_arrays(model, new)
    assert set(got) == set(ref)
    for k in ref:
        np.testing.assert_allclose(got[k], ref[k], rtol=1e-4, atol=1e-5, err_msg=k)
    seg = Segmenter.load(micro_cb_bundle, backend="onnxruntime", threads=1)
    pred = seg.predict(_frames(1)[0], classes=["green bird's head", "red quadruped's leg"])
    assert pred.class_names == ("green bird's head", "red quadruped's leg")
    with pytest.raises(VocabularyError, match="object 'dog' is not two words"):
        seg.predict(_frames(1)[0], classes=["dog's head"])


def test_per_object_rows_equal_the_word_rows_of_training(micro_cb_ckpt):
    """The deployed layout (a colour row and a body-plan row per object, logits summed in the
    graph) gives the training layout's logits (word rows + object-word matrix)."""
    from partclipseg.checkpoint import load_model
    from partclipseg.model.deploy import DeployModel, vocab_arrays
    from runtime.io import CLIP_MEAN, CLIP_STD

    model, vocab, _ = load_model(micro_cb_ckpt)
    frame = torch.from_numpy(_frames(2))
    deploy = DeployModel(model, CLIP_MEAN, CLIP_STD).eval()
    arrays = vocab_arrays(model, vocab)
    with torch.no_grad():
        got = deploy(frame, *(torch.from_numpy(arrays[n]) for n in list(deploy.input_specs())[1:]))
        x = frame.float().permute(0, 3, 1, 2) * deploy.scale.reshape(1, 3, 1, 1) \
            + deploy.shift.reshape(1, 3, 1, 1)
        want = model.forward_image(x, model.encode_vocabulary(vocab))
    np.testing.assert_allclose(got[0].numpy(), want.logits.numpy(), atol=1e-4)


def test_fast_graphs_give_the_exact_labels(micro_cb_ckpt, tmp_path):
    """Fast slot graphs exist for this model too: export checks them against the exact
    label-map path, and the runtime's slot backend gives the same labels."""
    from export.onnx import export_onnx

    m = export_onnx(micro_cb_ckpt, tmp_path / "b", labels=True, fast=[1, 2],
                    slots={"max_parts": 8, "max_objects": 4, "max_classes": 16})
    assert m.fast.agreement["fp32"] >= 0.999
    fast = Segmenter.load(tmp_path / "b", backend="onnxruntime", fast_labels=True, threads=1)
    exact = Segmenter.load(tmp_path / "b", backend="onnxruntime", threads=1)
    assert type(fast.backend).__name__ == "SlotGraphs"
    frames = list(_frames(3))
    for classes in (None, ["green bird's head", "red quadruped's leg"]):
        a, b = fast.predict_batch(frames, classes=classes), exact.predict_batch(frames, classes=classes)
        assert np.mean([np.mean(x.labels == y.labels) for x, y in zip(a, b)]) >= 0.999


def test_a_vocab_file_that_does_not_match_is_named(micro_cb_bundle, tmp_path):
    out = tmp_path / "b"
    shutil.copytree(micro_cb_bundle, out)
    m = spec.read_manifest(out)
    arrays = spec.read_vocab(m)
    arrays[COLOUR_FILM[0]] = arrays[COLOUR_FILM[0]][:1]
    from export.bundle import update_manifest, write_vocab

    write_vocab(out, arrays, m.files["vocab"].path)
    update_manifest(out, {"vocab": m.files["vocab"].path})
    with pytest.raises(spec.BundleError, match="colour_film_mul' has shape"):
        spec.read_vocab(spec.read_manifest(out))


def test_engine_profile_covers_the_colour_rows(micro_cb_bundle):
    from export.trt import profile_shapes

    shapes = profile_shapes(spec.read_manifest(micro_cb_bundle), 1, 1, 2, 16)
    assert shapes[COLOUR_FILM[0]] == [[1, 16], [2, 16], [16, 16]]
    assert shapes[spec.OBJECT_FILM[0]][0][0] == 2 and shapes[spec.OBJECT_FILM[0]][2][0] == 17


@pytest.mark.tensorrt
def test_colour_blind_graph_builds_with_tensorrt(tensorrt_builder, micro_cb_bundle):
    """The FP16 graph `export.trt` builds engines from, with the colour rows' profiles."""
    from export.trt import engine_bytes, profile_shapes

    manifest = spec.read_manifest(micro_cb_bundle)
    engine = engine_bytes(manifest.file("onnx_fp16"), profile_shapes(manifest, 1, 1, 2, 16),
                          workspace_gib=1.0)
    assert len(engine) > 10_000


def test_export_vocab_writes_a_new_word_vocabulary(micro_cb_bundle, micro_cb_ckpt, tmp_path):
    """`export.vocab` on a colour-blind bundle: new pairs, new rows, the graphs untouched."""
    from export.vocab import set_vocabulary

    out = tmp_path / "b"
    shutil.copytree(micro_cb_bundle, out)
    new = Vocabulary.from_names([("green bird", "head"), ("green quadruped", "leg"),
                                 ("red bird", "wing")])
    manifest = set_vocabulary(out, micro_cb_ckpt, new)
    arrays = spec.read_vocab(manifest)
    assert arrays[COLOUR_FILM[0]].shape[0] == 3  # one colour row per object
    seg = Segmenter.load(out, backend="onnxruntime", threads=1)
    assert seg.predict(_frames(1)[0]).class_names == new.class_names
