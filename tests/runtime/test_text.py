"""New class names at run time: tokenizer, text tower, numpy text layers, Segmenter and CLI."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("tokenizers")

from runtime import Segmenter, VocabularyError  # noqa: E402

from ..support import assert_imports_none, random_image  # noqa: E402
from runtime import bundle as spec  # noqa: E402
from runtime.preprocess import InputError  # noqa: E402
from runtime.vocabulary import Vocabulary, split_class_name  # noqa: E402

NEW = ["cup's handle", "cup's body", "robot arm's gripper", "red bird's wing"]
ODD = ["Ünïcödé's  Nâme", "emoji 🐶's ear", "日本語の名前's 部分", "a&amp;b's c",
       "O'Neil's hat", "3d printer's nozzle", "well-known car's wheel", "ﬁne ligature's part",
       "ＦＵＬＬ's width", "<start_of_text> weird's x", "tab\tname's x", "l'oiseau's aile",
       "he'll've's x", "a.b,c;d:e!f?g's h", "zürich's façade", "x" * 300 + "'s y",
       "  padded  's   part  ", "MiXeD CaSe's PaRt", "num 12345's 6789",
       "quote \"double\"'s part", "back\\slash's part", "dash — em's part",
       "caf\u0065\u0301's part (decomposed)", "ß's straße", "İstanbul's part"]


def test_tokenizer_gives_open_clip_ids_on_500_names(tiny_bundle):
    """SynthParts, Pascal-Part-116, ADE20K-Part-234 and odd names (unicode, punctuation, digits,
    whitespace, HTML entities, special-token text, overlong): the same ids as open_clip."""
    open_clip = pytest.importorskip("open_clip")
    from partclipseg.data.synthparts import SYNTHPARTS_VOCABULARY
    from partclipseg.data.vocabularies import ADE20K_PART_234, PASCAL_PART_116
    from runtime.text import TextSide

    text = TextSide.open(spec.read_manifest(tiny_bundle))
    names = []
    for v in (SYNTHPARTS_VOCABULARY, PASCAL_PART_116, ADE20K_PART_234):
        names += list(v.class_names) + list(v.objects) + list(v.parts)
    names = sorted(set(names)) + ODD
    assert len(names) >= 500
    for length in (16, 77):
        text.encoder.context_length = length
        np.testing.assert_array_equal(text.encoder.tokenize(names),
                                      open_clip.tokenize(names, context_length=length).numpy())


def test_runtime_text_side_equals_export_vocab(tiny_bundle, tiny_ckpt):
    """The graph inputs encoded in numpy + ONNX Runtime equal partclipseg's torch ones: relative
    error <= 1e-5 per array, for the bundle's names and for new ones."""
    from partclipseg.checkpoint import load_model
    from partclipseg.model.deploy import vocab_arrays
    from runtime.text import TextSide

    model, vocab, _ = load_model(tiny_ckpt)
    text = TextSide.open(spec.read_manifest(tiny_bundle))
    for v in (vocab, Vocabulary.from_names([split_class_name(n) for n in NEW])):
        got, want = text.vocab_arrays(v), vocab_arrays(model, v)
        assert sorted(got) == sorted(want)
        for name, ref in want.items():
            if ref.dtype.kind == "i":
                np.testing.assert_array_equal(got[name], ref)
            else:
                err = np.linalg.norm(got[name] - ref) / np.linalg.norm(ref)
                assert err <= 1e-5, (name, err)


@pytest.mark.parametrize("ckpt_fixture", ["tiny_ckpt", "tiny_clipseg_ckpt"])
def test_new_names_predict_like_a_bundle_exported_with_them(request, ckpt_fixture, tmp_path,
                                                            synth_root):
    """`predict(classes=new names)` gives the labels of a bundle whose vocabulary export.vocab
    set to those names in torch (both modes), on SynthParts val images and random frames."""
    from PIL import Image

    from export.onnx import export_onnx
    from export.vocab import set_vocabulary

    ckpt = request.getfixturevalue(ckpt_fixture)
    runtime_b = export_onnx(ckpt, tmp_path / "a", fp16=False).root
    torch_b = export_onnx(ckpt, tmp_path / "b", fp16=False).root
    vocab = Vocabulary.from_names([split_class_name(n) for n in NEW])
    set_vocabulary(torch_b, ckpt, vocab)
    ours = Segmenter.load(runtime_b, backend="onnxruntime")
    ref = Segmenter.load(torch_b, backend="onnxruntime")
    frames = [np.asarray(Image.open(p).convert("RGB"))
              for p in sorted((synth_root / "images" / "val").glob("*.jpg"))] + [random_image(96, 128, 1)]
    for frame in frames:
        a, b = ours.predict(frame, classes=NEW), ref.predict(frame)
        assert a.class_names == b.class_names == tuple(NEW)
        np.testing.assert_array_equal(a.labels, b.labels)


def test_new_names_chunk_like_the_whole_vocabulary(tiny_bundle):
    whole = Segmenter.load(tiny_bundle, backend="onnxruntime")
    chunked = Segmenter.load(tiny_bundle, backend="onnxruntime", max_classes=2)
    assert len(chunked.feeds(NEW)) == 2  # [cup (2 classes)], [robot arm, red bird]
    for seed in range(2):
        np.testing.assert_array_equal(chunked.predict(random_image(96, 128, seed), classes=NEW).labels,
                                      whole.predict(random_image(96, 128, seed), classes=NEW).labels)


def test_pairs_and_strings_name_the_same_classes(tiny_bundle):
    seg = Segmenter.load(tiny_bundle, backend="onnxruntime")
    pairs = [split_class_name(n) for n in NEW]
    a, b = seg.predict(random_image(96, 128), classes=NEW), seg.predict(random_image(96, 128), classes=pairs)
    assert a.class_names == b.class_names
    np.testing.assert_array_equal(a.labels, b.labels)


@pytest.mark.parametrize("bad, error, match", [
    (["   "], VocabularyError, "empty or whitespace"),
    (["cup handle"], VocabularyError, "names no part"),
    (["cup's "], VocabularyError, "empty object or part"),
    (["cup's handle", 3], InputError, "got int 3"),
    (["cup's handle", ("cup", "handle")], VocabularyError, "duplicate"),
    (["cup's handle", "cup's  handle "], VocabularyError, "duplicate"),
    ([], VocabularyError, "empty"),
    ("cup's handle", InputError, "not one string"),
    ([("cup",)], InputError, "pairs"),
    ([["cup", 3]], InputError, "pairs"),
])
def test_bad_class_requests_are_named_and_nothing_is_cached(tiny_bundle, bad, error, match):
    seg = Segmenter.load(tiny_bundle, backend="onnxruntime")
    seg.predict(random_image(96, 128), classes=NEW[:1])
    cached = seg.feeds(NEW[:1])[0]
    before = (seg.vocabulary, len(seg.text_side().encoder))
    with pytest.raises(error, match=match):
        seg.predict(random_image(96, 128), classes=bad)
    with pytest.raises(error, match=match):
        seg.set_vocabulary(bad)
    assert (seg.vocabulary, len(seg.text_side().encoder)) == before
    assert all(a is cached[n] for n, a in seg.feeds(NEW[:1])[0].items())  # still the cached


def test_a_name_runs_through_the_tower_once(tiny_bundle, monkeypatch):
    """The text cache: a name seen before (raw or after cleaning) runs no tower, and a batch
    runs the tower only for its new names. (Its speed is a target in benchmarks/test_text.py.)"""
    from runtime.text import TextSide

    encoder = TextSide.open(spec.read_manifest(tiny_bundle)).encoder
    rows = []
    run = encoder.tower.run
    monkeypatch.setattr(encoder.tower, "run",
                        lambda feed: rows.append(len(feed[spec.TOKENS])) or run(feed))
    first = encoder.encode(["cup's handle", "cup's body"])
    again = encoder.encode(["Cup's  Handle", "cup's body"])  # cleaned to cached names
    assert rows == [2]
    np.testing.assert_array_equal(first, again)
    encoder.encode(["cup's body", "mug's handle", "mug's handle"])
    assert rows == [2, 1]


def test_overlong_names_are_truncated_as_open_clip_does(tiny_bundle):
    """A name longer than the context length is cut (open_clip's truncation, documented),
    <end_of_text> kept last; two names that differ only past the cut encode the same."""
    seg = Segmenter.load(tiny_bundle, backend="onnxruntime")
    long_a, long_b = "x " * 40 + "a's part", "x " * 40 + "b's part"
    tokens = seg.text_side().encoder.tokenize([long_a, long_b])
    assert (tokens[:, -1] == 49407).all() and (tokens[0] == tokens[1]).all()
    assert seg.predict(random_image(96, 128), classes=[long_a]).labels.shape == (96, 128)


def test_set_vocabulary_is_the_default_and_safe_under_concurrent_predicts(tiny_bundle):
    seg = Segmenter.load(tiny_bundle, backend="onnxruntime", threads=1)
    first, second = NEW[:2], NEW[2:]
    want = {tuple(v): seg.predict(random_image(96, 128), classes=v).labels for v in (first, second)}
    errors, seen = [], set()

    def worker() -> None:
        try:
            for _ in range(15):
                p = seg.predict(random_image(96, 128))
                seen.add(p.class_names)
                if p.class_names in want:
                    np.testing.assert_array_equal(p.labels, want[p.class_names])
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for i in range(20):
        seg.set_vocabulary(first if i % 2 else second, unseen_objects=["cup"] if i % 2 else [])
    for t in threads:
        t.join()
    assert not errors, errors
    assert seen <= {tuple(first), tuple(second), seg.manifest.vocabulary.class_names}
    assert seg.vocabulary.unseen_objects == {"cup"} and seg.vocabulary.class_names == tuple(first)


def test_old_bundles_load_and_ask_for_a_reexport_for_new_names(tiny_bundle, tmp_path):
    import shutil

    b = tmp_path / "old"
    shutil.copytree(tiny_bundle, b)
    m = json.loads((b / spec.MANIFEST).read_text())
    for key in ("tokenizer", "text_onnx", "text_head"):
        (b / m["files"].pop(key)["path"]).unlink()
    del m["text"]
    (b / spec.MANIFEST).write_text(json.dumps(m))
    seg = Segmenter.load(b, backend="onnxruntime")
    known = list(seg.vocabulary.class_names[:2])
    assert seg.predict(random_image(96, 128), classes=known).class_names == tuple(known)
    with pytest.raises(VocabularyError, match="re-export it with python -m export.onnx"):
        seg.predict(random_image(96, 128), classes=["cup's handle"])
    typo = known[0].replace("'s ", "s's ", 1)
    with pytest.raises(VocabularyError, match="did you mean.*re-export"):
        seg.predict(random_image(96, 128), classes=[typo])


def test_new_names_never_import_torch(tiny_bundle):
    assert_imports_none(
        "import numpy as np; from runtime import Segmenter; "
        f"seg = Segmenter.load({str(tiny_bundle)!r}, backend='onnxruntime'); "
        "p = seg.predict(np.zeros((40, 50, 3), np.uint8), classes=[\"cup's handle\"]); "
        "seg.set_vocabulary([\"mug's rim\"]); seg.predict(np.zeros((40, 50, 3), np.uint8))")


def test_predict_cli_takes_new_names_from_a_file_and_videos(tiny_bundle, tmp_path, synth_root):
    av = pytest.importorskip("av")
    from PIL import Image

    from partclipseg.cli import main

    frames = [np.asarray(Image.open(p).convert("RGB"))
              for p in sorted((synth_root / "images" / "val").glob("*.jpg"))]
    video = tmp_path / "clip.mp4"
    with av.open(str(video), "w") as c:
        s = c.add_stream("mpeg4", rate=5)
        s.width, s.height, s.pix_fmt = frames[0].shape[1], frames[0].shape[0], "yuv420p"
        for f in frames:
            for packet in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(packet)
        for packet in s.encode():
            c.mux(packet)
    classes = tmp_path / "classes.txt"
    classes.write_text("# new names\ncup's handle\ncup's body *\nrobot arm's gripper\n")
    out = tmp_path / "out"
    assert main(["predict", "--bundle", str(tiny_bundle), str(video), "--out", str(out),
                 "--classes-file", str(classes), "--backend", "onnxruntime"]) == 0
    report = json.loads((out / "predictions.json").read_text())
    assert report["classes"] == ["cup's handle", "cup's body", "robot arm's gripper"]
    per_frame = [json.loads(x) for x in (out / "frames.jsonl").read_text().splitlines()]
    assert [x["frame"] for x in per_frame] == list(range(len(frames)))  # a file: every frame
    assert report["inputs"][str(video)]["processed"] == len(frames)
    with av.open(str(out / "clip.mp4")) as c:
        assert sum(1 for _ in c.decode(video=0)) == len(frames)
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video")
    assert main(["predict", "--bundle", str(tiny_bundle), str(bad), "--out",
                 str(tmp_path / "o2")]) == 2
    assert not (tmp_path / "o2" / "bad.mp4").exists()
    assert not (tmp_path / "o2" / "predictions.json").exists()


@pytest.mark.parametrize("key", ["tokenizer", "text_onnx", "text_head"])
def test_a_damaged_text_file_is_named_before_it_is_used(tiny_bundle, tmp_path, key):
    """Each text-side file's SHA-256 is checked when the text side opens (the first new name):
    one flipped byte is a BundleError naming the file, and nothing is cached."""
    import shutil

    from runtime.bundle import BundleError

    b = tmp_path / "b"
    shutil.copytree(tiny_bundle, b)
    path = b / spec.read_manifest(b).files[key].path
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    seg = Segmenter.load(b, backend="onnxruntime")  # the image side is untouched
    for _ in range(2):  # nothing half-built is kept: the next request fails the same way
        with pytest.raises(BundleError, match=f"{path.name} is corrupt"):
            seg.predict(random_image(96, 128), classes=NEW[:1])
    assert seg.predict(random_image(96, 128)).labels.shape == (96, 128)  # the bundle's names
