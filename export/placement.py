"""`python -m export.placement --bundle B --precision fp16 --device cuda`: where ONNX Runtime
runs each node of a bundle graph.

A CUDA session can fall back to the CPU for nodes it has no kernel for, and then inserts Memcpy
nodes around them: both cost a device round trip per call and rule out CUDA graphs. This reads
the placement from ONNX Runtime itself (the optimized graph it saves, with its Memcpy nodes, and
a profiled run that names each kernel's execution provider).
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

from runtime.errors import run_command

__all__ = ["placement", "structure", "build_parser", "main"]


def placement(onnx_path: str | Path, feed: dict[str, Any], device: str = "cuda") -> dict[str, Any]:
    """Run `onnx_path` once on `device` and report {memcpy_nodes, nodes_by_provider,
    cpu_ops, total_nodes}. cpu_ops counts op types of nodes run by the CPU provider."""
    import onnx
    import onnxruntime as ort

    providers = (["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda"
                 else ["CPUExecutionProvider"])
    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        opts.enable_profiling = True
        opts.profile_file_prefix = str(Path(tmp) / "profile")
        sess = ort.InferenceSession(str(onnx_path), opts, providers=providers)
        sess.run(None, {i.name: feed[i.name] for i in sess.get_inputs()})
        events = json.loads(Path(sess.end_profiling()).read_text())
        optimized = onnx.load(opts.optimized_model_filepath, load_external_data=False)
    memcpy = sum(n.op_type.startswith("Memcpy") for n in optimized.graph.node)
    by_provider: collections.Counter[str] = collections.Counter()
    cpu_ops: collections.Counter[str] = collections.Counter()
    seen = set()
    for e in events:
        args = e.get("args", {})
        if e.get("cat") != "Node" or "provider" not in args or e["name"] in seen:
            continue
        seen.add(e["name"])
        by_provider[args["provider"]] += 1
        if args["provider"] == "CPUExecutionProvider":
            cpu_ops[args.get("op_name", "?")] += 1
    return {"graph": Path(onnx_path).name, "device": device, "providers": sess.get_providers(),
            "memcpy_nodes": memcpy, "nodes_by_provider": dict(by_provider),
            "cpu_ops": dict(cpu_ops), "total_nodes": len(optimized.graph.node)}


def structure(onnx_path: str | Path) -> dict[str, Any]:
    """What a graph leaves to the host, read from the graph after ONNX Runtime's constant
    folding: {shape_ops: Shape nodes left, dynamic: {tensor: shape} of inputs and outputs with
    a symbolic dimension}. A fast slot graph has neither: nothing for the CPU to compute between
    kernels, so a CUDA graph can capture it."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        opts.optimized_model_filepath = str(Path(tmp) / "folded.onnx")
        ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
        graph = onnx.load(opts.optimized_model_filepath, load_external_data=False).graph
    dynamic = {}
    for t in list(graph.input) + list(graph.output):
        dims = [d.dim_param or d.dim_value for d in t.type.tensor_type.shape.dim]
        if any(isinstance(d, str) for d in dims):
            dynamic[t.name] = dims
    return {"graph": Path(onnx_path).name,
            "shape_ops": sum(n.op_type == "Shape" for n in graph.node), "dynamic": dynamic}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m export.placement",
                                description=__doc__.splitlines()[0])
    p.add_argument("--bundle", required=True)
    p.add_argument("--precision", choices=["fp16", "fp32"], default="fp16")
    p.add_argument("--labels", action="store_true", help="the label-map graph")
    p.add_argument("--fast", type=int, metavar="BATCH",
                   help="the fast slot graph of this batch size (export.onnx --fast)")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--batch", type=int, default=1)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    a = build_parser().parse_args(argv)

    def body() -> int:
        from partclipseg.model.deploy import example_inputs
        from runtime import Segmenter
        from runtime.backends.slots import pad_to_slots
        from runtime.bundle import graph_file

        seg = Segmenter.load(a.bundle, backend="onnxruntime", device="cpu")
        key, _ = graph_file(a.precision, a.labels, fast_batch=a.fast)
        path = seg.manifest.file(key)
        vocab = seg.feed()
        if a.fast:
            vocab = pad_to_slots(vocab, seg.manifest.vocab_inputs, seg.manifest.fast)
        feed = example_inputs(seg.input_size, vocab, batch=a.fast or a.batch)
        print(json.dumps({**placement(path, feed, a.device), **structure(path)}, indent=2))
        return 0
    return run_command("export.placement", body)


if __name__ == "__main__":
    sys.exit(main())
