"""Opening the training inputs (with clear errors before any long work) and assembling batches.

Batches are a pure function of (seed, step, process): the data order is a seeded permutation per
epoch and every augmentation draws from the step's generator, so a resumed run sees exactly the
batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch

from .backbone import Backbone, BackboneError, load_backbone
from .data import DataError, SubjectFolderDataset
from .errors import InputError
from .image_encoder import ImageEncoder, ImageEncoderError, load_image_encoder
from .objective import Batch
from .synthetic import write_synthetic_dataset

log = logging.getLogger("training")


def _synthetic_once(root: Path, subjects: int, images_per_subject: int, config, split: str) -> Path:
    """Write a synthetic subject folder unless one made with the same settings is there (re-runs and --resume
    reuse it). One made with other settings is written again, with a message: never silently reused."""
    settings = dict(subjects=subjects, images_per_subject=images_per_subject, size=max(64, config.resolution), seed=config.seed,
                    split=split, class_word=config.class_word)
    stamp = json.dumps(settings, sort_keys=True)
    marker = root / ".complete"  # written last, holding the settings: a half-written folder is redone
    if marker.is_file() and marker.read_text().strip() == stamp:
        return root
    if root.exists():
        log.warning("%s was made with other settings (%s); writing it again for %s", root, marker.read_text().strip() if marker.is_file() else "unfinished", stamp)
        shutil.rmtree(root)
    write_synthetic_dataset(root, subjects, images_per_subject, size=settings["size"], seed=config.seed, split=split, class_word=config.class_word)
    marker.write_text(stamp + "\n")
    return root


def _subject_folder(root, config, flip_prob: float) -> SubjectFolderDataset:
    return SubjectFolderDataset(root, config.resolution, flip_prob=flip_prob, class_word=config.class_word,
                                prompt_template=config.prompt_template, placeholder=config.placeholder)


def open_dataset(config, output_dir: Path) -> SubjectFolderDataset:
    root = config.data
    if root == "synthetic":
        root = _synthetic_once(output_dir / "synthetic_data", config.synthetic_subjects, config.synthetic_images_per_subject, config, "train")
    try:
        return _subject_folder(root, config, config.flip_prob)
    except DataError as error:
        raise InputError(f"data: {error}") from None


def open_preview_dataset(config, output_dir: Path, dataset: SubjectFolderDataset) -> SubjectFolderDataset:
    """Subjects for the sample grids: with synthetic data, held-out subjects the hypernetwork never saw
    (two images each, so the prompt can name a new context); otherwise the training subjects."""
    if config.data != "synthetic" or config.sample_subjects <= 0:
        return dataset
    return _subject_folder(_synthetic_once(output_dir / "synthetic_heldout", config.sample_subjects, 2, config, "heldout"), config, 0.0)


def open_eval_dataset(config, output_dir: Path) -> SubjectFolderDataset | None:
    """Held-out subjects for validation while training (``--eval-data``), or None."""
    if not config.eval_data:
        return None
    root = config.eval_data
    if root == "synthetic":
        root = _synthetic_once(output_dir / "synthetic_eval", config.eval_subjects, 2, config, "heldout")
    try:
        dataset = _subject_folder(root, config, 0.0)
    except DataError as error:
        raise InputError(f"eval data: {error}") from None
    if len(dataset.subjects) < 2:
        raise InputError(f"eval data: {root} holds {len(dataset.subjects)} subject(s); validation needs at least 2")
    return dataset


def open_backbone(config, device, dtype) -> Backbone:
    try:
        backbone = load_backbone(config.backbone, dtype=dtype, device=device, seed=config.seed)
    except (BackboneError, ValueError) as error:
        raise InputError(f"backbone: {error}") from None
    if backbone.is_sdxl and config.token_embedding:
        raise InputError("backbone: the predicted token embedding (--token-embedding) is not supported for SDXL's two text encoders yet")
    return backbone


def open_image_encoder(config, device) -> ImageEncoder:
    try:
        encoder = load_image_encoder(config.image_encoder, device=device, seed=config.seed + 1)
        encoder.feature_spec(config.hidden_state)
        return encoder
    except (ImageEncoderError, ValueError) as error:
        raise InputError(f"image encoder: {error}") from None


class EncodedCache:
    """Latents of every training image (both orientations when flips are on) and image features of every reference,
    computed once before training (``--cache-latents`` / ``--cache-features``). The VAE and the image encoder then
    leave the training device: at 1024 px their weights and the VAE's activations are several GB a step would
    otherwise hold. The data pipeline is deterministic (centre crops), so cached values are what a step would compute."""

    def __init__(self, dataset: SubjectFolderDataset, backbone: Backbone | None, encoder: ImageEncoder | None, config, batch_size: int = 8):
        self.latents: dict[tuple[int, bool], torch.Tensor] | None = None
        self.features: dict[tuple[int, int], torch.Tensor] | None = None
        with torch.no_grad():
            if backbone is not None:
                keys = [(item, flipped) for item in range(len(dataset)) for flipped in ((False, True) if config.flip_prob > 0 else (False,))]
                self.latents = {}
                for start in range(0, len(keys), batch_size):
                    chunk = keys[start:start + batch_size]
                    pixels = torch.stack([dataset.target(item, flipped)[0] for item, flipped in chunk])
                    for key, latent in zip(chunk, backbone.encode_images(pixels).float().cpu()):
                        self.latents[key] = latent
                backbone.vae.to("cpu")  # only sample grids decode from now on
            if encoder is not None:
                keys = [(s, i) for s, subject in enumerate(dataset.subjects) for i in range(len(subject.images))]
                self.features = {key: encoder.features(dataset.reference(*key).unsqueeze(0), config.hidden_state)[0].float().cpu() for key in keys}
                encoder.model.to("cpu")
        log.info("cached %s latents and %s reference features", len(self.latents or {}), len(self.features or {}))


class SubjectBatches:
    """``get(index, generator)``: the batch of one micro-step of one process."""

    def __init__(self, dataset: SubjectFolderDataset, encoder: ImageEncoder, config, num_processes: int, process_index: int, device,
                 cache: EncodedCache | None = None):
        self.dataset, self.encoder, self.config = dataset, encoder, config
        self.num_processes, self.process_index, self.device = num_processes, process_index, device
        self.cache = cache
        self._epoch, self._order = -1, None

    def _item(self, position: int) -> int:
        size = len(self.dataset)
        epoch = position // size
        if epoch != self._epoch:
            self._epoch = epoch
            self._order = torch.randperm(size, generator=torch.Generator().manual_seed(self.config.seed * 7919 + epoch))
        return int(self._order[position % size])

    def get(self, index: int, generator: torch.Generator) -> Batch:
        size = self.config.batch_size
        first = (index * self.num_processes + self.process_index) * size
        samples = [self.dataset.get(self._item(first + j), generator) for j in range(size)]
        return self.assemble(samples, self.encoder, self.config, self.device, self.cache)

    @staticmethod
    def assemble(samples, encoder: ImageEncoder | None, config, device, cache: EncodedCache | None = None) -> Batch:
        """A batch of samples; without an encoder the features are a placeholder (for stand-ins that ignore them)."""
        if cache is not None and cache.features is not None:
            features = torch.stack([cache.features[s.reference_key] for s in samples])
        elif encoder is not None:
            features = encoder.features([s.reference.unsqueeze(0) for s in samples], config.hidden_state)
        else:
            features = torch.zeros(len(samples), 1, 1)
        latents = torch.stack([cache.latents[(s.item, s.flipped)] for s in samples]).to(device) if cache is not None and cache.latents is not None else None
        pixels = torch.stack([s.pixels for s in samples])
        size = pixels.shape[-1]
        return Batch(
            pixels=pixels.to(device),
            features=features.to(device),
            captions=[s.caption for s in samples],
            subject_ids=[s.subject_id for s in samples],
            time_ids=torch.tensor([[*s.original_size, *s.crop_top_left, size, size] for s in samples], dtype=torch.float32, device=device),
            latents=latents,
        )
