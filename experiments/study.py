"""Toy-world study: do the papers' claims hold at small scale? Everything from scratch, on a CPU.

    python -m experiments.study --out runs/study            # full run (~60 min on 2 cores), writes docs/study.md
    python -m experiments.study --out runs/quick --quick    # pipeline check in a few minutes (numbers meaningless)

1. pretrain the toy world's base model (VAE, toy CLIP, UNet on class-level captions) -- experiments/toy_models.py
2. train the attribute reader that measures subject and prompt fidelity -- experiments/toy_metrics.py
3. train hypernetworks with training.train (with and without the L2 output regulariser)
4. on held-out subjects, one reference image each, new prompts: compare base; hypernet (+/- regulariser);
   hypernet + HM-CFG (cfg_subject sweep); hypernet + rank-relaxed finetune (40 steps); LoRA finetune from
   scratch (40 and 400 steps). Means with spread over subjects and seeds.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from hypernet import FinetuneConfig, LoraWeights, NoiseSchedule, attach_lora, load_hypernet, locate_targets, rank_relaxed_finetune
from training.backbone import load_backbone
from training.config import PRESETS, TrainConfig
from training.image_encoder import load_image_encoder
from training.sampling import image_grid, sample, to_pil
from training.synthetic import Context, SyntheticWorld, write_synthetic_dataset

from .toy_metrics import IDENTITY, fidelity, reader_accuracy, train_reader
from .toy_models import RenderStream, Sizes, pretrain_toy_world

REPO = Path(__file__).resolve().parents[1]
REFERENCE_CONTEXT = Context("white", "in the center", "large")


@dataclass
class Plan:
    sizes: Sizes
    reader_steps: int = 1500
    train_subjects: int = 400
    images_per_subject: int = 4
    hypernet_steps: int = 1000
    eval_subjects: int = 12
    eval_contexts: int = 4
    seeds: tuple = (0, 1)
    sample_steps: int = 20
    cfg_text: float = 5.0
    cfg_subjects: tuple = (0.5, 1.0, 2.0, 4.0)
    finetune_lr: float = 1e-3
    scratch_steps: tuple = (40, 400)
    hyper_finetune_steps: int = 40
    timings: dict = field(default_factory=dict)

    @classmethod
    def quick(cls) -> "Plan":
        return cls(sizes=Sizes.quick(), reader_steps=30, train_subjects=8, images_per_subject=2, hypernet_steps=8, eval_subjects=2,
                   eval_contexts=2, seeds=(0,), sample_steps=3, cfg_subjects=(1.0, 2.0), scratch_steps=(4, 8), hyper_finetune_steps=4)


def log(message: str) -> None:
    print(f"[study] {message}", flush=True)


def train_hypernet(out: Path, plan: Plan, data: Path, reg_weight: float, name: str) -> Path:
    from training.train import run

    target = out / name
    if (target / "hypernet.safetensors").exists():
        return target / "hypernet.safetensors"
    # the demo preset is this recipe (same hypernetwork size, batch, learning rate, no flips); only the inputs differ
    config = TrainConfig(**{
        **PRESETS["demo"], "backbone": str(out / "base"), "image_encoder": str(out / "image_encoder"), "data": str(data),
        "resolution": plan.sizes.resolution, "reg_weight": reg_weight, "max_steps": plan.hypernet_steps, "log_every": 50,
        "checkpoint_every": 500, "sample_steps": plan.sample_steps, "sample_subjects": 3, "output_dir": str(target), "seed": 0,
    })
    start = time.time()
    run(config)
    plan.timings[f"train_{name}_s"] = time.time() - start
    return target / "hypernet.safetensors"


class Evaluator:
    def __init__(self, out: Path, plan: Plan, reader):
        self.plan, self.reader = plan, reader
        self.backbone = load_backbone(str(out / "base"))
        self.encoder = load_image_encoder(str(out / "image_encoder"))
        self.unet_targets = locate_targets(self.backbone.unet)
        self.text_targets = locate_targets(None, [self.backbone.text_encoder])
        self.modules = {**self.unet_targets.modules, **self.text_targets.modules}
        self.schedule = NoiseSchedule(self.backbone.noise_scheduler.alphas_cumprod.float())
        self.world = SyntheticWorld(0)

    def generate(self, prompts, lora, mode, seed, cfg_subject=1.0):
        return sample(self.backbone, prompts, lora=lora, unet_modules=self.unet_targets.modules, text_modules=self.text_targets.modules,
                      mode=mode, cfg_text=self.plan.cfg_text, cfg_subject=cfg_subject, steps=self.plan.sample_steps,
                      resolution=self.plan.sizes.resolution, seed=seed)

    def finetune(self, reference: torch.Tensor, prompt: str, start: LoraWeights, steps: int, seed: int) -> LoraWeights:
        """Rank-relaxed finetune (start = prediction) or LoRA from scratch (start = zeros), rank 4."""
        latents = self.backbone.encode_images(reference.permute(0, 3, 1, 2) * 2 - 1)
        tokenizer = self.backbone.tokenizer
        ids = tokenizer([prompt], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids

        def denoiser(x_t, t):
            context = self.backbone.text_encoder(ids)[0]  # re-encoded: text-encoder LoRA hooks are live
            return self.backbone.unet(x_t, t, context.expand(x_t.shape[0], -1, -1)).sample

        config = FinetuneConfig(steps=steps, rank=4, learning_rate=self.plan.finetune_lr, seed=seed)
        return rank_relaxed_finetune(self.modules, start, latents, denoiser, self.schedule, config).lora

    def zero_lora(self) -> LoraWeights:
        layers = self.unet_targets.layers + self.text_targets.layers
        return LoraWeights({l.name: torch.zeros(1, l.in_features) for l in layers}, {l.name: torch.zeros(l.out_features, 1) for l in layers})


def evaluate(out: Path, plan: Plan, reader, hypernets: dict[str, Path]) -> dict:
    ev = Evaluator(out, plan, reader)
    world = ev.world
    subjects = world.subjects(plan.eval_subjects, "heldout")
    rng = random.Random(1234)
    loaded = {name: load_hypernet(path)[0] for name, path in hypernets.items()}
    scores: dict[str, dict[str, list]] = {}
    examples: dict[str, list] = {}
    start = time.time()
    for index, subject in enumerate(subjects):
        reference = torch.from_numpy(np.asarray(world.render(subject, REFERENCE_CONTEXT, plan.sizes.resolution))).float().div(255).unsqueeze(0)
        contexts = []
        while len(contexts) < plan.eval_contexts:
            context = world.sample_context(rng)
            if context != REFERENCE_CONTEXT and context not in contexts:
                contexts.append(context)
        prompts = [world.caption(c, "sks") for c in contexts]
        features = ev.encoder.features(reference, "penultimate_hidden_states")
        predicted = {name: h.predict(features).lora.select(0) for name, h in loaded.items()}
        reference_prompt = world.caption(REFERENCE_CONTEXT, "sks")
        methods: dict[str, tuple] = {"base model": (None, "base", 1.0)}
        methods["hypernet (L2 reg)"] = (predicted["reg"], "lora", 1.0)
        if "noreg" in predicted:
            methods["hypernet (no reg)"] = (predicted["noreg"], "lora", 1.0)
        for s in plan.cfg_subjects:
            methods[f"hypernet + HM-CFG s={s:g}"] = (predicted["reg"], "hmcfg", s)
        tuned = ev.finetune(reference, reference_prompt, predicted["reg"], plan.hyper_finetune_steps, seed=index)
        methods[f"hypernet + finetune {plan.hyper_finetune_steps}"] = (tuned, "lora", 1.0)
        for steps in plan.scratch_steps:
            methods[f"LoRA from scratch {steps}"] = (ev.finetune(reference, reference_prompt, ev.zero_lora(), steps, seed=index), "lora", 1.0)
        for name, (lora, mode, cfg_subject) in methods.items():
            per_subject = []
            for seed in plan.seeds:
                images = ev.generate(prompts, lora, mode, seed, cfg_subject)
                readings = reader.read(images * 2 - 1)
                per_subject += [fidelity(r, subject, c) for r, c in zip(readings, contexts)]
                if index == 0 and seed == plan.seeds[0]:
                    examples[name] = [to_pil(image) for image in images]
            row = scores.setdefault(name, {"subject": [], "prompt": []})
            row["subject"].append(statistics.mean(s for s, _ in per_subject))
            row["prompt"].append(statistics.mean(p for _, p in per_subject))
        examples.setdefault("reference", [to_pil(reference[0].permute(2, 0, 1))] * len(contexts))
        log(f"evaluated subject {index + 1}/{len(subjects)} ({time.time() - start:.0f}s)")
    plan.timings["evaluate_s"] = time.time() - start
    order = ["reference"] + list(scores)
    image_grid([examples[name] for name in order], plan.sizes.resolution * 2).save(out / "examples.png")
    summary = {name: {metric: (statistics.mean(values), statistics.pstdev(values)) for metric, values in row.items()} for name, row in scores.items()}
    return {"summary": summary, "per_subject": scores, "example_rows": order, "subjects": [s.id for s in subjects],
            "prompts_example": [world.caption(c, "sks") for c in contexts]}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = results["summary"]
    fig, ax = plt.subplots(figsize=(7, 5))
    sweep = [(name, v) for name, v in summary.items() if "HM-CFG" in name]
    if sweep:
        ax.plot([v["prompt"][0] for _, v in sweep], [v["subject"][0] for _, v in sweep], "-o", color="tab:purple", label="hypernet + HM-CFG (cfg_subject sweep)")
        for name, v in sweep:
            ax.annotate(name.split("s=")[-1], (v["prompt"][0], v["subject"][0]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    for name, v in summary.items():
        if "HM-CFG" in name:
            continue
        ax.errorbar(v["prompt"][0], v["subject"][0], xerr=v["prompt"][1], yerr=v["subject"][1], fmt="o", capsize=3, label=name)
    ax.set_xlabel("prompt fidelity (context attributes matched)")
    ax.set_ylabel("subject fidelity (identity attributes matched)")
    ax.set_title("Toy world, held-out subjects: fidelity vs prompt adherence")
    ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def paired(per_subject: dict, a: str, b: str, metric: str = "subject") -> str:
    """Mean paired difference a - b over subjects, with a 2-standard-error verdict (same subjects, prompts, seeds)."""
    diffs = [x - y for x, y in zip(per_subject[a][metric], per_subject[b][metric])]
    if len(diffs) < 2:
        return "n/a"
    mean, se = statistics.mean(diffs), statistics.stdev(diffs) / len(diffs) ** 0.5
    return f"paired difference {mean:+.3f} ± {se:.3f} s.e., {'significant' if abs(mean) > 2 * se else 'within noise'}"


def claims(summary: dict, plan: Plan, per_subject: dict | None = None) -> list[str]:
    def s(name, metric="subject"):
        return summary[name][metric][0]

    def noise(a, b, metric="subject"):
        return f"; {paired(per_subject, a, b, metric)}" if per_subject else ""

    def verdict(holds: bool, a, b, metric="subject"):
        word = "confirmed" if holds else "refuted"
        return f"{word} by the means, but within noise" if per_subject and "within noise" in paired(per_subject, a, b, metric) else word

    lines = []
    base, hyper = "base model", "hypernet (L2 reg)"
    lines.append(f"Hypernetwork beats the base model on subject fidelity for unseen subjects: "
                 f"{verdict(s(hyper) > s(base), hyper, base)} ({s(hyper):.3f} vs {s(base):.3f}{noise(hyper, base)}).")
    if "hypernet (no reg)" in summary:
        lines.append(f"The L2 output regulariser preserves prompt fidelity: {verdict(s(hyper, 'prompt') >= s('hypernet (no reg)', 'prompt'), hyper, 'hypernet (no reg)', 'prompt')} "
                     f"(prompt {s(hyper, 'prompt'):.3f} with vs {s('hypernet (no reg)', 'prompt'):.3f} without{noise(hyper, 'hypernet (no reg)', 'prompt')}; "
                     f"subject {s(hyper):.3f} vs {s('hypernet (no reg)'):.3f}).")
    sweep = {name: v for name, v in summary.items() if "HM-CFG" in name}
    if sweep:
        best = max(sweep, key=lambda n: sweep[n]["prompt"][0])
        lines.append(f"HM-CFG improves prompt fidelity at a small fidelity cost: best prompt fidelity {sweep[best]['prompt'][0]:.3f} ({best}) vs "
                     f"{s(hyper, 'prompt'):.3f} for the hypernet alone{noise(best, hyper, 'prompt')}; subject fidelity {sweep[best]['subject'][0]:.3f} "
                     f"vs {s(hyper):.3f} -> {verdict(sweep[best]['prompt'][0] > s(hyper, 'prompt'), best, hyper, 'prompt')}.")
    ft = f"hypernet + finetune {plan.hyper_finetune_steps}"
    long_scratch = f"LoRA from scratch {max(plan.scratch_steps)}"
    lines.append(f"Hypernet + {plan.hyper_finetune_steps}-step finetune >= {max(plan.scratch_steps)}-step finetune from scratch (subject fidelity): "
                 f"{verdict(s(ft) >= s(long_scratch), ft, long_scratch)} ({s(ft):.3f} vs {s(long_scratch):.3f}{noise(ft, long_scratch)}).")
    return lines


def interpretation(summary: dict, accuracy: dict) -> str:
    """What limits the numbers: how well the base model can render identity at all (the best finetune's score)."""
    chance = statistics.mean(1 / len(v) for v in IDENTITY.values())
    best_name = max(summary, key=lambda n: summary[n]["subject"][0])
    best = summary[best_name]["subject"][0]
    reader = statistics.mean(accuracy[k] for k in IDENTITY)
    return (f"Reading the numbers: the attribute reader recognises {reader:.2f} of the identity attributes in real renders, and "
            f"chance is about {chance:.2f}; the best method ({best_name}) reaches {best:.3f}. When even a per-subject "
            f"finetune gets little identity into the images, the limit is the toy base model's ability to render "
            f"subject attributes at all, not the way the LoRA is obtained; differences between methods smaller than "
            f"the paired standard error are noise. A larger base model (more pretraining steps or channels: "
            f"`experiments/toy_models.py` `Sizes`) is the first thing to change before reading more into them.")


def write_report(out: Path, plan: Plan, results: dict, accuracy: dict, quick: bool, docs: Path) -> None:
    summary = results["summary"]
    rows = "\n".join(f"| {name} | {v['subject'][0]:.3f} ± {v['subject'][1]:.3f} | {v['prompt'][0]:.3f} ± {v['prompt'][1]:.3f} |" for name, v in summary.items())
    identity_acc = statistics.mean(accuracy[k] for k in IDENTITY)
    context_acc = statistics.mean(v for k, v in accuracy.items() if k not in IDENTITY)
    timing = ", ".join(f"{k} {v:.0f}s" for k, v in plan.timings.items())
    text = f"""# Toy-world study{' (QUICK MODE: pipeline check, numbers are meaningless)' if quick else ''}

Regenerate: `python -m experiments.study --out runs/study` ({'quick' if quick else 'full'} run here: {sum(plan.timings.values()) / 60:.1f} min on
{torch.get_num_threads()} CPU threads; {timing}).

## Setup
No pretrained diffusion or CLIP weights are available here, so the study builds a small world where every claim can
be measured on a CPU. Subjects are procedural toys whose identity is (shape, primary colour, secondary colour,
pattern, marking) -- {len(SyntheticWorld(0).all_subjects())} identities, split 80/20 into train / held-out -- shown
in contexts (background, position, scale) that captions describe. The base model (SD1.5 family, tiny: VAE to
16x16x4 latents, UNet {plan.sizes.unet_channels}, toy-CLIP text encoder) was pretrained here on class-level captions
only ("a photo of a toy on a sand background, on the left, small"); the hypernetwork's frozen image encoder is the
toy CLIP's vision tower (contrastively pretrained on full descriptions, as CLIP is). Hypernetworks were trained with
`training.train` ({plan.hypernet_steps} steps, batch 8, {plan.train_subjects} train subjects x {plan.images_per_subject}
images; the reference is another image of the same subject). Evaluation: {plan.eval_subjects} held-out subjects,
one reference image each (white background, centre, large), {plan.eval_contexts} new prompts each, seeds {list(plan.seeds)},
DDIM {plan.sample_steps} steps, cfg_text {plan.cfg_text}. Finetunes: rank 4, AdamW lr {plan.finetune_lr} (the same for
all finetunes; the toy model is far smaller than SD1.5), on the reference image and its caption.

Metrics: an attribute-reading CNN trained on ground-truth renders (and their VAE round-trips).
*Subject fidelity* (role of DINO / CLIP-I) = share of the reference subject's 5 identity attributes read off a
generated image; *prompt fidelity* (role of CLIP-T) = share of the prompt's 3 context attributes read off it.
Reader accuracy on held-out subjects' images: identity {identity_acc:.3f}, context {context_acc:.3f}
(per attribute: {', '.join(f'{k} {v:.2f}' for k, v in accuracy.items())}). Chance: identity ~{statistics.mean(1 / len(v) for v in IDENTITY.values()):.2f}.

## Results (held-out subjects; mean ± std over subjects, each averaged over prompts and seeds)

| method | subject fidelity | prompt fidelity |
|---|---|---|
{rows}

![fidelity vs prompt adherence](study_fidelity.png)

Examples (first held-out subject; columns are the prompts; rows: reference, then methods in table order):

![examples](study_examples.png)

## The papers' claims at this scale
""" + "\n".join(f"- {line}" for line in claims(summary, plan, results.get("per_subject"))) + "\n\n" + interpretation(summary, accuracy) + """

These are measurements on a toy world, reported as measured; they say whether the mechanisms work as claimed at
small scale, not what the numbers would be on SD1.5 with real photographs.
"""
    docs.mkdir(parents=True, exist_ok=True)
    name = "study_quick.md" if quick else "study.md"
    (docs / name).write_text(text)
    import shutil

    if not quick:
        shutil.copy(out / "fidelity.png", docs / "study_fidelity.png")
        shutil.copy(out / "examples.png", docs / "study_examples.png")
    (out / "results.json").write_text(json.dumps({"results": results, "reader_accuracy": accuracy, "timings": plan.timings}, indent=1))
    log(f"wrote {docs / name}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/study", help="work folder (pretrained models are reused if present)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and step counts: checks the pipeline in a few minutes")
    parser.add_argument("--docs", default=str(REPO / "docs"), help="where study.md goes")
    parser.add_argument("--report-only", action="store_true", help="rewrite the report and plot from --out's results.json (no training)")
    args = parser.parse_args(argv)
    plan = Plan.quick() if args.quick else Plan(sizes=Sizes())
    out = Path(args.out)
    if args.report_only:
        saved = json.loads((out / "results.json").read_text())
        plan.timings.update(saved["timings"])
        plot(saved["results"], out / "fidelity.png")
        write_report(out, plan, saved["results"], saved["reader_accuracy"], args.quick, Path(args.docs))
        return
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if not (out / "base" / "model_index.json").exists():
        plan.timings.update(pretrain_toy_world(out, plan.sizes))
    else:
        plan.timings.update(json.loads((out / "pretrain_timings.json").read_text()))
    world = SyntheticWorld(0)
    train_stream = RenderStream(world, world.subjects(2000, "train"), plan.sizes.resolution, seed=5)
    heldout_stream = RenderStream(world, world.subjects(500, "heldout"), plan.sizes.resolution, seed=6)
    backbone = load_backbone(str(out / "base"))
    start = time.time()
    reader = train_reader(train_stream, backbone.vae, plan.reader_steps, 64 if not args.quick else 8, log)
    plan.timings["reader_s"] = time.time() - start
    accuracy = reader_accuracy(reader, heldout_stream, backbone.vae, batches=8 if not args.quick else 1, batch=64 if not args.quick else 8)
    log(f"attribute reader accuracy on held-out subjects: {accuracy}")
    data = out / "train_data"
    if not (data / ".complete").exists():
        write_synthetic_dataset(data, plan.train_subjects, plan.images_per_subject, size=plan.sizes.resolution, seed=0, split="train")
        (data / ".complete").write_text("ok\n")
    hypernets = {"reg": train_hypernet(out, plan, data, 1e-3, "hypernet_reg"), "noreg": train_hypernet(out, plan, data, 0.0, "hypernet_noreg")}
    results = evaluate(out, plan, reader, hypernets)
    plot(results, out / "fidelity.png")
    write_report(out, plan, results, accuracy, args.quick, Path(args.docs))
    for line in claims(results["summary"], plan, results.get("per_subject")):
        log(line)


if __name__ == "__main__":
    main()
