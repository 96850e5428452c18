"""A bundle checks itself where it runs (`partclipseg check`, `Segmenter.load(verify=True)`):
every route passes where it was exported, altered check labels fail with the likely cause, and
on a CPU without VNNI (emulated with qemu) today's 7-bit INT8 graphs pass where 8-bit ones fail.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from runtime import Segmenter  # noqa: E402
from runtime import bundle as spec  # noqa: E402
from runtime.bundle import BundleError  # noqa: E402
from runtime.check import main  # noqa: E402
from runtime.verification import (CheckError, CheckResult, likely_cause,  # noqa: E402
                                  read_check_set)

from ..support import ROOT, child_env, copy_bundle  # noqa: E402

QEMU = shutil.which("qemu-x86_64")
HASWELL = ["-cpu", "Haswell"]  # AVX2 and FMA, no AVX-512, no VNNI


def _alter_check_labels(bundle: Path, share: float = 0.05) -> None:
    """Give `share` of the check images' pixels another label (as a damaged or wrong-model
    check set would), recorded in the manifest so the file itself passes its SHA-256."""
    from export.bundle import update_manifest

    images, labels = read_check_set(spec.read_manifest(bundle))
    rows = int(share * labels.shape[1]) + 1
    labels = labels.copy()
    labels[:, :rows] = np.where(labels[:, :rows] == 0, 1, 0)
    with open(bundle / spec.CHECK_FILE, "wb") as f:
        np.savez_compressed(f, images=images, labels=labels)
    update_manifest(bundle, {"check": spec.CHECK_FILE})


def test_check_passes_every_route_where_exported(int8_bundle, tmp_path, capsys):
    out = tmp_path / "check.json"
    assert main(["--bundle", str(int8_bundle), "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    manifest = spec.read_manifest(int8_bundle)
    keys = {r["precision"] + ("" if r["route"] == "exact" else f"/{r['route']}")
            for r in report["results"]}
    assert keys == {"fp32", "fp32/labels", "fp32/fast", "int8", "int8/labels", "int8/fast"}
    for r in report["results"]:
        assert r["passed"] and r["images"] == manifest.check.images == 4
        assert r["agreement"] == r["exported"]  # the same code and machine as export's check
    assert isinstance(report["machine"]["cpu_flags"], list)
    assert "all 6 routes agree" in capsys.readouterr().out


def test_altered_labels_fail_check_and_verify_naming_the_cause(int8_bundle, tmp_path, capsys):
    bad = copy_bundle(int8_bundle, tmp_path / "bad")
    _alter_check_labels(bad)
    assert main(["--bundle", str(bad), "--precision", "int8", "--route", "exact"]) == 1
    printed = capsys.readouterr()
    assert "FAILED" in printed.out and "likely cause:" in printed.out
    assert "1 of 1 routes FAILED" in printed.err
    with pytest.raises(CheckError, match=r"int8 labels on this machine agree with the "
                       r"exporter's on 9\d\.\d+% .* Likely cause: "):
        Segmenter.load(bad, backend="onnxruntime", precision="int8", verify=True)
    with pytest.raises(CheckError, match="fp32"):
        Segmenter.load(bad, backend="onnxruntime", verify=True)


def test_verify_at_load_passes_and_needs_a_check_set(int8_bundle, tmp_path):
    seg = Segmenter.load(int8_bundle, backend="onnxruntime", precision="int8", fast_labels=True,
                         verify=True)
    assert seg.route == "fast"
    old = copy_bundle(int8_bundle, tmp_path / "old")
    raw = json.loads((old / spec.MANIFEST).read_text())
    del raw["check"]  # as bundles exported before the check set
    (old / spec.MANIFEST).write_text(json.dumps(raw))
    with pytest.raises(BundleError, match="no check images .* re-export"):
        Segmenter.load(old, backend="onnxruntime", verify=True)
    assert main(["--bundle", str(old)]) == 2  # a user error: one line, no traceback


def test_likely_cause_names_vnni_only_for_eight_bit_weights(int8_bundle):
    manifest = spec.read_manifest(int8_bundle)
    failed = CheckResult("onnxruntime:cpu:int8", "int8", "exact", 0.95, 0.99, 4, 0.1)
    haswell = {"cpu_flags": ["AVX2", "F16C", "FMA3"]}
    eight = dataclasses.replace(manifest.onnx, parity={"int8": {"weight_bits": 8}})
    assert "no VNNI" in likely_cause(failed, manifest.replace(onnx=eight), haswell)
    assert "no VNNI" not in likely_cause(failed, manifest.replace(onnx=eight),
                                         {"cpu_flags": ["AVX2", "AVX512F", "AVX512VNNI"]})
    assert "no VNNI" not in likely_cause(failed, manifest, haswell)  # 7-bit: exact there
    broken = dataclasses.replace(failed, agreement=0.2)
    assert "broken" in likely_cause(broken, manifest, haswell)


def _check_on_haswell(bundle: Path, json_out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([QEMU, *HASWELL, sys.executable, "-m", "runtime.check", "--bundle",
                           str(bundle), "--precision", "int8", "--route", "exact", "--json",
                           str(json_out)], capture_output=True, text=True, cwd=ROOT,
                          env=child_env(), timeout=600)


@pytest.mark.skipif(QEMU is None or platform.machine() != "x86_64",
                    reason="needs qemu-user's qemu-x86_64 on an x86_64 machine (Debian: apt "
                    "install qemu-user) to emulate a CPU without VNNI")
def test_int8_check_on_a_cpu_without_vnni(int8_bundle, synth_root, tmp_path):
    """Under qemu's Haswell (AVX2, no VNNI), the bundle's 7-bit INT8 graph passes its check;
    the same graph quantized with 8-bit weights, as export wrote it before, saturates there and
    fails, with the cause named. The second half proves the emulation reaches the kernels."""
    ok = _check_on_haswell(int8_bundle, tmp_path / "seven.json")
    assert ok.returncode == 0, ok.stdout + ok.stderr[-3000:]
    seven = json.loads((tmp_path / "seven.json").read_text())
    assert "AVX2" in seven["machine"]["cpu_flags"]
    assert "AVX512VNNI" not in seven["machine"]["cpu_flags"]
    assert seven["results"][0]["passed"]

    from benchmarks.experiments.int8_bits import requantize

    eight = requantize(int8_bundle, tmp_path / "eight", 8, synth_root / "images" / "train")
    native = Segmenter.load(eight, backend="onnxruntime", precision="int8")
    from runtime.verification import check_segmenter, machine

    if "AVX512VNNI" in (machine()["cpu_flags"] or []):
        assert check_segmenter(native).passed  # exact products here: the graph is fine
    bad = _check_on_haswell(eight, tmp_path / "eight.json")
    assert bad.returncode == 1, bad.stdout + bad.stderr[-3000:]
    assert "AVX2 but no VNNI" in bad.stdout
    result = json.loads((tmp_path / "eight.json").read_text())["results"][0]
    assert not result["passed"] and result["agreement"] < seven["results"][0]["agreement"]
