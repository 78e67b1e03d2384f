"""Validation while training: is the hypernetwork learning identity, long before the run ends?

Every ``--eval-every`` steps, for a fixed set of held-out subjects (``--eval-data``): predict each subject's LoRA
from its first image, sample its prompt (the caption of another image of it, so a new context), and score:

- ``identity``: cosine between the frozen image encoder's embeddings of the generated image and of the
  reference (the CLIP-I role), averaged over subjects;
- ``identity_base``: the same for the base model without a LoRA (computed once): the level to beat;
- ``identity_swapped``: the same with each subject sampled under *another* subject's LoRA. ``identity`` above
  ``identity_swapped`` means the LoRAs carry who the subject is; equal means one LoRA for everyone;
- ``prompt``: cosine between the generated image and its prompt (the CLIP-T role), when the image encoder is a
  whole CLIP model folder (its text tower is used; the placeholder is replaced by the class word);
- in the toy world (subject folders with ``labels.json`` and 64 px images), the toy attribute reader's
  ``subject_fidelity`` and ``prompt_fidelity`` (share of identity / context attributes read off the images).

Scores go to ``metrics.jsonl`` (``"eval/..."`` keys), TensorBoard, and ``validation.png`` in the output folder.
Sampling uses fixed seeds, so the curves move only because the hypernetwork does.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from hypernet.lora import LoraWeights

from .data import SubjectFolderDataset
from .sampling import sample

log = logging.getLogger("training")


@dataclass
class EvalSubject:
    reference: torch.Tensor  # (1, H, W, 3) in [0, 1]
    prompt: str
    class_word: str
    labels: dict | None  # toy world: {"subject": {...}, "context": {...}} of the prompt's image


def eval_subjects(dataset: SubjectFolderDataset, count: int) -> list[EvalSubject]:
    subjects = []
    for index, subject in enumerate(dataset.subjects[:count]):
        prompt_image = len(subject.images) - 1  # another context than the reference's when there are several images
        labels = None
        labels_file = subject.images[0].parent / "labels.json"
        if labels_file.is_file() and subject.images[0].parent != dataset.root:
            saved = json.loads(labels_file.read_text(encoding="utf-8"))
            if len(saved.get("contexts", [])) == len(subject.images):
                labels = {"subject": saved["subject"], "context": saved["contexts"][prompt_image]}
        subjects.append(EvalSubject(dataset.reference_images(index), dataset.caption_for(subject, subject.images[prompt_image]), subject.class_word, labels))
    return subjects


def _roll(lora: LoraWeights) -> LoraWeights:
    """Subject i gets subject i+1's LoRA."""
    return LoraWeights({n: d.roll(1, 0) for n, d in lora.down.items()}, {n: u.roll(1, 0) for n, u in lora.up.items()})


class Validator:
    def __init__(self, subjects: list[EvalSubject], backbone, encoder, unet_targets, text_targets, config, prompt_scorer=None, reader=None):
        if len(subjects) < 2:
            raise ValueError("validation needs at least two subjects (the swapped-LoRA score compares them)")
        self.subjects, self.backbone, self.encoder, self.config = subjects, backbone, encoder, config
        self.unet_modules = unet_targets.modules
        self.text_modules = text_targets.modules if text_targets is not None else {}
        self.prompt_scorer, self.reader = prompt_scorer, reader
        self.prompts = [s.prompt for s in subjects]
        references = [s.reference for s in subjects]
        self.features = torch.cat([encoder.features(r, config.hidden_state) for r in references])
        self.reference_embeds = self._embed(torch.cat([F.interpolate(r.movedim(-1, 1), size=config.resolution, mode="bilinear", antialias=True)
                                                       for r in references]))
        self.base_scores: dict[str, float] | None = None

    def _embed(self, images: torch.Tensor) -> torch.Tensor:
        """Unit-length image embeddings of ``(B, 3, H, W)`` images in [0, 1]."""
        batch = images.movedim(1, -1)
        if self.encoder.has_projection:
            embeds = self.encoder.features(batch, "image_embeds")[:, 0]
        else:
            embeds = self.encoder.features(batch, "last_hidden_state")[:, 0]
        return F.normalize(embeds, dim=-1)

    def _sample(self, lora: LoraWeights | None, token_embedding: torch.Tensor | None = None) -> torch.Tensor:
        common = dict(steps=self.config.sample_steps, resolution=self.config.resolution, seed=self.config.seed + 7)
        if lora is None:
            return sample(self.backbone, self.prompts, mode="base", **common)
        return sample(self.backbone, self.prompts, lora=lora, unet_modules=self.unet_modules, text_modules=self.text_modules, mode="lora",
                      token_embedding=token_embedding, placeholder=self.config.placeholder, **common)

    def _scores(self, images: torch.Tensor, prefix: str) -> dict[str, float]:
        scores = {f"{prefix}identity": float((self._embed(images) * self.reference_embeds).sum(-1).mean())}
        if self.prompt_scorer is not None:
            prompts = [s.prompt.replace(self.config.placeholder + " ", "") for s in self.subjects]
            scores[f"{prefix}prompt"] = self.prompt_scorer(images, prompts)
        if self.reader is not None and all(s.labels for s in self.subjects):
            readings = self.reader.read(images * 2 - 1)
            subject_hits = [sum(r[k] == v for k, v in s.labels["subject"].items()) / len(s.labels["subject"]) for r, s in zip(readings, self.subjects)]
            context_hits = [sum(r[k] == v for k, v in s.labels["context"].items()) / len(s.labels["context"]) for r, s in zip(readings, self.subjects)]
            scores[f"{prefix}subject_fidelity"] = sum(subject_hits) / len(subject_hits)
            scores[f"{prefix}prompt_fidelity"] = sum(context_hits) / len(context_hits)
        return scores

    @torch.no_grad()
    def __call__(self, hypernet) -> dict[str, float]:
        was_training = hypernet.training
        hypernet.eval()
        try:
            if self.base_scores is None:
                self.base_scores = self._scores(self._sample(None), "base_")
            predicted = hypernet(self.features.to(next(hypernet.parameters()).device))
            lora, embedding = predicted.lora.to("cpu"), predicted.token_embedding
            embedding = embedding.cpu() if embedding is not None else None
            scores = {**self._scores(self._sample(lora, embedding), ""), **self.base_scores}
            swapped = self._sample(_roll(lora), embedding.roll(1, 0) if embedding is not None else None)
            scores["identity_swapped"] = self._scores(swapped, "swapped_")["swapped_identity"]
        finally:
            hypernet.train(was_training)
        return {f"eval/{k}": round(v, 5) for k, v in scores.items()}


def clip_prompt_scorer(image_encoder_spec: str, encoder):
    """CLIP-T from the text tower of a whole transformers CLIP folder given as the image encoder, else None."""
    folder = Path(image_encoder_spec)
    config_file = folder / "config.json"
    if not folder.is_dir() or not config_file.is_file() or json.loads(config_file.read_text()).get("model_type") != "clip":
        return None
    from transformers import CLIPModel, CLIPTokenizer

    try:
        model = CLIPModel.from_pretrained(folder, local_files_only=True).eval().requires_grad_(False)
        tokenizer = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as error:
        log.warning("validation: no prompt score (%s's text tower did not load: %s)", folder, error)
        return None

    @torch.no_grad()
    def score(images: torch.Tensor, prompts: list[str]) -> float:
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
        text = F.normalize(model.get_text_features(input_ids=ids), dim=-1)
        pixels = encoder.preprocess(images.movedim(1, -1))
        image = F.normalize(model.get_image_features(pixel_values=pixels), dim=-1)
        return float((text * image).sum(-1).mean())

    return score


def toy_reader_for(config):
    """The toy world's attribute reader, where it applies (64 px renders of the toy world), else None."""
    if config.resolution != 64:
        return None
    from .toy_model import load_toy_reader

    return load_toy_reader()


def plot_validation(metrics_path: Path, out: Path) -> Path | None:
    """``validation.png``: every eval/ score against the step, personalised vs base vs swapped."""
    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()] if metrics_path.exists() else []
    records = [r for r in records if any(k.startswith("eval/") for k in r)]
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = {"identity (image-encoder cosine to the reference)": ["eval/identity", "eval/identity_swapped", "eval/base_identity"],
              "prompt (CLIP-T)": ["eval/prompt", "eval/base_prompt"],
              "toy reader: subject fidelity": ["eval/subject_fidelity", "eval/base_subject_fidelity"],
              "toy reader: prompt fidelity": ["eval/prompt_fidelity", "eval/base_prompt_fidelity"]}
    groups = {title: [k for k in keys if k in records[-1]] for title, keys in groups.items()}
    groups = {title: keys for title, keys in groups.items() if keys}
    fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 3.4), squeeze=False)
    steps = [r["step"] for r in records]
    for ax, (title, keys) in zip(axes[0], groups.items()):
        for key in keys:
            ax.plot(steps, [r.get(key, float("nan")) for r in records], "-o", markersize=3, label=key[5:])
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def make_validator(config, dataset, backbone, encoder, unet_targets, text_targets) -> Validator:
    return Validator(eval_subjects(dataset, config.eval_subjects), backbone, encoder, unet_targets, text_targets, config,
                     prompt_scorer=clip_prompt_scorer(config.image_encoder, encoder), reader=toy_reader_for(config))


def run_validation(validator: Validator, hypernet, step: int, metrics_path: Path, board, output_dir: Path) -> dict[str, float]:
    """Score, log one metrics line, update TensorBoard and validation.png; print a one-line summary."""
    scores = validator(hypernet)
    with open(metrics_path, "a") as handle:
        handle.write(json.dumps({"step": step, **scores}) + "\n")
    if board is not None:
        for key, value in scores.items():
            board.add_scalar(key, value, step)
    plot_validation(metrics_path, output_dir / "validation.png")
    shown = ", ".join(f"{k[5:]} {v:.3f}" for k, v in scores.items())
    print(f"\nvalidation at step {step}: {shown}", flush=True)
    return scores
