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

__all__ = ["METHODS", "DEFAULT_METHOD", "MIN_AGREEMENT", "quantize_graph", "weight_nodes",
           "calibration_images", "calibration_feeds", "split_images", "label_maps",
           "label_agreement",
           "write_int8_graphs", "IMAGE_SUFFIXES", "CALIBRATION_IMAGES"]

METHODS = ("static", "dynamic")
DEFAULT_METHOD = "static"
MIN_AGREEMENT = 0.99  # INT8 vs FP32 Pred-All labels on held-out images; below it nothing is written
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
                   exclude: Sequence[str] = ()) -> list[str]:
    """Write the INT8 version of the FP32 graph `fp32` to `out`; returns the quantized nodes.

    calibration: feeds ({input: array}) the static method measures activation ranges on.
    exclude: node names to keep in float besides the activation-only ones.
    """
    import onnx

    if method not in METHODS:
        raise ValueError(f"INT8 method must be one of {METHODS}, got {method!r}")
    model = onnx.load(str(fp32))
    nodes = [n for n in weight_nodes(model, PRODUCTS) if n not in set(exclude)]
    if not nodes:
        raise ValueError(f"{fp32} has no weight MatMul / Gemm node to quantize")
    _own_initializers(model, set(nodes))
    _gemm_as_matmul(model, set(nodes))
    with tempfile.TemporaryDirectory() as tmp:  # the calibrator's augmented graph goes here too
        src = Path(tmp) / "fp32.onnx"
        onnx.save(model, str(src))
        _quantize(src, Path(out), method, nodes, calibration, Path(tmp))
    quantized = onnx.load(str(out))
    if _float_for_float_ops(quantized):
        onnx.checker.check_model(quantized)
        onnx.save(quantized, str(out))
    return nodes


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
              calibration: Iterable[Mapping[str, np.ndarray]] | None, tmp: Path) -> None:
    """ONNX Runtime's quantizer on `nodes` of graph `src` (`tmp`: a scratch folder)."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat,
                                          QuantType, quantize_dynamic, quantize_static)

    if method == "dynamic":
        quantize_dynamic(str(src), str(out), per_channel=True, weight_type=QuantType.QInt8,
                         nodes_to_quantize=nodes)
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


def label_maps(outputs: Sequence[np.ndarray], names: Sequence[str],
               class_objects: Sequence[int]) -> np.ndarray:
    """(B, S, S) Pred-All labels at model resolution from a graph's outputs: its `labels`
    output, or the runtime's Pred-All on its logits (and object logits)."""
    from runtime.postprocess import pred_all

    out = dict(zip(names, outputs))
    if "labels" in out:
        return np.asarray(out["labels"])
    logits, objects = out["logits"], out.get("object_logits")
    size = logits.shape[-2:]
    return np.stack([pred_all(logits[i], np.asarray(class_objects), size,
                              None if objects is None else objects[i])
                     for i in range(logits.shape[0])])


def label_agreement(fp32: str | Path, int8: str | Path, feeds: Sequence[Mapping[str, np.ndarray]],
                    class_objects: Sequence[int]) -> float:
    """Share of equal Pred-All labels of the two graphs over `feeds` (CPU, model resolution)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sessions = [ort.InferenceSession(str(p), opts, providers=["CPUExecutionProvider"])
                for p in (fp32, int8)]
    equal = total = 0
    for feed in feeds:
        maps = []
        for s in sessions:
            names = [o.name for o in s.get_outputs()]
            outs = s.run(names, {i.name: feed[i.name] for i in s.get_inputs()})
            maps.append(label_maps(outs, names, class_objects))
        equal += int((maps[0] == maps[1]).sum())
        total += maps[0].size
    return equal / max(total, 1)


def write_int8_graphs(stage: Path, files: Mapping[str, str], vocab: Mapping[str, np.ndarray],
                      specs: Mapping[str, object], class_objects: Sequence[int],
                      images: Sequence[Path], size: int, image_dtype: str, fast: object | None,
                      method: str = DEFAULT_METHOD, count: int = CALIBRATION_IMAGES,
                      min_agreement: float | None = None,
                      log: Callable[[str], None] = print) -> tuple[dict[str, str], dict]:
    """The INT8 twin of every FP32 graph in `files` ({manifest key: file name} in `stage`):
    calibrated on up to `count` of `images`, checked on 8 others (`split_images`: disjoint)
    against the FP32 graph (Pred-All
    labels >= `min_agreement`, default MIN_AGREEMENT, else ValueError: the caller writes
    nothing). `vocab` and its
    `specs` (the graph contract) feed the dynamic graphs; fast graphs get them padded to the
    slots of `fast` (`runtime.bundle.FastInfo`). Returns the new files and
    {"int8<suffix>": parity record} for the manifest."""
    from runtime import bundle as spec
    from runtime.backends.slots import pad_to_slots

    limit = MIN_AGREEMENT if min_agreement is None else min_agreement
    calib_files, check_files = split_images(images, count)
    new, parity = {}, {}
    for key, name in sorted(files.items()):
        if not key.startswith("onnx_fp32"):
            continue
        suffix = key[len("onnx_fp32"):]
        fast_batch = int(suffix.rsplit("_b", 1)[1]) if "_fast_b" in suffix else None
        arrays = (dict(vocab) if fast_batch is None
                  else pad_to_slots(vocab, specs, fast))  # type: ignore[arg-type]
        batch = fast_batch or 1
        calib = calibration_feeds(calib_files, size, arrays, image_dtype, batch)
        check = calibration_feeds(check_files, size, arrays, image_dtype, batch)
        out_key = f"onnx_int8{suffix}"
        out_name = spec.graph_file("int8", labels=suffix == "_labels", fast_batch=fast_batch)[1]
        nodes = quantize_graph(stage / name, stage / out_name, method, calib)
        agree = label_agreement(stage / name, stage / out_name, check, class_objects)
        shown = len(check_files)
        log(f"  {out_name}: {method} INT8, {len(nodes)} weight nodes quantized; Pred-All labels "
            f"{100 * agree:.2f}% equal to FP32 on {shown} held-out images")
        if not agree >= limit:
            raise ValueError(f"{out_name} agrees with the FP32 graph on {100 * agree:.2f}% of "
                             f"pixels (< {100 * limit:.1f}%); the bundle was not written")
        new[out_key] = out_name
        parity[f"int8{suffix}"] = {"label_agreement": agree, "method": method,
                                   "calibration_images": len(calib_files),
                                   "images": shown}
    return new, parity
