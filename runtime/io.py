"""Files and constants every layer shares: atomic writes, SHA-256, CLIP's normalization and the
dataset ignore label.

The bottom of the import graph: numpy-free, torch-free, importable by `runtime`, `partclipseg`,
`export` and `benchmarks` alike, so each of these is written once.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Callable

__all__ = ["atomic_write", "atomic_write_text", "file_sha256", "StagedWriter", "CLIP_MEAN",
           "CLIP_STD", "IGNORE_LABEL"]

# OpenAI CLIP normalization (RGB, applied to [0, 1] pixels).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Label PNGs (OV-PARTS convention): 255 is "no part" in part maps and background in object maps.
IGNORE_LABEL = 255

_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write(path: str | Path, write: Callable[[str], object], durable: bool = True) -> Path:
    """Call `write(tmp_path)`, then rename onto `path`: readers see the old file or the new one,
    never half of one. On any failure the temp file is removed and `path` is untouched.

    durable: fsync before the rename, so a power cut cannot leave an empty file behind (off for
    bulk writes of regenerable files, where it would cost more than the data).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Same folder as the target, so os.replace is an atomic rename on every platform.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the usual permissions
    try:
        write(tmp)
        if durable:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """`atomic_write` of a UTF-8 text file."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in `chunk`-byte blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class StagedWriter:
    """A writer that stages its output beside the final name: `close()` finishes it (renamed
    into place, whole), `abort()` drops what was staged. As a context manager it closes on
    success and on Ctrl-C (what was written so far stays a whole, readable file) and aborts on
    any other error."""

    def close(self) -> None:
        raise NotImplementedError

    def abort(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> "StagedWriter":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        if exc_type is None or issubclass(exc_type, KeyboardInterrupt):
            self.close()
        else:
            self.abort()
