"""Overlay videos out (PyAV): frames at their own timestamps, a whole file or none.

    with VideoWriter("out/cam0.mp4") as video:
        video.write(rgb, t=0.033)  # (H, W, 3) uint8, t seconds from the first frame

Frames go to a temporary file beside `path`, renamed onto it on `close()`: a reader never sees
half a video, and an interrupted run (Ctrl-C, a lost source) still ends with a playable one.
`abort()` (or an error inside `with`) removes the temporary file instead; Ctrl-C inside `with`
finishes the video.
"""

from __future__ import annotations

import os
import tempfile
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from .io import StagedWriter

__all__ = ["VideoWriter", "TIME_BASE"]

# Millisecond timestamps: a live source's frames arrive at uneven times (drops, reconnects), so
# the video keeps each frame's own time instead of assuming a fixed rate.
TIME_BASE = Fraction(1, 1000)


class VideoWriter(StagedWriter):
    """An MP4 of RGB frames: H.264 when this FFmpeg has libx264, else MPEG-4 Part 2.

    The first frame fixes the size; later frames of another size are resized (nearest) to it.
    Sides are cut to even numbers (yuv420p needs them).
    """

    def __init__(self, path: str | Path):
        try:
            import av
        except ImportError as e:
            raise ImportError("video output needs PyAV: pip install av") from e
        self._av = av
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, self._tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp",
                                         dir=self.path.parent)
        os.close(fd)
        self._out: Any = av.open(self._tmp, mode="w", format="mp4")
        self._enc: Any = None
        self._last_pts = -1
        self.frames = 0

    def write(self, rgb: np.ndarray, t: float) -> None:
        """Append one (H, W, 3) uint8 frame shown at `t` seconds (>= 0; a time not after the
        previous frame's is moved 1 ms past it)."""
        av = self._av
        if self._enc is None:
            codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
            # rate 1000: the codec's time base is 1/rate, and a coarser one (1/30) maps two
            # close frames to one timestamp, which the muxer refuses.
            self._enc = self._out.add_stream(codec, rate=1000)
            self._enc.width, self._enc.height = rgb.shape[1] // 2 * 2, rgb.shape[0] // 2 * 2
            self._enc.pix_fmt = "yuv420p"
        h, w = self._enc.height, self._enc.width
        if rgb.shape[0] not in (h, h + 1) or rgb.shape[1] not in (w, w + 1):  # another size
            rows = np.arange(h) * rgb.shape[0] // h
            cols = np.arange(w) * rgb.shape[1] // w
            rgb = rgb[rows][:, cols]
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb[:h, :w]), format="rgb24")
        frame.pts = max(int(round(t / TIME_BASE)), self._last_pts + 1)
        frame.time_base = TIME_BASE
        self._last_pts = frame.pts
        for packet in self._enc.encode(frame):
            self._out.mux(packet)
        self.frames += 1

    def close(self) -> Path | None:
        """Flush, finish the file and rename it onto `path` (None, and no file, without
        frames)."""
        if self._out is None:
            return self.path if self.frames else None
        try:
            if self._enc is not None:
                for packet in self._enc.encode():
                    self._out.mux(packet)
            self._out.close()
            self._out = None
        except BaseException:
            self.abort()
            raise
        if not self.frames:
            Path(self._tmp).unlink(missing_ok=True)
            return None
        os.replace(self._tmp, self.path)
        return self.path

    def abort(self) -> None:
        """Drop the video: close the container, remove the temporary file."""
        if self._out is not None:
            try:
                self._out.close()
            except Exception:  # a half-initialized container: the file goes anyway
                pass
            self._out = None
        Path(self._tmp).unlink(missing_ok=True)

