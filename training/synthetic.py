"""A procedural world of subjects: toy objects whose identity is a combination of attributes, shown in
varied contexts described by template captions. Used by the demo, the tests and the toy study.

Identity = (shape, primary colour, secondary colour, pattern, marking); context = (background,
position, scale). Every identity attribute stays visible at 64 px and after the toy VAE: the primary
colour covers most of the object, every pattern shows the secondary colour as a clear minority, and the
markings are large enough to read. Identities are split deterministically into 'train' and 'heldout'
sets, so a model trained on one split can be evaluated on subjects it has never seen.

Captions name the context and, optionally, the identity in words:
``a photo of a toy on a sand background, on the left, small`` (class level),
``a photo of a sks toy on ...`` (the subject's placeholder), or
``a photo of a red and blue striped star toy with a dot marking on ...`` (described).
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
PATTERNS = {"stripes": "striped", "dots": "dotted", "border": "bordered", "band": "banded"}  # name -> caption word
MARKINGS = ("none", "dot", "bar", "star")
BACKGROUNDS = {
    "white": (235, 235, 235), "black": (25, 25, 30), "gray": (128, 128, 128), "sand": (214, 190, 140),
    "sky": (150, 200, 245), "grass": (110, 160, 80), "brick": (150, 70, 55), "night": (30, 35, 80),
}
POSITIONS = {"on the left": 0.34, "in the center": 0.5, "on the right": 0.66}
SCALES = {"small": 0.5, "large": 0.72}
IDENTITY_ATTRIBUTES = ("shape", "primary", "secondary", "pattern", "marking")
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

    def describe(self, attributes=IDENTITY_ATTRIBUTES, class_word: str = "toy") -> str:
        """The subject in words, e.g. 'red and blue striped star toy with a dot marking'; ``attributes``
        chooses which identity attributes are named (the secondary colour only together with the primary)."""
        words = []
        if "primary" in attributes:
            words.append(self.primary + (f" and {self.secondary}" if "secondary" in attributes else ""))
        if "pattern" in attributes:
            words.append(PATTERNS[self.pattern])
        if "shape" in attributes:
            words.append(self.shape)
        words.append(class_word)
        if "marking" in attributes:
            words.append("with no marking" if self.marking == "none" else f"with a {self.marking} marking")
        return " ".join(words)


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


def _article(noun: str) -> str:
    return "an" if noun[:1] in "aeiou" else "a"


class SyntheticWorld:
    def __init__(self, seed: int = 0, heldout_fraction: float = 0.2):
        self.seed, self.heldout_fraction = seed, heldout_fraction

    def all_subjects(self) -> list[Subject]:
        return [
            Subject(shape, primary, secondary, pattern, marking)
            for shape, primary, secondary, pattern, marking in itertools.product(SHAPES, COLOURS, COLOURS, PATTERNS, MARKINGS)
            if primary != secondary
        ]

    def subjects(self, n: int | None, split: str = "train") -> list[Subject]:
        """``n`` distinct identities of one split (all of them for ``None``), in a seeded order (disjoint across splits)."""
        if split not in ("train", "heldout"):
            raise ValueError("split must be 'train' or 'heldout'")
        pool = [s for s in self.all_subjects() if _split_of(s, self.seed, self.heldout_fraction) == split]
        random.Random(f"{self.seed}/{split}").shuffle(pool)
        if n is None:
            return pool
        if n > len(pool):
            raise ValueError(f"only {len(pool)} {split} subjects exist")
        return pool[:n]

    @staticmethod
    def sample_context(rng: random.Random) -> Context:
        return Context(rng.choice(list(BACKGROUNDS)), rng.choice(list(POSITIONS)), rng.choice(list(SCALES)))

    @staticmethod
    def caption(context: Context, subject_token: str | None = None, class_word: str = "toy", description: str | None = None) -> str:
        """'a photo of a [token] toy on a sand background, on the left, small'; ``description`` (from
        :meth:`Subject.describe`) replaces the noun phrase."""
        noun = description or (f"{subject_token} {class_word}" if subject_token else class_word)
        return f"a photo of {_article(noun)} {noun} on a {context.background} background, {context.position}, {context.scale}"

    def render(self, subject: Subject, context: Context, size: int = 64) -> Image.Image:
        big = size * SUPERSAMPLE
        canvas = Image.new("RGB", (big, big), BACKGROUNDS[context.background])
        extent = int(big * SCALES[context.scale])
        centre_x, centre_y = int(big * POSITIONS[context.position]), big // 2
        mask = _shape_mask(subject.shape, extent)
        fill = Image.fromarray(_pattern(subject, extent))
        _draw_marking(fill, subject, extent)
        canvas.paste(fill, (centre_x - extent // 2, centre_y - extent // 2), mask)
        return canvas.resize((size, size), Image.LANCZOS)


def _regular_polygon(sides: int, extent: float, rotation: float = -np.pi / 2, inner: float | None = None, centre=None):
    radius = extent / 2 * 0.97
    cx, cy = centre if centre is not None else (extent / 2, extent / 2)
    points = []
    count = sides * (2 if inner else 1)
    for i in range(count):
        r = radius if inner is None or i % 2 == 0 else radius * inner
        angle = rotation + 2 * np.pi * i / count
        points.append((cx + r * np.cos(angle), cy + r * np.sin(angle)))
    return points


def _shape_mask(shape: str, extent: int) -> Image.Image:
    mask = Image.new("L", (extent, extent), 0)
    draw = ImageDraw.Draw(mask)
    pad = extent * 0.03
    box = (pad, pad, extent - pad, extent - pad)
    if shape == "circle":
        draw.ellipse(box, fill=255)
    elif shape == "square":
        draw.rectangle((extent * 0.08, extent * 0.08, extent * 0.92, extent * 0.92), fill=255)
    elif shape == "triangle":
        draw.polygon(_regular_polygon(3, extent), fill=255)
    elif shape == "star":
        draw.polygon(_regular_polygon(5, extent, inner=0.5), fill=255)
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
        draw.ellipse((extent * 0.32, extent * 0.32, extent * 0.68, extent * 0.68), fill=0)
    else:
        raise ValueError(f"unknown shape {shape}")
    return mask


def _pattern(subject: Subject, extent: int) -> np.ndarray:
    """The object's colours: primary everywhere, secondary on a minority of the area that the pattern picks."""
    primary, secondary = np.array(COLOURS[subject.primary], np.uint8), np.array(COLOURS[subject.secondary], np.uint8)
    y, x = np.mgrid[0:extent, 0:extent]
    period = extent / 3.2
    if subject.pattern == "stripes":  # vertical stripes, ~40 % of the area
        use_secondary = ((x + extent * 0.1) % period) < period * 0.38
    elif subject.pattern == "dots":
        cx, cy = ((x + period / 2) % period) - period / 2, ((y + period / 2) % period) - period / 2
        use_secondary = cx * cx + cy * cy < (period * 0.3) ** 2
    elif subject.pattern == "border":  # a thick outline: the shape minus a shrunken copy of it
        inner_extent = int(extent * 0.68)
        inner = Image.new("L", (extent, extent), 0)
        inner.paste(_shape_mask(subject.shape, inner_extent), ((extent - inner_extent) // 2, (extent - inner_extent) // 2))
        use_secondary = np.asarray(inner) < 128
    elif subject.pattern == "band":  # a horizontal band across the lower middle
        use_secondary = (y > extent * 0.55) & (y < extent * 0.78)
    else:
        raise ValueError(f"unknown pattern {subject.pattern}")
    return np.where(use_secondary[..., None], secondary, primary).astype(np.uint8)


def _draw_marking(fill: Image.Image, subject: Subject, extent: int) -> None:
    if subject.marking == "none":
        return
    draw = ImageDraw.Draw(fill)
    # Black or white, whichever contrasts with the primary colour; on the object's body, above its middle.
    brightness = sum(COLOURS[subject.primary]) / 3
    ink = (20, 20, 20) if brightness > 110 else (245, 245, 245)
    cx, cy, r = extent * 0.5, {"triangle": 0.58, "ring": 0.17}.get(subject.shape, 0.36) * extent, extent * 0.13
    if subject.marking == "dot":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=ink)
    elif subject.marking == "bar":
        draw.rectangle((cx - 2.2 * r, cy - 0.6 * r, cx + 2.2 * r, cy + 0.6 * r), fill=ink)
    elif subject.marking == "star":
        draw.polygon(_regular_polygon(5, 3.2 * r, inner=0.45, centre=(cx, cy)), fill=ink)
    else:
        raise ValueError(f"unknown marking {subject.marking}")


def dataset_views(world: SyntheticWorld, n_subjects: int, images_per_subject: int, split: str = "train") -> list[tuple[Subject, list[Context]]]:
    """The subjects of a data set written by :func:`write_synthetic_dataset` with ``world``'s seed, each with the contexts
    of its images in file order (a seeded draw per split): what those files show, without reading them."""
    rng = random.Random(f"{world.seed}/contexts/{split}")
    return [(subject, [world.sample_context(rng) for _ in range(images_per_subject)]) for subject in world.subjects(n_subjects, split)]


def write_synthetic_dataset(folder: str | Path, n_subjects: int, images_per_subject: int, size: int = 64, seed: int = 0,
                            split: str = "train", class_word: str = "toy") -> Path:
    """A folder SubjectFolderDataset reads: one sub-folder per subject, per-image caption files
    (with a ``{token}`` placeholder), ``class.txt`` and the ground-truth ``labels.json``."""
    folder = Path(folder)
    world = SyntheticWorld(seed)
    for subject, views in dataset_views(world, n_subjects, images_per_subject, split):
        subject_dir = folder / subject.id
        subject_dir.mkdir(parents=True, exist_ok=True)
        contexts = []
        for i, context in enumerate(views):
            world.render(subject, context, size).save(subject_dir / f"{i:02d}.png")
            (subject_dir / f"{i:02d}.txt").write_text(world.caption(context, "{token}", class_word) + "\n")
            contexts.append(context.labels())
        (subject_dir / "class.txt").write_text(class_word + "\n")
        (subject_dir / "labels.json").write_text(json.dumps({"subject": subject.labels(), "contexts": contexts}))
    return folder
