"""A live camera stand-in: MPEG-TS over UDP on 127.0.0.1 at a fixed frame rate (PyAV).

    python -m benchmarks.loopback --port 5000 [--fps 30] [--images DIR] [--size 160]

Sends until killed, cycling through the images of DIR (SynthParts val images, say) or, without
DIR, a generated test pattern (a square crossing a gradient). Each frame leaves at its deadline
(start + i / fps), so a slow reader does not slow the sender down, as with a camera.

Tests and `benchmarks/test_stream.py` run it as a child process (`LoopbackSender`): a process
can be killed mid-stream (a lost camera), a thread cannot. Loopback only: the address is fixed.
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

__all__ = ["LoopbackSender", "free_ports", "free_udp_port", "pattern", "build_parser", "main"]

HOST = "127.0.0.1"


def free_ports(n: int, udp: bool = False) -> list[int]:
    """n distinct TCP (or UDP) ports on 127.0.0.1 that nothing is bound to right now (all
    bound at once, so they differ)."""
    kind = socket.SOCK_DGRAM if udp else socket.SOCK_STREAM
    socks = [socket.socket(socket.AF_INET, kind) for _ in range(n)]
    try:
        for s in socks:
            s.bind((HOST, 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def free_udp_port() -> int:
    """A UDP port on 127.0.0.1 that nothing is bound to right now."""
    return free_ports(1, udp=True)[0]


def pattern(i: int, size: int) -> np.ndarray:
    """(size, size, 3) uint8 frame i of the test pattern: a gradient and a moving square."""
    y, x = np.mgrid[0:size, 0:size]
    frame = np.stack([x * 255 // size, y * 255 // size,
                      np.full_like(x, (i * 7) % 256)], -1).astype(np.uint8)
    s = size // 4
    x0 = (i * 3) % (size - s)
    frame[s:2 * s, x0:x0 + s] = (255, 255, 255)
    return frame


def _frames(images: str | None, size: int) -> list[np.ndarray]:
    if images is None:
        return [pattern(i, size) for i in range(30)]
    from PIL import Image

    paths = sorted(p for p in Path(images).iterdir() if p.suffix.lower() in (".jpg", ".png"))
    if not paths:
        raise SystemExit(f"loopback: no .jpg/.png images in {images}")
    return [np.asarray(Image.open(p).convert("RGB").resize((size, size))) for p in paths[:60]]


def send(port: int, fps: float, frames: list[np.ndarray], seconds: float | None = None) -> None:
    """Encode `frames` (cycled) as MPEG-4 Part 2 in MPEG-TS to udp://127.0.0.1:port."""
    import av

    # pkt_size 1316 = 7 TS packets: one datagram each, as broadcast senders do.
    with av.open(f"udp://{HOST}:{port}?pkt_size=1316", mode="w", format="mpegts") as out:
        enc = out.add_stream("mpeg4", rate=int(round(fps)))
        enc.height, enc.width = frames[0].shape[:2]
        enc.pix_fmt = "yuv420p"
        enc.gop_size = int(round(fps)) // 2  # a key frame every 0.5 s: a reader joins fast
        enc.bit_rate = 2_000_000
        start = time.monotonic()
        i = 0
        while seconds is None or i < seconds * fps:
            delay = start + i / fps - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            frame = av.VideoFrame.from_ndarray(frames[i % len(frames)], format="rgb24")
            frame.pts = i
            for packet in enc.encode(frame):
                out.mux(packet)
            i += 1


class LoopbackSender:
    """`python -m benchmarks.loopback` as a child process: `with LoopbackSender(port): ...`.

    kill() ends it at once (SIGKILL, a camera unplugged); restart() starts it again.
    """

    def __init__(self, port: int, fps: float = 30.0, images: str | Path | None = None,
                 size: int = 160):
        self.port, self.url = port, f"udp://{HOST}:{port}"
        self._args = [sys.executable, "-m", "benchmarks.loopback", "--port", str(port),
                      "--fps", str(fps), "--size", str(size)]
        if images is not None:
            self._args += ["--images", str(images)]
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> "LoopbackSender":
        self._proc = subprocess.Popen(self._args, cwd=Path(__file__).resolve().parents[1])
        return self

    def kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()

    restart = start

    def __enter__(self) -> "LoopbackSender":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.loopback",
                                description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, required=True, help="UDP port on 127.0.0.1")
    p.add_argument("--fps", type=float, default=30.0)
    p.add_argument("--images", help="folder of .jpg/.png frames (default: a test pattern)")
    p.add_argument("--size", type=int, default=160, help="frame side in pixels (default 160)")
    p.add_argument("--seconds", type=float, help="stop after this long (default: never)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        send(a.port, a.fps, _frames(a.images, a.size), a.seconds)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
