"""Full-size SD1.5 or SDXL architecture (random weights): time and memory to personalise one subject, and file sizes.

    python benchmarks/personalise.py --resolution 256 [--measure-steps 3]
    python benchmarks/personalise.py --arch sdxl --resolution 128

Side by side in one run, same backbone and image:
- hypernetwork prediction: ViT-L/14 CLIP-vision features + hypernetwork forward (LiDB defaults; SD1.5 176 layers,
  SDXL 736);
- rank-relaxed finetune, 40 steps (predicted LoRA fixed, fresh rank-4 LoRA trained; UNet + text encoder hooks);
- LoRA DreamBooth-style finetune from scratch, 400 steps (same loop, zero start).
On a CPU, running 440 SD1.5 training steps takes hours, so each finetune's per-step time is measured over
``--measure-steps`` steps (after a warm-up step) and multiplied by its step count; the table says so.
Sizes: the hypernetwork file (width 512, depth 2, 4 rounds), the compact and the standard subject LoRA.
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import statistics
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import _clock as clock  # noqa: E402

from hypernet import (  # noqa: E402
    FeatureSpec, FinetuneConfig, HyperNetConfig, HyperNetwork, LidbConfig, LoraWeights, NoiseSchedule, locate_targets,
    predict_subject_lora, rank_relaxed_finetune, save_hypernet,
)
from hypernet.targets import UNET_COMPONENT  # noqa: E402


def rss_mb() -> float:
    return int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize() / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=["sd15", "sdxl"], default="sd15")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--measure-steps", type=int, default=3)
    parser.add_argument("--unet-only", action="store_true", help="finetune as the ComfyUI node does: prompt encoded once, UNet layers only")
    parser.add_argument("--json", help="also write the numbers to this JSON file (benchmarks/sd15.py reads it)")
    args = parser.parse_args()
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from training.backbone import TextConditioning, sd15_random_backbone, sdxl_random_backbone, sdxl_target_layers
    from training.image_encoder import ImageEncoder

    def load():
        # SDXL's text encoders (3.3 GB in fp32) are left out when the prompt arrives encoded anyway
        backbone = sdxl_random_backbone(text_encoders=not args.unet_only) if args.arch == "sdxl" else sd15_random_backbone()
        del backbone.vae  # latents are given; the VAE is not part of either route
        for model in (backbone.unet, *backbone.text_encoders):
            model.eval().requires_grad_(False)
        return backbone, locate_targets(backbone.unet, backbone.text_encoders)

    # SDXL in float32 is 14 GB: its target list comes from the shipped configs (meta device) and the backbone is
    # built only after the image encoder is gone
    backbone, bound = (None, None) if args.arch == "sdxl" else load()
    layers = sdxl_target_layers() if args.arch == "sdxl" else bound.layers
    vision = CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                                                            image_size=224, patch_size=14, projection_dim=768)).eval().requires_grad_(False)
    encoder = ImageEncoder(vision, 224, "ViT-L/14 (random)")
    schedule = NoiseSchedule.scaled_linear()
    hyper_config = HyperNetConfig(features=FeatureSpec(dim=1024, tokens=257, encoder="ViT-L/14"), width=512, depth=2, heads=8, iterations=4, lidb=LidbConfig())
    hypernet = HyperNetwork(hyper_config, layers).eval()
    with torch.no_grad():
        for p in hypernet.heads.weights:
            p.normal_(0, 0.01)
    image = torch.rand(1, 512, 512, 3)
    latent_size = args.resolution // 8
    latents = torch.randn(1, 4, latent_size, latent_size)

    rows = []
    # 1. hypernetwork prediction
    base_rss = rss_mb()
    times = []
    for _ in range(3):
        start = clock.now()
        with torch.no_grad():
            subject = predict_subject_lora(hypernet, encoder.features(image, "penultimate_hidden_states"), base_arch=args.arch)
        times.append(clock.now() - start)
    rows.append(("hypernetwork prediction", statistics.median(times), "measured (median of 3)", rss_mb() - base_rss))
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        sizes = {
            "hypernetwork file": save_hypernet(folder / "h.safetensors", hypernet, base_arch=args.arch).stat().st_size,
            "subject LoRA, compact": subject.save_compact(folder / "c.safetensors").stat().st_size,
            "subject LoRA, standard (fp32)": subject.save(folder / "s.safetensors").stat().st_size,
            "subject LoRA, standard (fp16)": subject.save(folder / "s16.safetensors", dtype=torch.float16).stat().st_size,
        }
    num_predicted = hypernet.num_predicted()
    del vision, encoder, hypernet
    gc.collect()
    if backbone is None:
        backbone, bound = load()

    if args.unet_only:  # as the ComfyUI node: the prompt arrives encoded, the UNet layers are tuned
        if backbone.text_encoders:
            with torch.no_grad():
                fixed = backbone.encode_prompts(["a photo of a sks dog"])
        else:  # an encoded prompt of the right shapes (its values do not change the cost)
            width, pooled = backbone.encoded_prompt_shape()
            fixed = TextConditioning(torch.randn(1, 77, width), None if pooled is None else torch.randn(1, pooled))
        backbone.text_encoder = backbone.text_encoder_2 = None
        gc.collect()
        bound = bound.restricted_to(UNET_COMPONENT)
        subject.lora = subject.lora.restricted_to(bound.names)

        def denoiser(x_t, t):
            return backbone.predict_noise(x_t, t, TextConditioning(fixed.context.expand(x_t.shape[0], -1, -1),
                                                                    None if fixed.pooled is None else fixed.pooled.expand(x_t.shape[0], -1)))
    else:
        def denoiser(x_t, t):  # the prompt is re-encoded: text-encoder LoRA hooks are live
            conditioning = backbone.encode_prompts(["a photo of a sks dog"] * x_t.shape[0])
            return backbone.predict_noise(x_t, t, conditioning)
    modules = bound.modules

    # 2./3. finetunes: per-step time over a few steps
    def per_step(start_lora: LoraWeights) -> float:
        samples = []

        def callback(step, loss):
            samples.append(clock.now())

        begin = clock.now()
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

    print(f"{'SDXL' if args.arch == 'sdxl' else 'SD1.5'} architecture (random weights), {args.resolution}px, CPU, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{len(layers)} adapted layers, {num_predicted:,} predicted numbers"
          + ("; finetunes tune the UNet layers on a pre-encoded prompt (as the ComfyUI node)" if args.unet_only else ""))
    print(f"{'personalise one subject':40s} {'seconds':>9s} {'vs hypernet':>12s}  how")
    for name, seconds, how, _ in rows:
        print(f"{name:40s} {seconds:9.1f} {seconds / rows[0][1]:11.1f}x  {how}")
    print(f"extra resident memory: prediction {rows[0][3]:.0f} MB; finetune (peak) {train_mb:.0f} MB over the loaded models")
    for name, size in sizes.items():
        print(f"{name:40s} {size:>12,d} bytes")
    if args.json:
        Path(args.json).write_text(json.dumps({"arch": args.arch, "resolution": args.resolution, "seconds": {name: seconds for name, seconds, _, _ in rows},
                                               "how": {name: how for name, _, how, _ in rows}, "prediction_mb": rows[0][3],
                                               "finetune_peak_mb": train_mb, "sizes": sizes, "layers": len(layers),
                                               "unet_only_finetune": args.unet_only, "clock": clock.UNIT}, indent=1))


if __name__ == "__main__":
    main()
