"""INT8 graphs for CPUs (`python -m export.onnx --int8`), with ONNX Runtime's quantization.

`quantize_graph` turns an exported FP32 graph into an INT8 one by one of two methods:

  static    calibrated QDQ (`quantize_static`, QuantFormat.QDQ): QuantizeLinear /
            DequantizeLinear pairs around the MatMul / Gemm nodes that carry weights,
            activation ranges from calibration images, per-channel INT8 weights. ONNX Runtime's
            CPU provider fuses the pairs into integer kernels, and TensorRT reads the same
            explicit Q/DQ.
  dynamic   `quantize_dynamic`: per-channel INT8 weights of the same nodes, activation ranges
            computed at run time (MatMulInteger). No calibration; ONNX Runtime only.

Only MatMul / Gemm nodes that multiply by a weight are quantized. LayerNorm, softmax, GELU,
the residual Adds, the convolutions and the attention's activation-by-activation MatMuls stay
in float: quantizing them is
what collapses ViT accuracy (onnxsim's Orin study, optimum #151). `calibration_images` finds the
images a checkpoint was trained on, and `calibration_feeds` turns images into graph feeds.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

__all__ = ["METHODS", "DEFAULT_METHOD", "WEIGHT_BITS", "quantize_graph", "weight_nodes",
           "quantized_weight_range", "calibration_images", "calibration_feeds", "split_images",
           "write_int8_graphs", "IMAGE_SUFFIXES", "CALIBRATION_IMAGES"]

METHODS = ("static", "dynamic")
DEFAULT_METHOD = "static"
# Weights use 7 bits ([-64, 64]), so every integer product is exact on every CPU. ONNX Runtime
# multiplies u8 activations by s8 weights with VPMADDUBSW on x86 CPUs without VNNI (AVX2, and
# AVX-512 before Cascade Lake), which adds two products into a saturating int16: 2 x 255 x 127
# = 64770 overflows it, 2 x 255 x 64 = 32640 does not. VNNI (VPDPBUSD) and ARM accumulate in
# 32 bits either way. Measured in docs/int8.md: with 8-bit weights the demo model's INT8 labels
# changed on AVX2 (emulated Haswell) while 7-bit ones matched VNNI's.
WEIGHT_BITS = 7
# Calibration keeps every recorded activation of every image in memory (ONNX Runtime 1.32's
# periodic folding drops data), so the count bounds memory: 32 images of ViT-B/16 at batch 1
# peaked at 14 GB, and a batch-8 fast graph ran out of 24 GB.
CALIBRATION_IMAGES = 16
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
# The quantized products. Not Conv: the mask heads' convolutions run on per-class maps at up to
# full resolution, where calibrating them at batch 8 ran out of 24 GB and INT8 gained nothing
# (stage 2 + class head: 77 ms FP32, 85 ms INT8 at the reference size); the one Conv of the
# image tower (the patch embedding) is a small share.
PRODUCTS = ("MatMul", "Gemm")


def weight_nodes(model: object, op_types: Sequence[str] = ("MatMul", "Gemm")) -> list[str]:
    """Names of the `op_types` nodes of ONNX `model` whose second input is an initializer
    (a weight), i.e. every matrix product except activation-by-activation ones."""
    graph = model.graph  # type: ignore[attr-defined]
    weights = {t.name for t in graph.initializer}
    return [n.name for n in graph.node
            if n.op_type in op_types and len(n.input) > 1 and n.input[1] in weights]


def quantize_graph(fp32: str | Path, out: str | Path, method: str = DEFAULT_METHOD,
                   calibration: Iterable[Mapping[str, np.ndarray]] | None = None,
                   exclude: Sequence[str] = (), weight_bits: int = WEIGHT_BITS) -> list[str]:
    """Write the INT8 version of the FP32 graph `fp32` to `out`; returns the quantized nodes.

    calibration: feeds ({input: array}) the static method measures activation ranges on.
    exclude: node names to keep in float besides the activation-only ones.
    weight_bits: 7 (default: exact integer products on every CPU, `WEIGHT_BITS`) or 8 (the
        full INT8 range, whose products saturate on x86 CPUs without VNNI; for measurements).
    """
    import onnx

    if method not in METHODS:
        raise ValueError(f"INT8 method must be one of {METHODS}, got {method!r}")
    if weight_bits not in (7, 8):
        raise ValueError(f"weight_bits must be 7 or 8, got {weight_bits!r}")
    model = onnx.load(str(fp32))
    nodes = [n for n in weight_nodes(model, PRODUCTS) if n not in set(exclude)]
    if not nodes:
        raise ValueError(f"{fp32} has no weight MatMul / Gemm node to quantize")
    _own_initializers(model, set(nodes))
    _gemm_as_matmul(model, set(nodes))
    with tempfile.TemporaryDirectory() as tmp:  # the calibrator's augmented graph goes here too
        src = Path(tmp) / "fp32.onnx"
        onnx.save(model, str(src))
        _quantize(src, Path(out), method, nodes, calibration, Path(tmp), weight_bits == 7)
    quantized = onnx.load(str(out))
    if _float_for_float_ops(quantized):
        onnx.checker.check_model(quantized)
        onnx.save(quantized, str(out))
    return nodes


def quantized_weight_range(model: object) -> tuple[int, int]:
    """(least, greatest) integer of every quantized weight in ONNX `model`: the INT8 / UINT8
    initializers that DequantizeLinear (static) or MatMulInteger (dynamic) read. Exact integer
    products on every CPU need them within [-64, 64] (`WEIGHT_BITS`)."""
    from onnx import numpy_helper

    graph = model.graph  # type: ignore[attr-defined]
    inits = {t.name: t for t in graph.initializer}
    values = [numpy_helper.to_array(inits[i]) for n in graph.node
              if n.op_type in ("DequantizeLinear", "MatMulInteger") for i in n.input[:2]
              if i in inits and inits[i].data_type == 3]  # 3: INT8
    if not values:
        raise ValueError("the graph has no INT8 weight")
    return (min(int(v.min()) for v in values), max(int(v.max()) for v in values))


def _float_for_float_ops(model: object) -> int:
    """Rewire every op other than a product that reads a DequantizeLinear of an activation to
    that activation itself: ONNX Runtime's QDQ quantizer hands every consumer of a quantized
    tensor its dequantized copy, which would put INT8 rounding into the residual stream,
    LayerNorm and shape ops. Returns how many inputs were rewired."""
    graph = model.graph  # type: ignore[attr-defined]
    inits = {t.name for t in graph.initializer}
    produced = {o: n for n in graph.node for o in n.output}
    source = {}  # DequantizeLinear output -> the float activation its QuantizeLinear read
    for n in graph.node:
        if n.op_type == "DequantizeLinear" and n.input[0] in produced:
            q = produced[n.input[0]]
            if q.op_type == "QuantizeLinear" and q.input[0] not in inits:
                source[n.output[0]] = q.input[0]
    rewired = 0
    for n in graph.node:
        if n.op_type in PRODUCTS:
            continue
        for k, i in enumerate(n.input):
            if i in source:
                n.input[k] = source[i]
                rewired += 1
    return rewired


def _own_initializers(model: object, nodes: set[str]) -> None:
    """Give each node in `nodes` its own copy of every initializer it shares with another node
    (onnxslim merges equal constants, e.g. zero biases), so quantizing its copy never changes
    what a float op (a LayerNorm sharing that bias) reads."""
    import onnx

    graph = model.graph  # type: ignore[attr-defined]
    inits = {t.name: t for t in graph.initializer}
    users: dict[str, int] = {}
    for n in graph.node:
        for i in n.input:
            if i in inits:
                users[i] = users.get(i, 0) + 1
    for n in graph.node:
        if n.name not in nodes:
            continue
        for k, i in enumerate(n.input):
            if i in inits and users[i] > 1:
                copy = onnx.TensorProto()
                copy.CopyFrom(inits[i])
                copy.name = f"{i}__{n.name}"
                graph.initializer.append(copy)
                n.input[k] = copy.name
                users[i] -= 1


def _gemm_as_matmul(model: object, nodes: set[str]) -> None:
    """Rewrite each plain Gemm in `nodes` (alpha = beta = 1, A not transposed) as MatMul + Add,
    keeping its name on the MatMul. Static-shape graphs (the fast graphs) trace linear layers
    as Gemm, and ONNX Runtime fuses Q/DQ around a MatMul into an integer kernel but leaves a
    Gemm with a float bias dequantizing its weights on every call (measured: slower than FP32)."""
    import onnx
    from onnx import helper, numpy_helper

    graph = model.graph  # type: ignore[attr-defined]
    inits = {t.name: t for t in graph.initializer}
    out_nodes = []
    for n in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        plain = (n.op_type == "Gemm" and n.name in nodes and n.input[1] in inits
                 and attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0
                 and not attrs.get("transA", 0))
        if not plain:
            out_nodes.append(n)
            continue
        w = numpy_helper.to_array(inits[n.input[1]])
        if attrs.get("transB", 0):
            w = w.T
        name = f"{n.input[1]}__matmul"
        graph.initializer.append(numpy_helper.from_array(w.copy(), name))
        has_bias = len(n.input) > 2 and n.input[2]
        product = f"{n.output[0]}__product" if has_bias else n.output[0]
        out_nodes.append(helper.make_node("MatMul", [n.input[0], name], [product], name=n.name))
        if has_bias:
            out_nodes.append(helper.make_node("Add", [product, n.input[2]], [n.output[0]],
                                              name=f"{n.name}__bias"))
    del graph.node[:]
    graph.node.extend(out_nodes)
    onnx.checker.check_model(model)


def _quantize(src: Path, out: Path, method: str, nodes: list[str],
              calibration: Iterable[Mapping[str, np.ndarray]] | None, tmp: Path,
              reduce_range: bool) -> None:
    """ONNX Runtime's quantizer on `nodes` of graph `src` (`tmp`: a scratch folder);
    `reduce_range`: 7-bit weights ([-64, 64]; activations keep 8 bits)."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat,
                                          QuantType, quantize_dynamic, quantize_static)

    if method == "dynamic":
        quantize_dynamic(str(src), str(out), per_channel=True, weight_type=QuantType.QInt8,
                         nodes_to_quantize=nodes, reduce_range=reduce_range)
        return
    feeds = list(calibration or ())
    if not feeds:
        raise ValueError("static INT8 needs calibration images (--calibration DIR)")

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(feeds)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._it, None)

    quantize_static(
        str(src), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
        reduce_range=reduce_range,
        # Signed, symmetric activations: TensorRT's Q/DQ parser accepts no zero point.
        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
        nodes_to_quantize=nodes, calibrate_method=CalibrationMethod.MinMax,
        # op_types_to_quantize also limits what the calibrator records to the tensors around
        # these ops (ONNX Runtime 1.32's CalibMaxIntermediateOutputs drops the folded data, so
        # memory is bounded by the calibration count instead).
        op_types_to_quantize=list(PRODUCTS),
        # DedicatedQDQPair: a tensor that feeds a quantized product and a float op (a residual
        # Add, LayerNorm) keeps its float value for the float op.
        # OpTypesToExcludeOutputQuantization: only the products' inputs are quantized; their
        # outputs (into bias and residual Adds) stay float.
        # QuantizeBias False: biases stay float, as TensorRT's Q/DQ parser requires (it
        # refuses an INT32 DequantizeLinear).
        extra_options={"WeightSymmetric": True, "ActivationSymmetric": True,
                       "DedicatedQDQPair": True,
                       "QuantizeBias": False,
                       "OpTypesToExcludeOutputQuantization": list(PRODUCTS)},
        calibration_providers=["CPUExecutionProvider"], use_external_data_format=False)


def calibration_images(source: str | Path | None, train_config: Mapping[str, object]
                       ) -> list[Path]:
    """The calibration image files: those in folder `source`, or else the training images the
    checkpoint records (`<data.root>/images/<data.train_split>/`). ValueError names the fix."""
    if source is None:
        data = dict(train_config.get("data") or {})  # type: ignore[arg-type]
        root, split = data.get("root"), data.get("train_split", "train")
        if not root:
            raise ValueError("the checkpoint records no training data: pass --calibration DIR "
                             "(a folder of images like the deployment's)")
        source = Path(str(root)) / "images" / str(split)
        if not source.is_dir():
            raise ValueError(f"the checkpoint's training images {source} are not here: pass "
                             "--calibration DIR (a folder of images like the deployment's)")
    folder = Path(source)
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"--calibration {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


def calibration_feeds(files: Sequence[Path], size: int, vocab: Mapping[str, np.ndarray],
                      image_dtype: str = "uint8", batch: int = 1) -> list[dict[str, np.ndarray]]:
    """Graph feeds of the images `files`, each resized to the model's S x S as the runtime
    resizes, `batch` images a feed (the last one padded by repeating images), plus the
    vocabulary arrays."""
    from PIL import Image

    from runtime.preprocess import resize_image

    images = []
    for f in files:
        with Image.open(f) as im:
            images.append(resize_image(np.asarray(im.convert("RGB")), size))
    while len(images) % batch:
        images.append(images[len(images) % len(files)])
    return [{"image": np.stack(images[i:i + batch]).astype(image_dtype), **vocab}
            for i in range(0, len(images), batch)]


def split_images(files: Sequence[Path], count: int, check: int = 8, seed: int = 0
                 ) -> tuple[list[Path], list[Path]]:
    """(calibration images, held-out check images): disjoint, drawn from `files` (seeded); up
    to `count` for calibration and `check` held out. ValueError when there are too few."""
    if len(files) < check + 1:
        raise ValueError(f"INT8 calibration needs at least {check + 1} images, found "
                         f"{len(files)}: pass --calibration DIR with more")
    order = np.random.default_rng(seed).permutation(len(files))
    n = min(count, len(files) - check)
    return [files[i] for i in sorted(order[:n])], [files[i] for i in sorted(order[n:n + check])]


def write_int8_graphs(stage: Path, files: Mapping[str, str], vocab: Mapping[str, np.ndarray],
                      specs: Mapping[str, object], images: Sequence[Path], size: int,
                      image_dtype: str, fast: object | None, method: str = DEFAULT_METHOD,
                      count: int = CALIBRATION_IMAGES, weight_bits: int = WEIGHT_BITS,
                      log: Callable[[str], None] = print) -> tuple[dict[str, str], dict]:
    """The INT8 twin of every FP32 graph in `files` ({manifest key: file name} in `stage`),
    calibrated on up to `count` of `images`. `vocab` and its `specs` (the graph contract) feed
    the dynamic graphs; fast graphs get them padded to the slots of `fast`
    (`runtime.bundle.FastInfo`). Their labels are checked by the caller, with the bundle's
    check set (`export.check.measure`). Returns the new files and {"int8<suffix>": record}
    for the manifest's parity."""
    from runtime import bundle as spec
    from runtime.backends.slots import pad_to_slots

    calib_files = list(images[:count]) if len(images) <= count else \
        [images[i] for i in sorted(np.random.default_rng(0).permutation(len(images))[:count])]
    new, parity = {}, {}
    for key, name in sorted(files.items()):
        if not key.startswith("onnx_fp32"):
            continue
        suffix = key[len("onnx_fp32"):]
        fast_batch = int(suffix.rsplit("_b", 1)[1]) if "_fast_b" in suffix else None
        arrays = (dict(vocab) if fast_batch is None
                  else pad_to_slots(vocab, specs, fast))  # type: ignore[arg-type]
        calib = calibration_feeds(calib_files, size, arrays, image_dtype, fast_batch or 1)
        out_name = spec.graph_file("int8", labels=suffix == "_labels", fast_batch=fast_batch)[1]
        nodes = quantize_graph(stage / name, stage / out_name, method, calib,
                               weight_bits=weight_bits)
        log(f"  {out_name}: {method} INT8, {len(nodes)} weight nodes quantized "
            f"({weight_bits}-bit weights), calibrated on {len(calib_files)} images")
        new[f"onnx_int8{suffix}"] = out_name
        parity[f"int8{suffix}"] = {"method": method, "weight_bits": weight_bits,
                                   "calibration_images": len(calib_files)}
    return new, parity
