"""INT8 graphs for CPUs (`export.onnx --int8`): calibrated, 7-bit weights (exact integer
products on every CPU), checked with the bundle's check set, float where INT8 breaks ViTs,
loaded with `precision="int8"`, refused clearly where they cannot run.

They run on a micro model trained 40 steps (`trained_micro_ckpt`), whose labels are not
near-ties: the thresholds are the product's own (99%), not lowered for tests."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from export.onnx import ExportError, export_onnx  # noqa: E402
from runtime import Segmenter  # noqa: E402
from runtime import bundle as spec  # noqa: E402
from runtime.bundle import BundleError  # noqa: E402
from runtime.errors import DeviceError  # noqa: E402


def _val_frames(bundle) -> list[np.ndarray]:
    from runtime.verification import read_check_set

    return list(read_check_set(spec.read_manifest(bundle))[0])


def test_every_fp32_graph_gets_a_checked_int8_twin(int8_bundle):
    m = spec.read_manifest(int8_bundle)
    assert "int8" in m.precisions
    assert m.check.source.endswith("(validation)") and m.check.images == 4
    for suffix in ("", "_labels", "_fast_b2"):
        assert m.has(f"onnx_int8{suffix}")
        p = m.onnx.parity[f"int8{suffix}"]
        assert p["label_agreement"] >= 0.99 and p["method"] == "static" and p["images"] == 4
        assert p["weight_bits"] == 7


def test_int8_weights_use_seven_bits(int8_bundle):
    """Every quantized weight lies in [-64, 64], so u8 x s8 products summed in pairs stay below
    int16's limit (2 x 255 x 64 = 32640): exact on CPUs without VNNI too."""
    from export.int8 import quantized_weight_range

    m = spec.read_manifest(int8_bundle)
    for key in ("onnx_int8", "onnx_int8_labels", "onnx_int8_fast_b2"):
        low, high = quantized_weight_range(onnx.load(str(m.file(key))))
        assert -64 <= low < 0 < high <= 64, (key, low, high)


def test_only_weight_products_are_quantized(int8_bundle):
    """Q/DQ pairs feed MatMul / Gemm only: LayerNorm, softmax, GELU, convolutions, the residual
    Adds and the attention's activation-by-activation MatMuls stay in float."""
    graph = onnx.load(str(spec.read_manifest(int8_bundle).file("onnx_int8"))).graph
    weights = {t.name for t in graph.initializer}
    dq_out = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    consumers = [n for n in graph.node if set(n.input) & dq_out]
    assert consumers and {n.op_type for n in consumers} <= {"MatMul", "Gemm"}
    assert not [n.op_type for n in graph.node if n.op_type in ("LayerNormalization", "Softmax")
                and set(n.input) & dq_out]
    # a quantized product multiplies by a (dequantized) weight, never two activations
    dq_of_weight = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear"
                    and n.input[0] in weights}
    assert all(set(n.input) & dq_of_weight for n in consumers)


def test_int8_segmenter_agrees_with_fp32(int8_bundle):
    fp32 = Segmenter.load(int8_bundle, backend="onnxruntime")
    int8 = Segmenter.load(int8_bundle, backend="onnxruntime", precision="int8")
    fast = Segmenter.load(int8_bundle, backend="onnxruntime", precision="int8",
                          fast_labels=True)
    assert int8.backend_name == "onnxruntime:cpu:int8" and fast.route == "fast"
    frames = _val_frames(int8_bundle)  # at the model's input size: no resize in between
    a, b, c = (s.predict_batch(frames) for s in (fp32, int8, fast))
    assert np.mean([np.mean(x.labels == y.labels) for x, y in zip(a, b)]) >= 0.99
    assert np.mean([np.mean(x.labels == y.labels) for x, y in zip(b, c)]) >= 0.99


def test_int8_is_refused_where_it_cannot_run(int8_bundle, micro_bundle):
    with pytest.raises(DeviceError, match="CPU provider"):
        Segmenter.load(int8_bundle, backend="onnxruntime", device="cuda", precision="int8")
    with pytest.raises(BundleError, match="--int8"):
        Segmenter.load(micro_bundle, backend="onnxruntime", precision="int8")
    with pytest.raises(ValueError, match="torch backend"):
        Segmenter.load(int8_bundle, backend="torch", precision="int8")


def test_no_calibration_images_and_failed_checks_write_nothing(micro_ckpt, trained_micro_ckpt,
                                                               tmp_path):
    with pytest.raises(ValueError, match="--calibration"):
        export_onnx(micro_ckpt, tmp_path / "a", int8=True)  # a random checkpoint: no data
    with pytest.raises(ValueError, match="holds no images"):
        export_onnx(micro_ckpt, tmp_path / "b", int8=True, calibration=tmp_path)
    with pytest.raises(ValueError, match="between 0 and 1"):
        export_onnx(trained_micro_ckpt, tmp_path / "c", int8=True, int8_min_agreement=1.5)
    # Every label of 4 images equal to FP32's: INT8 rounding flips a few boundary pixels.
    with pytest.raises(ExportError, match=r"int8 labels agree with PyTorch FP32's on 9\d\.\d+%"):
        export_onnx(trained_micro_ckpt, tmp_path / "d", fp16=False, int8=True,
                    int8_min_agreement=1.0)
    assert not [p for p in tmp_path.iterdir() if p.name in ("a", "b", "c", "d")]


@pytest.mark.tensorrt
def test_int8_graph_builds_with_tensorrt(tensorrt_builder, int8_bundle):
    """TensorRT consumes the explicit Q/DQ graph (strongly typed). Executing it is not verified
    here: no machine we have runs TensorRT."""
    from export.trt import engine_bytes, profile_shapes

    m = spec.read_manifest(int8_bundle)
    engine = engine_bytes(m.file("onnx_int8"), profile_shapes(m, 1, 1, 2, 96), workspace_gib=1.0)
    assert len(engine) > 10_000
