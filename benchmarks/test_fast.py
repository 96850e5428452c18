"""The fast slot graphs (`export.onnx --fast`) vs the label-map graph (`--labels`) on --device:
the bare backend call, uint8 batch in, (B, S, S) label maps out, batch 1 and 8, FP32.

Both give Pred-All at model resolution; the fast graph has every dimension static (vocabulary
in zero-padded slots), which is what CUDA graphs and static TensorRT profiles need. On the CPU
it shows what the padding costs or saves; the terminal summary lists the ratio.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from benchmarks.conftest import BenchBundle, BenchReport
from benchmarks.targets import Target, TargetBook


@pytest.fixture(scope="module")
def label_graphs(bench_bundle: BenchBundle, bench_options: Any) -> dict[str, Any]:
    from runtime import Segmenter
    from runtime.backends.onnxruntime import OnnxRuntimeBackend
    from runtime.bundle import graph_file

    seg = Segmenter.load(bench_bundle.path, backend="onnxruntime", device=bench_options.device,
                         precision="fp32", fast_labels=True)
    if type(seg.backend).__name__ != "SlotGraphs":
        pytest.skip(f"{bench_bundle.path} has no fast graphs (export.onnx --fast)")
    plain = OnnxRuntimeBackend(str(seg.manifest.file(graph_file("fp32", labels=True)[0])),
                               bench_options.device)
    return {"fast": seg.backend, "labels": plain, "feed": seg.feed()}


_MEDIANS: dict[tuple[str, int], float] = {}


@pytest.mark.parametrize("images", [1, 8])
@pytest.mark.parametrize("graph", ["labels", "fast"])
def test_label_map_graphs(benchmark: Any, graph: str, images: int, label_graphs: dict[str, Any],
                          frames: np.ndarray, environment: dict[str, Any],
                          bench_report: BenchReport) -> None:
    backend, feed = label_graphs[graph], {"image": frames[:images], **label_graphs["feed"]}
    benchmark.group = f"label-map graphs/fp32/b{images}"
    benchmark.extra_info.update(environment, graph=graph, images=images)
    out = benchmark.pedantic(backend.run, args=(feed,), rounds=10 if images == 1 else 4,
                             warmup_rounds=1)
    assert out["labels"].shape == (images,) + frames.shape[1:3]
    if benchmark.stats is not None:
        _MEDIANS[(graph, images)] = 1e3 * benchmark.stats.stats.median
        if ("labels", images) in _MEDIANS and ("fast", images) in _MEDIANS:
            a, b = _MEDIANS[("labels", images)], _MEDIANS[("fast", images)]
            bench_report.ratios.append(f"b{images} label-map graph {a:.1f} ms vs fast slot "
                                       f"graph {b:.1f} ms: {a / b:.2f}x")


def test_fast_graph_gives_the_label_graph_labels(label_graphs: dict[str, Any],
                                                  frames: np.ndarray, targets: TargetBook) -> None:
    feed = {"image": frames[:8], **label_graphs["feed"]}
    a, b = label_graphs["fast"].run(feed)["labels"], label_graphs["labels"].run(feed)["labels"]
    targets.check(Target("fast slot graph vs label-map graph: label agreement (b8, fp32)",
                         goal=99.9, measured=100 * float(np.mean(a == b)), unit="%"))
