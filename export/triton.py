"""`python -m export.triton --bundle B --out REPO`: a bundle's graph as a Triton Inference Server
model repository for Triton's ONNX Runtime backend (optionally with its TensorRT accelerator).

Writes
  REPO/<name>/config.pbtxt        backend "onnxruntime", max_batch_size, dynamic batching,
                                  instance_group; with --tensorrt the TensorRT execution
                                  accelerator at the graph's precision
  REPO/<name>/1/model.onnx        the bundle's graph with the bundle's vocabulary baked in
  REPO/<name>/class_names.txt     the class of each label index, one "object's part" a line

Why the vocabulary is baked in: the graphs take the text side (the vocabulary arrays of
vocab.npz: FiLM vectors, class indexes) as inputs without a batch dimension, and Triton's
dynamic batcher needs one on every input. As initializers they leave `image` as the only input,
(B, S, S, 3) uint8 at the model's input size S, which Triton batches. A new vocabulary is a new
model version (`export.vocab`, then this again). The label-map graph (`export.onnx --labels`)
is used when the bundle has it: its output `labels` (B, S, S) int32 is Pred-All at model
resolution, -1 = background, to be resized (nearest) to the frame; else the logits graph
(`logits`, `object_logits`), whose Pred-All is `runtime.postprocess.pred_all`. Resizing the
frame to S x S (bilinear) is the client's job, as in `runtime.preprocess.resize_image`.

docs/serving.md says what is checked (the config parses with Triton's own protobuf; the baked
graph answers like the runtime) and what is not (loading in a Triton with the onnxruntime
backend).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from runtime import bundle as spec
from runtime.errors import run_command
from runtime.io import atomic_write, atomic_write_text
from runtime.options import nonneg_int, positive_int

__all__ = ["MODEL_NAME", "write_triton_model", "config_text", "bake_vocabulary",
           "build_parser", "main"]

MODEL_NAME = "partclipseg_onnx"
_TRITON_TYPES = {"uint8": "TYPE_UINT8", "float32": "TYPE_FP32", "float16": "TYPE_FP16",
                 "int32": "TYPE_INT32", "int64": "TYPE_INT64", "bool": "TYPE_BOOL"}


def bake_vocabulary(model: Any, arrays: dict[str, np.ndarray]) -> list[str]:
    """Turn every graph input named in `arrays` into an initializer holding that array (cast to
    the input's element type), in place on the `onnx.ModelProto`; returns the inputs left."""
    from onnx import helper, numpy_helper

    graph = model.graph
    for inp in list(graph.input):
        if inp.name in arrays:
            dtype = helper.tensor_dtype_to_np_dtype(inp.type.tensor_type.elem_type)
            graph.initializer.append(numpy_helper.from_array(
                np.ascontiguousarray(arrays[inp.name], dtype=dtype), inp.name))
            graph.input.remove(inp)
    return [i.name for i in graph.input]


def _dims(shape: Sequence[Any], sizes: dict[str, int]) -> list[int]:
    """A manifest shape less its batch symbol, every vocabulary symbol resolved ("K+1" -> 89)."""
    out = []
    for d in shape[1:]:
        if isinstance(d, int):
            out.append(d)
        else:
            sym, _, extra = str(d).partition("+")
            axis = {v: k for k, v in spec.AXES.items()}[sym]
            out.append(sizes[axis] + (int(extra) if extra else 0))
    return out


def config_text(name: str, inputs: dict[str, tuple[str, list[int]]],
                outputs: dict[str, tuple[str, list[int]]], max_batch: int,
                max_queue_delay_us: int, instances: int, device: str,
                tensorrt_precision: str | None = None, comment: str = "") -> str:
    """Triton's model configuration (protobuf text format) for the ONNX Runtime backend.

    inputs / outputs: name -> (numpy dtype name, dims without the batch dimension).
    tensorrt_precision: "FP16" or "FP32" adds ONNX Runtime's TensorRT execution accelerator.
    """
    def tensors(d: dict[str, tuple[str, list[int]]]) -> str:
        return ",\n".join(
            f'  {{\n    name: "{n}"\n    data_type: {_TRITON_TYPES[t]}\n'
            f'    dims: [ {", ".join(str(x) for x in dims)} ]\n  }}'
            for n, (t, dims) in d.items())

    lines = [f"# {line}" for line in comment.splitlines()] + [
        f'name: "{name}"', 'backend: "onnxruntime"', f"max_batch_size: {max_batch}",
        f"input [\n{tensors(inputs)}\n]", f"output [\n{tensors(outputs)}\n]",
        f"dynamic_batching {{\n  max_queue_delay_microseconds: {max_queue_delay_us}\n}}",
        "instance_group [\n  {\n    count: %d\n    kind: %s\n  }\n]"
        % (instances, "KIND_GPU" if device == "cuda" else "KIND_CPU")]
    if tensorrt_precision:
        lines.append(
            "optimization {\n  execution_accelerators {\n    gpu_execution_accelerator: [\n"
            '      {\n        name: "tensorrt"\n'
            f'        parameters {{ key: "precision_mode" value: "{tensorrt_precision}" }}\n'
            '        parameters { key: "max_workspace_size_bytes" value: "1073741824" }\n'
            "      }\n    ]\n  }\n}")
    return "\n".join(lines) + "\n"


def write_triton_model(bundle: str | Path, out: str | Path, name: str = MODEL_NAME,
                       device: str = "cuda", precision: str | None = None, max_batch: int = 8,
                       max_queue_delay_us: int = 1000, instances: int = 1,
                       tensorrt: bool = False) -> Path:
    """Write `out/name/{config.pbtxt, 1/model.onnx, class_names.txt}` (see the module doc);
    returns the model folder. precision: "fp16" or "fp32" (default: fp16 on cuda, fp32 on cpu).
    """
    import onnx

    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if tensorrt and device != "cuda":
        raise ValueError("--tensorrt is a GPU accelerator: use it with --device cuda")
    precision = precision or ("fp16" if device == "cuda" else "fp32")
    if precision not in ("fp16", "fp32"):
        raise ValueError(f"precision must be fp16 or fp32 for Triton's ONNX Runtime backend, "
                         f"got {precision!r}")
    manifest = spec.read_manifest(bundle)
    labels_key, labels_file = spec.graph_file(precision, labels=True)
    logits_key, logits_file = spec.graph_file(precision)
    if labels_key in manifest.files:
        graph, output_names = labels_file, [spec.LABELS]
    elif logits_key in manifest.files:
        graph, output_names = logits_file, [spec.LOGITS, spec.OBJECT_LOGITS]
    else:
        raise spec.BundleError(f"{manifest.root} has no {precision} graph: export it with "
                               "python -m export.onnx")
    model = onnx.load(str(manifest.root / graph))
    left = bake_vocabulary(model, spec.read_vocab(manifest))
    if left != [spec.IMAGE]:
        raise spec.BundleError(f"{manifest.root / graph} takes {left} after the vocabulary is "
                               f"baked in; Triton's batcher needs {spec.IMAGE!r} alone")
    vocab = manifest.vocabulary
    sizes = spec.axis_sizes(vocab)
    image = manifest.inputs[spec.IMAGE]
    outputs = {n: (manifest.outputs[n].dtype, _dims(manifest.outputs[n].shape, sizes))
               for n in output_names if n in manifest.outputs}
    folder = Path(out) / name
    atomic_write(folder / "1" / "model.onnx", lambda tmp: onnx.save(model, tmp))
    atomic_write_text(folder / "class_names.txt", "\n".join(vocab.class_names) + "\n")
    atomic_write_text(folder / "config.pbtxt", config_text(
        name, {spec.IMAGE: (image.dtype, _dims(image.shape, sizes))}, outputs, max_batch,
        max_queue_delay_us, instances, device, precision.upper() if tensorrt else None,
        comment=f"python -m export.triton --bundle {manifest.root}: {graph}, {precision}, "
        f"{vocab.num_classes} classes baked in (class_names.txt)"))
    return folder


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m export.triton",
                                description=__doc__.splitlines()[0])
    p.add_argument("--bundle", required=True, help="bundle folder written by export.onnx")
    p.add_argument("--out", required=True, help="Triton model repository folder")
    p.add_argument("--name", default=MODEL_NAME, help=f"model name (default {MODEL_NAME})")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda",
                   help="instance kind: KIND_GPU (cuda, default) or KIND_CPU")
    p.add_argument("--precision", choices=["fp16", "fp32"],
                   help="graph (default: fp16 on cuda, fp32 on cpu)")
    p.add_argument("--max-batch", type=positive_int, default=8)
    p.add_argument("--max-queue-delay-us", type=nonneg_int, default=1000)
    p.add_argument("--instances", type=positive_int, default=1)
    p.add_argument("--tensorrt", action="store_true",
                   help="run through ONNX Runtime's TensorRT execution provider (GPU)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    a = build_parser().parse_args(argv)

    def body() -> int:
        folder = write_triton_model(a.bundle, a.out, a.name, a.device, a.precision,
                                    a.max_batch, a.max_queue_delay_us, a.instances, a.tensorrt)
        print(f"[export.triton] {folder}: config.pbtxt, 1/model.onnx, class_names.txt; "
              f"tritonserver --model-repository {Path(a.out)}")
        return 0
    return run_command("export.triton", body)


if __name__ == "__main__":
    sys.exit(main())
