"""Subject images from a folder: one subject per image, or one per sub-folder with several images.

Optional per-image captions (``<image>.txt``), a per-subject ``caption.txt`` and ``class.txt``.
Captions may contain ``{token}`` / ``{class_word}`` placeholders; without a caption the configured
template is used. Unreadable files are skipped and counted. Every random choice (reference view,
flip) comes from a generator the caller passes, so batches are reproducible and resumable.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

log = logging.getLogger("training.data")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
MAX_REFERENCE_SIDE = 512  # references keep their aspect; the encoder does its own resize/crop


class DataError(ValueError):
    pass


@dataclass
class SubjectEntry:
    subject_id: str
    images: list[Path]
    class_word: str
    caption: str | None  # subject-level caption, if any


@dataclass
class Sample:
    pixels: torch.Tensor  # (3, R, R) in [-1, 1]
    reference: torch.Tensor  # (H, W, 3) in [0, 1], ComfyUI IMAGE layout
    caption: str
    subject_id: str
    original_size: tuple[int, int] = (0, 0)  # (height, width) of the image file: SDXL's size conditioning
    crop_top_left: tuple[int, int] = (0, 0)  # where the square crop starts in the resized image: SDXL's crop conditioning
    item: int = 0  # which image (index into ``items``), flipped or not: the key of cached latents
    flipped: bool = False
    reference_key: tuple[int, int] = (0, 0)  # (subject index, image index) of the reference: the key of cached features


def _readable(path: Path) -> bool:
    try:
        with Image.open(path) as image:
            image.verify()
        return True
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        return False


def _read_text(path: Path) -> str | None:
    return path.read_text(encoding="utf-8").strip() if path.is_file() else None


def _load_rgb(path: Path) -> Image.Image:
    with Image.open(path) as image:
        image.load()
        if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
            background = Image.new("RGB", image.size, (255, 255, 255))
            background.paste(image.convert("RGBA"), mask=image.convert("RGBA").split()[-1])
            return background
        return image.convert("RGB")


def _square(image: Image.Image, resolution: int) -> tuple[Image.Image, int, int, int]:
    """Resize the short side to ``resolution`` and crop the centre: (crop, top, left, resized width)."""
    scale = resolution / min(image.size)
    resized = image.resize((max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale))), Image.BICUBIC)
    left, top = (resized.width - resolution) // 2, (resized.height - resolution) // 2
    return resized.crop((left, top, left + resolution, top + resolution)), top, left, resized.width


class SubjectFolderDataset:
    def __init__(self, root: str | Path, resolution: int, *, flip_prob: float = 0.0, class_word: str = "object",
                 prompt_template: str = "a photo of a {token} {class_word}", placeholder: str = "sks", reference_view: str = "other"):
        self.root, self.resolution, self.flip_prob = Path(root), resolution, flip_prob
        self.prompt_template, self.placeholder, self.reference_view = prompt_template, placeholder, reference_view
        if not self.root.is_dir():
            raise DataError(f"data folder not found: {self.root}")
        self.skipped: list[Path] = []
        self.subjects: list[SubjectEntry] = []
        default_class = _read_text(self.root / "class.txt") or class_word
        for path in sorted(self.root.iterdir()):
            if path.is_dir():
                images = self._scan(sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES))
                if images:
                    self.subjects.append(SubjectEntry(path.name, images, _read_text(path / "class.txt") or default_class, _read_text(path / "caption.txt")))
            elif path.suffix.lower() in IMAGE_SUFFIXES:
                images = self._scan([path])
                if images:
                    self.subjects.append(SubjectEntry(path.stem, images, default_class, None))
        if self.skipped:
            log.warning("skipped %d unreadable image file(s) in %s (first: %s)", len(self.skipped), self.root, self.skipped[0].name)
        if not self.subjects:
            raise DataError(f"no readable images in {self.root} (looked for {', '.join(sorted(IMAGE_SUFFIXES))}; {len(self.skipped)} unreadable)")
        self.items = [(s, i) for s in range(len(self.subjects)) for i in range(len(self.subjects[s].images))]
        log.info("data: %d subjects, %d images from %s", len(self.subjects), len(self.items), self.root)

    def _scan(self, paths: list[Path]) -> list[Path]:
        good = []
        for path in paths:
            (good if _readable(path) else self.skipped).append(path)
        return good

    def __len__(self) -> int:
        return len(self.items)

    def caption_for(self, subject: SubjectEntry, image: Path) -> str:
        text = _read_text(image.with_suffix(".txt")) or subject.caption or self.prompt_template
        if "{token}" not in text and self.placeholder not in text.split():
            text = self.prompt_template  # a caption that never names the subject cannot teach it
        return text.replace("{token}", self.placeholder).replace("{class_word}", subject.class_word)

    def target(self, item: int, flipped: bool = False) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
        """The training image of ``item`` in [-1, 1] ``(3, R, R)``, its original (height, width) and crop (top, left)."""
        subject_index, image_index = self.items[item % len(self.items)]
        image = _load_rgb(self.subjects[subject_index].images[image_index])
        square, top, left, resized_width = _square(image, self.resolution)
        if flipped:  # the crop's left edge as seen in the mirrored image
            square, left = square.transpose(Image.FLIP_LEFT_RIGHT), resized_width - left - self.resolution
        pixels = torch.from_numpy(np.asarray(square, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)
        return pixels, (image.height, image.width), (top, left)

    def get(self, index: int, generator: torch.Generator) -> Sample:
        item = index % len(self.items)
        subject_index, image_index = self.items[item]
        subject = self.subjects[subject_index]
        flipped = self.flip_prob > 0 and torch.rand((), generator=generator).item() < self.flip_prob
        reference_index = image_index
        if self.reference_view == "other" and len(subject.images) > 1:
            offset = int(torch.randint(1, len(subject.images), (), generator=generator))
            reference_index = (image_index + offset) % len(subject.images)
        pixels, original_size, crop = self.target(item, flipped)
        return Sample(pixels, self.reference(subject_index, reference_index), self.caption_for(subject, subject.images[image_index]), subject.subject_id,
                      original_size, crop, item, flipped, (subject_index, reference_index))

    def reference(self, subject_index: int, image_index: int = 0) -> torch.Tensor:
        image = _load_rgb(self.subjects[subject_index].images[image_index])
        if max(image.size) > MAX_REFERENCE_SIDE:
            image.thumbnail((MAX_REFERENCE_SIDE, MAX_REFERENCE_SIDE), Image.BICUBIC)
        return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)

    def reference_images(self, subject_index: int) -> torch.Tensor:
        """The first reference of a subject as a ComfyUI IMAGE batch ``(1, H, W, 3)``."""
        return self.reference(subject_index, 0).unsqueeze(0)
