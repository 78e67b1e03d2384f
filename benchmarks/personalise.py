"""Full-size SD1.5 architecture (random weights): time and memory to personalise one subject, and file sizes.

    python benchmarks/personalise.py --resolution 256 [--measure-steps 3]

Side by side in one run, same backbone and image:
- hypernetwork prediction: ViT-L/14 CLIP-vision features + hypernetwork forward (SD1.5 LiDB defaults, 176 layers);
- rank-relaxed finetune, 40 steps (predicted LoRA fixed, fresh rank-4 LoRA trained; UNet + text encoder hooks);
- LoRA DreamBooth-style finetune from scratch, 400 steps (same loop, zero start).
On a CPU, running 440 SD1.5 training steps takes hours, so each finetune's per-step time is measured over
``--measure-steps`` steps (after a warm-up step) and multiplied by its step count; the table says so.
Sizes: the hypernetwork file (width 512, depth 2, 4 rounds), the compact and the standard subject LoRA.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hypernet import (  # noqa: E402
    FeatureSpec, FinetuneConfig, HyperNetConfig, HyperNetwork, LidbConfig, LoraWeights, NoiseSchedule, locate_targets,
    predict_subject_lora, rank_relaxed_finetune, save_hypernet,
)


def rss_mb() -> float:
    return int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize() / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--measure-steps", type=int, default=3)
    parser.add_argument("--json", help="also write the numbers to this JSON file (benchmarks/sd15.py reads it)")
    args = parser.parse_args()
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from training.backbone import sd15_random_backbone
    from training.image_encoder import ImageEncoder

    backbone = sd15_random_backbone()
    unet = backbone.unet.eval().requires_grad_(False)
    text_encoder = backbone.text_encoder.eval().requires_grad_(False)
    vision = CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                                                            image_size=224, patch_size=14, projection_dim=768)).eval().requires_grad_(False)
    encoder = ImageEncoder(vision, 224, "ViT-L/14 (random)")
    tokenizer = backbone.tokenizer
    bound = locate_targets(unet, [text_encoder])
    modules = bound.modules
    schedule = NoiseSchedule.scaled_linear()
    hyper_config = HyperNetConfig(features=FeatureSpec(dim=1024, tokens=257, encoder="ViT-L/14"), width=512, depth=2, heads=8, iterations=4, lidb=LidbConfig())
    hypernet = HyperNetwork(hyper_config, bound.layers).eval()
    with torch.no_grad():
        for p in hypernet.heads.weights:
            p.normal_(0, 0.01)
    image = torch.rand(1, 512, 512, 3)
    ids = tokenizer(["a photo of a sks dog"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    latent_size = args.resolution // 8
    latents = torch.randn(1, 4, latent_size, latent_size)

    def denoiser(x_t, t):
        return unet(x_t, t, text_encoder(ids)[0].expand(x_t.shape[0], -1, -1)).sample

    rows = []
    # 1. hypernetwork prediction
    base_rss = rss_mb()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        with torch.no_grad():
            subject = predict_subject_lora(hypernet, encoder.features(image, "penultimate_hidden_states"), base_arch="sd15")
        times.append(time.perf_counter() - start)
    rows.append(("hypernetwork prediction", statistics.median(times), "measured (median of 3)", rss_mb() - base_rss))

    # 2./3. finetunes: per-step time over a few steps
    def per_step(start_lora: LoraWeights) -> float:
        samples = []

        def callback(step, loss):
            samples.append(time.perf_counter())

        begin = time.perf_counter()
        rank_relaxed_finetune(modules, start_lora, latents, denoiser, schedule, FinetuneConfig(steps=args.measure_steps + 1, rank=4), callback)
        steps = [b - a for a, b in zip([begin] + samples[:-1], samples)][1:]  # drop the warm-up step
        return statistics.median(steps)

    before = rss_mb()
    predicted_step = per_step(subject.lora)
    zero = LoraWeights({l.name: torch.zeros(1, l.in_features) for l in bound.layers}, {l.name: torch.zeros(l.out_features, 1) for l in bound.layers})
    scratch_step = per_step(zero)
    train_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before
    rows.append(("rank-relaxed finetune, 40 steps", 40 * predicted_step, f"{predicted_step:.2f} s/step x 40", train_mb))
    rows.append(("LoRA finetune from scratch, 400 steps", 400 * scratch_step, f"{scratch_step:.2f} s/step x 400", train_mb))

    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        sizes = {
            "hypernetwork file": save_hypernet(folder / "h.safetensors", hypernet, base_arch="sd15").stat().st_size,
            "subject LoRA, compact": subject.save_compact(folder / "c.safetensors").stat().st_size,
            "subject LoRA, standard (fp32)": subject.save(folder / "s.safetensors").stat().st_size,
            "subject LoRA, standard (fp16)": subject.save(folder / "s16.safetensors", dtype=torch.float16).stat().st_size,
        }
    print(f"SD1.5 architecture (random weights), {args.resolution}px, CPU, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{len(bound.layers)} adapted layers, {hypernet.num_predicted():,} predicted numbers")
    print(f"{'personalise one subject':40s} {'seconds':>9s} {'vs hypernet':>12s}  how")
    for name, seconds, how, _ in rows:
        print(f"{name:40s} {seconds:9.1f} {seconds / rows[0][1]:11.1f}x  {how}")
    print(f"extra resident memory: prediction {rows[0][3]:.0f} MB; finetune (peak) {train_mb:.0f} MB over the loaded models")
    for name, size in sizes.items():
        print(f"{name:40s} {size:>12,d} bytes")
    if args.json:
        Path(args.json).write_text(json.dumps({"resolution": args.resolution, "seconds": {name: seconds for name, seconds, _, _ in rows},
                                               "how": {name: how for name, _, how, _ in rows}, "prediction_mb": rows[0][3],
                                               "finetune_peak_mb": train_mb, "sizes": sizes, "layers": len(bound.layers)}, indent=1))


if __name__ == "__main__":
    main()
