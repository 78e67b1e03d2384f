"""Subject images from a folder: one subject per image, or one per sub-folder with several images.

Optional per-image captions (``<image stem>.txt``), a per-subject ``caption.txt`` and ``class.txt``, all
read as UTF-8 (a byte-order mark is dropped; other encodings are refused by file name). Captions may
contain ``{token}`` / ``{class_word}`` placeholders; without a caption the configured template is used.

Every image is decoded once when the folder is scanned, so a truncated or corrupt file is skipped and
counted up front (never a crash mid-training); so is an image over Pillow's decompression-bomb limit.
Images are read as ComfyUI's Load Image reads them (EXIF orientation applied; Pillow's 32-bit "I" mode
scaled by 1/255), so training and the nodes see the same picture; transparent pixels are composited onto
white. Images in folders two levels down are not read (a warning counts them). Two top-level images
with the same stem (``a.png``, ``a.jpg``) are two subjects, named by their full file names.
Every random choice (reference view, flip) comes from a generator the caller passes, so batches are
reproducible and resumable.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

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


def _decode_problem(path: Path) -> tuple[str | None, str]:
    """(why ``path`` cannot be used as an image: "unreadable", "bomb" or None; its mode). Decodes every pixel once."""
    try:
        with Image.open(path) as image:
            image.load()
            return None, image.mode
    except Image.DecompressionBombError:
        return "bomb", ""
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        return "unreadable", ""


def read_text(path: Path) -> str | None:
    """A caption or class file as UTF-8 (BOM dropped), stripped; None if absent; DataError naming the file otherwise."""
    if not path.is_file():
        return None
    raw = path.read_bytes()
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise DataError(f"{path} is UTF-16 text; save it as UTF-8")
    try:
        return raw.decode("utf-8-sig").strip()
    except UnicodeDecodeError as error:
        raise DataError(f"{path} is not UTF-8 text (byte {error.start} is 0x{raw[error.start]:02x}); save it as UTF-8") from None


def load_rgb(path: Path) -> Image.Image:
    """An image as ComfyUI's Load Image reads it (first frame, EXIF orientation, 32-bit "I" mode / 255), as RGB;
    transparent pixels composited onto white."""
    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image)
        image.load()
        if image.mode == "I":
            image = image.point(lambda value: value * (1 / 255))
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
        self.too_large: list[Path] = []
        self.ignored_deeper: list[Path] = []
        self.clipped_16bit: list[Path] = []
        self.subjects: list[SubjectEntry] = []
        self.captions: dict[Path, str | None] = {}
        default_class = read_text(self.root / "class.txt") or class_word
        entries = sorted(self.root.iterdir())
        top_images = [p for p in entries if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
        stems = [p.stem for p in top_images] + [p.name for p in entries if p.is_dir()]
        for path in entries:
            if path.is_dir():
                children = sorted(path.iterdir())
                self.ignored_deeper += [p for c in children if c.is_dir() for p in c.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES]
                images = self._scan([p for p in children if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES])
                if images:
                    self.subjects.append(SubjectEntry(path.name, images, read_text(path / "class.txt") or default_class, read_text(path / "caption.txt")))
            elif path in top_images:
                images = self._scan([path])
                if images:  # a.png and a.jpg are two subjects: the stem alone would name both
                    subject_id = path.stem if stems.count(path.stem) == 1 else path.name
                    self.subjects.append(SubjectEntry(subject_id, images, default_class, None))
        self._report()
        if not self.subjects:
            raise DataError(f"no readable images in {self.root} (looked for {', '.join(sorted(IMAGE_SUFFIXES))}; "
                            f"{len(self.skipped)} unreadable, {len(self.too_large)} over the decompression-bomb limit)")
        self.items = [(s, i) for s in range(len(self.subjects)) for i in range(len(self.subjects[s].images))]
        log.info("data: %d subjects, %d images from %s", len(self.subjects), len(self.items), self.root)

    def _scan(self, paths: list[Path]) -> list[Path]:
        good = []
        for path in paths:
            problem, mode = _decode_problem(path)
            if mode.startswith("I;16"):
                self.clipped_16bit.append(path)
            if problem is None:
                good.append(path)
                self.captions[path] = read_text(path.with_suffix(".txt"))
            else:
                (self.too_large if problem == "bomb" else self.skipped).append(path)
        return good

    def _report(self) -> None:
        if self.skipped:
            log.warning("skipped %d unreadable image file(s) in %s (corrupt or truncated; first: %s)", len(self.skipped), self.root,
                        self.skipped[0].relative_to(self.root))
        if self.too_large:
            log.warning("skipped %d image(s) in %s over Pillow's decompression-bomb limit of %d pixels (first: %s); downscale them to use them",
                        len(self.too_large), self.root, 2 * Image.MAX_IMAGE_PIXELS, self.too_large[0].relative_to(self.root))
        if self.clipped_16bit:  # Pillow >= 10 opens them as "I;16", which ComfyUI's Load Image does not rescale
            log.warning("%d 16-bit grayscale image(s) in %s (first: %s): ComfyUI's Load Image clips them to white above 1/256 of "
                        "full scale, and training reads them the same way so both see one picture; save them as 8-bit to keep "
                        "their tones", len(self.clipped_16bit), self.root, self.clipped_16bit[0].relative_to(self.root))
        if self.ignored_deeper:
            log.warning("ignored %d image(s) in folders below the subject folders of %s (first: %s): a subject is one image at the top "
                        "level or one folder of images", len(self.ignored_deeper), self.root, self.ignored_deeper[0].relative_to(self.root))

    def _load(self, path: Path) -> Image.Image:
        try:
            return load_rgb(path)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
            raise DataError(f"{path} could not be read ({error}); it changed after the data folder was scanned") from None

    def __len__(self) -> int:
        return len(self.items)

    def caption_for(self, subject: SubjectEntry, image: Path) -> str:
        text = (self.captions[image] if image in self.captions else read_text(image.with_suffix(".txt"))) or subject.caption or self.prompt_template
        if "{token}" not in text and self.placeholder not in text.split():
            text = self.prompt_template  # a caption that never names the subject cannot teach it
        return text.replace("{token}", self.placeholder).replace("{class_word}", subject.class_word)

    def target(self, item: int, flipped: bool = False) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
        """The training image of ``item`` in [-1, 1] ``(3, R, R)``, its original (height, width) and crop (top, left)."""
        subject_index, image_index = self.items[item % len(self.items)]
        image = self._load(self.subjects[subject_index].images[image_index])
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
        image = self._load(self.subjects[subject_index].images[image_index])
        if max(image.size) > MAX_REFERENCE_SIDE:
            image.thumbnail((MAX_REFERENCE_SIDE, MAX_REFERENCE_SIDE), Image.BICUBIC)
        return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)

    def reference_images(self, subject_index: int) -> torch.Tensor:
        """The first reference of a subject as a ComfyUI IMAGE batch ``(1, H, W, 3)``."""
        return self.reference(subject_index, 0).unsqueeze(0)
