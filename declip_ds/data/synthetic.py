"""Embedded synthetic "shapes" image-caption dataset.

The default data of the toolkit: procedurally drawn scenes of 1-3 coloured
shapes on textured backgrounds, with captions in varied natural wording
(``captions="rich"``; ``"plain"`` gives "a red circle and two squares", what
the demo trains on) and, at rate ``noise``, corrupted the way web alt-text is, plus one-object
zero-shot evaluation splits for shape, colour and shape+colour.

Everything is deterministic for a seed: every sample has its own numpy
``Generator`` derived from ``(seed, split, index)`` so the content does not
depend on sharding, and tar members carry fixed metadata, so generating twice
gives byte-identical files.  Global RNGs are never touched.

Output layout::

    DIR/manifest.json
    DIR/train/00000.tar ...          <key>.jpg  <key>.txt  <key>.json
    DIR/train/sizes.json
    DIR/eval/<task>/00000.tar ...    <key>.jpg  <key>.cls  <key>.json
    DIR/eval/<task>/classnames.txt
    DIR/eval/<task>/templates.txt
    DIR/eval/<task>/sizes.json

Usage::

    python -m declip_ds.data.synthetic --out DIR --num-samples 8192 \
        --shard-size 1024 --seed 0 [--image-size 64] [--noise 0.1] \
        [--eval-per-class 8] [--captions rich|plain] [--quiet]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import operator
import os
import sys
import tarfile
import time
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "GENERATOR_VERSION",
    "SHAPES",
    "COLORS",
    "SIZES",
    "POSITIONS",
    "TASKS",
    "COLOR_RGB",
    "SHAPE_SYNONYMS",
    "COLOR_SYNONYMS",
    "CAPTION_STYLES",
    "NUM_HELD_OUT",
    "held_out_pairs",
    "classnames",
    "templates",
    "generate",
    "ensure_dataset",
    "main",
]

# Bump whenever the generated content changes: ensure_dataset() regenerates
# datasets made by another version.
GENERATOR_VERSION = "3"
# probability that a caption leaves out an object's colour (an ordinary caption, not noise)
P_COLOR_OMITTED = 0.5
# probabilities of 1, 2 and 3 objects in a training scene
P_NUM_OBJECTS = (0.45, 0.35, 0.2)
# probability that an object is named by its canonical shape word rather than a synonym
P_CANONICAL_SHAPE = 0.6
# caption styles: "rich" (the default: varied wording, synonyms, sizes, positions, backgrounds,
# like alt-text) or "plain" ("a red circle and two squares": canonical shape words, colour
# sometimes, counts; nothing else). The demo uses plain so shape is learnt within its 5 minutes:
# with rich captions contrastive learning picks up colour, position and size first and needs about
# 3x the steps before shape rises (benchmarks/RESULTS.md, "Demo").
CAPTION_STYLES = ("rich", "plain")
# plain captions name an object's colour with probability 1 - this (rich: 1 - P_COLOR_OMITTED)
P_COLOR_OMITTED_PLAIN = 0.75

SHAPES = ("circle", "square", "triangle", "star", "hexagon", "cross", "diamond", "heart")
COLORS = ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "white")
SIZES = ("small", "large")
POSITIONS = (
    "top_left", "top", "top_right",
    "left", "center", "right",
    "bottom_left", "bottom", "bottom_right",
)
TASKS = ("shape", "color", "shape_color")
NUM_HELD_OUT = 8  # one held-out colour per shape, each colour used once

COLOR_RGB = {
    "red": (215, 35, 35),
    "orange": (245, 135, 20),
    "yellow": (240, 220, 40),
    "green": (40, 170, 55),
    "cyan": (30, 200, 210),
    "blue": (35, 70, 215),
    "purple": (135, 45, 180),
    "white": (245, 245, 245),
}

# (singular, plural); the first entry is the canonical class name.
SHAPE_SYNONYMS = {
    "circle": (("circle", "circles"), ("disk", "disks"), ("disc", "discs"), ("round dot", "round dots")),
    "square": (("square", "squares"), ("box", "boxes"), ("block", "blocks")),
    "triangle": (("triangle", "triangles"), ("triangular shape", "triangular shapes"), ("wedge", "wedges")),
    "star": (("star", "stars"), ("five-pointed star", "five-pointed stars")),
    "hexagon": (("hexagon", "hexagons"), ("six-sided shape", "six-sided shapes"), ("hex", "hexes")),
    "cross": (("cross", "crosses"), ("plus sign", "plus signs"), ("plus", "pluses")),
    "diamond": (("diamond", "diamonds"), ("rhombus", "rhombuses"), ("lozenge", "lozenges")),
    "heart": (("heart", "hearts"), ("heart shape", "heart shapes"), ("love heart", "love hearts")),
}
# Canonical word first, used by most captions so zero-shot class names match.
COLOR_SYNONYMS = {
    "red": ("red", "crimson", "scarlet"),
    "orange": ("orange", "tangerine", "amber"),
    "yellow": ("yellow", "golden", "lemon"),
    "green": ("green", "emerald", "jade"),
    "cyan": ("cyan", "turquoise", "aqua"),
    "blue": ("blue", "azure", "cobalt"),
    "purple": ("purple", "violet", "plum"),
    "white": ("white", "snow-white", "ivory"),
}
_NOT_NOUNS = ("golden", "snow-white")  # colour words that don't read as "in <colour>"
SIZE_SYNONYMS = {
    "small": ("small", "small", "little", "tiny"),
    "large": ("large", "large", "big", "huge"),
}
# position -> (long phrases, short phrases)
POSITION_PHRASES = {
    "top_left": (("in the top left corner", "at the top left", "in the upper left"), ("top left", "upper left")),
    "top": (("at the top", "near the top", "at the top of the picture"), ("top", "top center")),
    "top_right": (("in the top right corner", "at the top right", "in the upper right"), ("top right", "upper right")),
    "left": (("on the left", "on the left side", "to the left"), ("left", "left side")),
    "center": (("in the center", "in the middle", "in the middle of the picture"), ("center", "middle")),
    "right": (("on the right", "on the right side", "to the right"), ("right", "right side")),
    "bottom_left": (("in the bottom left corner", "at the bottom left", "in the lower left"), ("bottom left", "lower left")),
    "bottom": (("at the bottom", "near the bottom", "at the bottom of the picture"), ("bottom", "bottom center")),
    "bottom_right": (("in the bottom right corner", "at the bottom right", "in the lower right"), ("bottom right", "lower right")),
}
BACKGROUNDS = ("plain", "gradient", "radial", "stripes", "checker", "noise", "blotches")
BACKGROUND_WORDS = {
    "plain": ("plain", "gray", "grey", "simple"),
    "gradient": ("gradient", "soft gradient"),
    "radial": ("gradient", "vignette"),
    "stripes": ("striped", "stripy"),
    "checker": ("checkered", "checkerboard"),
    "noise": ("noisy", "grainy"),
    "blotches": ("mottled", "textured"),
}
FILLERS = (
    "IMG_{n4}.jpg", "DSC_{n4}.JPG", "photo", "image", "click to enlarge", "stock image",
    "free download", "thumbnail", "hd wallpaper", "see more", "untitled", "#shapes",
    "via pinterest", "royalty free", "pic {n2}", "clipart", "screenshot", "best quality",
)
NUMBER_WORDS = {1: "one", 2: "two", 3: "three"}

TEMPLATES = {
    "shape": (
        "a {}.", "a picture of a {}.", "a small {}.", "a large {}.", "there is a {}.",
        "a photo of a {}.", "a {} in the picture.", "one {}.", "the {}.",
    ),
    "color": (
        "a {} shape.", "a {} object.", "something {}.", "a small {} shape.",
        "a large {} object.", "a picture of a {} shape.", "a {} thing.", "one {} shape.",
    ),
    "shape_color": (
        "a {}.", "a small {}.", "a large {}.", "a picture of a {}.", "there is a {}.",
        "a photo of a {}.", "one {}.", "the {}.",
    ),
}

JPEG_QUALITY = 90
TAR_MTIME = 946684800  # 2000-01-01T00:00:00Z; fixed so tars are byte-identical
_STREAM_TRAIN = 1
_STREAM_EVAL = 2
_STREAM_HELD_OUT = 3

# Per-shape geometry: (rotation jitter in degrees, radius scale).
_SHAPE_GEOM = {
    "circle": (0.0, 0.92),
    "square": (12.0, 0.82),
    "triangle": (15.0, 1.08),
    "star": (20.0, 1.08),
    "hexagon": (30.0, 0.95),
    "cross": (12.0, 1.0),
    "diamond": (10.0, 1.05),
    "heart": (15.0, 1.0),
}
_RADIUS_FRAC = {"small": (0.1, 0.13), "large": (0.18, 0.225)}


# --------------------------------------------------------------------------
# argument handling
# --------------------------------------------------------------------------


def _as_int(value, name, flag, example):
    if isinstance(value, bool):
        raise ValueError(f"{name} ({flag}) must be an integer, got {value!r}; pass e.g. {flag} {example}")
    try:
        return operator.index(value)
    except TypeError:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ValueError(
            f"{name} ({flag}) must be an integer, got {value!r}; pass e.g. {flag} {example}"
        ) from None


def _validate(num_samples, shard_size, seed, image_size, noise, eval_per_class, captions="rich") -> dict:
    num_samples = _as_int(num_samples, "num_samples", "--num-samples", 8192)
    if num_samples <= 0:
        raise ValueError(
            f"num_samples (--num-samples) must be a positive number of training samples, "
            f"got {num_samples}; pass e.g. --num-samples 8192"
        )
    shard_size = _as_int(shard_size, "shard_size", "--shard-size", 1024)
    if shard_size <= 0:
        raise ValueError(
            f"shard_size (--shard-size) must be a positive number of samples per tar shard, "
            f"got {shard_size}; pass e.g. --shard-size 1024"
        )
    seed = _as_int(seed, "seed", "--seed", 0)
    if seed < 0:
        raise ValueError(f"seed (--seed) must be a non-negative integer, got {seed}; pass e.g. --seed 0")
    image_size = _as_int(image_size, "image_size", "--image-size", 64)
    if image_size < 16:
        raise ValueError(
            f"image_size (--image-size) must be at least 16 pixels, got {image_size}; "
            f"pass e.g. --image-size 64"
        )
    if isinstance(noise, bool):
        raise ValueError(f"noise (--noise) must be a number in [0, 1], got {noise!r}; pass e.g. --noise 0.1")
    try:
        noise = float(noise)
    except (TypeError, ValueError):
        raise ValueError(
            f"noise (--noise) must be a number in [0, 1], got {noise!r}; pass e.g. --noise 0.1"
        ) from None
    if not 0.0 <= noise <= 1.0:  # also rejects NaN
        raise ValueError(
            f"noise (--noise) is the probability of corrupting a caption and must be in [0, 1], "
            f"got {noise}; pass e.g. --noise 0.1 (or --noise 0 for clean captions)"
        )
    eval_per_class = _as_int(eval_per_class, "eval_per_class", "--eval-per-class", 8)
    if eval_per_class < 1:
        raise ValueError(
            f"eval_per_class (--eval-per-class) must be at least 1 image per class, "
            f"got {eval_per_class}; pass e.g. --eval-per-class 8"
        )
    if captions not in CAPTION_STYLES:
        raise ValueError(f"captions (--captions) must be one of {', '.join(CAPTION_STYLES)}, got {captions!r}; "
                         f"pass e.g. --captions rich")
    return {
        "num_samples": num_samples,
        "shard_size": shard_size,
        "seed": seed,
        "image_size": image_size,
        "noise": noise,
        "eval_per_class": eval_per_class,
        "captions": captions,
    }


# --------------------------------------------------------------------------
# held-out pairs, class names, templates
# --------------------------------------------------------------------------


def held_out_pairs(seed: int) -> list[tuple[str, str]]:
    """The (shape, colour) pairs never shown together in training, from the seed.

    One pair per shape and one per colour (a random permutation of colours).
    """
    rng = np.random.default_rng([int(seed), _STREAM_HELD_OUT])
    perm = rng.permutation(len(COLORS))
    return [(SHAPES[i], COLORS[int(perm[i])]) for i in range(NUM_HELD_OUT)]


def classnames(task: str) -> list[str]:
    """Class names of an eval task; index = integer label."""
    if task == "shape":
        return list(SHAPES)
    if task == "color":
        return list(COLORS)
    if task == "shape_color":
        return [f"{c} {s}" for s in SHAPES for c in COLORS]
    raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")


def templates(task: str) -> list[str]:
    """Zero-shot prompt templates of an eval task (each contains "{}")."""
    if task not in TEMPLATES:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    return list(TEMPLATES[task])


def _label_to_attrs(task: str, label: int, rng) -> tuple[str, str]:
    """(shape, colour) for an eval sample of ``task`` with ``label``."""
    if task == "shape":
        return SHAPES[label], COLORS[int(rng.integers(len(COLORS)))]
    if task == "color":
        return SHAPES[int(rng.integers(len(SHAPES)))], COLORS[label]
    return SHAPES[label // len(COLORS)], COLORS[label % len(COLORS)]


# --------------------------------------------------------------------------
# image rendering
# --------------------------------------------------------------------------


@lru_cache(maxsize=8)
def _grid(size: int):
    c = (np.arange(size, dtype=np.float32) + 0.5) / size
    yy, xx = np.meshgrid(c, c, indexing="ij")
    return yy, xx


def _bg_color(rng, lo=60.0, hi=170.0):
    """A low-saturation mid-tone, so saturated / white objects stand out."""
    g = rng.uniform(lo, hi)
    return np.clip(g + rng.normal(0.0, 10.0, 3), 0, 255).astype(np.float32)


def _background(rng, size: int) -> tuple[np.ndarray, str]:
    kind = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    yy, xx = _grid(size)
    c1 = _bg_color(rng)
    if kind == "plain":
        img = np.broadcast_to(c1, (size, size, 3)).astype(np.float32)
    elif kind in ("gradient", "stripes", "checker", "radial"):
        c2 = np.clip(c1 + rng.normal(0.0, 1.0, 3) * 8 + rng.choice([-1.0, 1.0]) * rng.uniform(18, 45), 0, 255)
        c2 = c2.astype(np.float32)
        if kind == "gradient":
            a = rng.uniform(0, 2 * math.pi)
            t = (xx - 0.5) * math.cos(a) + (yy - 0.5) * math.sin(a)
            t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        elif kind == "radial":
            cx, cy = rng.uniform(0.3, 0.7, 2)
            t = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2)
            t = np.clip(t / 0.75, 0, 1)
        elif kind == "stripes":
            a = rng.uniform(0, math.pi)
            period = rng.uniform(0.07, 0.2)
            u = (xx * math.cos(a) + yy * math.sin(a)) / period
            t = (np.floor(u + rng.uniform()) % 2).astype(np.float32)
        else:  # checker
            cell = rng.uniform(0.07, 0.2)
            ox, oy = rng.uniform(0, 1, 2)
            t = ((np.floor(xx / cell + ox) + np.floor(yy / cell + oy)) % 2).astype(np.float32)
        img = c1 * (1 - t[..., None]) + c2 * t[..., None]
    elif kind == "noise":
        sigma = rng.uniform(8, 20)
        img = c1 + rng.normal(0.0, sigma, (size, size, 1)).astype(np.float32)
        img = img + rng.normal(0.0, sigma * 0.3, (size, size, 3)).astype(np.float32)
    else:  # blotches: low-frequency noise, bilinearly upsampled
        n = int(rng.integers(3, 7))
        low = rng.normal(0.0, 1.0, (n, n)).astype(np.float32)
        low_img = Image.fromarray(low).resize((size, size), Image.BILINEAR)
        t = np.asarray(low_img, dtype=np.float32)
        amp = rng.uniform(10, 22)
        tint = rng.normal(0.0, 0.25, 3).astype(np.float32) + 1.0
        img = c1 + t[..., None] * amp * tint
    return np.clip(img, 0, 255).astype(np.float32), kind


def _shape_points(shape: str, cx: float, cy: float, r: float, angle: float, rng) -> np.ndarray:
    """Polygon vertices (N, 2) of a shape centred at (cx, cy) with radius r."""
    if shape == "circle":
        t = np.linspace(0, 2 * math.pi, 48, endpoint=False)
        ax = rng.uniform(0.9, 1.0)
        pts = np.stack([np.cos(t) * ax, np.sin(t)], 1)
    elif shape == "square":
        pts = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=np.float64)
    elif shape == "triangle":
        t = -math.pi / 2 + np.arange(3) * 2 * math.pi / 3
        pts = np.stack([np.cos(t), np.sin(t) + 0.15], 1)  # shift down: visually centred
    elif shape == "star":
        t = -math.pi / 2 + np.arange(10) * math.pi / 5
        rad = np.where(np.arange(10) % 2 == 0, 1.0, rng.uniform(0.42, 0.5))
        pts = np.stack([np.cos(t) * rad, np.sin(t) * rad], 1)
    elif shape == "hexagon":
        t = np.arange(6) * math.pi / 3
        pts = np.stack([np.cos(t), np.sin(t)], 1)
    elif shape == "cross":
        w = rng.uniform(0.3, 0.38)
        pts = np.array([
            [-w, -1], [w, -1], [w, -w], [1, -w], [1, w], [w, w],
            [w, 1], [-w, 1], [-w, w], [-1, w], [-1, -w], [-w, -w],
        ], dtype=np.float64)
    elif shape == "diamond":
        hw = rng.uniform(0.6, 0.7)
        pts = np.array([[0, -1], [hw, 0], [0, 1], [-hw, 0]], dtype=np.float64)
    elif shape == "heart":
        t = np.linspace(0, 2 * math.pi, 48, endpoint=False)
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        pts = np.stack([x / 17.0, (y + 2.5) / 17.0], 1)
    else:  # pragma: no cover - SHAPES is closed
        raise ValueError(shape)
    ca, sa = math.cos(angle), math.sin(angle)
    rot = np.array([[ca, -sa], [sa, ca]])
    return pts @ rot.T * r + np.array([cx, cy])


def _position_of(cx: float, cy: float, size: int) -> str:
    col = min(2, max(0, int(cx * 3 // size)))
    row = min(2, max(0, int(cy * 3 // size)))
    return POSITIONS[row * 3 + col]


def _place(rng, size: int, radius: float, placed: list, cell: int | None = None):
    """Centre for an object of ``radius`` avoiding heavy overlap with ``placed``.

    Returns (cx, cy) or None.
    """
    cell_w = size / 3.0
    for attempt in range(40):
        c = int(rng.integers(9)) if cell is None or attempt >= 20 else cell
        row, col = divmod(c, 3)
        cx = (col + rng.uniform(0.2, 0.8)) * cell_w
        cy = (row + rng.uniform(0.2, 0.8)) * cell_w
        cx = float(np.clip(cx, radius + 1, size - radius - 1))
        cy = float(np.clip(cy, radius + 1, size - radius - 1))
        if all(math.hypot(cx - px, cy - py) >= 0.9 * (radius + pr) for px, py, pr in placed):
            return cx, cy
    return None


def _make_object(rng, size: int, shape: str, color: str, obj_size: str, placed: list, cell=None):
    lo, hi = _RADIUS_FRAC[obj_size]
    radius = rng.uniform(lo, hi) * size
    centre = _place(rng, size, radius, placed, cell)
    if centre is None:
        return None
    cx, cy = centre
    rot_jitter, scale = _SHAPE_GEOM[shape]
    angle = math.radians(rng.uniform(-rot_jitter, rot_jitter)) if rot_jitter else 0.0
    pts = _shape_points(shape, cx, cy, radius * scale, angle, rng)
    rgb = np.clip(np.array(COLOR_RGB[color], dtype=np.float64) + rng.normal(0.0, 8.0, 3), 0, 255)
    placed.append((cx, cy, radius))
    x0, y0 = pts.min(0)
    x1, y1 = pts.max(0)
    return {
        "shape": shape,
        "color": color,
        "size": obj_size,
        "position": _position_of(cx, cy, size),
        "center": [round(cx / size, 4), round(cy / size, 4)],
        "bbox": [round(float(max(x0, 0)) / size, 4), round(float(max(y0, 0)) / size, 4),
                 round(float(min(x1, size)) / size, 4), round(float(min(y1, size)) / size, 4)],
        "rgb": [int(round(v)) for v in rgb],
        "_pts": pts,
        "_radius": radius,
    }


def _supersample(size: int) -> int:
    if size <= 32:
        return 4
    if size <= 96:
        return 3
    if size <= 256:
        return 2
    return 1


def _render(rng, size: int, bg: np.ndarray, objects: list) -> bytes:
    img = bg.copy()
    ss = _supersample(size)
    yy, xx = _grid(size)
    max_shift = max(2, size // 32)
    for obj in objects:
        # work on the object's bounding box (+ room for the shadow) only
        pts = obj["_pts"]
        x0 = max(0, int(math.floor(pts[:, 0].min())) - 1)
        y0 = max(0, int(math.floor(pts[:, 1].min())) - 1)
        x1 = min(size, int(math.ceil(pts[:, 0].max())) + 2 + max_shift)
        y1 = min(size, int(math.ceil(pts[:, 1].max())) + 2 + max_shift)
        w, h = x1 - x0, y1 - y0
        mask = Image.new("L", (w * ss, h * ss), 0)
        local = (pts - np.array([x0, y0])) * ss
        ImageDraw.Draw(mask).polygon([(float(x), float(y)) for x, y in local], fill=255)
        if ss > 1:
            mask = mask.resize((w, h), Image.BOX)
        alpha = np.asarray(mask, dtype=np.float32)[..., None] / 255.0
        region = img[y0:y1, x0:x1]
        if rng.random() < 0.3:  # soft drop shadow
            dx, dy = (int(v) for v in rng.integers(1, max_shift + 1, 2))
            shadow = np.zeros_like(alpha)
            shadow[dy:, dx:] = alpha[: h - dy, : w - dx]
            region = region * (1.0 - 0.35 * shadow)
        # gentle lighting gradient across the object, keeps the hue
        a = rng.uniform(0, 2 * math.pi)
        strength = rng.uniform(0.0, 0.1)
        cx, cy = obj["center"]
        r = obj["_radius"] / size
        shade = 1.0 + strength * ((xx[y0:y1, x0:x1] - cx) * math.cos(a)
                                  + (yy[y0:y1, x0:x1] - cy) * math.sin(a)) / r
        colour = np.clip(np.asarray(obj["rgb"], dtype=np.float32) * shade[..., None], 0, 255)
        img[y0:y1, x0:x1] = region * (1.0 - alpha) + colour * alpha
    img += rng.normal(0.0, rng.uniform(1.5, 5.0), img.shape).astype(np.float32)
    arr = np.clip(img + 0.5, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=JPEG_QUALITY, subsampling=0)
    return buf.getvalue()


def _public(obj: dict) -> dict:
    return {k: v for k, v in obj.items() if not k.startswith("_")}


# --------------------------------------------------------------------------
# captions
# --------------------------------------------------------------------------


def _pick(rng, seq, p_first: float | None = None):
    """Random element; with ``p_first`` the first (canonical) one has that probability."""
    if p_first is not None and len(seq) > 1:
        if rng.random() < p_first:
            return seq[0]
        return seq[1 + int(rng.integers(len(seq) - 1))]
    return seq[int(rng.integers(len(seq)))]


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def _group_objects(objects: list) -> list[dict]:
    groups: list[dict] = []
    for o in objects:
        for g in groups:
            if g["shape"] == o["shape"] and g["color"] == o["color"]:
                g["members"].append(o)
                break
        else:
            groups.append({"shape": o["shape"], "color": o["color"], "members": [o]})
    descs = []
    for g in groups:
        sizes = {m["size"] for m in g["members"]}
        n = len(g["members"])
        descs.append({
            "shape": g["shape"],
            "color": g["color"],
            "count": n,
            "size": sizes.pop() if len(sizes) == 1 else None,
            "position": g["members"][0]["position"] if n == 1 else None,
        })
    return descs


def _noun_phrase(rng, d: dict, short: bool = False) -> str:
    sg, pl = _pick(rng, SHAPE_SYNONYMS[d["shape"]], P_CANONICAL_SHAPE) if d["shape"] else ("object", "objects")
    colour = _pick(rng, COLOR_SYNONYMS[d["color"]], 0.7) if d["color"] else None
    size = _pick(rng, SIZE_SYNONYMS[d["size"]]) if d["size"] else None
    n = d["count"]
    noun = sg if n == 1 else pl
    if d["shape"] and sg == d["shape"] and d["shape"] != "heart" and rng.random() < 0.15:
        # "a red star-shaped object", "two blue circle shapes": colour next to a generic noun
        generic = _pick(rng, ("-shaped object", " shape"))
        noun = sg + generic + ("" if n == 1 else "s")
    if short:
        words = [w for w in (size, colour, noun) if w]
        if n > 1:
            words.insert(0, NUMBER_WORDS[n])
        return " ".join(words)
    pos = _pick(rng, POSITION_PHRASES[d["position"]][0]) if d["position"] else None
    if colour and colour not in _NOT_NOUNS and rng.random() < 0.2:  # "a circle in crimson"
        core = " ".join(w for w in (size, noun) if w) + f" in {colour}"
    else:
        core = " ".join(w for w in (size, colour, noun) if w)
    if n == 1:
        head = _article(core) if rng.random() < 0.92 else "one"
    elif n == 2 and rng.random() < 0.2:
        head = "a pair of"
    else:
        head = NUMBER_WORDS[n]
    text = f"{head} {core}"
    if pos:
        text += f" {pos}"
    return text


def _join(rng, items: list[str]) -> str:
    if len(items) == 1:
        return items[0]
    if len(items) == 2:
        return f"{items[0]} {_pick(rng, ('and', 'and', 'and', 'next to', 'with'))} {items[1]}"
    comma = "," if rng.random() < 0.3 else ""
    return ", ".join(items[:-1]) + f"{comma} and {items[-1]}"


def _render_caption(rng, descs: list[dict], bg_kind: str) -> str:
    bg = _pick(rng, BACKGROUND_WORDS[bg_kind])
    total = sum(d["count"] for d in descs)
    if len(descs) == 1 and descs[0]["count"] == 1:
        d = descs[0]
        options = ["np", "np", "there", "photo", "picture", "image", "close", "drawing", "bg"]
        if d["position"] and d["shape"]:
            options += ["short", "is"]
        form = _pick(rng, options)
        if form == "short":
            words = [w for w in (_pick(rng, COLOR_SYNONYMS[d["color"]], 0.7) if d["color"] else None,
                                 _pick(rng, SHAPE_SYNONYMS[d["shape"]], P_CANONICAL_SHAPE)[0]) if w]
            return f"{' '.join(words)}, {_pick(rng, POSITION_PHRASES[d['position']][1])}"
        if form == "is":
            nd = dict(d, position=None)
            phrase = _noun_phrase(rng, nd, short=True)
            return f"the {phrase} is {_pick(rng, POSITION_PHRASES[d['position']][0])}"
        np_ = _noun_phrase(rng, d)
        return {
            "np": "{}",
            "there": "there is {}",
            "photo": "a photo of {}",
            "picture": "a picture of {}",
            "image": "an image of {}",
            "close": "close-up of {}",
            "drawing": "simple drawing of {}",
            "bg": "{} on a " + bg + " background",
        }[form].format(np_)
    forms = ["list", "list", "there", "picture", "image", "bg", "scene", "short"]
    if len(descs) > 1:
        forms.append("count")
    form = _pick(rng, forms)
    if form == "short":
        return ", ".join(_noun_phrase(rng, d, short=True) for d in descs)
    items = _join(rng, [_noun_phrase(rng, d) for d in descs])
    if form == "there":
        return f"there {'is' if descs[0]['count'] == 1 else 'are'} {items}"
    if form == "count":
        return f"{NUMBER_WORDS[total]} shapes: {items}"
    return {
        "list": "{}",
        "picture": "a picture of {}",
        "image": "an image with {}",
        "bg": "{} on a " + bg + " background",
        "scene": "a scene containing {}",
    }[form].format(items)


def _render_plain(descs: list[dict]) -> str:
    """"a red circle and two squares": per group a count, maybe its colour, the canonical shape word."""
    items = []
    for d in descs:
        n = d["count"]
        if d["shape"]:
            noun = SHAPE_SYNONYMS[d["shape"]][0][0 if n == 1 else 1]
        else:  # the shape dropped by caption noise
            noun = "object" if n == 1 else "objects"
        core = f"{d['color']} {noun}" if d["color"] else noun
        items.append(f"{_article(core)} {core}" if n == 1 else f"{NUMBER_WORDS[n]} {core}")
    return " and ".join(items)


def _filler(rng) -> str:
    f = _pick(rng, FILLERS)
    return f.format(n4=int(rng.integers(1000, 10000)), n2=int(rng.integers(1, 100)))


def _make_caption(rng, objects: list, bg_kind: str, noise: float, held_out: set,
                  captions: str = "rich") -> tuple[str, list[str]]:
    descs = _group_objects(objects)
    p_pos = 0.6 if len(descs) == 1 else 0.35
    plain = captions == "plain"
    for d in descs:
        if plain:
            d["size"] = d["position"] = None
        if d["size"] and rng.random() > 0.55:
            d["size"] = None
        # alt-text often names the shape without its colour ("a circle on the left"); without such
        # captions colour alone separates most pairs of a batch and shape is learnt far more slowly
        if d["color"] and d["shape"] and rng.random() < (P_COLOR_OMITTED_PLAIN if plain else P_COLOR_OMITTED):
            d["color"] = None
        if d["position"] and rng.random() > p_pos:
            d["position"] = None
    ops: list[str] = []
    if noise > 0 and rng.random() < noise:
        op = _pick(rng, ("drop", "swap", "filler", "truncate"))
        if op == "drop":
            d = descs[int(rng.integers(len(descs)))]
            attrs = [a for a in ("color", "color", "size", "position", "shape") if d[a]]
            a = _pick(rng, attrs)
            d[a] = None
            ops.append(f"drop_{a}")
        elif op == "swap":
            d = descs[int(rng.integers(len(descs)))]
            wrong = [c for c in COLORS if c != d["color"] and (d["shape"], c) not in held_out]
            d["color"] = _pick(rng, wrong)
            ops.append("swap_color")
        else:
            ops.append(op)
    text = _render_plain(descs) if plain else _render_caption(rng, descs, bg_kind)
    if rng.random() < 0.25:
        text = text[0].upper() + text[1:]
    if rng.random() < 0.3:
        text += "."
    if "truncate" in ops:
        words = text.split()
        if len(words) >= 3:  # keep at least half of the words
            text = " ".join(words[: int(rng.integers(max(2, len(words) // 2), len(words)))])
    if "filler" in ops:
        f = _filler(rng)
        sep = _pick(rng, (" - ", " | ", ", ", " "))
        text = f"{f}{sep}{text}" if rng.random() < 0.5 else f"{text}{sep}{f}"
    return text, ops


# --------------------------------------------------------------------------
# samples
# --------------------------------------------------------------------------


def _train_sample(seed: int, index: int, size: int, noise: float, held_out: set, captions: str = "rich"):
    rng = np.random.default_rng([seed, _STREAM_TRAIN, index])
    bg, bg_kind = _background(rng, size)
    n = int(rng.choice([1, 2, 3], p=list(P_NUM_OBJECTS)))
    p_large = 0.5 if n == 1 else (0.4 if n == 2 else 0.3)
    objects: list[dict] = []
    placed: list = []
    for k in range(n):
        if k > 0 and rng.random() < 0.25:  # repeated object -> counts in captions
            shape, color = objects[-1]["shape"], objects[-1]["color"]
        else:
            shape = SHAPES[int(rng.integers(len(SHAPES)))]
            allowed = [c for c in COLORS if (shape, c) not in held_out]
            color = allowed[int(rng.integers(len(allowed)))]
        obj_size = "large" if rng.random() < p_large else "small"
        obj = _make_object(rng, size, shape, color, obj_size, placed)
        if obj is None and obj_size == "large":
            obj = _make_object(rng, size, shape, color, "small", placed)
        if obj is not None:
            objects.append(obj)
    # the first object always fits on an empty canvas, so 1 <= len(objects) <= 3
    jpg = _render(rng, size, bg, objects)
    caption, ops = _make_caption(rng, objects, bg_kind, noise, held_out, captions)
    key = f"train_{index:07d}"
    meta = {
        "key": key,
        "objects": [_public(o) for o in objects],
        "background": bg_kind,
        "caption": caption,
        "caption_noised": bool(ops),
        "noise_ops": ops,
    }
    return key, [("jpg", jpg), ("txt", caption.encode("utf-8")), ("json", _json_bytes(meta))]


def _eval_sample(seed: int, task: str, index: int, size: int):
    t = TASKS.index(task)
    rng = np.random.default_rng([seed, _STREAM_EVAL, t, index])
    label = index % len(classnames(task))
    shape, color = _label_to_attrs(task, label, rng)
    bg, bg_kind = _background(rng, size)
    obj_size = SIZES[int(rng.integers(2))]
    cell = int(rng.integers(9))
    obj = _make_object(rng, size, shape, color, obj_size, [], cell)
    jpg = _render(rng, size, bg, [obj])
    key = f"eval_{task}_{index:06d}"
    meta = {
        "key": key,
        "task": task,
        "label": label,
        "classname": classnames(task)[label],
        "objects": [_public(obj)],
        "background": bg_kind,
    }
    return key, [("jpg", jpg), ("cls", str(label).encode("ascii")), ("json", _json_bytes(meta))]


def _json_bytes(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode("utf-8")


# --------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------


def _add_member(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = TAR_MTIME
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    info.type = tarfile.REGTYPE
    tf.addfile(info, io.BytesIO(data))


def _clean(directory: Path) -> None:
    """Remove files this generator owns so a smaller dataset leaves no stale shards."""
    if not directory.is_dir():
        return
    for p in directory.iterdir():
        if p.is_file() and (p.name.endswith(".tar") or p.name.endswith(".tmp")
                            or p.name in ("sizes.json", "classnames.txt", "templates.txt")):
            p.unlink()


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _write_shards(directory: Path, n: int, shard_size: int, make_sample, pbar) -> list[str]:
    directory.mkdir(parents=True, exist_ok=True)
    _clean(directory)
    sizes: dict[str, int] = {}
    num_shards = (n + shard_size - 1) // shard_size
    if num_shards > 100000:
        raise ValueError(
            f"{num_shards} shards would not fit 5-digit shard names; raise --shard-size"
        )
    for s in range(num_shards):
        name = f"{s:05d}.tar"
        lo, hi = s * shard_size, min(n, (s + 1) * shard_size)
        tmp = directory / (name + ".tmp")
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tf:
            for i in range(lo, hi):
                key, parts = make_sample(i)
                for ext, data in parts:
                    _add_member(tf, f"{key}.{ext}", data)
                pbar.update(1)
        os.replace(tmp, directory / name)
        sizes[name] = hi - lo
    _write_text(directory / "sizes.json", json.dumps(sizes, indent=1, sort_keys=True) + "\n")
    return list(sizes)


def _pattern(prefix: str, shards: list[str]) -> str:
    if len(shards) == 1:
        return f"{prefix}/{shards[0]}"
    return f"{prefix}/{{{shards[0][:-4]}..{shards[-1][:-4]}}}.tar"


def generate(out, num_samples, shard_size, seed, image_size=64, noise=0.1, eval_per_class=8,
             progress=True, captions="rich") -> dict:
    """Generate the dataset under ``out`` and return its manifest (also written to
    ``out/manifest.json``, last, so a present manifest means a complete dataset)."""
    args = _validate(num_samples, shard_size, seed, image_size, noise, eval_per_class, captions)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / "manifest.json"
    if manifest_path.exists():
        manifest_path.unlink()
    seed, size = args["seed"], args["image_size"]
    held = held_out_pairs(seed)
    held_set = set(held)
    eval_counts = {t: len(classnames(t)) * args["eval_per_class"] for t in TASKS}
    total = args["num_samples"] + sum(eval_counts.values())

    from tqdm.auto import tqdm

    with tqdm(total=total, disable=not progress, desc="synthetic shapes", unit="img",
              dynamic_ncols=True) as pbar:
        train_shards = _write_shards(
            out / "train", args["num_samples"], args["shard_size"],
            lambda i: _train_sample(seed, i, size, args["noise"], held_set, args["captions"]), pbar,
        )
        eval_info = {}
        for task in TASKS:
            d = out / "eval" / task
            shards = _write_shards(
                d, eval_counts[task], args["shard_size"],
                lambda i, task=task: _eval_sample(seed, task, i, size), pbar,
            )
            names = classnames(task)
            tmpl = templates(task)
            _write_text(d / "classnames.txt", "\n".join(names) + "\n")
            _write_text(d / "templates.txt", "\n".join(tmpl) + "\n")
            eval_info[task] = {
                "dir": f"eval/{task}",
                "num_classes": len(names),
                "num_samples": eval_counts[task],
                "shards": shards,
                "pattern": _pattern(f"eval/{task}", shards),
                "classnames": names,
                "templates": tmpl,
            }

    manifest = {
        "generator": "declip_ds.data.synthetic",
        "version": GENERATOR_VERSION,
        "args": args,
        "shapes": list(SHAPES),
        "colors": list(COLORS),
        "sizes": list(SIZES),
        "positions": list(POSITIONS),
        "held_out_pairs": [[s, c] for s, c in held],
        "held_out_classnames": [f"{c} {s}" for s, c in held],
        "tasks": list(TASKS),
        "counts": {
            "train": args["num_samples"],
            "train_shards": len(train_shards),
            "eval": eval_counts,
        },
        "train": {
            "dir": "train",
            "num_samples": args["num_samples"],
            "shards": train_shards,
            "pattern": _pattern("train", train_shards),
        },
        "eval": eval_info,
    }
    _write_text(manifest_path, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def _manifest_matches(root: Path, args: dict) -> bool:
    try:
        manifest = json.loads((root / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    made = manifest.get("args")
    if isinstance(made, dict):
        made = {"captions": "rich", **made}  # made before the option existed: rich captions
    if manifest.get("version") != GENERATOR_VERSION or made != args:
        return False
    try:
        dirs = [(root / manifest["train"]["dir"], manifest["train"]["shards"])]
        dirs += [(root / e["dir"], e["shards"]) for e in manifest["eval"].values()]
    except (KeyError, TypeError, AttributeError):
        return False
    return all((d / "sizes.json").is_file() and all((d / s).is_file() for s in shards)
               for d, shards in dirs)


@contextlib.contextmanager
def _lock(root: Path):
    """Inter-process lock so concurrent ranks don't generate into the same dir."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    with open(root / ".synthetic.lock", "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def ensure_dataset(root, num_samples=8192, shard_size=1024, seed=0, image_size=64, noise=0.1,
                   eval_per_class=8, progress=True, captions="rich") -> Path:
    """Return ``root``, generating the dataset there only if ``root/manifest.json`` is
    missing, from another generator version, made with different arguments, or its
    shards are missing.  Safe to call from several processes at once (file lock)."""
    args = _validate(num_samples, shard_size, seed, image_size, noise, eval_per_class, captions)
    root = Path(root)
    if _manifest_matches(root, args):
        return root
    root.mkdir(parents=True, exist_ok=True)
    with _lock(root):
        if not _manifest_matches(root, args):  # another process may have just made it
            generate(root, progress=progress, **args)
    return root


# --------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m declip_ds.data.synthetic",
        description="Generate the synthetic 'shapes' image-caption dataset "
                    "(webdataset tar shards + zero-shot eval splits).",
    )
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--num-samples", type=int, default=8192, help="training samples (default 8192)")
    p.add_argument("--shard-size", type=int, default=1024, help="samples per tar shard (default 1024)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--image-size", type=int, default=64, help="image side in pixels, >= 16 (default 64)")
    p.add_argument("--noise", type=float, default=0.1,
                   help="probability of corrupting a caption like web alt-text, in [0, 1] (default 0.1)")
    p.add_argument("--eval-per-class", type=int, default=8,
                   help="eval images per class per task (default 8)")
    p.add_argument("--captions", choices=CAPTION_STYLES, default="rich",
                   help="caption style: rich (varied alt-text-like wording, the default) or plain "
                        "('a red circle and two squares'; what the demo trains on)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    return p


def main(argv=None) -> int:
    parser = _build_parser()
    ns = parser.parse_args(argv)
    kwargs = dict(num_samples=ns.num_samples, shard_size=ns.shard_size, seed=ns.seed,
                  image_size=ns.image_size, noise=ns.noise, eval_per_class=ns.eval_per_class,
                  captions=ns.captions)
    try:
        _validate(**kwargs)
    except ValueError as e:
        parser.error(str(e))
    t0 = time.perf_counter()
    manifest = generate(ns.out, progress=not ns.quiet, **kwargs)
    if not ns.quiet:
        ev = ", ".join(f"{t}={n}" for t, n in manifest["counts"]["eval"].items())
        print(f"wrote {manifest['counts']['train']} training samples in "
              f"{manifest['counts']['train_shards']} shards and eval splits ({ev}) to {ns.out} "
              f"in {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
