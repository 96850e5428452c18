"""The README's robotics example runs as written (against a bundle laid out as the demo's), in a
process where torch, open_clip and partclipseg cannot be imported."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def test_robotics_example_runs_as_written(tiny_bundle, tmp_path):
    pytest.importorskip("onnxruntime")
    from PIL import Image

    text = README.read_text()
    match = re.search(r"<!-- robotics-example.*?-->\n```python\n(.*?)```", text, re.S)
    assert match, "README lost its robotics example block"
    code = match.group(1)
    assert len(code.strip().splitlines()) <= 16
    shutil.copytree(tiny_bundle, tmp_path / "demo" / "bundle")
    frames = tmp_path / "demo" / "synthparts" / "images" / "val"
    frames.mkdir(parents=True)
    frame = np.random.default_rng(0).integers(0, 256, (120, 160, 3), dtype=np.uint8)
    Image.fromarray(frame).save(frames / "val_000000.jpg")
    env = dict(os.environ, PYTHONPATH=str(README.parent))
    # A None entry in sys.modules makes `import torch` raise ImportError: the example must not
    # need it, new class names included.
    block = "import sys\nfor m in ('torch', 'open_clip', 'partclipseg', 'export'):\n" \
            "    sys.modules[m] = None\n"
    r = subprocess.run([sys.executable, "-c", block + code], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("onnxruntime:cpu:fp32") and " px" in r.stdout
    assert "cup's handle:" in r.stdout


def test_readme_stays_a_users_page():
    """At most 250 lines: lab numbers and long tables live in docs/."""
    assert len(README.read_text().splitlines()) <= 250


def test_stream_example_runs_as_written(tiny_bundle, tmp_path):
    """The README's live-stream loop, against a loopback UDP stream at 30 fps in place of its
    address, in a process where torch cannot be imported."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("av")
    from benchmarks.loopback import LoopbackSender, free_udp_port

    match = re.search(r"<!-- stream-example.*?-->\n```python\n(.*?)```", README.read_text(), re.S)
    assert match, "README lost its stream example block"
    code = match.group(1)
    assert len(code.strip().splitlines()) <= 12 and "udp://127.0.0.1:5000" in code
    shutil.copytree(tiny_bundle, tmp_path / "demo" / "bundle")
    env = dict(os.environ, PYTHONPATH=str(README.parent))
    block = "import sys\nfor m in ('torch', 'open_clip', 'partclipseg', 'export'):\n" \
            "    sys.modules[m] = None\n"
    with LoopbackSender(free_udp_port(), size=96) as sender:
        r = subprocess.run([sys.executable, "-c", block + code.replace(
            "udp://127.0.0.1:5000", sender.url)], cwd=tmp_path, env=env, capture_output=True,
            text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) >= 2 and all(" ms " in x and x.endswith(" dropped") for x in lines)
    assert int(lines[-1].split()[1]) >= 60  # ran until the example's own stop
