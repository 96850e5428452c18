"""GPU latency of the reference model, every path in one run (docs/design.md, "Targets").

    PYTHONPATH=/tmp/site python3 -m benchmarks.gpu_bench                 # H100: < 6 min
    python -m benchmarks.gpu_bench --smoke                               # tiny model, b1, any
                                                                         # machine (CPU too)

Builds the reference speed model (random-init ViT-B/16 @352, Pascal-Part-116 vocabulary: 116
classes, 42 parts, 16 objects) and exports its bundle (FP32 + FP16 ONNX) on this machine (the
bundle is ~0.5 GB and cannot travel; `--bundle DIR` reuses one, and the default folder is reused
when it already holds a complete bundle). Then, at batch 1, 8 and 32 on the same frames
(SynthParts renders at 352 px):

  torch-fp32 / torch-fp16   PyTorch eager (`DeployModel`; FP16 = the model in half):
      model   CUDA-event time of the forward with inputs already on the GPU
      predict `Segmenter(backend="torch").predict/predict_batch` end to end
  ort-fp32 / ort-fp16       ONNX Runtime CUDA EP on the bundle's graphs:
      predict `Segmenter.predict/predict_batch` end to end (uint8 in, label maps out)
      session the bare `seg.backend.run(feed)` (numpy in, numpy logits out)
      device  the same session with IO binding, inputs and outputs on the GPU (no host copies)

plus label agreement of every path with torch-fp32 at every batch (Pred-All label maps), and a
per-stage profile of the torch paths by CUDA events (host preprocess, H2D, normalize, ViT,
stage-1 decoder, stage-2 mix + FiLM', heads, D2H, host postprocess). Medians after warm-up;
host-side timings use perf_counter after synchronize. Results go to $OUT/gpu_bench.json
(default ./out) after every batch, so a run cut short still leaves what it measured; a short
table is printed last.

Needs: torch with CUDA, onnxruntime-gpu (CUDA EP), open_clip_torch (+ ftfy, wcwidth) and
onnxslim for the export. Missing pieces are named in the first seconds.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from benchmarks.timing import Timing, time_calls, time_cuda
from runtime.errors import run_command

BATCHES = (1, 8, 32)
TARGET_B1_MS = 1.0           # docs/design.md, GPU: exported FP16 predict, batch 1
# Fast slot graphs of the reference bundle: batch 1 and 32 (the two targets; batch 8 runs
# padded in the 32 graph), slots that fit Pascal-Part-116 (116 classes, 42 parts, 16 objects).
FAST_BATCHES = (1, 32)
FAST_SLOTS = {"max_parts": 48, "max_objects": 16, "max_classes": 120}
TARGET_VS_TORCH = 10.0       # ... >= 10x faster than PyTorch eager FP32 in the same run
TARGET_B32_IMG_S = 2500.0    # ... batch 32 >= 2500 images/s
FP16_MIN_AGREEMENT = 0.995
DEFAULT_BUNDLE = Path("/tmp/partclipseg_reference")


def log(msg: str) -> None:
    print(f"[gpu_bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- setup --------------------------------------------------------------------------------------
def preflight(device: str) -> dict[str, Any]:
    """Import everything the run needs and fail in seconds, naming what is missing."""
    problems = []
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        problems.append("torch sees no CUDA device")
    for mod, hint in (("open_clip", "open_clip_torch (+ ftfy, wcwidth) wheel"),
                      ("onnx", "onnx"), ("onnxslim", "onnxslim wheel (export.onnx simplifies "
                                                     "graphs with it)")):
        try:
            __import__(mod)
        except ImportError as e:
            problems.append(f"cannot import {mod} ({e}): carry the {hint}")
    try:
        import onnxruntime as ort

        if device == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                problems.append(f"onnxruntime {ort.__version__} ({ort.__file__}) has no CUDA EP: "
                                "put onnxruntime-gpu first on PYTHONPATH")
            else:
                problem = _cuda_ep_works(ort)
                if problem:
                    problems.append(problem)
    except ImportError as e:
        problems.append(f"cannot import onnxruntime ({e})")
    if problems:
        raise SystemExit("gpu_bench: cannot run:\n  " + "\n  ".join(problems))
    import onnxruntime as ort

    env = {"python": platform.python_version(), "torch": torch.__version__,
           "onnxruntime": ort.__version__, "onnxruntime_file": ort.__file__,
           "numpy": np.__version__, "device": device, "cpu_count": os.cpu_count()}
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        env.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1),
                   cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    return env


def _cuda_ep_works(ort: Any) -> str | None:
    """Run a one-node graph on the CUDA EP: ONNX Runtime falls back to the CPU silently when
    the EP's CUDA/cuDNN libraries do not load, which must not cost an export first."""
    from onnx import TensorProto, helper

    if hasattr(ort, "preload_dlls"):  # CUDA/cuDNN of torch's nvidia-* wheels (ORT >= 1.21)
        try:
            ort.preload_dlls()
        except Exception as e:  # noqa: BLE001  best effort; the session below decides
            log(f"onnxruntime.preload_dlls() failed: {e}")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    graph = helper.make_graph([helper.make_node("Add", ["x", "x"], ["y"])], "probe", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = min(model.ir_version, 9)
    try:
        sess = ort.InferenceSession(model.SerializeToString(),
                                    providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
        out = sess.run(None, {"x": np.ones(2, np.float32)})[0]
    except Exception as e:  # noqa: BLE001
        return f"ONNX Runtime CUDA EP probe failed: {type(e).__name__}: {e}"
    if sess.get_providers()[0] != "CUDAExecutionProvider" or not np.allclose(out, 2.0):
        return (f"ONNX Runtime fell back to {sess.get_providers()}: the CUDA EP's libraries "
                "(CUDA 13 runtime, cuBLAS, cuDNN 9) did not load; import torch first or set "
                "LD_LIBRARY_PATH to its nvidia/*/lib folders")
    return None


def get_bundle(args: argparse.Namespace) -> tuple[Path, Path, dict[str, Any]]:
    """(bundle, checkpoint, export info): reuse a complete bundle, else build one here."""
    from benchmarks.reference import build_bundle, checkpoint_path_for
    from runtime.bundle import BundleError, graph_file, read_manifest

    out = Path(args.bundle)
    ckpt = checkpoint_path_for(out)
    want = "tiny" if args.smoke else "vit_b16"
    try:
        m = read_manifest(out)
        graphs = [graph_file(p, labels)[0] for p in ("fp32", "fp16") for labels in (False, True)]
        graphs += [graph_file(p, fast_batch=b)[0] for p in ("fp32", "fp16") for b in FAST_BATCHES]
        if (m.model_name == want and ckpt.is_file() and all(m.has(k) for k in graphs)
                and not args.rebuild):
            for k in graphs:
                m.file(k, verify=False)  # size checks: raise when truncated
            log(f"reusing bundle {out} ({want}); --rebuild to export again")
            return out, ckpt, {"reused": True, "parity": m.onnx.parity if m.onnx else None}
    except BundleError:
        pass
    log(f"building the {want} reference bundle in {out} (export on {os.cpu_count()} CPU cores)")
    built = build_bundle(out, config=want, check_batch=1, fast=FAST_BATCHES, slots=FAST_SLOTS)
    return out, built.checkpoint, {"reused": False, "seconds": built.seconds,
                                   "parity": built.manifest.onnx.parity}


def make_frames(size: int, n: int) -> np.ndarray:
    """(n, size, size, 3) uint8 SynthParts val renders (real-looking content, not noise)."""
    from partclipseg.data.synthparts import render_sample

    return np.stack([render_sample(0, "val", i, size)[0] for i in range(n)])


# -- the torch model, staged --------------------------------------------------------------------
class Marks:
    """Named time marks: CUDA events on cuda, perf_counter on cpu. `elapsed()` -> {stage: ms}."""

    def __init__(self, device: str):
        import torch

        self._torch, self._cuda = torch, device == "cuda"
        self._marks: list[tuple[str, Any]] = []

    def __call__(self, name: str) -> None:
        if self._cuda:
            ev = self._torch.cuda.Event(enable_timing=True)
            ev.record()
            self._marks.append((name, ev))
        else:
            self._marks.append((name, time.perf_counter()))

    def elapsed(self) -> dict[str, float]:
        if self._cuda:
            self._torch.cuda.synchronize()
            ms = lambda a, b: float(a.elapsed_time(b))  # noqa: E731
        else:
            ms = lambda a, b: 1e3 * (b - a)  # noqa: E731
        return {n1: ms(t0, t1) for (_, t0), (n1, t1) in zip(self._marks, self._marks[1:])}


class TorchPath:
    """PyTorch eager DeployModel at one precision, inputs resident on the device."""

    def __init__(self, checkpoint: Path, manifest: Any, arrays: dict[str, np.ndarray],
                 device: str, precision: str):
        import torch

        from partclipseg.checkpoint import load_model
        from partclipseg.model.deploy import DeployModel
        from runtime import bundle as spec

        model, _, _ = load_model(checkpoint, map_location=device)
        self.deploy = DeployModel(model, manifest.mean, manifest.std).to(device).eval()
        self.dtype = torch.float16 if precision == "fp16" else torch.float32
        if precision == "fp16":
            self.deploy.half()
        self.device, self.precision, self.torch = device, precision, torch
        self.vocab = [self._tensor(arrays[n]) for n in manifest.vocab_inputs]

    def _tensor(self, a: np.ndarray) -> Any:
        t = self.torch.from_numpy(np.ascontiguousarray(a)).to(self.device)
        return t.to(self.dtype) if t.is_floating_point() else t

    def image(self, frames: np.ndarray) -> Any:
        return self.torch.from_numpy(np.ascontiguousarray(frames)).to(self.device)

    def forward(self, image: Any, mark: Callable[[str], None] = lambda name: None
                ) -> tuple[Any, Any]:
        with self.torch.inference_mode():
            return self.deploy.stages(image, *self.vocab, mark=mark)


# -- measurements -------------------------------------------------------------------------------
class Budget:
    """Wall-clock budget of the run: measurements stop being started when it runs out."""

    def __init__(self, seconds: float):
        self.end = time.perf_counter() + seconds

    def left(self) -> float:
        return self.end - time.perf_counter()


def timed(fn: Callable[[], Any], device: str, batch: int, gpu_clock: bool) -> Timing:
    """Median-ready samples: CUDA events for device-resident torch work, else perf_counter
    (+ synchronize). Fewer runs for bigger batches; about 2 s per configuration."""
    runs = {1: (3, 5, 50), 8: (2, 5, 30), 32: (1, 3, 10)}.get(batch, (1, 3, 10))
    warmup, lo, hi = runs
    if device == "cuda" and gpu_clock:
        return time_cuda(fn, warmup=warmup, min_runs=lo, max_runs=hi, budget_s=2.0)
    sync = None
    if device == "cuda":
        import torch

        sync = torch.cuda.synchronize
    return time_calls(fn, warmup=warmup, min_runs=lo, max_runs=hi, budget_s=2.0, sync=sync)


def labels_of(logits: np.ndarray, object_logits: np.ndarray, class_objects: np.ndarray
              ) -> np.ndarray:
    """(B, K + 1, S, S), (B, O + 1, S, S) -> (B, S, S) int32 Pred-All label maps."""
    from runtime.postprocess import pred_all

    size = logits.shape[-2:]
    return np.stack([pred_all(logits[j], class_objects, size, object_logits[j])
                     for j in range(logits.shape[0])])


def ort_device_runner(seg: Any, feed: dict[str, np.ndarray], device: str) -> Callable[[], Any]:
    """`run_with_iobinding` with inputs copied to the device once and outputs left there."""
    import onnxruntime as ort

    sess = seg.backend.session
    io = sess.io_binding()
    where = "cuda" if device == "cuda" else "cpu"
    keep = []
    for i in sess.get_inputs():
        v = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(feed[i.name]), where, 0)
        keep.append(v)
        io.bind_ortvalue_input(i.name, v)
    for o in sess.get_outputs():
        io.bind_output(o.name, where)

    def run() -> None:
        sess.run_with_iobinding(io)
        io.synchronize_outputs()
        _ = keep  # the input OrtValues must outlive the binding

    return run


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from runtime import Segmenter
    from runtime import bundle as spec

    t_start = time.perf_counter()
    device = "cuda" if (torch.cuda.is_available() and args.device != "cpu") else "cpu"
    if device == "cpu" and not args.smoke:
        raise SystemExit("gpu_bench: no CUDA device; use --smoke to try the script on a CPU")
    env = preflight(device)
    log(f"device {env.get('gpu', 'cpu')}, torch {env['torch']}, onnxruntime {env['onnxruntime']}")
    batches = (1,) if args.smoke else tuple(args.batches)
    out_dir = Path(os.environ.get("OUT") or "out")
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "gpu_bench.json"

    bundle, ckpt, export_info = get_bundle(args)
    manifest = spec.read_manifest(bundle)
    arrays = spec.read_vocab(manifest)
    vocab = manifest.vocabulary
    s = manifest.input_size
    class_objects = np.asarray(vocab.class_objects)
    frames = make_frames(s, max(batches))
    budget = Budget(args.budget_s - (time.perf_counter() - t_start))
    result: dict[str, Any] = {
        "environment": env, "bundle": str(bundle), "export": export_info,
        "model": {"config": manifest.model_name, "input_size": s,
                  "classes": vocab.num_classes, "parts": len(vocab.parts),
                  "objects": len(vocab.objects)},
        "latency_ms": {}, "agreement_vs_torch_fp32": {}, "profile_ms": {}, "errors": {},
        "skipped": [], "seconds": {"setup": time.perf_counter() - t_start}}

    def save() -> None:
        result["seconds"]["total"] = time.perf_counter() - t_start
        json_path.write_text(json.dumps(_clean(result), indent=2) + "\n")

    def record(route: str, call: str, b: int, t: Timing) -> None:
        result["latency_ms"].setdefault(route, {}).setdefault(call, {})[f"b{b}"] = t.to_dict(b)
        log(f"  {route:<13} {call:<8} b{b:<3} median {t.median_ms:9.3f} ms ({t.runs} runs)")

    def attempt(route: str, what: str, fn: Callable[[], Any]) -> Any:
        if budget.left() < 10:
            result["skipped"].append(f"{route} {what}: time budget spent")
            return None
        try:
            return fn()
        except Exception as e:  # keep measuring the other paths; the JSON names the failure
            msg = f"{type(e).__name__}: {str(e).splitlines()[0][:400] if str(e) else ''}"
            result["errors"][f"{route} {what}"] = msg
            log(f"  {route} {what} FAILED: {msg}")
            if args.verbose:
                traceback.print_exc()
            return None

    # -- open every path once ------------------------------------------------------------------
    t = time.perf_counter()
    torch_paths: dict[str, TorchPath] = {}
    for prec in ("fp32", "fp16"):
        if prec == "fp16" and device == "cpu":
            result["skipped"].append("torch-fp16: half-precision eager runs on CUDA only")
            continue
        p = attempt(f"torch-{prec}", "load", lambda: TorchPath(ckpt, manifest, arrays, device,
                                                               prec))
        if p is not None:
            torch_paths[f"torch-{prec}"] = p
    segs: dict[str, Any] = {}
    for prec in ("fp32", "fp16"):
        if prec != "fp16" or device == "cuda":
            sg = attempt(f"torch-{prec}", "segmenter", lambda: Segmenter.load(
                bundle, backend="torch", device=device, precision=prec, checkpoint=ckpt))
            if sg is not None:
                segs[f"torch-{prec}"] = sg
        sg = attempt(f"ort-{prec}", "segmenter", lambda: Segmenter.load(
            bundle, backend="onnxruntime", device=device, precision=prec))
        if sg is not None:
            providers = sg.backend.session.get_providers()
            want = "CUDAExecutionProvider" if device == "cuda" else "CPUExecutionProvider"
            if providers[0] != want:  # ORT falls back to the CPU silently
                raise SystemExit(f"gpu_bench: the ONNX Runtime session runs on {providers}, "
                                 f"not {want}")
            segs[f"ort-{prec}"] = sg
        # Label-map graph (export --labels): Pred-All in the graph, label maps cross to host.
        sg = attempt(f"ort-{prec}-lbl", "segmenter", lambda: Segmenter.load(
            bundle, backend="onnxruntime", device=device, precision=prec, fast_labels=True,
            slots=False))
        if sg is not None:
            segs[f"ort-{prec}-lbl"] = sg
        # Fast slot graphs (export --fast): all dimensions static; CUDA graphs on the GPU.
        sg = attempt(f"ort-{prec}-fast", "segmenter", lambda: Segmenter.load(
            bundle, backend="onnxruntime", device=device, precision=prec, fast_labels=True,
            slots=True))
        if sg is not None:
            segs[f"ort-{prec}-fast"] = sg
    result["seconds"]["load"] = time.perf_counter() - t
    log(f"opened {sorted(torch_paths)} (model) and {sorted(segs)} (Segmenter) in "
        f"{result['seconds']['load']:.1f} s")

    # -- latency + agreement, batch by batch ---------------------------------------------------
    for b in batches:
        imgs = frames[:b]
        feed = {spec.IMAGE: np.ascontiguousarray(imgs), **arrays}
        labels: dict[str, np.ndarray] = {}
        for name, tp in torch_paths.items():
            image = tp.image(imgs)
            tm = attempt(name, f"model b{b}", lambda: timed(lambda: tp.forward(image), device,
                                                             b, gpu_clock=True))
            if tm:
                record(name, "model", b, tm)
                lo, ob = tp.forward(image)
                labels[name] = labels_of(lo.float().cpu().numpy(), ob.float().cpu().numpy(),
                                         class_objects)
        for name, sg in segs.items():
            ims = list(imgs)
            pred = (lambda: [sg.predict(ims[0])]) if b == 1 else (lambda: sg.predict_batch(ims))
            tm = attempt(name, f"predict b{b}", lambda: timed(pred, device, b, gpu_clock=False))
            if tm:
                record(name, "predict", b, tm)
                last = pred()
                # timing_ms is per image (batch calls share pre/infer evenly): x b per call
                split = {k: b * float(np.median([p.timing_ms[k] for p in last]))
                         for k in ("pre", "infer", "post")}
                result["profile_ms"].setdefault(name, {})[f"predict_b{b}"] = split
                if name.startswith("ort"):
                    labels.setdefault(name, np.stack([p.labels for p in last]))
            if not name.startswith("ort"):
                continue
            tm = attempt(name, f"session b{b}", lambda: timed(lambda: sg.backend.run(feed),
                                                               device, b, gpu_clock=False))
            if tm:
                record(name, "session", b, tm)
            if name.endswith("-fast"):  # its own I/O binding (fixed buffers, CUDA graph)
                continue
            dev_run = attempt(name, "io binding", lambda: ort_device_runner(sg, feed, device))
            if dev_run is not None:
                tm = attempt(name, f"device b{b}", lambda: timed(dev_run, device, b,
                                                                  gpu_clock=False))
                if tm:
                    record(name, "device", b, tm)
                del dev_run
        ref = labels.get("torch-fp32")
        for name, lab in labels.items():
            if ref is not None and name != "torch-fp32":
                agree = float((lab == ref).mean())
                result["agreement_vs_torch_fp32"].setdefault(name, {})[f"b{b}"] = agree
                log(f"  {name:<13} agreement with torch-fp32 at b{b}: {100 * agree:.3f}%")
        save()
        gc.collect()

    # -- per-stage profile of the torch paths ----------------------------------------------
    from runtime.preprocess import check_image, resize_image

    for name, tp in torch_paths.items():
        for b in batches:
            if budget.left() < 10:
                result["skipped"].append(f"{name} profile b{b}: time budget spent")
                continue
            imgs = list(frames[:b])
            stages: dict[str, list[float]] = {}
            for i in range(4):  # first run is warm-up
                t0 = time.perf_counter()
                host = np.stack([resize_image(check_image(im), s) for im in imgs])
                t1 = time.perf_counter()
                marks = Marks(device)
                marks("h2d_start")
                image = tp.image(host)
                lo, ob = tp.forward(image, marks)
                marks("d2h_start")
                lo_np, ob_np = lo.float().cpu().numpy(), ob.float().cpu().numpy()
                marks("d2h")
                ms = marks.elapsed()
                t2 = time.perf_counter()
                labels_of(lo_np, ob_np, class_objects)
                t3 = time.perf_counter()
                ms.pop("d2h_start", None)  # heads end -> d2h start: nothing runs there
                row = {"host_preprocess": 1e3 * (t1 - t0), "h2d": ms.pop("start"), **ms,
                       "host_postprocess": 1e3 * (t3 - t2)}
                if i:
                    for k, v in row.items():
                        stages.setdefault(k, []).append(v)
            result["profile_ms"].setdefault(name, {})[f"stages_b{b}"] = {
                k: float(np.median(v)) for k, v in stages.items()}
    save()
    for sg in segs.values():
        sg.close()
    return result


def _clean(x: Any) -> Any:
    """JSON-safe: NaN/inf -> None, tuples -> lists."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


# -- report -------------------------------------------------------------------------------------
def table(result: dict[str, Any]) -> str:
    """The short summary printed last: medians per path and batch, agreement, the GPU targets (docs/design.md)."""
    lat, agree = result["latency_ms"], result["agreement_vs_torch_fp32"]
    batches = sorted({int(b[1:]) for r in lat.values() for c in r.values() for b in c})
    head = f"{'path':<13} {'call':<8}" + "".join(f" {'b' + str(b) + ' ms':>10}" for b in batches)
    head += f" {'img/s @b' + str(batches[-1]) if batches else '':>12}  agreement vs torch-fp32"
    lines = [f"gpu_bench: {result['model']['config']} @{result['model']['input_size']}, "
             f"{result['model']['classes']} classes, on {result['environment'].get('gpu', 'cpu')}",
             head, "-" * len(head)]
    for route in sorted(lat):
        for call, per_b in lat[route].items():
            cells = "".join(f" {per_b[f'b{b}']['median_ms']:10.3f}" if f"b{b}" in per_b
                            else f" {'-':>10}" for b in batches)
            last = per_b.get(f"b{batches[-1]}")
            ag = " ".join(f"b{b} {100 * a:.2f}%" for b, a in (
                (int(k[1:]), v) for k, v in agree.get(route, {}).items())) if call in (
                "model", "predict") else ""
            lines.append(f"{route:<13} {call:<8}{cells} "
                         f"{last['images_per_s'] if last else float('nan'):12.1f}  {ag}")
    lines.append("")
    lines += [f"target: {t}" for t in targets(result)]
    for k, v in result["errors"].items():
        lines.append(f"error: {k}: {v}")
    for k in result["skipped"]:
        lines.append(f"skipped: {k}")
    lines.append(f"total {result['seconds'].get('total', float('nan')):.0f} s")
    return "\n".join(lines)


def targets(result: dict[str, Any]) -> list[str]:
    """The GPU targets (docs/design.md), each against the better of the two exported FP16 paths
    (logits graph + numpy post-processing, label-map graph)."""
    lat, agree = result["latency_ms"], result["agreement_vs_torch_fp32"]
    ref = lat.get("torch-fp32", {}).get("model", {})
    out = []
    for b, key in (("b1", "median_ms"), ("b32", "images_per_s")):
        cands = [(r, lat[r]["predict"][b]) for r in ("ort-fp16", "ort-fp16-lbl")
                 if b in lat.get(r, {}).get("predict", {})]
        if not cands:
            continue
        pick = min if key == "median_ms" else max
        route, m = pick(cands, key=lambda c: c[1][key])
        if b == "b1":
            ms = m["median_ms"]
            out.append(f"{route} predict b1 {ms:.3f} ms (<= {TARGET_B1_MS} ms): "
                       f"{'MET' if ms <= TARGET_B1_MS else 'MISSED'}")
            if "b1" in ref:
                x = ref["b1"]["median_ms"] / ms
                out.append(f"torch-fp32 model b1 / {route} predict b1 = {x:.2f}x (>= "
                           f"{TARGET_VS_TORCH}x): {'MET' if x >= TARGET_VS_TORCH else 'MISSED'}")
        else:
            ips = m["images_per_s"]
            out.append(f"{route} predict b32 {ips:.0f} img/s (>= {TARGET_B32_IMG_S:.0f}): "
                       f"{'MET' if ips >= TARGET_B32_IMG_S else 'MISSED'}")
    for route in ("ort-fp16", "ort-fp16-lbl", "torch-fp16"):
        for b, a in agree.get(route, {}).items():
            out.append(f"{route} agreement {b} {100 * a:.2f}% (>= {100 * FP16_MIN_AGREEMENT}%): "
                       f"{'MET' if a >= FP16_MIN_AGREEMENT else 'MISSED'}")
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_bench",
                                description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true",
                   help="tiny model, batch 1, CPU allowed: proves the script runs end to end")
    p.add_argument("--bundle", default=None, help=f"bundle folder to use or build (default "
                   f"{DEFAULT_BUNDLE}, or {DEFAULT_BUNDLE}_smoke with --smoke); reused when "
                   "complete")
    p.add_argument("--rebuild", action="store_true", help="export again even if reusable")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cpu only with --smoke")
    p.add_argument("--batches", type=int, nargs="+", default=list(BATCHES))
    p.add_argument("--budget-s", type=float, default=330.0,
                   help="stop starting measurements after this many seconds (default 330)")
    p.add_argument("--verbose", action="store_true", help="tracebacks of failed paths")
    return p


def _main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.bundle is None:
        args.bundle = str(DEFAULT_BUNDLE) + ("_smoke" if args.smoke else "")
    result = run(args)
    print(table(result), flush=True)
    log(f"wrote {Path(os.environ.get('OUT') or 'out') / 'gpu_bench.json'}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_command("benchmarks.gpu_bench", lambda: _main(argv))


if __name__ == "__main__":
    sys.exit(main())
