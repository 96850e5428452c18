"""What test modules share at import time (fixtures live in conftest.py, which no test imports).

VOCAB is the test vocabulary (the `vocab` fixture); hypothesis strategies need it while the
module is imported, before any fixture exists. The rest serves the robustness tests of every
package (tests/*/test_robustness.py): hypothesis settings, byte mutations of files, random
frames, bundle copies, hidden leftovers and child processes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from runtime.vocabulary import Vocabulary

ROOT = Path(__file__).resolve().parents[1]

VOCAB = Vocabulary.from_names(
    [("red quadruped", "head"), ("red quadruped", "leg"), ("red quadruped", "eye"),
     ("blue bird", "head"), ("blue bird", "wing"), ("blue bird", "beak"), ("blue bird", "eye")],
    unseen_objects=["blue bird"],
)

# -- robustness tests ---------------------------------------------------------------------------
FUZZ = settings(max_examples=25, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])

# Arguments of `mutate`, as hypothesis strategies: @given(**MUTATION).
MUTATION = dict(offset=st.floats(0, 1, exclude_max=True), xor=st.integers(1, 255),
                truncate=st.booleans())


def mutate(data: bytes, offset: float, xor: int, truncate: bool) -> bytes:
    """`data` cut at `offset` (a fraction of its length), or with that byte XORed by `xor`."""
    at = min(int(offset * len(data)), len(data) - 1)
    if truncate:
        return data[:at]
    b = bytearray(data)
    b[at] ^= xor
    return bytes(b)


def random_image(h=48, w=56, seed=0):
    """A random (h, w, 3) uint8 RGB frame."""
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def copy_bundle(src: Path, dst: Path) -> Path:
    """A fresh copy of folder `src` at `dst` (replacing what is there)."""
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    return dst


def hidden(folder: Path, name: str) -> list[str]:
    """The hidden `.NAME.*` entries of `folder` (staging folders, locks, temp files of NAME)."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(f".{name}."))


def child_env() -> dict[str, str]:
    """Environment of a child Python: one thread, the repository importable."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{ROOT}{os.pathsep}"
               + os.environ.get("PYTHONPATH", ""))
    return env


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    """Wait until the child `proc` creates `path`; fail with its output if it exits first."""
    t = time.monotonic()
    while not path.exists():
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"child exited early ({proc.returncode}): {out[-2000:]}"
                                 f"{err[-3000:]}")
        if time.monotonic() - t > timeout:
            proc.kill()
            raise AssertionError(f"timed out waiting for {path}")
        time.sleep(0.05)


def assert_imports_none(code: str, modules: tuple[str, ...] = ("torch", "open_clip",
                                                              "partclipseg", "export")) -> None:
    """Run `code` in a fresh interpreter and fail if it leaves any of `modules` imported."""
    check = (f"\nimport sys\nbad = [m for m in {modules!r} if m in sys.modules]\n"
             "print(bad)\nsys.exit(1 if bad else 0)\n")
    r = subprocess.run([sys.executable, "-c", code + check], capture_output=True, text=True,
                       cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
