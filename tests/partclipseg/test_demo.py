"""`partclipseg demo` wiring, end to end on a very small SynthParts (the real run: README)."""

from __future__ import annotations

import json

import pytest


def test_demo_runs_every_stage(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    from partclipseg.cli import main

    cfg = tmp_path / "demo_small.yaml"
    # The demo recipe's model (shipped towers, colour-blind head), on a few images and steps:
    # enough (40) that INT8 meets the product's own 99% bar (2 steps leave near-tie labels).
    cfg.write_text("model: tiny\ndata: {kind: synthparts, synth_train: 12, synth_val: 4}\n"
                   "model_overrides: {pretrained: synthparts_tiny_grey.pt, colour_blind: true}\n"
                   "loss: {kind: softmax}\nsteps: 40\nbatch_size: 2\neval_every: 40\n"
                   "num_workers: 0\nlr: 2.0e-3\n")
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--config", str(cfg)]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["results"]) == {"oracle-obj", "pred-all"}
    rows = {r["backend"]: r for r in summary["deployment"]}
    assert rows["torch:cpu:fp32"]["latency_ms"] > 0
    assert rows["onnxruntime:cpu:fp32"]["pixel_agreement"] >= 0.999
    assert abs(rows["onnxruntime:cpu:fp32"]["d_miou_seen"]) <= 0.05
    assert rows["onnxruntime:cpu:fp32 fast slots"]["vs_exact"] >= 0.999  # the demo model's too
    assert rows["onnxruntime:cpu:int8"]["pixel_agreement"] >= 0.9
    assert (out / "bundle" / "manifest.json").is_file() and (out / "run" / "best.pt").is_file()
    assert json.loads((out / "bundle" / "manifest.json").read_text())["mode"] == "colour_blind"
    assert len(list((out / "overlays").glob("*.png"))) == 4
    assert "pixel agr." in printed and "PyTorch FP32, oracle-obj" in printed
