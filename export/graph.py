"""Graph helpers every exporter shares (the bottom of `export/`: it imports no other module of
the package): trace a module to ONNX, clean it, derive its FP16 twin, run it in ONNX Runtime,
and measure its agreement with PyTorch.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from runtime.bundle import TensorSpec

__all__ = ["trace", "trace_deploy", "dynamic_axes", "finish_graph", "to_fp16", "ort_run",
           "relative_error", "FP16_KEEP_FP32"]

# LayerNormalization stays FP32 in FP16 graphs: its variance overflows FP16 on CLIP's large
# activations (softmax subtracts its max and stays FP16).
FP16_KEEP_FP32 = ["LayerNormalization"]


def dynamic_axes(specs: Mapping[str, TensorSpec]) -> dict[str, dict[int, str]]:
    """ONNX dynamic axes from the contract: every symbolic dimension ("B", "P", "O+1", "K", ...)
    is dynamic and named by its symbol, so tensors that share a symbol share the dimension."""
    return {name: {i: d for i, d in enumerate(t.shape) if isinstance(d, str)}
            for name, t in specs.items()}


def trace(module: Any, args: Sequence[Any], path: Path, input_names: Sequence[str],
          output_names: Sequence[str], dynamic: Mapping[str, Mapping[int, str]] | None,
          opset: int) -> None:
    """`torch.onnx.export` of `module(*args)` (the TorchScript tracer, constants folded) to
    `path`; `dynamic`: {tensor: {axis: name}}, None for a graph with every dimension static."""
    import torch

    fastpath = torch.backends.mha.get_fastpath_enabled()
    # nn.MultiheadAttention's fused inference kernel has no ONNX symbolic.
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about shape arithmetic
            torch.onnx.export(module, tuple(args), str(path), input_names=list(input_names),
                              output_names=list(output_names), dynamic_axes=dynamic or {},
                              opset_version=opset, dynamo=False, do_constant_folding=True)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


def trace_deploy(deploy: Any, inputs: Mapping[str, np.ndarray], path: Path, opset: int,
                 image_dtype: str = "uint8", static: bool = False,
                 log: Callable[[str], None] = print) -> Any:
    """Trace a `partclipseg.model.deploy.DeployModel` with the interface it declares
    (`input_specs`, then `mask_specs` for a slot graph; `output_specs`), dynamic on every
    symbolic dimension unless `static`; check and slim it. Returns the ONNX model."""
    import torch

    specs = dict(deploy.input_specs(image_dtype))
    if deploy.slots:
        specs.update(deploy.mask_specs())
    outputs = deploy.output_specs()
    names = list(specs)
    trace(deploy, [torch.from_numpy(np.asarray(inputs[n])) for n in names], path, names,
          list(outputs), None if static else dynamic_axes({**specs, **outputs}), opset)
    return finish_graph(path, log)


def finish_graph(path: Path, log: Callable[[str], None] = print) -> Any:
    """onnx checker + onnxslim (constant folding, dead-node and shape-op cleanup), in place;
    returns the ONNX model."""
    import onnx
    import onnxslim

    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    before = len(model.graph.node)
    model = onnxslim.slim(model)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    log(f"  {path.name}: {before} -> {len(model.graph.node)} nodes after onnxslim")
    return model


def to_fp16(model: Any, path: Path) -> None:
    """Write the FP16 twin of ONNX `model` to `path`: inputs and outputs stay FP32, and
    FP16_KEEP_FP32 ops run in FP32."""
    import onnx
    import onnxslim
    from onnxruntime.transformers.float16 import convert_float_to_float16

    fp16 = convert_float_to_float16(model, keep_io_types=True, op_block_list=FP16_KEEP_FP32)
    fp16 = onnxslim.slim(fp16)  # the converter appends its Casts unsorted; slim re-sorts
    onnx.checker.check_model(fp16)
    onnx.save(fp16, str(path))


def ort_run(path: Path, inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """Run the graph at `path` once on the CPU with the inputs it takes from `inputs`."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {i.name: inputs[i.name] for i in sess.get_inputs()})


def relative_error(ours: np.ndarray, ref: np.ndarray) -> float:
    """||ours - ref|| / ||ref|| in float64 (NaN in `ours` gives NaN, which fails any bound)."""
    ref = np.asarray(ref, np.float64)
    return float(np.linalg.norm(np.asarray(ours, np.float64) - ref)
                 / max(np.linalg.norm(ref), 1e-12))
