"""Checkpoint, loader, CLI and training reliability: corrupt and foreign files, killed runs.

A flipped byte or truncation anywhere in a checkpoint is a CheckpointError, a pickled payload is
refused and never executed, any bytes in an image or label file are read or refused naming the
file, CLI errors are exit code 2 with a message, and training SIGKILLed inside a checkpoint write
resumes to the weights of an uninterrupted run. Runtime and export robustness: tests/runtime/
and tests/export/test_robustness.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from partclipseg.checkpoint import CheckpointError, load_checkpoint  # noqa: E402
from runtime import BundleError, Segmenter  # noqa: E402

from ..support import FUZZ, MUTATION, child_env, hidden, mutate, wait_for  # noqa: E402


# -- checkpoints --------------------------------------------------------------------------------
@FUZZ
@given(**MUTATION)
def test_fuzzed_checkpoint_is_refused_or_loads_the_same_weights(micro_ckpt, fuzz_dir, offset,
                                                                xor, truncate):
    """torch.load does not check the zip CRCs; load_checkpoint does, so a flipped byte in the
    weights is a CheckpointError, never silently different weights."""
    data = micro_ckpt.read_bytes()
    bad = fuzz_dir / "ckpt.pt"
    bad.write_bytes(mutate(data, offset, xor, truncate))
    try:
        record = load_checkpoint(bad)
    except CheckpointError as e:
        assert "corrupt" in str(e) or "truncated" in str(e) or "partclipseg" in str(e)
        return
    ref = load_checkpoint(micro_ckpt)["state_dict"]  # only padding bytes are not covered
    assert all(torch.equal(record["state_dict"][k], ref[k]) for k in ref)


class _Marker:
    """Unpickling it would create a file: proof of execution."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickled_payload_is_refused_and_never_executed(micro_ckpt, micro_bundle, tmp_path,
                                                       capsys):
    from export.onnx import main as export_main
    from partclipseg.checkpoint import load_model
    from partclipseg.cli import main as cli_main

    marker = tmp_path / "EXECUTED"
    record = load_checkpoint(micro_ckpt)
    evil = tmp_path / "evil.pt"
    torch.save({**record, "extra": _Marker(marker)}, evil)
    import pickle

    legacy = tmp_path / "evil.pkl"
    legacy.write_bytes(pickle.dumps({"format": "partclipseg-checkpoint", "x": _Marker(marker)}))
    for path in (evil, legacy):
        with pytest.raises(CheckpointError):
            load_model(path)
        assert export_main(["--ckpt", str(path), "--out", str(tmp_path / "b")]) == 2
        assert cli_main(["eval", "--ckpt", str(path), "--data", str(tmp_path)]) == 2
        assert cli_main(["import-weights", "--partclipseg", str(path), "--out",
                         str(tmp_path / "init.pt")]) == 2
        with pytest.raises(BundleError):  # the torch backend checks the hash first
            Segmenter.load(micro_bundle, backend="torch", checkpoint=path)
    err = capsys.readouterr().err
    assert "pickled objects" in err
    assert not marker.exists()
    assert not (tmp_path / "b").exists() and not (tmp_path / "init.pt").exists()
    assert not hidden(tmp_path, "b")


# -- image and label files, CLIs --------------------------------------------------------------
def _png_claiming(w: int, h: int) -> bytes:
    import struct
    import zlib

    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 8))
            + chunk(b"IEND", b""))


@pytest.fixture(scope="session")
def image_files(tmp_path_factory):
    import io

    from PIL import Image

    d = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    out = {}
    for fmt in ("PNG", "JPEG"):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(buf, fmt)
        out[fmt] = buf.getvalue()
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 9, (24, 32), dtype=np.uint8)).save(buf, "PNG")
    out["label"] = buf.getvalue()
    out["dir"] = d
    return out


@FUZZ
@given(kind=st.sampled_from(["PNG", "JPEG", "label"]), **MUTATION)
def test_fuzzed_image_and_label_files_are_read_or_named(image_files, kind, offset, xor,
                                                         truncate):
    from partclipseg.data.datasets import DatasetError, read_image, read_label_png

    path = image_files["dir"] / f"x_{kind}"
    path.write_bytes(mutate(image_files[kind], offset, xor, truncate))
    read = read_label_png if kind == "label" else read_image
    try:
        arr = read(path)
    except DatasetError as e:
        assert str(path) in str(e)
        return
    assert arr.ndim == (2 if kind == "label" else 3) and arr.size > 0


def test_decompression_bombs_are_named(micro_bundle, tmp_path, capsys):
    """A 30000 x 30000 PNG header (a few bytes): refused by name, not a traceback or 2.7 GB."""
    from partclipseg.cli import main
    from partclipseg.data.datasets import DatasetError, read_image, read_label_png

    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_claiming(30000, 30000))
    for read in (read_image, read_label_png):
        with pytest.raises(DatasetError, match="bomb"):
            read(bomb)
    out = tmp_path / "out"
    assert main(["predict", "--bundle", str(micro_bundle), str(bomb), "--out", str(out),
                 "--backend", "onnxruntime"]) == 2
    assert "bomb" in capsys.readouterr().err
    assert not (out / "predictions.json").exists()


@pytest.mark.parametrize("args", [
    ["eval", "--ckpt", "{missing}"],
    ["eval", "--ckpt", "{garbage}"],
    ["train", "--config", "{garbage}", "--out", "{tmp}/run"],
    ["train", "--config", "{yaml_list}", "--out", "{tmp}/run"],
    ["predict", "--bundle", "{tmp}", "{garbage}", "--out", "{tmp}/p"],
])
def test_cli_errors_are_exit_2_with_a_message(tmp_path, capsys, args):
    from partclipseg.cli import main

    (tmp_path / "garbage").write_bytes(b"\xff\x00\x13garbage\n" * 10)
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    fmt = {"missing": str(tmp_path / "nope.pt"), "garbage": str(tmp_path / "garbage"),
           "tmp": str(tmp_path), "yaml_list": str(tmp_path / "list.yaml")}
    assert main([a.format(**fmt) for a in args]) == 2
    assert "error" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


# == killed training ==========================================================================
def _train_cfg(root):
    from partclipseg.training.config import DataConfig, TrainConfig

    return TrainConfig(model="micro",
                       data=DataConfig(root=str(root), val_limit=4), steps=6, batch_size=4,
                       lr=1e-3, warmup_steps=2, grad_clip=1.0, eval_every=2, log_every=1,
                       num_workers=0, seed=0)


# Runs the training of `cfg` and, inside the second write of last.pt (step 4), writes half of
# the checkpoint to atomic_write's temp file, says so, and waits to be killed.
_KILL_IN_SAVE = r"""
import sys, time, yaml, torch
from pathlib import Path
import partclipseg.checkpoint as ck
from partclipseg.training.config import TrainConfig
from partclipseg.training.trainer import train

cfg = TrainConfig.from_dict(yaml.safe_load(Path(sys.argv[1]).read_text()))
out, ready = Path(sys.argv[2]), Path(sys.argv[3])
real_save, calls = torch.save, {"n": 0}

def save(obj, f, *a, **k):
    if Path(f).name.startswith(".last.pt."):
        calls["n"] += 1
        if calls["n"] == 2:
            real_save(obj, f, *a, **k)
            data = Path(f).read_bytes()
            Path(f).write_bytes(data[: len(data) // 2])  # the kill lands mid-write
            ready.write_text(str(obj["step"]))
            while True:
                time.sleep(1)
    return real_save(obj, f, *a, **k)

torch.save = save
torch.set_num_threads(1)
train(cfg, out, progress=False)
"""


def test_training_killed_inside_a_checkpoint_write_resumes_to_the_same_weights(
        synth_root, tmp_path):
    import yaml

    from partclipseg.training.trainer import train

    cfg = _train_cfg(synth_root)
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg.to_dict()))
    run, ready = tmp_path / "run", tmp_path / "ready"
    proc = subprocess.Popen([sys.executable, "-c", _KILL_IN_SAVE, str(cfg_path), str(run),
                             str(ready)], env=child_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_for(ready, proc)
        assert ready.read_text() == "4"
        before = (run / "last.pt").read_bytes()  # step 2's, while step 4's is half written
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    temps = [p.name for p in run.iterdir() if p.name.startswith(".last.pt.")]
    assert len(temps) == 1 and temps[0].endswith(".tmp")  # the half-written file
    assert (run / "last.pt").read_bytes() == before  # untouched by the killed write
    with pytest.raises(CheckpointError):
        load_checkpoint(run / temps[0])
    assert load_checkpoint(run / "last.pt")["step"] == 2

    torch.set_num_threads(1)
    try:
        train(cfg, run, progress=False, resume=True)
        train(cfg, tmp_path / "straight", progress=False)
    finally:
        torch.set_num_threads(os.cpu_count() or 1)
    a = load_checkpoint(tmp_path / "straight" / "last.pt")
    b = load_checkpoint(run / "last.pt")
    assert a["step"] == b["step"] == 6
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    assert a["metrics"] == b["metrics"]
    assert sorted(p.name for p in run.iterdir()) == ["best.pt", "config.json", "last.pt",
                                                     "metrics.csv"]  # temp file cleaned
