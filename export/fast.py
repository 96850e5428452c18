"""Fast slot graphs (`python -m export.onnx --fast`): every dimension static.

The vocabulary enters as zero-padded slot arrays of fixed size (`max_parts` parts,
`max_objects` objects + background, `max_classes` classes) plus validity masks
(`runtime.backends.slots.pad_to_slots` fills them from the graph contract, for every model);
invalid slots get -inf before every argmax, so they never win. One graph per batch size:
nothing is left for Shape arithmetic on the host, so ONNX Runtime can capture the graph in a
CUDA graph and TensorRT can build it with a static profile; a new vocabulary that fits changes slot contents, never shapes. The graphs return
Pred-All label maps at model resolution (the `--labels` graph's output).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from runtime import bundle as spec

__all__ = ["DEFAULT_SLOTS", "DEFAULT_BATCHES", "MIN_AGREEMENT", "export_fast_graphs"]

# Sized for Pascal-Part-116 (116 classes, 42 parts, 16 objects) and ADE20K-Part-234 (234
# classes, 85 parts, 44 objects).
DEFAULT_SLOTS = {"max_parts": 88, "max_objects": 48, "max_classes": 240}
DEFAULT_BATCHES = (1, 8)
MIN_AGREEMENT = 0.999  # fast-graph labels vs the exact label-map graph, FP32, model resolution


def export_fast_graphs(model: Any, stage: Path, arrays: dict[str, np.ndarray],
                       batches: Sequence[int] = DEFAULT_BATCHES, max_parts: int = 88,
                       max_objects: int = 48, max_classes: int = 240, opset: int = 17,
                       fp16: bool = True, image_dtype: str = "uint8",
                       log: Any = print) -> tuple[spec.FastInfo, dict[str, str]]:
    """Write one FP32 (+ FP16) fast graph per batch size into `stage`; returns the manifest's
    FastInfo and {manifest key: file name}. Raises ValueError when the bundle's own vocabulary
    does not fit the slots or the FP32 graph's labels agree with the exact label-map graph on
    fewer than MIN_AGREEMENT of the pixels of fresh random images."""
    import torch

    from partclipseg.model.deploy import DeployModel, example_inputs
    from runtime.backends.slots import pad_to_slots
    from runtime.io import CLIP_MEAN, CLIP_STD

    from .graph import ort_run, to_fp16, trace_deploy

    deploy = DeployModel(model, CLIP_MEAN, CLIP_STD, labels=True, slots=True).eval()
    specs = {n: t for n, t in deploy.input_specs(image_dtype).items() if n != spec.IMAGE}
    info = spec.FastInfo(tuple(sorted(set(int(b) for b in batches))), max_parts, max_objects,
                         max_classes, masks=deploy.mask_specs())
    if not info.batches or min(info.batches) < 1:
        raise ValueError(f"--fast batch sizes must be positive, got {list(batches)}")
    slots = pad_to_slots(arrays, specs, info)  # raises when the vocabulary is larger
    files: dict[str, str] = {}
    for b in info.batches:
        t = time.perf_counter()
        key, name = spec.graph_file("fp32", fast_batch=b)
        inputs = example_inputs(model.cfg.image_size, slots, batch=b, seed=0, dtype=image_dtype)
        graph = trace_deploy(deploy, inputs, stage / name, opset, image_dtype, static=True,
                             log=log)
        files[key] = name
        if fp16:
            key16, name16 = spec.graph_file("fp16", fast_batch=b)
            to_fp16(graph, stage / name16)
            files[key16] = name16
        log(f"  {name}: static batch {b}, {max_parts} part / {max_objects} object / "
            f"{max_classes} class slots, {time.perf_counter() - t:.1f} s")
    # The fast graph's labels vs the exact label-map model on images the trace never saw.
    b = info.batches[0]
    check = example_inputs(model.cfg.image_size, slots, batch=b, seed=3, dtype=image_dtype)
    got = ort_run(stage / spec.graph_file("fp32", fast_batch=b)[1], check)[0]
    exact = DeployModel(model, CLIP_MEAN, CLIP_STD, labels=True).eval()
    with torch.no_grad():
        want = exact(torch.from_numpy(check[spec.IMAGE]),
                     *(torch.from_numpy(arrays[n]) for n in specs))[0].numpy()
    agreement = float((got == want).mean())
    if agreement < MIN_AGREEMENT:
        raise ValueError(f"the fast graph's labels agree with the exact path on "
                         f"{100 * agreement:.3f}% of pixels (< {100 * MIN_AGREEMENT:.1f}%); "
                         "the bundle was not written")
    log(f"  fast graph vs exact label maps (FP32, batch {b}): {100 * agreement:.3f}% equal")
    return info.replace(agreement={"fp32": agreement}), files
