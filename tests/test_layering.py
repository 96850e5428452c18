"""`runtime` must stay importable without torch, open_clip or partclipseg."""

import subprocess
import sys


def test_runtime_imports_no_torch():
    code = ("import sys, runtime, runtime.postprocess, runtime.preprocess, runtime.vocabulary, "
            "runtime.segmenter, runtime.bundle, runtime.overlay, runtime.predict, "
            "runtime.backends.onnxruntime, runtime.backends.tensorrt, runtime.backends.torch; "
            "bad = [m for m in ('torch', 'open_clip', 'partclipseg') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
