"""A resolution-native synthetic benchmark: scenes described by numbers, rendered at any size.

Every sample is a scene drawn from a generator seeded by (seed, split, index): an object (one of
five shapes) with a fine grating on its surface, over a textured background with distractors.
The class is (shape, grating orientation). The grating's period is a fixed fraction of the object,
so a small object's grating is finer than a pixel at low resolution and the box filter of each
pixel (applied analytically: a sinusoid integrated over a pixel is scaled by a sinc) washes it
out; at higher resolution it appears. As on ImageNet-HR, more pixels carry more information.
Everything is anti-aliased: edges by signed distance, textures by their pixel-box response.

The ``where`` task asks on which side of the object a magenta marker lies. The marker (a fifth of
the image side) sits 0.04-0.12 image sides away from the object, so at the training size object and
marker mostly fall in different patches: a model has to relate two places. (Markers of 5-10% of the
image side proved too faint a signal for small ViTs to learn in a few epochs.)

The ``far`` task relates two places far apart: a small marker lies anywhere in the left or right
half of the image and the object in the other half; the class is (shape, the half with the marker).
The distance between them, in patches, grows with the image, as a relation across a photograph does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

SHAPES = ("disk", "square", "triangle", "ring", "cross")
ORIENTATIONS = ("horizontal", "vertical")
SIDES = ("above", "below", "left", "right")
TASKS = ("what", "where", "far")
HALVES = ("left", "right")  # the far task's marker half
SPLITS = {"train": 0, "val": 1, "test": 2}
MEAN, STD = (0.35, 0.35, 0.35), (0.25, 0.25, 0.25)
MIN_SIZE, MAX_SIZE = 0.14, 0.7
WHERE_MAX_SIZE = 0.45  # objects of the where task leave room for the gap and the marker
MARKER = 0.2  # side of the where task's marker, as a fraction of the image side
FAR_MARKER = 0.1  # the far task's: small, and anywhere in its half
MARKER_COLOR = (1.0, 0.0, 1.0)  # no object can have it: objects are bright in every channel


@dataclass(frozen=True)
class Scene:
    label: int
    shape: int
    orientation: int
    side: int  # where the marker sits ("where" task)
    size: float  # object side as a fraction of the image side
    cx: float
    cy: float
    cycles: float  # grating cycles across the object
    phase: float
    colors: np.ndarray  # (2, 3): the grating's two colours
    bg: np.ndarray  # (3, 5): per channel base, amplitude, fx, fy, phase
    distractors: np.ndarray  # (k, 6): cx, cy, radius, r, g, b
    task: str = "what"
    marker: tuple[float, float] = (0.0, 0.0)  # marker centre minus object centre (where and far tasks)
    marker_size: float = MARKER


def draw_scene(rng: np.random.Generator, task: str = "what") -> Scene:
    shape = int(rng.integers(len(SHAPES)))
    orientation = int(rng.integers(len(ORIENTATIONS)))
    side = int(rng.integers(len(SIDES)))
    top = MAX_SIZE if task == "what" else WHERE_MAX_SIZE
    size = float(math.exp(rng.uniform(math.log(MIN_SIZE), math.log(top))))
    marker_size = FAR_MARKER if task == "far" else MARKER
    if task == "what":
        margin = size / 2
        cx, cy = rng.uniform(margin, 1 - margin, size=2) if margin < 0.5 else (0.5, 0.5)
        marker = (0.0, 0.0)
    elif task == "far":  # side 2 (left) or 3 (right) of SIDES: the marker's half; the object in the other
        side = 2 + int(rng.integers(2))
        m = size / 2 + 0.01
        ox = float(rng.uniform(m, 0.5 - m))
        cx = ox if side == 3 else 1 - ox
        cy = float(rng.uniform(m, 1 - m))
        h = marker_size / 2 + 0.01
        mx = float(rng.uniform(h, 0.5 - h)) + (0.5 if side == 3 else 0.0)
        marker = (mx - cx, float(rng.uniform(h, 1 - h)) - cy)
    else:
        reach = size / 2 + float(rng.uniform(0.04, 0.12)) + MARKER / 2  # centre to marker centre
        ux, uy = [(0, -1), (0, 1), (-1, 0), (1, 0)][side]
        marker = (ux * reach, uy * reach)
        lo = [max(size / 2, MARKER / 2 - m) + 0.01 for m in marker]  # object and marker inside the image
        hi = [1 - max(size / 2, MARKER / 2 + m) - 0.01 for m in marker]
        cx, cy = (float(rng.uniform(a, b)) for a, b in zip(lo, hi))
    # A bright object over a darker background: the silhouette survives low resolution, the
    # grating (between the colour and a dark shade of it) does not.
    bright = rng.uniform(0.6, 1.0, size=3)
    colors = np.stack([bright, bright * 0.35])
    bg = np.stack([rng.uniform(0.1, 0.4, 3), rng.uniform(0.03, 0.1, 3), rng.uniform(-3, 3, 3),
                   rng.uniform(-3, 3, 3), rng.uniform(0, 2 * math.pi, 3)], axis=1)
    k = int(rng.integers(0, 3))
    distractors = np.concatenate([rng.uniform(0.05, 0.95, (k, 2)), rng.uniform(0.015, 0.04, (k, 1)),
                                  rng.uniform(0.0, 1.0, (k, 3))], axis=1)
    label = {"what": shape * 2 + orientation, "where": side, "far": shape * 2 + side - 2}[task]
    return Scene(label, shape, orientation, side, size, float(cx), float(cy), float(rng.uniform(4.0, 6.0)),
                 float(rng.uniform(0, 2 * math.pi)), colors, bg, distractors, task, marker, marker_size)


def _coverage(sdf: np.ndarray, px: float) -> np.ndarray:
    """Fraction of each pixel inside a shape, from its signed distance (in image units)."""
    return np.clip(0.5 - sdf / px, 0.0, 1.0)


def _shape_sdf(shape: int, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    if shape == 0:
        return np.sqrt(dx * dx + dy * dy) - r
    if shape == 1:
        return np.maximum(np.abs(dx), np.abs(dy)) - 0.85 * r
    if shape == 2:  # equilateral triangle, flat side up (image rows grow downward)
        k = math.sqrt(3.0)
        ax = np.abs(dx)
        return np.maximum(ax * k / 2 + dy / 2, -dy) - r / 2
    if shape == 3:
        return np.abs(np.sqrt(dx * dx + dy * dy) - 0.7 * r) - 0.3 * r
    arm = 0.33 * r  # cross: union of two bars
    return np.minimum(np.maximum(np.abs(dx) - r, np.abs(dy) - arm), np.maximum(np.abs(dx) - arm, np.abs(dy) - r))


def render(scene: Scene, size: int | tuple[int, int]) -> np.ndarray:
    """The scene as a float32 ``(3, H, W)`` image in [0, 1], anti-aliased at this size."""
    h, w = (size, size) if isinstance(size, int) else size
    px = 1.0 / min(h, w)
    u = ((np.arange(w, dtype=np.float32) + 0.5) / w)[None, :]
    v = ((np.arange(h, dtype=np.float32) + 0.5) / h)[:, None]
    bg = scene.bg
    # Background: one low-frequency plane wave per channel, box-filtered per pixel.
    att = np.sinc(bg[:, 2] / w) * np.sinc(bg[:, 3] / h)
    img = np.empty((3, h, w), dtype=np.float32)
    for c in range(3):
        img[c] = bg[c, 0] + bg[c, 1] * att[c] * np.cos(2 * np.pi * (bg[c, 2] * u + bg[c, 3] * v) + bg[c, 4])
    for dcx, dcy, rad, r, g, b in scene.distractors:
        cov = _coverage(np.sqrt((u - dcx) ** 2 + (v - dcy) ** 2) - rad, px)
        img += cov * (np.array([r, g, b], dtype=np.float32)[:, None, None] - img)
    r = scene.size / 2
    dx, dy = u - scene.cx, v - scene.cy
    cov = _coverage(_shape_sdf(scene.shape, dx, dy, r), px)
    freq = scene.cycles / scene.size  # cycles per image unit
    if scene.orientation == 0:  # horizontal stripes: varies along y
        wave = np.cos(2 * np.pi * freq * dy + scene.phase) * np.sinc(freq / h)
    else:
        wave = np.cos(2 * np.pi * freq * dx + scene.phase) * np.sinc(freq / w)
    mix = 0.5 + 0.5 * wave  # (h, 1) or (1, w)
    c0, c1 = scene.colors.astype(np.float32)
    obj = c1[:, None, None] + (c0 - c1)[:, None, None] * mix[None]
    img += cov * (obj - img)
    if scene.task in ("where", "far"):
        mx, my = scene.marker
        mcov = _coverage(np.maximum(np.abs(dx - mx), np.abs(dy - my)) - scene.marker_size / 2, px)
        img += mcov * (np.array(MARKER_COLOR, dtype=np.float32)[:, None, None] - img)
    return img


class SyntheticScenes(Dataset):
    """``length`` scenes of a split, rendered at ``img_size``; items are (normalised image, label).

    ``task="what"``: 10 classes, (shape, grating orientation). ``task="where"``: 4 classes, the side
    of the object where the marker sits: the class depends on where things are, not on what they are.
    ``task="far"``: 10 classes, (shape, the half of the image holding a small marker; the object is
    in the other half).
    """

    mean, std = MEAN, STD

    def __init__(self, split: str = "train", img_size: int | tuple[int, int] = 64, length: int = 10000,
                 seed: int = 0, task: str = "what"):
        if split not in SPLITS:
            raise ValueError(f"split={split!r}; allowed: {', '.join(SPLITS)}")
        if task not in TASKS:
            raise ValueError(f"task={task!r}; allowed: {', '.join(TASKS)}")
        if length < 1:
            raise ValueError(f"length={length} must be >= 1")
        self.split, self.img_size, self.length, self.seed, self.task = split, img_size, length, seed, task
        self.num_classes = len(SIDES) if task == "where" else 10
        self._mean = np.array(MEAN, dtype=np.float32)[:, None, None]
        self._std = np.array(STD, dtype=np.float32)[:, None, None]

    def __len__(self) -> int:
        return self.length

    def scene(self, index: int) -> Scene:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} scenes")
        rng = np.random.default_rng([self.seed, SPLITS[self.split], index, 0x100C])
        return draw_scene(rng, self.task)

    def object_size(self, index: int) -> float:
        return self.scene(index).size

    def render(self, index: int, img_size: int | tuple[int, int] | None = None) -> np.ndarray:
        return render(self.scene(index), img_size or self.img_size)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        scene = self.scene(index)
        img = (render(scene, self.img_size) - self._mean) / self._std
        return torch.from_numpy(img), scene.label
