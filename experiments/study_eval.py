"""The study's measurements: generating with each method for held-out subjects and reading the images.

One :class:`Evaluator` holds the toy world (base model, image encoder, attribute reader); every method is a
per-subject LoRA (or none) plus a sampling mode and a prompt form. All methods see the same subjects,
reference images, prompts and seeds, so differences between methods are paired.
"""

from __future__ import annotations

import random
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from hypernet import FinetuneConfig, LoraWeights, TuningConfig, rank_relaxed_finetune, tune_subject
from training.backbone import load_backbone
from training.objective import TokenEmbeddingOverride, real_word_ids
from training.image_encoder import load_image_encoder
from training.sampling import sample
from training.synthetic import Context, Subject, SyntheticWorld
from training.toy_reader import IDENTITY, AttributeReader, load_reader

REFERENCE_CONTEXT = Context("white", "in the center", "large")


@dataclass
class World:
    """The pretrained toy world: ``'toy'`` (the shipped copy) or a folder written by experiments.pretrain."""

    spec: str
    backbone: object
    encoder: object
    reader: AttributeReader

    @classmethod
    def load(cls, spec: str) -> "World":
        if spec == "toy":
            from training.toy_model import load_toy_reader

            reader = load_toy_reader()
            if reader is None:
                raise SystemExit("the shipped toy model has no attribute reader; run python -m experiments.pretrain --pack")
            return cls(spec, load_backbone("toy"), load_image_encoder("toy"), reader)
        folder = Path(spec)
        return cls(spec, load_backbone(str(folder / "base")), load_image_encoder(str(folder / "image_encoder")), load_reader(folder / "reader.safetensors"))

    @property
    def backbone_spec(self) -> str:
        return "toy" if self.spec == "toy" else str(Path(self.spec) / "base")

    @property
    def encoder_spec(self) -> str:
        return "toy" if self.spec == "toy" else str(Path(self.spec) / "image_encoder")


@dataclass
class Case:
    """One held-out subject: its reference image, the new contexts it is prompted into."""

    subject: Subject
    reference: torch.Tensor  # (1, H, W, 3) in [0, 1]
    contexts: list[Context]


def make_cases(world: SyntheticWorld, subjects: list[Subject], contexts_per_subject: int, resolution: int, seed: int) -> list[Case]:
    rng = random.Random(seed)
    cases = []
    for subject in subjects:
        reference = torch.from_numpy(np.asarray(world.render(subject, REFERENCE_CONTEXT, resolution))).float().div(255).unsqueeze(0)
        contexts: list[Context] = []
        while len(contexts) < contexts_per_subject:
            context = world.sample_context(rng)
            if context != REFERENCE_CONTEXT and context not in contexts:
                contexts.append(context)
        cases.append(Case(subject, reference, contexts))
    return cases


def stack_loras(loras: list[LoraWeights], repeats: int) -> LoraWeights:
    """Per-subject LoRAs -> one batched LoRA with each subject's factors repeated ``repeats`` times."""
    names = loras[0].names
    stacked = LoraWeights({n: torch.stack([l.down[n] for l in loras]) for n in names}, {n: torch.stack([l.up[n] for l in loras]) for n in names})
    return stacked.repeated(repeats, interleave=True)


def lora_spread(loras: list[LoraWeights]) -> dict[str, float]:
    """How much predicted LoRAs differ between subjects, relative to their size (all layers' dW concatenated).

    ``pairwise``: mean pairwise distance / mean norm; ``specific``: mean distance to the mean LoRA / mean norm.
    A hypernetwork that predicts one LoRA for everyone scores ~0 on both."""
    vectors = torch.stack([torch.cat([l.delta(n).flatten() for n in l.names]) for l in loras]).double()
    norm = vectors.norm(dim=1).mean()
    pairwise = torch.pdist(vectors).mean()
    specific = (vectors - vectors.mean(0)).norm(dim=1).mean()
    return {"pairwise": float(pairwise / norm), "specific": float(specific / norm), "mean_norm": float(norm)}


class Evaluator:
    def __init__(self, world: World, sample_steps: int, cfg_text: float, resolution: int, placeholder: str = "sks"):
        self.world, self.sample_steps, self.cfg_text, self.resolution, self.placeholder = world, sample_steps, cfg_text, resolution, placeholder
        backbone = world.backbone
        self.unet_targets, self.text_targets = backbone.targets()
        self.modules = {**self.unet_targets.modules, **self.text_targets.modules}
        self.schedule = backbone.noise_schedule()

    # ------------------------------------------------------------------ generation and reading

    def prompts(self, cases: list[Case], form: str) -> list[str]:
        """``form``: 'token' ("a photo of a sks toy on ..."), 'described' (the identity in words) or 'class'."""
        out = []
        for case in cases:
            for context in case.contexts:
                if form == "token":
                    out.append(SyntheticWorld.caption(context, self.placeholder))
                elif form == "described":
                    out.append(SyntheticWorld.caption(context, description=case.subject.describe()))
                else:
                    out.append(SyntheticWorld.caption(context))
        return out

    def generate(self, cases: list[Case], loras: list[LoraWeights] | None, mode: str, seed: int, form: str = "token",
                 cfg_subject: float = 2.0, embeddings: list[torch.Tensor] | None = None, dual_alpha: float = 0.5) -> torch.Tensor:
        repeats = len(cases[0].contexts)
        lora = stack_loras(loras, repeats) if loras is not None else None
        embedding = torch.stack(embeddings).repeat_interleave(repeats, 0) if embeddings is not None else None
        return sample(self.world.backbone, self.prompts(cases, form), lora=lora, unet_modules=self.unet_targets.modules,
                      text_modules=self.text_targets.modules, mode=mode, cfg_text=self.cfg_text, cfg_subject=cfg_subject,
                      steps=self.sample_steps, resolution=self.resolution, seed=seed, token_embedding=embedding, placeholder=self.placeholder,
                      dual_alpha=dual_alpha)

    def score(self, cases: list[Case], images: torch.Tensor, against: list[Subject] | None = None) -> tuple[list[float], list[float]]:
        """Per-subject (subject fidelity, prompt fidelity), each averaged over the subject's prompts."""
        readings = self.world.reader.read(images * 2 - 1)
        repeats = len(cases[0].contexts)
        subject_scores, prompt_scores = [], []
        for i, case in enumerate(cases):
            target = (against or [c.subject for c in cases])[i]
            rows = readings[i * repeats : (i + 1) * repeats]
            subject_scores.append(statistics.mean(sum(r[k] == v for k, v in target.labels().items()) / len(IDENTITY) for r in rows))
            prompt_scores.append(statistics.mean(sum(r[k] == v for k, v in c.labels().items()) / len(c.labels()) for r, c in zip(rows, case.contexts)))
        return subject_scores, prompt_scores

    # ------------------------------------------------------------------ per-subject LoRAs

    def predict(self, hypernet, cases: list[Case], hidden_state: str) -> tuple[list[LoraWeights], list[torch.Tensor] | None]:
        loras, embeddings = [], []
        for case in cases:
            out = hypernet.predict(self.world.encoder.features(case.reference, hidden_state))
            loras.append(out.lora.select(0))
            if out.token_embedding is not None:
                embeddings.append(out.token_embedding[0])
        return loras, (embeddings or None)

    def _references(self, cases: list[Case]) -> tuple[torch.Tensor, torch.Tensor]:
        """Each subject's reference image as latents ``(S, 1, C, h, w)``, and the token ids of its caption."""
        backbone = self.world.backbone
        references = torch.cat([case.reference for case in cases])
        latents = backbone.encode_images(references.permute(0, 3, 1, 2) * 2 - 1).unsqueeze(1)
        return latents, backbone.tokenize([SyntheticWorld.caption(REFERENCE_CONTEXT, self.placeholder)])

    def finetune(self, cases: list[Case], starts: list[LoraWeights], steps: int, rank: int, learning_rate: float, seed: int) -> list[LoraWeights]:
        """Rank-relaxed finetune (starts = predictions) or LoRA from scratch (starts = zeros) on each subject's
        reference image and its caption, with the product's finetune loop (hypernet.finetune), all subjects in one
        batch (each subject's LoRA sees only its own samples)."""
        backbone = self.world.backbone
        latents, ids = self._references(cases)

        def denoiser(x_t, t):
            context = backbone.text_encoder(ids.expand(x_t.shape[0], -1))[0]  # re-encoded each step: the text-encoder LoRA hooks are live
            return backbone.unet(x_t, t, context).sample

        stacked = LoraWeights({n: torch.stack([s.down[n] for s in starts]) for n in starts[0].names},
                              {n: torch.stack([s.up[n] for s in starts]) for n in starts[0].names})
        config = FinetuneConfig(steps=steps, rank=rank, learning_rate=learning_rate, seed=seed)
        tuned = rank_relaxed_finetune(self.modules, stacked, latents, denoiser, self.schedule, config).lora
        return [tuned.select(i) for i in range(len(cases))]

    def tune(self, cases: list[Case], loras: list[LoraWeights], embeddings: list[torch.Tensor], steps: int, learning_rate: float,
             nn_weight: float) -> tuple[list[LoraWeights], list[torch.Tensor]]:
        """The tuning encoder's few-step tuning (hypernet.tuning) of each subject's predicted LoRA and word embedding on
        its reference image, all subjects in one batch; the prompt is re-encoded with the embedding every step."""
        backbone = self.world.backbone
        latents, ids = self._references(cases)
        placeholder_id = backbone.tokenizer(self.placeholder, add_special_tokens=False).input_ids[0]
        override = TokenEmbeddingOverride(backbone.text_encoder.get_input_embeddings(), placeholder_id)
        vocabulary = backbone.text_encoder.get_input_embeddings().weight.detach()[real_word_ids(backbone, placeholder_id)]

        def denoiser(x_t, t, vectors):
            handle = override.attach(vectors)
            try:
                context = backbone.text_encoder(ids.expand(x_t.shape[0], -1))[0]
            finally:
                handle.remove()
            return backbone.unet(x_t, t, context).sample

        stacked = LoraWeights({n: torch.stack([l.down[n] for l in loras]) for n in loras[0].names},
                              {n: torch.stack([l.up[n] for l in loras]) for n in loras[0].names})
        config = TuningConfig(steps=steps, learning_rate=learning_rate, nn_weight=nn_weight)
        result = tune_subject(self.modules, stacked, torch.stack(embeddings), vocabulary, latents, denoiser, self.schedule, config)
        return [result.lora.select(i) for i in range(len(cases))], list(result.embeddings)

    def zero_lora(self) -> LoraWeights:
        layers = self.unet_targets.layers + self.text_targets.layers
        return LoraWeights({l.name: torch.zeros(1, l.in_features) for l in layers}, {l.name: torch.zeros(l.out_features, 1) for l in layers})

    # ------------------------------------------------------------------ the instruments themselves

    @torch.no_grad()
    def rerender(self, pixels: torch.Tensor, prompts: list[str], strength: float, seed: int) -> torch.Tensor:
        """SDEdit: noise renders to ``strength`` of the schedule and let the base model (CFG, the given prompts)
        denoise them: images in the base model's own style whose attributes are, mostly, still the renders'."""
        from diffusers import DDIMScheduler

        backbone = self.world.backbone
        scheduler = DDIMScheduler.from_config(backbone.noise_scheduler.config)
        scheduler.set_timesteps(self.sample_steps)
        timesteps = [t for t in scheduler.timesteps if t <= strength * scheduler.config.num_train_timesteps]
        latents = backbone.encode_images(pixels)
        noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed))
        latents = scheduler.add_noise(latents, noise, timesteps[0].reshape(1))

        def encode(texts):
            return backbone.text_encoder(backbone.tokenize(texts))[0]

        cond, uncond = encode(prompts), encode([""] * len(prompts))
        for t in timesteps:
            eps_u, eps_c = backbone.unet(torch.cat([latents, latents]), t, torch.cat([uncond, cond])).sample.chunk(2)
            latents = scheduler.step(eps_u + self.cfg_text * (eps_c - eps_u), t, latents).prev_sample
        return backbone.decode_latents(latents).float().clamp(-1, 1)


def reader_checks(evaluator: Evaluator, world: SyntheticWorld, subjects: list[Subject], count: int, resolution: int, seed: int) -> dict:
    """The reader's per-attribute accuracy on held-out subjects: ground-truth renders, their VAE round trips, and
    the base model's re-renders of them (SDEdit at strength 0.5 with the described prompt)."""
    from experiments.toy_metrics import reader_accuracy

    rng = random.Random(seed)
    chosen = [rng.choice(subjects) for _ in range(count)]
    contexts = [world.sample_context(rng) for _ in range(count)]
    pixels = torch.from_numpy(np.stack([np.asarray(world.render(s, c, resolution)) for s, c in zip(chosen, contexts)])).permute(0, 3, 1, 2).float() / 127.5 - 1
    reader, backbone = evaluator.world.reader, evaluator.world.backbone
    with torch.no_grad():
        round_trip = torch.cat([backbone.decode_latents(backbone.encode_images(pixels[i : i + 256])).float().clamp(-1, 1) for i in range(0, count, 256)])
    few = min(count, 256)
    prompts = [SyntheticWorld.caption(c, description=s.describe()) for s, c in zip(chosen[:few], contexts[:few])]
    rerendered = evaluator.rerender(pixels[:few], prompts, 0.5, seed)
    return {"renders": reader_accuracy(reader, pixels, chosen, contexts),
            "vae_round_trips": reader_accuracy(reader, round_trip, chosen, contexts),
            "base_model_rerenders": reader_accuracy(reader, rerendered, chosen[:few], contexts[:few])}


class Timer:
    def __init__(self):
        self.timings: dict[str, float] = {}

    def __call__(self, name: str):
        timer = self

        class _Block:
            def __enter__(self):
                self.start = time.time()

            def __exit__(self, *exc):
                timer.timings[name] = round(timer.timings.get(name, 0.0) + time.time() - self.start, 1)

        return _Block()
