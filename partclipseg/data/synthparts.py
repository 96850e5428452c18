"""SynthParts: a generated open-vocabulary part segmentation data set (numpy + Pillow only).

Every object is assembled from *generalized parts* (head, torso, leg, wheel, ...). A part looks
the same on whatever object it sits: its shape family and its part-specific pattern (banded legs,
striped tails, white eyes with a pupil, grey-hubbed wheels, ...) never change; only body-type
parts are tinted by the object's colour. Object categories are "<colour> <body plan>" phrases
("red quadruped", "blue bird"), and the unseen categories are new combinations of seen words: a
model that has learned what "yellow" and what "bird" look like can segment a "yellow bird"
without ever training on one. That makes open-vocabulary transfer measurable with a randomly
initialised text tower, where real CLIP weights are not available.

Output follows the OV-PARTS Pascal-Part layout so one loader serves real and synthetic data:

    OUT/images/{train,val}/{id}.jpg                    RGB, JPEG quality 95
    OUT/annotations_detectron2_part/{split}/{id}.png   uint8 "L": class index, 255 = background
    OUT/annotations_detectron2_obj/{split}/{id}.png    uint8 "L": object index, 255 = background
    OUT/classes.json                                   written last: its presence means complete

Every image draws from its own RNG seeded by (seed, split, index), so any subset can be
rendered independently (in parallel, or again later) and the bytes are identical each time.
"""

from __future__ import annotations

import colorsys
import json
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw

from runtime.io import IGNORE_LABEL, atomic_write, atomic_write_text
from runtime.vocabulary import Vocabulary

__all__ = [
    "SYNTHPARTS_VOCABULARY",
    "render_sample",
    "generate",
    "COLOURS",
    "BODY_PLANS",
    "PARTS",
    "OBJECTS",
    "UNSEEN_OBJECTS",
    "FORMAT_VERSION",
]

FORMAT_VERSION = 1
_MARKER = ".synthparts"  # present from the first write on, so an interrupted run is still ours
_LAYOUT_DIRS = ("images", "annotations_detectron2_part", "annotations_detectron2_obj")


# ------------------------------------------------------------------------------------------------
# Tables: colours, generalized parts, body plans
# ------------------------------------------------------------------------------------------------

# Saturated, well separated hues, so the colour word is unambiguous on any background; instances
# get a small jitter around these.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (205, 40, 35),
    "blue": (35, 85, 215),
    "green": (40, 165, 60),
    "yellow": (235, 200, 35),
}

# Canonical order of generalized parts; each object lists its parts in this order.
PARTS: tuple[str, ...] = (
    "head", "torso", "leg", "tail", "ear", "eye", "wing", "beak", "fin",
    "body", "wheel", "window", "light",
)


@dataclass(frozen=True)
class PartSpec:
    """One drawn piece of a body plan, in object units (the object is about 1 unit long).

    The object faces +x (right); +y is down, as in images. Angles are degrees, 0 = +x, 90 = down.

    kind:
        "ellipse": centre `xy`, radii `size` = (rx, ry), rotated by `angle`.
        "limb":    trapezoid from root `xy` towards `angle`; `size` = (root width, length);
                   the tip is `taper` times the root width. Legs are limbs (their length gets the
                   object's leg-length jitter); tails, ears, beaks, fins use the same shape.
        "fork":    like "limb" with a notch cut into the tip (fish tails).
        "poly":    fixed polygon `points` in object units (car body, windows).
    swing: random pose rotation of this piece about its root/centre, +- degrees.
    joint: name of a shared joint (BodyPlan.joints) that rotates this piece with its neighbours,
        e.g. head + ears + eye + beak turn together.
    far: piece on the far side of the body: drawn before the torso and a little darker.
    """

    part: str
    kind: str
    xy: tuple[float, float] = (0.0, 0.0)
    size: tuple[float, float] = (0.0, 0.0)
    angle: float = 0.0
    taper: float = 0.75
    swing: float = 0.0
    joint: str | None = None
    far: bool = False
    points: tuple[tuple[float, float], ...] = ()


@dataclass(frozen=True)
class BodyPlan:
    """Parts (in drawing order: later pieces cover earlier ones), the plan's skin texture for
    its torso/body, its maximum whole-object rotation (degrees) and its shared joints
    (name -> (pivot in object units, swing degrees))."""

    skin: str
    max_rotation: float
    pieces: tuple[PartSpec, ...]
    joints: dict[str, tuple[tuple[float, float], float]] = field(default_factory=dict)

    @property
    def parts(self) -> tuple[str, ...]:
        used = {p.part for p in self.pieces}
        return tuple(p for p in PARTS if p in used)


L, E, F, P = "limb", "ellipse", "fork", "poly"

BODY_PLANS: dict[str, BodyPlan] = {
    "quadruped": BodyPlan(
        skin="fur", max_rotation=20,
        joints={"head": ((0.30, -0.10), 12)},
        pieces=(
            PartSpec("leg", L, (-0.20, 0.06), (0.065, 0.34), 90, swing=14, far=True),
            PartSpec("leg", L, (0.18, 0.06), (0.065, 0.34), 90, swing=14, far=True),
            PartSpec("tail", L, (-0.28, -0.06), (0.055, 0.24), 205, taper=0.4, swing=25),
            PartSpec("torso", E, (0.0, 0.0), (0.32, 0.15)),
            PartSpec("torso", P, points=((0.18, -0.08), (0.30, -0.21), (0.41, -0.14), (0.29, 0.05))),
            PartSpec("leg", L, (-0.25, 0.07), (0.07, 0.34), 90, swing=14),
            PartSpec("leg", L, (0.24, 0.07), (0.07, 0.34), 90, swing=14),
            PartSpec("ear", L, (0.33, -0.22), (0.075, 0.11), -110, taper=0.0, swing=10,
                     joint="head", far=True),
            PartSpec("head", E, (0.40, -0.18), (0.12, 0.085), 15, joint="head"),
            PartSpec("ear", L, (0.38, -0.24), (0.075, 0.11), -95, taper=0.0, swing=10,
                     joint="head"),
            PartSpec("eye", E, (0.45, -0.20), (0.028, 0.028), joint="head"),
        ),
    ),
    "bird": BodyPlan(
        skin="feathers", max_rotation=25,
        joints={"head": ((0.18, -0.10), 15), "wing": ((0.06, -0.06), 30)},
        pieces=(
            PartSpec("leg", L, (-0.04, 0.12), (0.03, 0.30), 97, swing=12, far=True),
            PartSpec("tail", L, (-0.19, -0.02), (0.07, 0.28), 190, taper=2.6, swing=15),
            PartSpec("leg", L, (0.04, 0.12), (0.03, 0.30), 83, swing=12),
            PartSpec("torso", E, (0.0, 0.0), (0.25, 0.15), -10),
            PartSpec("beak", L, (0.32, -0.17), (0.07, 0.15), 5, taper=0.0, joint="head"),
            PartSpec("head", E, (0.25, -0.17), (0.10, 0.10), joint="head"),
            PartSpec("eye", E, (0.28, -0.20), (0.026, 0.026), joint="head"),
            PartSpec("wing", E, (-0.04, -0.03), (0.20, 0.08), -15, joint="wing"),
        ),
    ),
    "fish": BodyPlan(
        skin="scales", max_rotation=35,
        pieces=(
            PartSpec("tail", F, (-0.29, 0.0), (0.06, 0.22), 180, taper=5.0, swing=15),
            PartSpec("fin", L, (-0.02, -0.11), (0.20, 0.15), -115, taper=0.15, swing=8),
            PartSpec("fin", L, (0.00, 0.11), (0.11, 0.10), 115, taper=0.15, swing=8),
            PartSpec("torso", E, (0.0, 0.0), (0.34, 0.15)),
            PartSpec("head", E, (0.25, 0.0), (0.11, 0.105)),
            PartSpec("fin", L, (0.07, 0.04), (0.07, 0.13), 155, taper=0.3, swing=15),
            PartSpec("eye", E, (0.28, -0.035), (0.03, 0.03)),
        ),
    ),
    "car": BodyPlan(
        skin="metallic", max_rotation=10,
        pieces=(
            PartSpec("body", P, points=((-0.46, 0.16), (-0.46, -0.02), (-0.26, -0.05),
                                        (-0.16, -0.22), (0.14, -0.22), (0.28, -0.05),
                                        (0.45, -0.02), (0.47, 0.11), (0.45, 0.16))),
            PartSpec("window", P, points=((-0.22, -0.06), (-0.14, -0.19), (-0.02, -0.19),
                                          (-0.02, -0.06))),
            PartSpec("window", P, points=((0.02, -0.06), (0.02, -0.19), (0.12, -0.19),
                                          (0.23, -0.06))),
            PartSpec("wheel", E, (-0.27, 0.15), (0.10, 0.10)),
            PartSpec("wheel", E, (0.27, 0.15), (0.10, 0.10)),
            PartSpec("light", E, (0.445, 0.03), (0.022, 0.032)),
            PartSpec("light", E, (-0.445, 0.02), (0.018, 0.026)),
        ),
    ),
}
del L, E, F, P

# Objects: every colour x body plan. The unseen ones form a Latin-square diagonal, so each unseen
# colour still appears with three seen plans and each unseen plan with three seen colours.
OBJECTS: tuple[str, ...] = tuple(f"{c} {p}" for p in BODY_PLANS for c in COLOURS)
UNSEEN_OBJECTS: frozenset[str] = frozenset(
    {"green quadruped", "yellow bird", "red fish", "blue car"})

SYNTHPARTS_VOCABULARY: Vocabulary = Vocabulary.from_names(
    [(o, p) for o in OBJECTS for p in BODY_PLANS[o.split(" ", 1)[1]].parts],
    unseen_objects=UNSEEN_OBJECTS,
)
_CLASS_INDEX: dict[tuple[str, str], int] = {
    (SYNTHPARTS_VOCABULARY.objects[o], SYNTHPARTS_VOCABULARY.parts[p]): k
    for k, (o, p) in enumerate(SYNTHPARTS_VOCABULARY.classes)
}


# ------------------------------------------------------------------------------------------------
# Part looks: each generalized part has one pattern, whatever object it is on
# ------------------------------------------------------------------------------------------------

@dataclass
class _Pixels:
    """The pixels of one drawn piece, in that piece's own frame (object units).

    a: (n,) float, along the piece's main axis (0 at its centre/root; limbs: 0..length).
    b: (n,) float, across it. For "poly" pieces (a, b) are plain object coordinates (x, y).
    dims: ellipse (rx, ry); limb/fork (root width, length); poly (0, 0).
    noise: (n,) float, ~N(0, 1) per-pixel noise of this image.
    tint: (3,) float in [0, 255], the object instance's colour.
    skin: the body plan's skin texture name.
    """

    a: np.ndarray
    b: np.ndarray
    dims: tuple[float, float]
    noise: np.ndarray
    tint: np.ndarray
    skin: str


def _bands(t: np.ndarray, period: float) -> np.ndarray:
    """Hard-edged stripes: +1 / -1 alternating every half `period`."""
    return np.where(np.sin(2 * np.pi * t / period) >= 0, 1.0, -1.0)


def _tinted(px: _Pixels, m: np.ndarray) -> np.ndarray:
    return px.tint[None, :] * m[:, None]


def _fixed(rgb: tuple[int, int, int], m: np.ndarray | float = 1.0) -> Callable[[_Pixels], np.ndarray]:
    return lambda px: np.broadcast_to(np.asarray(rgb, np.float32) * np.reshape(m, (-1, 1)),
                                      (px.a.size, 3))


def _radius(px: _Pixels) -> np.ndarray:
    """Normalised elliptical radius: 0 at the centre, 1 on the outline."""
    rx, ry = px.dims
    return np.sqrt((px.a / rx) ** 2 + (px.b / ry) ** 2)


# Torso/body texture per body plan: the one place where the *object* (not the part) sets a
# texture, as real categories differ in fur, feathers, scales and paint.
_SKINS: dict[str, Callable[[_Pixels], np.ndarray]] = {
    "fur": lambda px: 1.0 + 0.10 * px.noise
    - 0.22 * (np.sin(2 * np.pi * px.a / 0.17) * np.sin(2 * np.pi * px.b / 0.11) > 0.55),
    "feathers": lambda px: 1.0 + 0.14 * _bands(px.a + 0.9 * np.abs(px.b), 0.06),
    "scales": lambda px: 1.0 + 0.18 * np.cos(2 * np.pi * px.a / 0.05) * np.cos(2 * np.pi * px.b / 0.05)
    + 0.3 * np.clip(px.b / 0.12, 0.0, 1.0),  # lighter belly
    "metallic": lambda px: 1.18 - 0.9 * (px.b + 0.22)
    + 0.35 * np.exp(-(((px.b + 0.02) / 0.012) ** 2)),  # top-lit paint with a highlight line
}


def _eye(px: _Pixels) -> np.ndarray:
    pupil = (_radius(px) < 0.5)[:, None]
    return np.where(pupil, np.float32(20), np.asarray((245, 245, 238), np.float32))


def _wheel(px: _Pixels) -> np.ndarray:
    r = _radius(px)[:, None]
    tyre, hub, axle = (np.asarray(c, np.float32) for c in ((40, 40, 44), (182, 182, 188), (70, 70, 75)))
    return np.where(r < 0.18, axle, np.where(r < 0.55, hub, tyre))


def _window(px: _Pixels) -> np.ndarray:
    glare = (((px.a - px.b) % 0.14) < 0.03)[:, None]
    glass = np.asarray((160, 205, 232), np.float32) * (1.0 - 1.2 * (px.b + 0.19))[:, None]
    return np.where(glare, np.asarray((236, 246, 252), np.float32), glass)


def _light(px: _Pixels) -> np.ndarray:
    core = (_radius(px) < 0.55)[:, None]
    return np.where(core, np.asarray((255, 255, 240), np.float32),
                    np.asarray((250, 235, 160), np.float32))


PART_LOOKS: dict[str, Callable[[_Pixels], np.ndarray]] = {
    # Tinted by the object colour, each with its own shade and pattern.
    "torso": lambda px: _tinted(px, _SKINS[px.skin](px)),
    "body": lambda px: _tinted(px, _SKINS[px.skin](px)),
    "head": lambda px: _tinted(px, 1.12 + 0.1 * (1 - _radius(px) ** 2) - 0.3 * (px.noise > 1.5)),
    "leg": lambda px: _tinted(px, 0.72 * (1 + 0.22 * _bands(px.a, 0.07))),
    "tail": lambda px: _tinted(px, 0.85 * (1 + 0.22 * _bands(px.a + px.b, 0.06))),
    "ear": lambda px: _tinted(px, 0.55 * (1 + 0.05 * px.noise)),
    "wing": lambda px: _tinted(px, 0.85 * (1 + 0.2 * _bands(px.b, 0.035))
                               * np.where(px.a < -0.4 * px.dims[0], 0.7, 1.0)),  # dark tips
    "fin": lambda px: _tinted(px, 0.8 * (1 + 0.25 * np.sin(2 * np.pi * px.b / 0.022))
                              * (1 + 0.25 * px.a / px.dims[1])),  # rays, lighter rim
    # Fixed colours: identical on every object.
    "eye": _eye,
    "beak": lambda px: _fixed((240, 140, 25), 1.1 - 0.35 * px.a / px.dims[1])(px),
    "wheel": _wheel,
    "window": _window,
    "light": _light,
}
assert set(PART_LOOKS) == set(PARTS)


# ------------------------------------------------------------------------------------------------
# Geometry
# ------------------------------------------------------------------------------------------------

def _affine(deg: float = 0.0, tx: float = 0.0, ty: float = 0.0,
            sx: float = 1.0, sy: float = 1.0) -> np.ndarray:
    """3x3 homogeneous matrix: scale (sx, sy), then rotate by `deg`, then translate."""
    c, s = np.cos(np.radians(deg)), np.sin(np.radians(deg))
    return np.array([[c * sx, -s * sy, tx], [s * sx, c * sy, ty], [0.0, 0.0, 1.0]])


def _apply(m: np.ndarray, pts: np.ndarray) -> np.ndarray:
    return pts @ m[:2, :2].T + m[:2, 2]


@dataclass
class _Piece:
    part: str
    outline: np.ndarray  # (n, 2) polygon in the piece's own frame
    frame: np.ndarray  # 3x3, piece frame -> object units
    dims: tuple[float, float]
    far: bool


def _outline(spec: PartSpec, size: tuple[float, float]) -> np.ndarray:
    if spec.kind == "ellipse":
        rx, ry = size
        t = np.linspace(0, 2 * np.pi, 32 if rx > 0.05 else 14, endpoint=False)
        return np.stack([rx * np.cos(t), ry * np.sin(t)], 1)
    if spec.kind in ("limb", "fork"):
        w, length = size
        tip = w * spec.taper / 2
        pts = [(0, -w / 2), (length, -tip), (length, tip), (0, w / 2)]
        if spec.kind == "fork":
            pts.insert(2, (0.65 * length, 0.0))
        return np.asarray(pts, float)
    if spec.kind == "poly":
        return np.asarray(spec.points, float)
    raise ValueError(f"unknown piece kind {spec.kind!r}")


def _build_pieces(plan: BodyPlan, rng: np.random.Generator) -> list[_Piece]:
    """The object's pieces in object units with this instance's pose and proportion jitter."""
    leg_scale = rng.uniform(0.75, 1.25)
    joint_frames = {}
    for name, ((px, py), swing) in plan.joints.items():
        turn = rng.uniform(-swing, swing)
        joint_frames[name] = _affine(0, px, py) @ _affine(turn) @ _affine(0, -px, -py)
    pieces = []
    for spec in plan.pieces:
        size = spec.size
        if spec.kind == "ellipse":
            k = rng.uniform(0.9, 1.1)
            size = (size[0] * k, size[1] * k)
        elif spec.part == "leg":
            size = (size[0], size[1] * leg_scale)
        if spec.kind == "poly":
            frame, dims = np.eye(3), (0.0, 0.0)
        else:
            angle = spec.angle + rng.uniform(-spec.swing, spec.swing)
            frame, dims = _affine(angle, *spec.xy), size
        if spec.joint is not None:
            frame = joint_frames[spec.joint] @ frame
        pieces.append(_Piece(spec.part, _outline(spec, size), frame, dims, spec.far))
    return pieces


# ------------------------------------------------------------------------------------------------
# Canvas: RGB image and both label maps, painted in lockstep
# ------------------------------------------------------------------------------------------------

class _Canvas:
    """img (N, N, 3) float32 in [0, 255]; part/obj (N, N) uint8, 255 = background."""

    def __init__(self, background: np.ndarray, noise: np.ndarray) -> None:
        n = background.shape[0]
        self.n = n
        self.img = background
        self.noise = noise
        self.part = np.full((n, n), IGNORE_LABEL, np.uint8)
        self.obj = np.full((n, n), IGNORE_LABEL, np.uint8)

    def paint(self, poly: np.ndarray, to_piece: np.ndarray, look: Callable[[_Pixels], np.ndarray],
              dims: tuple[float, float], tint: np.ndarray, skin: str, light: float,
              cls: int, obj: int) -> None:
        """Fill polygon `poly` ((n, 2) image pixels): colour from `look`, labels `cls`/`obj`.

        Later paints overwrite earlier ones in all three arrays, so occlusion is exact: labels
        show what is visible. Labels are rasterised without anti-aliasing.
        """
        x0, y0 = np.maximum(np.floor(poly.min(0)).astype(int) - 1, 0)
        x1, y1 = np.minimum(np.ceil(poly.max(0)).astype(int) + 2, self.n)
        if x0 >= x1 or y0 >= y1:
            return
        mask_im = Image.new("L", (int(x1 - x0), int(y1 - y0)), 0)
        ImageDraw.Draw(mask_im).polygon([(float(x - x0), float(y - y0)) for x, y in poly], fill=1)
        ys, xs = np.nonzero(np.asarray(mask_im))
        if ys.size == 0:
            return
        ys += y0
        xs += x0
        # Pixel centres back into the piece's frame, so patterns turn and scale with the piece.
        a = to_piece[0, 0] * (xs + 0.5) + to_piece[0, 1] * (ys + 0.5) + to_piece[0, 2]
        b = to_piece[1, 0] * (xs + 0.5) + to_piece[1, 1] * (ys + 0.5) + to_piece[1, 2]
        rgb = look(_Pixels(a, b, dims, self.noise[ys, xs], tint, skin))
        self.img[ys, xs] = np.clip(rgb * light, 0, 255)
        self.part[ys, xs] = cls
        self.obj[ys, xs] = obj


def _muted_colour(rng: np.random.Generator, max_sat: float) -> np.ndarray:
    rgb = colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.0, max_sat), rng.uniform(0.25, 0.92))
    return np.asarray(rgb, np.float32) * 255


def _value_noise(rng: np.random.Generator, n: int, cells: int) -> np.ndarray:
    """Smooth noise in [0, 1], shape (n, n): a coarse random grid upsampled bicubically."""
    grid = Image.fromarray(rng.random((cells, cells)).astype(np.float32))
    out = np.asarray(grid.resize((n, n), Image.BICUBIC))
    lo, hi = out.min(), out.max()
    return (out - lo) / max(hi - lo, 1e-6)


def _background(rng: np.random.Generator, n: int) -> np.ndarray:
    """(n, n, 3) float32 in [0, 255]: a textured two-colour field plus a few clutter shapes.

    Colours are drawn from the whole hue circle at low-to-moderate saturation: saturated enough
    that "coloured pixel = object" is not a shortcut, muted enough that the objects' colour words
    stay readable.
    """
    c1, c2 = _muted_colour(rng, 0.45), _muted_colour(rng, 0.45)
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32) / n
    theta = rng.uniform(0, np.pi)
    along = xx * np.cos(theta) + yy * np.sin(theta)
    kind = rng.integers(4)
    if kind == 0:  # gradient
        t = (along - along.min()) / max(float(np.ptp(along)), 1e-6)
    elif kind == 1:  # stripes, soft or hard
        t = 0.5 + 0.5 * np.sin(2 * np.pi * along / rng.uniform(0.04, 0.18) + rng.uniform(0, 6.3))
        t = np.clip((t - 0.5) * rng.uniform(1, 6) + 0.5, 0, 1)
    elif kind == 2:  # blotchy noise
        t = _value_noise(rng, n, int(rng.integers(3, 14)))
    else:  # checker, blended with noise so it is not perfectly regular
        p = rng.uniform(0.06, 0.2)
        t = (((xx // p) + (yy // p)) % 2) * 0.7 + 0.3 * _value_noise(rng, n, 6)
    img = c1 * (1 - t[..., None]) + c2 * t[..., None]

    im = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(im)
    for _ in range(rng.integers(0, 6)):
        fill = tuple(int(v) for v in _muted_colour(rng, 0.65))
        cx, cy = rng.uniform(0, n, 2)
        r = rng.uniform(0.04, 0.2) * n
        if rng.random() < 0.5:
            draw.ellipse([cx - r, cy - r * rng.uniform(0.4, 1), cx + r, cy + r], fill=fill)
        else:
            k = int(rng.integers(3, 7))
            ang = np.sort(rng.uniform(0, 2 * np.pi, k))
            rad = r * rng.uniform(0.5, 1.0, k)
            draw.polygon([(float(cx + q * np.cos(t_)), float(cy + q * np.sin(t_)))
                          for q, t_ in zip(rad, ang)], fill=fill)
    return np.asarray(im, np.float32).copy()


# ------------------------------------------------------------------------------------------------
# Scene
# ------------------------------------------------------------------------------------------------

_SIZE_RANGE = {1: (0.55, 0.95), 2: (0.42, 0.75), 3: (0.36, 0.62)}  # longest side / image side


def _split_code(split: str) -> int:
    # crc32, not hash(): Python salts str hashes per process, which would break determinism.
    return zlib.crc32(split.encode("utf-8"))


def _rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, _split_code(split), index])


def _place(rng: np.random.Generator, sizes: list[float], n: int) -> list[tuple[float, float]]:
    """Object centres in pixels: mostly inside the frame, overlapping but rarely hidden."""
    centres: list[tuple[float, float]] = []
    for s in sizes:
        lo, hi = 0.4 * s, n - 0.4 * s  # up to ~10% of an object may leave the frame
        if lo > hi:
            lo = hi = n / 2
        best, best_gap = None, -1.0
        for _ in range(12):
            c = (rng.uniform(lo, hi), rng.uniform(lo, hi))
            gap = min((np.hypot(c[0] - q[0], c[1] - q[1]) / (0.5 * (s + t))
                       for q, t in zip(centres, sizes)), default=np.inf)
            if gap >= 0.6:
                best = c
                break
            if gap > best_gap:
                best, best_gap = c, gap
        centres.append(best)
    return centres


def render_sample(seed: int, split: str, index: int, image_size: int = 160,
                  objects: Sequence[int] | None = None,
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render one SynthParts sample, determined entirely by (seed, split, index, image_size).

    Returns:
        image: (H, W, 3) uint8 RGB, H = W = image_size.
        part: (H, W) uint8, index into SYNTHPARTS_VOCABULARY.classes; 255 = background.
        obj: (H, W) uint8, index into SYNTHPARTS_VOCABULARY.objects; 255 = background.
        Every pixel with part label k has obj == SYNTHPARTS_VOCABULARY.classes[k][0].

    Image `index` always contains object category `index % 16` (so any 16 consecutive images
    cover every category), plus 0-2 random others; `objects` (1-3 category indices) replaces
    that draw, e.g. seen categories only for pretraining.
    """
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if not isinstance(index, (int, np.integer)) or index < 0:
        raise ValueError(f"index must be a non-negative integer, got {index!r}")
    if not split:
        raise ValueError("split must be a non-empty string such as 'train' or 'val'")
    if image_size < 32:
        raise ValueError(f"image_size must be >= 32, got {image_size}")
    n = int(image_size)
    rng = _rng(int(seed), split, int(index))
    vocab = SYNTHPARTS_VOCABULARY

    canvas = _Canvas(_background(rng, n), rng.standard_normal((n, n)).astype(np.float32))
    if objects is None:
        n_obj = int(rng.choice([1, 2, 3], p=[0.4, 0.4, 0.2]))
        cats = [index % len(vocab.objects)] + [int(rng.integers(len(vocab.objects)))
                                               for _ in range(n_obj - 1)]
        rng.shuffle(cats)  # the guaranteed category is not always drawn first (least visible)
    else:
        cats = [int(c) for c in objects]
        if not 1 <= len(cats) <= 3 or not all(0 <= c < len(vocab.objects) for c in cats):
            raise ValueError(f"objects must be 1-3 category indices in [0, "
                             f"{len(vocab.objects)}), got {list(objects)}")
        n_obj = len(cats)

    # Pose first (it sets each object's extent), then sizes and positions.
    objects = []
    for cat in cats:
        colour, plan_name = vocab.objects[cat].split(" ", 1)
        plan = BODY_PLANS[plan_name]
        pieces = _build_pieces(plan, rng)
        flip = -1.0 if rng.random() < 0.5 else 1.0
        pose = _affine(rng.uniform(-plan.max_rotation, plan.max_rotation)) @ _affine(
            sx=flip * rng.uniform(0.85, 1.15), sy=rng.uniform(0.85, 1.2))
        pts = np.concatenate([_apply(pose @ p.frame, p.outline) for p in pieces])
        lo, hi = pts.min(0), pts.max(0)
        objects.append((cat, colour, plan, pieces, pose, lo, hi))
    sizes = [rng.uniform(*_SIZE_RANGE[n_obj]) * n for _ in objects]
    centres = _place(rng, sizes, n)

    for (cat, colour, plan, pieces, pose, lo, hi), size, (cx, cy) in zip(objects, sizes, centres):
        scale = size / float(max(hi - lo))
        mid = (lo + hi) / 2
        to_image = _affine(0, cx - scale * mid[0], cy - scale * mid[1], scale, scale) @ pose
        tint = np.clip(np.asarray(COLOURS[colour], np.float32) * rng.uniform(0.85, 1.12)
                       + rng.normal(0, 10, 3), 0, 255).astype(np.float32)
        light = float(rng.uniform(0.88, 1.1))
        obj_name = vocab.objects[cat]
        for p in pieces:
            m = to_image @ p.frame
            canvas.paint(_apply(m, p.outline), np.linalg.inv(m), PART_LOOKS[p.part], p.dims,
                         tint, plan.skin, light * (0.8 if p.far else 1.0),
                         _CLASS_INDEX[(obj_name, p.part)], cat)

    # Soft global illumination and sensor noise, so flat colours are not exact giveaways.
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32) / n
    illum = 1.0 + rng.uniform(-0.12, 0.12) * (xx - 0.5) + rng.uniform(-0.12, 0.12) * (yy - 0.5)
    img = canvas.img * illum[..., None] + rng.normal(0, 3.0, (n, n, 3)).astype(np.float32)
    return np.clip(img + 0.5, 0, 255).astype(np.uint8), canvas.part, canvas.obj


# ------------------------------------------------------------------------------------------------
# Writing the data set
# ------------------------------------------------------------------------------------------------

def _sample_id(split: str, index: int) -> str:
    return f"{split}_{index:06d}"


def _is_synthparts_dir(out: Path) -> bool:
    if (out / _MARKER).is_file():
        return True
    try:
        meta = json.loads((out / "classes.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("dataset") == "SynthParts"


def generate(out: str | Path, seed: int = 0, n_train: int = 800, n_val: int = 200,
             image_size: int = 160, progress: bool = True) -> Path:
    """Write a SynthParts data set in the OV-PARTS Pascal layout (see the module docstring).

    An existing non-empty `out` is accepted only if it is a previous (complete or interrupted)
    SynthParts output; it is then regenerated in place and files from the old run that the new
    one does not produce are removed. `classes.json` is removed first and written last, so an
    interrupted run never looks complete. Returns `out` as a Path.
    """
    from tqdm import tqdm

    out = Path(out)
    if n_train < 0 or n_val < 0:
        raise ValueError(f"n_train and n_val must be >= 0, got {n_train}, {n_val}")
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not _is_synthparts_dir(out):
        raise FileExistsError(
            f"refusing to write SynthParts into {out}: the folder is not empty and is not a "
            f"previous SynthParts output (no {_MARKER} marker, no classes.json with dataset "
            "'SynthParts'). Choose a new or empty folder.")
    out.mkdir(parents=True, exist_ok=True)
    (out / _MARKER).write_text(json.dumps({"dataset": "SynthParts"}) + "\n")
    (out / "classes.json").unlink(missing_ok=True)

    splits = {"train": int(n_train), "val": int(n_val)}
    for split, count in splits.items():
        expected = {_sample_id(split, i) for i in range(count)}
        for d in _LAYOUT_DIRS:
            folder = out / d / split
            folder.mkdir(parents=True, exist_ok=True)
            for f in folder.iterdir():  # leftovers of an earlier, larger or interrupted run
                if f.is_file() and (f.name.startswith(".") or f.stem not in expected):
                    f.unlink()

    with tqdm(total=sum(splits.values()), desc="SynthParts", unit="img",
              disable=not progress) as bar:
        for split, count in splits.items():
            for i in range(count):
                image, part, obj = render_sample(seed, split, i, image_size)
                sid = _sample_id(split, i)
                # 4:4:4 chroma: 4:2:0 would smear the colour of 3-pixel eyes and beaks.
                # Not fsynced: a regenerable dataset, and 3 files per image.
                atomic_write(out / "images" / split / f"{sid}.jpg",
                             lambda p, image=image: Image.fromarray(image).save(
                                 p, format="JPEG", quality=95, subsampling=0), durable=False)
                for d, lab in (("annotations_detectron2_part", part),
                               ("annotations_detectron2_obj", obj)):
                    atomic_write(out / d / split / f"{sid}.png",
                                 lambda p, lab=lab: Image.fromarray(lab).save(p, format="PNG"),
                                 durable=False)
                bar.update(1)

    meta = {"dataset": "SynthParts", "format_version": FORMAT_VERSION, "seed": int(seed),
            "image_size": int(image_size), "splits": splits,
            "vocabulary": SYNTHPARTS_VOCABULARY.to_dict()}
    atomic_write_text(out / "classes.json", json.dumps(meta, indent=1) + "\n")
    return out
