"""Deterministic synthetic visual-question-answering task ("shapes VQA").

A scene is a 64x64 image split into a 2x2 grid; each occupied cell holds one
coloured shape with a jittered size and centre. (shape, colour) pairs are unique in a
scene so every question has exactly one answer. Five question types:

========== ========================================= ===========================
type       question                                  answers
========== ========================================= ===========================
color      what color is the {shape} ?               red, green, blue, yellow
shape      what shape is the {color} object ?        circle, square, triangle
count      how many objects are there ?              one, two, three
presence   is there a {color} {shape} ?              yes, no (balanced)
position   where is the {color} {shape} ?            top left, top right, ...
========== ========================================= ===========================

Sample ``i`` of a split is drawn from ``numpy.random.default_rng([split_seed, i])``,
so any sample can be regenerated alone and splits never depend on each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 64
GRID = 2
SHAPES = ("circle", "square", "triangle")
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 80, 230),
    "yellow": (235, 215, 40),
}
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
COUNT_WORDS = ("zero", "one", "two", "three")
QUESTION_TYPES = ("color", "shape", "count", "presence", "position")
BACKGROUND = (30, 30, 30)
MAX_OBJECTS = 3

SPLIT_SEEDS = {"train": 0, "calib": 1, "eval": 2}
SPLIT_SIZES = {"calib": 64, "eval": 500}


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    cell: int  # 0..3, row-major over the 2x2 grid
    radius: int
    dx: int
    dy: int


@dataclass(frozen=True)
class Sample:
    """One visual question with its answer; ``image`` is an RGB PIL image."""

    image: Image.Image = field(repr=False)
    question: str
    answer: str
    qtype: str
    image_path: str | None = None


def render(objects: list[SceneObject]) -> Image.Image:
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND)
    draw = ImageDraw.Draw(img)
    cell_px = IMAGE_SIZE // GRID
    for obj in objects:
        row, col = divmod(obj.cell, GRID)
        cx = col * cell_px + cell_px // 2 + obj.dx
        cy = row * cell_px + cell_px // 2 + obj.dy
        r = obj.radius
        fill = COLORS[obj.color]
        if obj.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif obj.shape == "square":
            s = int(round(r * 0.85))
            draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r - 1), (cx + r, cy + r - 1)], fill=fill)
    return img


def _random_scene(rng: np.random.Generator) -> list[SceneObject]:
    n = int(rng.integers(1, MAX_OBJECTS + 1))
    cells = rng.permutation(GRID * GRID)[:n]
    pairs = [(s, c) for s in SHAPES for c in COLORS]
    chosen = rng.permutation(len(pairs))[:n]
    return [
        SceneObject(
            shape=pairs[k][0],
            color=pairs[k][1],
            cell=int(cell),
            radius=int(rng.integers(8, 12)),
            dx=int(rng.integers(-3, 4)),
            dy=int(rng.integers(-3, 4)),
        )
        for k, cell in zip(chosen, cells)
    ]


def _question(rng: np.random.Generator, objs: list[SceneObject], qtype: str) -> tuple[str, str] | None:
    """A (question, answer) of ``qtype`` for the scene, or None if the scene has none."""
    if qtype == "color":
        unique = [o for o in objs if sum(p.shape == o.shape for p in objs) == 1]
        if not unique:
            return None
        o = unique[int(rng.integers(len(unique)))]
        return f"what color is the {o.shape} ?", o.color
    if qtype == "shape":
        unique = [o for o in objs if sum(p.color == o.color for p in objs) == 1]
        if not unique:
            return None
        o = unique[int(rng.integers(len(unique)))]
        return f"what shape is the {o.color} object ?", o.shape
    if qtype == "count":
        return "how many objects are there ?", COUNT_WORDS[len(objs)]
    if qtype == "presence":
        present = {(o.color, o.shape) for o in objs}
        if rng.random() < 0.5:
            color, shape = sorted(present)[int(rng.integers(len(present)))]
            return f"is there a {color} {shape} ?", "yes"
        absent = sorted({(c, s) for c in COLORS for s in SHAPES} - present)
        # Half the negatives share a colour or a shape with the scene: the hard cases.
        near = [p for p in absent if any(p[0] == a or p[1] == b for a, b in present)]
        pool = near if near and rng.random() < 0.5 else absent
        color, shape = pool[int(rng.integers(len(pool)))]
        return f"is there a {color} {shape} ?", "no"
    if qtype == "position":
        o = objs[int(rng.integers(len(objs)))]
        return f"where is the {o.color} {o.shape} ?", POSITIONS[o.cell]
    raise ValueError(f"unknown question type {qtype!r}")


def _draw(split_seed: int, index: int) -> tuple[list[SceneObject], str, str, str]:
    rng = np.random.default_rng([split_seed, index])
    qtype = QUESTION_TYPES[index % len(QUESTION_TYPES)]
    while True:
        objs = _random_scene(rng)
        qa = _question(rng, objs, qtype)
        if qa is not None:
            return objs, qtype, qa[0], qa[1]


def make_sample(split_seed: int, index: int) -> Sample:
    """Sample ``index`` of the split seeded ``split_seed``; types cycle so splits are balanced."""
    objs, qtype, question, answer = _draw(split_seed, index)
    return Sample(image=render(objs), question=question, answer=answer, qtype=qtype)


def make_split(name: str, n: int | None = None) -> list[Sample]:
    """The built-in ``calib`` (64) or ``eval`` (500) split, or the first ``n`` of ``train``."""
    if name not in SPLIT_SEEDS:
        raise ValueError(f"unknown split {name!r}; choose one of {sorted(SPLIT_SEEDS)}")
    size = n if n is not None else SPLIT_SIZES.get(name)
    if size is None:
        raise ValueError("the train split is a stream: pass n")
    return [make_sample(SPLIT_SEEDS[name], i) for i in range(size)]


def scene_targets(split_seed: int, index: int) -> np.ndarray:
    """Per-cell (shape class, colour class) targets of a sample, for vision pre-training.

    Shape class 0 and colour class 0 mean an empty cell.
    """
    objs = _draw(split_seed, index)[0]
    targets = np.zeros((GRID * GRID, 2), dtype=np.int64)
    colors = list(COLORS)
    for o in objs:
        targets[o.cell] = (SHAPES.index(o.shape) + 1, colors.index(o.color) + 1)
    return targets


def vocabulary() -> list[str]:
    """Every word the task's questions, answers and prompt template use."""
    words = {"what", "color", "is", "the", "shape", "object", "how", "many", "objects",
             "are", "there", "a", "where", "?", "user", "assistant", ":"}
    words |= set(SHAPES) | set(COLORS) | set(COUNT_WORDS) | {"yes", "no"}
    for p in POSITIONS:
        words |= set(p.split())
    return sorted(words)
