"""Training-step cost: the hypernetwork objective vs a plain single-LoRA training step, same backbone, one run.

    python benchmarks/train_step.py                       # tiny preset (tiny random backbone), CPU
    python benchmarks/train_step.py --backbone sd15-random --resolution 512 --batch-size 4 --mixed-precision bf16 --gradient-checkpointing
    python benchmarks/train_step.py --backbone sdxl-random --resolution 128 --batch-size 1 --repeats 3 --warmup 1

Both steps: VAE encode, text encode, UNet forward/backward with LoRA on the same target layers, AdamW step.
HyperNet step = image-encoder features + hypernetwork forward (s refinement rounds) + a *different* LoRA per
sample; plain step = one shared rank-r LoRA (peft), as in LoRA DreamBooth. Interleaved repeats, medians.
Peak memory is each variant's own process (CPU: max RSS; GPU: torch.cuda.max_memory_allocated).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import _clock as clock  # noqa: E402


def build(args):
    from hypernet import HyperNetwork, locate_targets
    from training.config import PRESETS, TrainConfig
    from training.image_encoder import load_image_encoder
    from training.backbone import TextConditioning
    from training.objective import Batch, HyperNetObjective

    config = TrainConfig(**{**PRESETS["tiny"], "batch_size": args.batch_size, "resolution": args.resolution})
    if args.backbone in ("sd15-random", "sdxl-random"):
        from training.backbone import sd15_random_backbone, sdxl_random_backbone

        backbone = sd15_random_backbone() if args.backbone == "sd15-random" else sdxl_random_backbone(text_encoders=not args.unet_only)
        config = TrainConfig(**{**PRESETS[args.backbone.split("-")[0]], "batch_size": args.batch_size, "resolution": args.resolution})
        encoder = load_image_encoder("tiny")  # encoder cost is small and identical across runs; kept tiny offline
    else:
        from training.backbone import load_backbone

        backbone = load_backbone("tiny")
        encoder = load_image_encoder("tiny")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.mixed_precision]
    for part in (backbone.unet, *backbone.text_encoders):
        part.to(device, dtype).requires_grad_(False)
    backbone.vae.to(device).requires_grad_(False)
    encoder.model.to(device)
    if args.gradient_checkpointing:
        backbone.unet.enable_gradient_checkpointing()
        for text_encoder in backbone.text_encoders:
            text_encoder.gradient_checkpointing_enable()
    if args.unet_only:  # no text-encoder targets, and the prompt arrives encoded (random values of the right shapes)
        width, pooled = backbone.encoded_prompt_shape()
        encoded = TextConditioning(torch.randn(1, 77, width).to(device), None if pooled is None else torch.randn(1, pooled).to(device))
        backbone.text_encoder = backbone.text_encoder_2 = None
        backbone.encode_prompts = lambda prompts, device=None: TextConditioning(
            encoded.context.expand(len(prompts), -1, -1), None if encoded.pooled is None else encoded.pooled.expand(len(prompts), -1))
        config.text_encoder_targets = False
    unet_targets = locate_targets(backbone.unet)
    text_targets = locate_targets(None, backbone.text_encoders) if backbone.text_encoders else None
    schedule = backbone.noise_schedule()
    generator = torch.Generator().manual_seed(0)
    size = args.resolution
    pixels = (torch.rand(args.batch_size, 3, size, size, generator=generator) * 2 - 1).to(device)
    references = torch.rand(args.batch_size, size, size, 3, generator=generator)
    captions = ["a photo of a sks toy on a red background"] * args.batch_size
    return (config, backbone, encoder, unet_targets, text_targets, schedule, pixels, references, captions, device, dtype,
            Batch, HyperNetObjective, HyperNetwork)


def run_variant(args) -> dict:
    (config, backbone, encoder, unet_targets, text_targets, schedule, pixels, references, captions, device, dtype,
     Batch, HyperNetObjective, HyperNetwork) = build(args)
    autocast = torch.autocast(device_type=device, dtype=dtype, enabled=dtype != torch.float32)
    if args.variant == "hypernet":
        layers = unet_targets.layers + (text_targets.layers if text_targets is not None else [])
        hyper_config = config.hypernet_config(encoder.feature_spec(config.hidden_state))
        model = HyperNetwork(hyper_config, layers).to(device)
        objective = HyperNetObjective(backbone, unet_targets, text_targets, config, schedule)

        def step(generator):
            features = encoder.features(references, config.hidden_state).to(device)
            with autocast, objective.step(model, Batch(pixels, features, captions, ["s"] * len(captions)), generator) as terms:
                terms["loss"].backward()
    else:
        from peft import LoraConfig, inject_adapter_in_model

        rank = config.lidb_rank
        inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=["to_q", "to_k", "to_v", "to_out.0"]), backbone.unet)
        for text_encoder in backbone.text_encoders:
            inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]), text_encoder)
        for part in (backbone.unet, *backbone.text_encoders):
            part.to(device)
        model = torch.nn.ModuleList([backbone.unet, *backbone.text_encoders])

        def step(generator):
            with torch.no_grad():
                latents = backbone.encode_images(pixels)
            noise = torch.randn(latents.shape, generator=generator).to(device, latents.dtype)
            t = torch.randint(0, 1000, (len(captions),), generator=generator).to(device)
            with autocast:
                conditioning = backbone.encode_prompts(captions, device)
                prediction = backbone.predict_noise(schedule.add_noise(latents, noise, t), t, conditioning)
            (prediction.float() - noise.float()).pow(2).mean().backward()

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    times = []
    for index in range(args.warmup + args.repeats):
        start = clock.now()
        optimizer.zero_grad()
        step(torch.Generator().manual_seed(index))
        optimizer.step()
        if device == "cuda":
            torch.cuda.synchronize()
        if index >= args.warmup:
            times.append(clock.now() - start)
    import resource

    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"variant": args.variant, "median_s": statistics.median(times), "times": times, "peak_mb": peak,
            "trainable": sum(p.numel() for p in params), "device": device, "clock": clock.UNIT}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", choices=["tiny", "sd15-random", "sdxl-random"], default="tiny")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"], default="no")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--unet-only", action="store_true", help="UNet targets only, prompt pre-encoded, text encoders not loaded (SDXL's diffusers LoRA default)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", help="also write the numbers to this JSON file (benchmarks/sd15.py reads it)")
    parser.add_argument("--variant", choices=["hypernet", "plain_lora"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args)))
        return
    results = {}
    base = [a for a in sys.argv[1:]]
    if args.json:  # the children print their row; only this process writes the file
        index = base.index("--json")
        del base[index:index + 2]
    for variant in ("plain_lora", "hypernet"):  # separate processes: honest peak memory, same machine state
        out = subprocess.run([sys.executable, __file__, *base, "--variant", variant], capture_output=True, text=True, check=True)
        results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
    plain, hyper = results["plain_lora"], results["hypernet"]
    print(f"backbone {args.backbone}, {args.resolution}px, batch {args.batch_size}, precision {args.mixed_precision}, "
          f"checkpointing {args.gradient_checkpointing}, device {hyper['device']}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'step':24s} {'median s':>9s} {'peak MB':>9s} {'trainable':>11s}")
    for name, row in (("plain single LoRA (peft)", plain), ("hypernet, per-sample LoRA", hyper)):
        print(f"{name:24s} {row['median_s']:9.4f} {row['peak_mb']:9.0f} {row['trainable']:11,d}")
    print(f"ratio hypernet / plain: time {hyper['median_s'] / plain['median_s']:.3f}x, peak memory {hyper['peak_mb'] / plain['peak_mb']:.3f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"plain_lora": plain, "hypernet": hyper, "resolution": args.resolution, "batch_size": args.batch_size}, indent=1))


if __name__ == "__main__":
    main()
