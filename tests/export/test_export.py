"""Export: ONNX graphs match PyTorch, FP16 keeps LayerNorm in FP32, bundles are atomic,
engines build (TensorRT-RTX on CPU machines), new vocabularies need no rebuild."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from export.onnx import ExportError, export_onnx  # noqa: E402
from runtime import bundle as spec  # noqa: E402
from runtime.vocabulary import Vocabulary  # noqa: E402


def _run(path, feed):
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return s.run(None, {i.name: feed[i.name] for i in s.get_inputs()})


def test_manifest_lists_every_file_with_size_and_hash(tiny_bundle):
    m = spec.read_manifest(tiny_bundle)
    raw = json.loads((tiny_bundle / spec.MANIFEST).read_text())
    assert raw["format"] == spec.FORMAT and m.format_version == spec.FORMAT_VERSION
    assert spec.Manifest.from_dict(m.to_dict(), m.path) == m  # the writer's dict, read back
    for key in ("vocab", "onnx_fp32", "onnx_fp16"):
        entry = m.files[key]
        path = m.file(key)
        assert path.stat().st_size == entry.bytes and len(entry.sha256) == 64
    assert list(m.inputs) == ["image", *spec.PART_FILM, *spec.OBJECT_FILM, *spec.CLASS_FILM,
                              *spec.CLASS_INDEX]
    assert m.inputs["class_part"].indexes == "part" and m.inputs["object_film_mul"].background
    assert m.onnx.parity["fp32"]["rel_error"] < 1e-4
    assert m.onnx.parity["fp32_labels"]["label_agreement"] >= 0.999
    assert m.outputs[spec.LABELS].dtype == "int32" and m.has("onnx_fp16_labels")
    assert m.producer["torch"] and len(m.checkpoint.sha256) == 64
    # Nothing left behind by staging.
    assert not [p for p in tiny_bundle.parent.iterdir() if p.name.startswith(f".{tiny_bundle.name}.")]


OTHER_VOCAB = Vocabulary.from_names([("cat", "tail"), ("cat", "ear"), ("red quadruped", "head"),
                                     ("van", "wheel"), ("van", "door"), ("van", "window")])


def _assert_graphs_match_torch(ckpt, graphs, torch):
    """Each (ONNX path, tolerance) run on OTHER_VOCAB at batch 3 matches the torch DeployModel:
    output shapes follow the new class counts, relative L2 error below the tolerance."""
    from partclipseg.checkpoint import load_model
    from runtime.io import CLIP_MEAN, CLIP_STD
    from partclipseg.model.deploy import DeployModel, example_inputs, vocab_arrays

    model, _, _ = load_model(ckpt)
    size = model.cfg.image_size
    feed = example_inputs(size, vocab_arrays(model, OTHER_VOCAB), batch=3, seed=7)
    with torch.no_grad():
        deploy = DeployModel(model, CLIP_MEAN, CLIP_STD)
        ref = deploy(*(torch.from_numpy(feed[n]) for n in deploy.input_specs()))
    for path, tol in graphs:
        out = _run(path, feed)
        assert out[0].shape == (3, OTHER_VOCAB.num_classes + 1, size, size)
        assert out[1].shape == (3, len(OTHER_VOCAB.objects) + 1, size, size)
        for o, r in zip(out, ref):
            r = r.numpy()
            assert np.linalg.norm(o - r) / np.linalg.norm(r) < tol, path


def test_onnx_matches_torch_on_another_vocabulary_and_batch(tiny_bundle, tiny_ckpt, torch):
    """Class dimensions and batch are dynamic: a vocabulary of other sizes runs unchanged."""
    _assert_graphs_match_torch(tiny_ckpt, [(tiny_bundle / spec.graph_file("fp32")[1], 1e-4),
                                           (tiny_bundle / spec.graph_file("fp16")[1], 2e-2)], torch)


def test_onnx_mlp_mix_variant_keeps_class_dims_dynamic(tmp_path, torch, vocab):
    """The released code's variants (MLP Mix, adapter output ReLU) export with P/O/K dynamic."""
    from partclipseg.checkpoint import save_checkpoint
    from partclipseg.model import build_model

    torch.manual_seed(3)
    model = build_model("tiny", mix="mlp", adapter_out_relu=True)
    with torch.no_grad():  # off the averaging init, so the ReLU bends inside the graph
        for p in model.mix.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    ckpt = save_checkpoint(tmp_path / "mlp.pt", model, vocab)
    manifest = export_onnx(ckpt, tmp_path / "b", fp16=False)
    assert manifest.model_config["mix"] == "mlp"
    _assert_graphs_match_torch(ckpt, [(tmp_path / "b" / spec.graph_file("fp32")[1], 1e-4)], torch)


def test_fp16_graph_keeps_layernorm_in_fp32(tiny_bundle):
    g = onnx.load(str(tiny_bundle / spec.graph_file("fp16")[1])).graph
    inits = {i.name: i.data_type for i in g.initializer}
    ln = [n for n in g.node if n.op_type == "LayerNormalization"]
    assert ln, "opset 17 export should emit LayerNormalization nodes"
    for n in ln:
        assert inits.get(n.input[1], onnx.TensorProto.FLOAT) == onnx.TensorProto.FLOAT
    big = [i for i in g.initializer if np.prod(i.dims) >= 1024]
    fp16 = [i for i in big if i.data_type == onnx.TensorProto.FLOAT16]
    assert len(fp16) >= 0.8 * len(big), "matmul/conv weights should be FP16"
    # The interface stays float32 in every precision (keep_io_types).
    io = {v.name: v.type.tensor_type.elem_type for v in list(g.input) + list(g.output)}
    assert io[spec.IMAGE] == onnx.TensorProto.UINT8
    assert {io[n] for n in io if n not in spec.CLASS_INDEX + (spec.IMAGE,)} == {onnx.TensorProto.FLOAT}


def test_failed_parity_leaves_previous_bundle_intact(tiny_bundle, tiny_ckpt, tmp_path):
    out = tmp_path / "b"
    shutil.copytree(tiny_bundle, out)
    before = (out / spec.MANIFEST).read_text()
    with pytest.raises(ExportError, match="disagrees"):
        export_onnx(tiny_ckpt, out, fp16_tolerance=1e-12)
    assert (out / spec.MANIFEST).read_text() == before
    spec.read_vocab(spec.read_manifest(out))  # still a whole, usable bundle
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_clipseg_bundle_and_float_input(tiny_clipseg_ckpt, tmp_path):
    m = export_onnx(tiny_clipseg_ckpt, tmp_path / "c", image_dtype="float32", image_size=128,
                    fp16=False)
    assert m.mode == "clipseg" and m.input_size == 128 and not m.has("onnx_fp16")
    sess = ort.InferenceSession(str(tmp_path / "c" / spec.graph_file("fp32")[1]))
    assert [i.name for i in sess.get_inputs()] == list(m.inputs) == ["image", *spec.OBJECT_FILM]
    assert m.inputs[spec.OBJECT_FILM[0]].rows == "class"  # one condition per class
    assert sess.get_inputs()[0].type == "tensor(float)"


def test_export_cli_errors(tmp_path, capsys):
    from export.onnx import main

    assert main(["--ckpt", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "b")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_new_vocabulary_without_rebuild(tiny_bundle, tiny_ckpt, tmp_path):
    from export.vocab import main
    from runtime.vocabulary import read_class_file
    from runtime import Segmenter

    out = tmp_path / "b"
    shutil.copytree(tiny_bundle, out)
    classes = tmp_path / "classes.txt"
    classes.write_text("# new names are fine\nred quadruped's head\ngreen cat's tail *\n"
                       "green cat's head *\n")
    assert read_class_file(classes).unseen_objects == {"green cat"}
    onnx_before = (out / spec.graph_file("fp32")[1]).read_bytes()
    assert main(["--bundle", str(out), "--ckpt", str(tiny_ckpt), "--classes", str(classes)]) == 0
    seg = Segmenter.load(out, backend="onnxruntime")
    assert seg.vocabulary.class_names == ("red quadruped's head", "green cat's tail",
                                          "green cat's head")
    assert (out / spec.graph_file("fp32")[1]).read_bytes() == onnx_before
    assert len(list(out.glob("vocab*.npz"))) == 1
    image = np.random.default_rng(3).integers(0, 256, (90, 120, 3), dtype=np.uint8)
    assert seg.predict(image).labels.max() < 3

    classes.write_text("red quadruped head\n")
    assert main(["--bundle", str(out), "--ckpt", str(tiny_ckpt), "--classes", str(classes)]) == 2


def test_new_vocabulary_refuses_another_checkpoint(tiny_bundle, tiny_clipseg_ckpt, tmp_path):
    from export.vocab import set_vocabulary

    with pytest.raises(ValueError, match="not the checkpoint"):
        set_vocabulary(tiny_bundle, tiny_clipseg_ckpt, Vocabulary.from_names([("a", "b")]))


# -- TensorRT --------------------------------------------------------------------------------
def test_missing_tensorrt_names_the_pip_extra(monkeypatch):
    import builtins

    from runtime.backends import tensorrt as trt_backend

    real_import = builtins.__import__

    def no_trt(name, *a, **k):
        if name.startswith("tensorrt"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_trt)
    monkeypatch.setattr(trt_backend, "_FLAVOUR", None)
    with pytest.raises(trt_backend.TensorRTUnavailable, match=r"partclipseg-deploy\[tensorrt\]"):
        trt_backend.import_tensorrt()


def test_engine_mismatch_says_what_to_rebuild():
    from runtime.backends.tensorrt import engine_mismatch

    info = spec.EngineInfo(flavour="tensorrt", version="10.9.0",
                           gpu={"name": "NVIDIA H100", "compute_capability": "9.0"},
                           precision="fp16", onnx="model_fp16.onnx", profiles=(),
                           max_classes=128, max_batch=8)
    h100 = {"name": "NVIDIA H100", "compute_capability": "9.0"}
    assert engine_mismatch(info, "tensorrt", "10.9.0", h100) is None
    assert "10.9.0" in engine_mismatch(info, "tensorrt", "10.10.0", h100)
    msg = engine_mismatch(info, "tensorrt", "10.9.0", {"name": "Orin", "compute_capability": "8.7"})
    assert "8.7" in msg and "export.trt" in msg
    assert "no NVIDIA GPU" in engine_mismatch(info, "tensorrt", "10.9.0", None)


def test_profile_shapes_cover_the_vocabulary(tiny_bundle):
    from export.trt import profile_shapes

    manifest = spec.read_manifest(tiny_bundle)
    shapes = profile_shapes(manifest, 1, 2, 4, 16)
    size = manifest.input_size
    assert shapes["image"] == [[1, size, size, 3], [2, size, size, 3], [4, size, size, 3]]
    assert shapes["object_film_mul"][1][0] == 3 and shapes["object_film_mul"][2][0] == 17
    with pytest.raises(ValueError, match="max-classes"):
        profile_shapes(manifest, 1, 1, 4, 3)
    with pytest.raises(ValueError, match="min-batch"):
        profile_shapes(manifest, 2, 1, 4, 16)


@pytest.mark.tensorrt
def test_literal_export_trt_command_builds_an_engine_beside_the_checkpoint(
        tensorrt_builder, tiny_ckpt, micro_ckpt, micro_bundle, tmp_path):
    """`python -m export.trt --ckpt best.pt`, as written, in a fresh folder: exports the ONNX
    bundle to best_bundle/, parses model_fp16.onnx strongly typed and builds a real engine
    (TensorRT-RTX builds on CPU-only machines; running the engine needs a supported GPU)."""
    import subprocess
    import sys

    def export_trt() -> subprocess.CompletedProcess:
        done = subprocess.run([sys.executable, "-m", "export.trt", "--ckpt", "best.pt"],
                              cwd=tmp_path, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
        return done

    shutil.copy(tiny_ckpt, tmp_path / "best.pt")
    done = export_trt()
    out = tmp_path / "best_bundle"
    assert done.stdout.strip().splitlines()[-1] == f"[export.trt] bundle: {out}"
    m = spec.read_manifest(out)
    engine = m.engine
    assert m.file("engine").stat().st_size > 100_000
    assert engine.strongly_typed and engine.onnx == spec.graph_file("fp16")[1]
    assert engine.max_batch == 8 and engine.profiles[0]["class_film_mul"][2][0] == 128
    assert (out / spec.TIMING_CACHE).is_file()
    assert not list(out.glob("*.lock")) and not list(out.glob(".*"))
    assert m.checkpoint.path == str(tmp_path / "best.pt")
    # Again on the same checkpoint: the engine is rebuilt from the bundle's graphs as they are.
    assert "[export.onnx]" not in export_trt().stdout
    # A retrained best.pt: its graphs replace the stale ones before the build.
    shutil.copy(micro_ckpt, tmp_path / "best.pt")
    assert "exporting again" in export_trt().stdout
    m = spec.read_manifest(out)
    assert m.model_config == spec.read_manifest(micro_bundle).model_config and m.engine


def test_export_commands_default_to_a_bundle_beside_the_checkpoint(micro_ckpt, tmp_path,
                                                                   capsys):
    """`export.onnx --ckpt X.pt` writes X_bundle/ and prints it; `export.trt` with neither
    --ckpt nor --out names both options."""
    from export import onnx as export_onnx_cli
    from export import trt

    ckpt = tmp_path / "best.pt"
    shutil.copy(micro_ckpt, ckpt)
    assert export_onnx_cli.main(["--ckpt", str(ckpt), "--no-fp16"]) == 0
    assert spec.read_manifest(tmp_path / "best_bundle").has("onnx_fp32")
    assert capsys.readouterr().out.strip().splitlines()[-1] == \
        f"[export.onnx] bundle: {tmp_path / 'best_bundle'}"
    with pytest.raises(SystemExit) as e:
        trt.main([])
    assert e.value.code == 2 and "--ckpt CKPT" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.tensorrt
def test_vit_b16_reference_exports_and_builds(tmp_path, torch):
    """The paper-size graph (ViT-B/16 @352, random weights) exports with parity and its FP16
    graph builds into a strongly typed engine. Minutes on a 2-core CPU: `pytest -m slow`."""
    from runtime.backends.tensorrt import TensorRTUnavailable, import_tensorrt

    from partclipseg.checkpoint import save_checkpoint
    from partclipseg.model import build_model

    torch.manual_seed(0)
    vocab = Vocabulary.from_names([(f"object{o}", f"part{p}") for o in range(4)
                                   for p in range(o, o + 3)], unseen_objects=["object3"])
    ckpt = save_checkpoint(tmp_path / "vitb16.pt", build_model("vit_b16"), vocab)
    manifest = export_onnx(ckpt, tmp_path / "b", check_batch=1)
    assert manifest.input_size == 352 and manifest.onnx.parity["fp16"]["rel_error"] < 2e-2
    try:
        import_tensorrt()
    except TensorRTUnavailable as e:
        pytest.skip(str(e))
    from export.trt import main

    # Modest profile: TensorRT-RTX sizes activations for the largest shape, within host memory.
    assert main(["--out", str(tmp_path / "b"), "--max-batch", "2", "--max-classes", "32"]) == 0
    assert spec.read_manifest(tmp_path / "b").file("engine").stat().st_size > 50e6


def test_placement_reports_every_node_on_its_provider(tiny_bundle):
    """The CUDA check (`python -m export.placement --device cuda`) on the GPU machine reads the
    same fields; on CPU every node runs on the CPU provider and nothing is copied."""
    from export.placement import placement
    from partclipseg.model.deploy import example_inputs

    m = spec.read_manifest(tiny_bundle)
    feed = example_inputs(m.input_size, spec.read_vocab(m))
    report = placement(m.file("onnx_fp32"), feed, device="cpu")
    assert report["memcpy_nodes"] == 0
    assert set(report["nodes_by_provider"]) == {"CPUExecutionProvider"}
    assert sum(report["nodes_by_provider"].values()) > 100


@pytest.mark.tensorrt
@pytest.mark.parametrize("key", ["onnx_fp32", "onnx_fp16", "onnx_fp32_labels", "onnx_fp16_labels"])
def test_every_exported_graph_builds_with_tensorrt(tensorrt_builder, tiny_bundle, key):
    """Not only the engine's graph: every graph a bundle holds parses strongly typed and builds."""
    from export.trt import engine_bytes, profile_shapes

    manifest = spec.read_manifest(tiny_bundle)
    shapes = profile_shapes(manifest, 1, 1, 2, 16)
    engine = engine_bytes(manifest.file(key), shapes, workspace_gib=1.0)
    assert len(engine) > 100_000
