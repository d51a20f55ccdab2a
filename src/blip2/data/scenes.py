"""Procedural scenes: coloured shapes on a plain background, with captions and QA derived from
the scene description. Deterministic from a seed; written as Karpathy-style JSON + PNG files so
every reader, cache and evaluator treats them like real data.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

COLORS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 210, 40),
    "purple": (140, 60, 180), "orange": (245, 140, 30), "white": (250, 250, 250), "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle", "star")
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
NUMBERS = ("zero", "one", "two", "three", "four")


@dataclass
class Shape:
    shape: str
    color: str
    cell: int  # 0..8 in a 3x3 grid, row-major
    large: bool

    @property
    def position(self) -> str:
        return POSITIONS[self.cell]

    def phrase(self, with_size: bool = False) -> str:
        size = ("large " if self.large else "small ") if with_size else ""
        return f"a {size}{self.color} {self.shape}"


def sample_scene(rng: random.Random) -> list[Shape]:
    n = rng.choice((1, 2, 2, 3))
    combos = rng.sample([(s, c) for s in SHAPES for c in COLORS], n)
    cells = rng.sample(range(9), n)
    return [Shape(s, c, cell, rng.random() < 0.5) for (s, c), cell in zip(combos, cells, strict=True)]


def render(shapes: list[Shape], size: int, rng: random.Random) -> Image.Image:
    bg = tuple(rng.randint(120, 170) for _ in range(3))
    img = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(img)
    cell = size / 3
    for s in shapes:
        r = cell * (0.42 if s.large else 0.26)
        cx = (s.cell % 3 + 0.5) * cell + rng.uniform(-0.08, 0.08) * cell
        cy = (s.cell // 3 + 0.5) * cell + rng.uniform(-0.08, 0.08) * cell
        fill = COLORS[s.color]
        if s.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif s.shape == "square":
            draw.rectangle([cx - r * 0.85, cy - r * 0.85, cx + r * 0.85, cy + r * 0.85], fill=fill)
        elif s.shape == "triangle":
            draw.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=fill)
        else:  # five-pointed star
            pts = []
            for k in range(10):
                rad = r if k % 2 == 0 else r * 0.45
                a = -math.pi / 2 + k * math.pi / 5
                pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
            draw.polygon(pts, fill=fill)
    return img


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def captions(shapes: list[Shape], rng: random.Random) -> list[str]:
    n = len(shapes)
    noun = "shape" if n == 1 else "shapes"
    caps = [
        _join([f"{s.phrase(True)} at the {s.position}" for s in shapes]),
        f"{NUMBERS[n]} {noun}: " + _join([s.phrase() for s in shapes]),
        "there is " + _join([s.phrase() for s in rng.sample(shapes, n)]),
        "a picture of " + _join([f"{s.phrase()} on the {s.position}" for s in rng.sample(shapes, n)]),
        _join([s.phrase(True) for s in shapes]) + " on a grey background",
    ]
    return caps


def questions(shapes: list[Shape], rng: random.Random) -> list[dict[str, str]]:
    """Question/answer pairs whose answers follow from the scene description alone."""
    qa = [{"question": "how many shapes are there?", "answer": NUMBERS[len(shapes)]}]
    target = rng.choice(shapes)
    if sum(s.shape == target.shape for s in shapes) == 1:
        qa.append({"question": f"what color is the {target.shape}?", "answer": target.color})
    if sum(s.color == target.color for s in shapes) == 1:
        qa.append({"question": f"what shape is {target.color}?", "answer": target.shape})
    qa.append({"question": f"where is the {target.color} {target.shape}?", "answer": target.position})
    present = {(s.shape, s.color) for s in shapes}
    if rng.random() < 0.5:
        s = rng.choice(shapes)
        qa.append({"question": f"is there a {s.color} {s.shape}?", "answer": "yes"})
    else:
        absent = rng.choice([(sh, c) for sh in SHAPES for c in COLORS if (sh, c) not in present])
        qa.append({"question": f"is there a {absent[1]} {absent[0]}?", "answer": "no"})
    return qa


def write_scenes(out: str | Path, n_train: int, n_val: int, size: int = 224, seed: int = 0) -> Path:
    """Write images/ and scenes.json (Karpathy-style, with per-image "qa"); returns the JSON path."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    entries = []
    for i in range(n_train + n_val):
        shapes = sample_scene(rng)
        name = f"scene_{i:05d}.png"
        path = out / "images" / name
        img = render(shapes, size, rng)
        if not path.exists():
            img.save(path)
        entries.append({
            "filename": name, "imgid": i, "split": "train" if i < n_train else "val",
            "sentences": [{"raw": c} for c in captions(shapes, rng)],
            "qa": questions(shapes, rng),
            "objects": [{"shape": s.shape, "color": s.color, "position": s.position,
                         "size": "large" if s.large else "small"} for s in shapes],
        })
    ann = out / "scenes.json"
    ann.write_text(json.dumps({"dataset": "procedural_scenes", "seed": seed, "images": entries}))
    return ann
