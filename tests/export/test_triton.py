"""`python -m export.triton`: a bundle as a Triton model repository (ONNX Runtime backend).

Checked here: the config parses with Triton's own protobuf (tritonclient's model_config_pb2)
and says what the module promises; PyTriton's bundled tritonserver reads it and stops only at
the missing onnxruntime backend (that build ships the Python backend alone); the graph with the
vocabulary baked in takes `image` alone and answers exactly like the runtime's graph fed the
bundle's vocabulary arrays. Not checked (no Triton with the onnxruntime backend here): that
backend loading and running it (docs/serving.md).
"""

from __future__ import annotations

import os
import subprocess

import numpy as np
import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from export.triton import main, write_triton_model  # noqa: E402
from runtime import Segmenter  # noqa: E402
from runtime import bundle as spec  # noqa: E402


@pytest.fixture(scope="module")
def labels_bundle(tmp_path_factory, micro_ckpt):
    """The micro model exported with label-map graphs (micro_bundle has none)."""
    from export.onnx import export_onnx

    return export_onnx(micro_ckpt, tmp_path_factory.mktemp("triton") / "b", labels=True).root


def _parse(folder):
    model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2",
                                           reason="needs tritonclient[grpc] (the [serve] extra)")
    from google.protobuf import text_format

    return text_format.Parse((folder / "config.pbtxt").read_text(),
                             model_config_pb2.ModelConfig()), model_config_pb2


def test_config_parses_with_tritons_protobuf_and_batches_images(labels_bundle, tmp_path):
    folder = write_triton_model(labels_bundle, tmp_path, device="cuda", max_batch=16,
                                max_queue_delay_us=500, instances=2, tensorrt=True)
    cfg, pb = _parse(folder)
    s = spec.read_manifest(labels_bundle).input_size
    assert (cfg.name, cfg.backend, cfg.max_batch_size) == ("partclipseg_onnx", "onnxruntime", 16)
    assert [(i.name, pb.DataType.Name(i.data_type), list(i.dims)) for i in cfg.input] == [
        ("image", "TYPE_UINT8", [s, s, 3])]
    assert [(o.name, pb.DataType.Name(o.data_type), list(o.dims)) for o in cfg.output] == [
        ("labels", "TYPE_INT32", [s, s])]
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 500
    group = cfg.instance_group[0]
    assert group.count == 2 and pb.ModelInstanceGroup.Kind.Name(group.kind) == "KIND_GPU"
    trt = cfg.optimization.execution_accelerators.gpu_execution_accelerator[0]
    assert trt.name == "tensorrt" and trt.parameters["precision_mode"] == "FP16"
    names = (folder / "class_names.txt").read_text().splitlines()
    assert tuple(names) == spec.read_manifest(labels_bundle).vocabulary.class_names


def test_the_baked_label_graph_answers_like_the_runtime(labels_bundle, tmp_path):
    import onnxruntime as ort

    folder = write_triton_model(labels_bundle, tmp_path, device="cpu")  # fp32 on the CPU
    sess = ort.InferenceSession(str(folder / "1" / "model.onnx"),
                                providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["image"]
    seg = Segmenter.load(labels_bundle, backend="onnxruntime", precision="fp32",
                         fast_labels=True)
    s = seg.input_size
    frames = np.random.default_rng(0).integers(0, 256, (3, s, s, 3), dtype=np.uint8)
    (labels,) = sess.run(["labels"], {"image": frames})
    want = np.stack([p.labels for p in seg.predict_batch(list(frames))])
    np.testing.assert_array_equal(labels, want)
    assert (labels >= 0).any()  # not all background: the vocabulary really is in the graph


def test_without_label_graphs_the_logits_graph_is_used(micro_bundle, tmp_path):
    import onnxruntime as ort

    folder = write_triton_model(micro_bundle, tmp_path, name="m", device="cpu")
    cfg, pb = _parse(folder)
    m = spec.read_manifest(micro_bundle)
    k, o, s = m.vocabulary.num_classes, len(m.vocabulary.objects), m.input_size
    assert [(x.name, list(x.dims)) for x in cfg.output] == [("logits", [k + 1, s, s]),
                                                           ("object_logits", [o + 1, s, s])]
    assert pb.ModelInstanceGroup.Kind.Name(cfg.instance_group[0].kind) == "KIND_CPU"
    sess = ort.InferenceSession(str(folder / "1" / "model.onnx"),
                                providers=["CPUExecutionProvider"])
    frames = np.random.default_rng(1).integers(0, 256, (2, s, s, 3), dtype=np.uint8)
    got = sess.run(["logits"], {"image": frames})[0]
    seg = Segmenter.load(micro_bundle, backend="onnxruntime", precision="fp32")
    want = seg.backend.run({"image": frames, **seg.feed()})["logits"]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_pytritons_tritonserver_reads_the_config_and_stops_at_the_missing_backend(
        labels_bundle, tmp_path):
    pytest.importorskip("pytriton", reason="needs the [serve] extra (nvidia-pytriton)")
    from pytriton.utils.distribution import get_libs_path

    import pytriton

    dist = os.path.join(os.path.dirname(pytriton.__file__), "tritonserver")
    write_triton_model(labels_bundle, tmp_path / "repo", device="cpu")
    from benchmarks.loopback import free_ports

    ports = [str(p) for p in free_ports(3)]
    env = {**os.environ, "LD_LIBRARY_PATH": f"{get_libs_path()}:"
           f"{os.environ.get('LD_LIBRARY_PATH', '')}"}
    run = subprocess.run(
        [os.path.join(dist, "bin", "tritonserver"), "--model-repository", str(tmp_path / "repo"),
         "--backend-directory", os.path.join(dist, "backends"), "--exit-on-error", "true",
         "--http-address", "127.0.0.1", "--grpc-address", "127.0.0.1", "--http-port", ports[0],
         "--grpc-port", ports[1], "--metrics-port", ports[2]],
        env=env, capture_output=True, text=True, timeout=120)
    log = run.stdout + run.stderr
    assert "failed to read text proto" not in log, log[-3000:]
    assert "unable to find backend library for backend 'onnxruntime'" in log, log[-3000:]
    # ... and a damaged config is refused before that, so the line above means "parsed"
    cfg = tmp_path / "repo" / "partclipseg_onnx" / "config.pbtxt"
    cfg.write_text(cfg.read_text().replace("TYPE_UINT8", "TYPE_UINT9"))
    run = subprocess.run(run.args, env=env, capture_output=True, text=True, timeout=120)
    assert "failed to read text proto" in run.stdout + run.stderr


def test_cli_user_errors_are_one_line(labels_bundle, tmp_path, capsys):
    assert main(["--bundle", str(labels_bundle), "--out", str(tmp_path), "--device", "cpu",
                 "--tensorrt"]) == 2
    assert "--tensorrt is a GPU accelerator" in capsys.readouterr().err
    assert main(["--bundle", str(tmp_path / "none"), "--out", str(tmp_path)]) == 2
    assert main(["--bundle", str(labels_bundle), "--out", str(tmp_path), "--device", "cpu"]) == 0
    assert (tmp_path / "partclipseg_onnx" / "1" / "model.onnx").is_file()
