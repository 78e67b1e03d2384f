"""A procedural world of subjects: toy objects whose identity is a combination of attributes, shown in
varied contexts described by template captions. Used by the demo, the tests and the toy study.

Identity = (shape, primary colour, secondary colour, pattern, marking); context = (background,
position, scale). Identities are split deterministically into 'train' and 'heldout' sets, so a model
trained on one split can be evaluated on subjects it has never seen.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star", "diamond", "hexagon", "cross", "ring")
COLOURS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (240, 210, 40),
    "purple": (140, 60, 190), "orange": (245, 130, 30), "cyan": (40, 200, 210), "pink": (240, 120, 180),
}
PATTERNS = ("solid", "stripes", "dots", "checker", "halves")
MARKINGS = ("none", "dot", "bar", "star")
BACKGROUNDS = {
    "white": (235, 235, 235), "black": (25, 25, 30), "gray": (128, 128, 128), "sand": (214, 190, 140),
    "sky": (150, 200, 245), "grass": (110, 160, 80), "brick": (150, 70, 55), "night": (30, 35, 80),
}
POSITIONS = {"on the left": 0.3, "in the center": 0.5, "on the right": 0.7}
SCALES = {"small": 0.38, "large": 0.62}
SUPERSAMPLE = 4


@dataclass(frozen=True)
class Subject:
    shape: str
    primary: str
    secondary: str
    pattern: str
    marking: str

    @property
    def id(self) -> str:
        return f"{self.shape}-{self.primary}-{self.secondary}-{self.pattern}-{self.marking}"

    def labels(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Context:
    background: str
    position: str
    scale: str

    def labels(self) -> dict:
        return asdict(self)


def _split_of(subject: Subject, seed: int, heldout_fraction: float) -> str:
    digest = hashlib.sha256(f"{seed}/{subject.id}".encode()).digest()
    return "heldout" if int.from_bytes(digest[:4], "little") / 2**32 < heldout_fraction else "train"


class SyntheticWorld:
    def __init__(self, seed: int = 0, heldout_fraction: float = 0.2):
        self.seed, self.heldout_fraction = seed, heldout_fraction

    def all_subjects(self) -> list[Subject]:
        return [
            Subject(shape, primary, secondary, pattern, marking)
            for shape, primary, secondary, pattern, marking in itertools.product(SHAPES, COLOURS, COLOURS, PATTERNS, MARKINGS)
            if primary != secondary
        ]

    def subjects(self, n: int, split: str = "train") -> list[Subject]:
        """``n`` distinct identities of one split, in a seeded order (disjoint across splits)."""
        if split not in ("train", "heldout"):
            raise ValueError("split must be 'train' or 'heldout'")
        pool = [s for s in self.all_subjects() if _split_of(s, self.seed, self.heldout_fraction) == split]
        random.Random(f"{self.seed}/{split}").shuffle(pool)
        if n > len(pool):
            raise ValueError(f"only {len(pool)} {split} subjects exist")
        return pool[:n]

    @staticmethod
    def sample_context(rng: random.Random) -> Context:
        return Context(rng.choice(list(BACKGROUNDS)), rng.choice(list(POSITIONS)), rng.choice(list(SCALES)))

    @staticmethod
    def caption(context: Context, subject_token: str | None = None, class_word: str = "toy") -> str:
        """'a photo of a [token] toy on a sand background, on the left, small' (no token: class-level)."""
        noun = f"{subject_token} {class_word}" if subject_token else class_word
        return f"a photo of a {noun} on a {context.background} background, {context.position}, {context.scale}"

    def render(self, subject: Subject, context: Context, size: int = 64) -> Image.Image:
        big = size * SUPERSAMPLE
        canvas = Image.new("RGB", (big, big), BACKGROUNDS[context.background])
        extent = int(big * SCALES[context.scale])
        centre_x, centre_y = int(big * POSITIONS[context.position]), big // 2
        fill = Image.fromarray(_pattern(subject, extent))
        mask = Image.new("L", (extent, extent), 0)
        _draw_shape(ImageDraw.Draw(mask), subject.shape, extent)
        _draw_marking(fill, subject, extent)
        canvas.paste(fill, (centre_x - extent // 2, centre_y - extent // 2), mask)
        return canvas.resize((size, size), Image.LANCZOS)


def _pattern(subject: Subject, extent: int) -> np.ndarray:
    primary, secondary = np.array(COLOURS[subject.primary], np.uint8), np.array(COLOURS[subject.secondary], np.uint8)
    y, x = np.mgrid[0:extent, 0:extent]
    period = max(2, extent // 5)
    if subject.pattern == "solid":
        use_secondary = np.zeros_like(x, dtype=bool)
    elif subject.pattern == "stripes":
        use_secondary = ((x + y) // (period // 2 + 1)) % 2 == 1
    elif subject.pattern == "dots":
        cx, cy = (x % period) - period / 2, (y % period) - period / 2
        use_secondary = cx * cx + cy * cy < (period * 0.28) ** 2
    elif subject.pattern == "checker":
        use_secondary = ((x // period) + (y // period)) % 2 == 1
    else:  # halves
        use_secondary = y > extent // 2
    return np.where(use_secondary[..., None], secondary, primary).astype(np.uint8)


def _regular_polygon(sides: int, extent: int, rotation: float = -np.pi / 2, inner: float | None = None):
    radius, centre = extent / 2 * 0.95, extent / 2
    points = []
    count = sides * (2 if inner else 1)
    for i in range(count):
        r = radius if inner is None or i % 2 == 0 else radius * inner
        angle = rotation + 2 * np.pi * i / count
        points.append((centre + r * np.cos(angle), centre + r * np.sin(angle)))
    return points


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, extent: int) -> None:
    pad = extent * 0.03
    box = (pad, pad, extent - pad, extent - pad)
    if shape == "circle":
        draw.ellipse(box, fill=255)
    elif shape == "square":
        draw.rectangle((extent * 0.1, extent * 0.1, extent * 0.9, extent * 0.9), fill=255)
    elif shape == "triangle":
        draw.polygon(_regular_polygon(3, extent), fill=255)
    elif shape == "star":
        draw.polygon(_regular_polygon(5, extent, inner=0.45), fill=255)
    elif shape == "diamond":
        draw.polygon(_regular_polygon(4, extent), fill=255)
    elif shape == "hexagon":
        draw.polygon(_regular_polygon(6, extent, rotation=0.0), fill=255)
    elif shape == "cross":
        third = extent / 3
        draw.rectangle((third, pad, 2 * third, extent - pad), fill=255)
        draw.rectangle((pad, third, extent - pad, 2 * third), fill=255)
    elif shape == "ring":
        draw.ellipse(box, fill=255)
        draw.ellipse((extent * 0.3, extent * 0.3, extent * 0.7, extent * 0.7), fill=0)
    else:
        raise ValueError(f"unknown shape {shape}")


def _draw_marking(fill: Image.Image, subject: Subject, extent: int) -> None:
    if subject.marking == "none":
        return
    draw = ImageDraw.Draw(fill)
    # The mark is black or white (whichever contrasts with the primary colour), near the top.
    brightness = sum(COLOURS[subject.primary]) / 3
    ink = (20, 20, 20) if brightness > 110 else (245, 245, 245)
    cx, cy, r = extent * 0.5, extent * 0.36, extent * 0.11
    if subject.marking == "dot":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=ink)
    elif subject.marking == "bar":
        draw.rectangle((cx - 2.2 * r, cy - 0.55 * r, cx + 2.2 * r, cy + 0.55 * r), fill=ink)
    elif subject.marking == "star":
        points = [(cx + x - extent / 2 * 0.3, cy + y - extent / 2 * 0.3) for x, y in _regular_polygon(5, extent * 0.3, inner=0.45)]
        draw.polygon(points, fill=ink)


def write_synthetic_dataset(folder: str | Path, n_subjects: int, images_per_subject: int, size: int = 64, seed: int = 0,
                            split: str = "train", class_word: str = "toy") -> Path:
    """A folder SubjectFolderDataset reads: one sub-folder per subject, per-image caption files
    (with a ``{token}`` placeholder), ``class.txt`` and the ground-truth ``labels.json``."""
    folder = Path(folder)
    world = SyntheticWorld(seed)
    rng = random.Random(f"{seed}/contexts/{split}")
    for subject in world.subjects(n_subjects, split):
        subject_dir = folder / subject.id
        subject_dir.mkdir(parents=True, exist_ok=True)
        contexts = []
        for i in range(images_per_subject):
            context = world.sample_context(rng)
            world.render(subject, context, size).save(subject_dir / f"{i:02d}.png")
            (subject_dir / f"{i:02d}.txt").write_text(world.caption(context, "{token}", class_word) + "\n")
            contexts.append(context.labels())
        (subject_dir / "class.txt").write_text(class_word + "\n")
        (subject_dir / "labels.json").write_text(json.dumps({"subject": subject.labels(), "contexts": contexts}))
    return folder
