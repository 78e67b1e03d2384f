"""HM-CFG sampling cost vs the plain KSampler, Predict Subject LoRA latency, and memory over repeated runs,
measured inside a real ComfyUI (0.3.75, CPU unless a GPU is present), side by side in one process.

    python benchmarks/comfy_sampling.py                                  # smallest SD1.5-shaped checkpoint
    python benchmarks/comfy_sampling.py --full-sd15 --resolution 256     # full-size SD1.5 UNet, random weights
    python benchmarks/comfy_sampling.py --full-sdxl --resolution 128     # full-size SDXL UNet (both text encoders), random weights

The 3-prediction HM-CFG needs 1.5x the UNet work of CFG (3 predictions instead of 2); this reports how
close each implementation gets: 'comfy_hooks' (ComfyUI weight hooks: the subject prediction runs as a
separate batch with patched weights) and 'batched' (one UNet call, LoRA in activation space, per-sample gate).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "scripts"), str(REPO / "benchmarks")]

import _clock as clock  # noqa: E402

from testkit.comfyui.fixtures import build_model_files, build_sdxl_model_files  # noqa: E402
from testkit.comfyui.harness import run_in_comfyui  # noqa: E402
from get_comfyui import ensure_comfyui  # noqa: E402

FULL_SD15 = r"""
import math, sys, torch
comfy_root, out = sys.argv[1], sys.argv[2]
sys.path.insert(0, comfy_root)
import comfy.cli_args; comfy.cli_args.args.cpu = True
import comfy.ops
from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
from safetensors.torch import load_file, save_file
g = torch.Generator().manual_seed(0)
unet = UNetModel(image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=2, channel_mult=[1, 2, 4, 4],
                 transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], transformer_depth_middle=1, transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
                 context_dim=768, num_heads=8, use_spatial_transformer=True, use_linear_in_transformer=False, legacy=False,
                 operations=comfy.ops.disable_weight_init)
norms = {id(m.weight) for m in unet.modules() if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm))}
state = {}
for name, p in unet.named_parameters():
    if id(p) in norms: v = torch.ones(p.shape)
    elif p.dim() >= 2: v = (torch.rand(p.shape, generator=g) * 2 - 1) / math.sqrt(p[0].numel())
    else: v = torch.zeros(p.shape)
    state["model.diffusion_model." + name] = v.half()
small = load_file(sys.argv[3])  # text encoder and TAESD from the small fixture
state.update({k: v for k, v in small.items() if not k.startswith("model.diffusion_model.")})
save_file(state, out)
"""

# SDXL base's UNet (ComfyUI's own class and key layout) with random fp16 weights, generated tensor by tensor (the
# module is built on the meta device, so the 10 GB float32 model never exists); text encoders and TAESD come from
# the smallest SDXL fixture, whose text encoders are already full size.
FULL_SDXL = r"""
import math, sys, torch
comfy_root, out = sys.argv[1], sys.argv[2]
sys.path.insert(0, comfy_root)
import comfy.cli_args; comfy.cli_args.args.cpu = True
import comfy.ops
from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
from safetensors import safe_open
from safetensors.torch import save_file
g = torch.Generator().manual_seed(0)
with torch.device("meta"):
    unet = UNetModel(image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=2, channel_mult=[1, 2, 4],
                     transformer_depth=[0, 0, 2, 2, 10, 10], transformer_depth_middle=10, transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10],
                     context_dim=2048, num_head_channels=64, use_spatial_transformer=True, use_linear_in_transformer=True, legacy=False,
                     num_classes="sequential", adm_in_channels=2816, operations=comfy.ops.disable_weight_init)
norms = {id(m.weight) for m in unet.modules() if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm))}
state = {}
for name, p in unet.named_parameters():
    if id(p) in norms: v = torch.ones(p.shape)
    elif p.dim() >= 2: v = (torch.rand(p.shape, generator=g) * 2 - 1) / math.sqrt(p[0].numel())
    else: v = torch.zeros(p.shape)
    state["model.diffusion_model." + name] = v.half()
with safe_open(sys.argv[3], "pt") as small:
    for key in small.keys():
        if not key.startswith("model.diffusion_model."):
            state[key] = small.get_tensor(key)
save_file(state, out)
"""

# How every benchmark run inside ComfyUI starts (this one, comfy_dual_path.py, profile_hmcfg.py): the models
# prepare_models wrote, loaded through the core nodes and the pack's own.
LOAD_MODELS = r"""
import torch
import nodes as core
cfg = spec["bench"]
model, clip, vae = core.CheckpointLoaderSimple().load_checkpoint(cfg["ckpt"])[:3]
hypernet = core.NODE_CLASS_MAPPINGS["SubjectHyperNet_LoadHyperNet"]().load(cfg["hypernet"])["result"][0]
clip_vision = core.CLIPVisionLoader().load_clip(cfg["clip_vision"])[0]
predict = core.NODE_CLASS_MAPPINGS["SubjectHyperNet_PredictSubjectLora"]()
encode = lambda c, text: core.CLIPTextEncode().encode(c, text)[0]
"""

CODE = LOAD_MODELS + r"""
import time, statistics, resource, sys
import comfy.samplers, comfy.model_management
clock = time.process_time if cfg["cpu_clock"] else time.perf_counter  # see benchmarks/_clock.py
image = torch.rand(1, 512, 512, 3, generator=torch.Generator().manual_seed(0))
predict.predict(hypernet, clip_vision, image, model, 1.0, clip, 1.0)  # warm-up
t = []
for _ in range(5):
    start = clock(); model_s, clip_s, lora = predict.predict(hypernet, clip_vision, image, model, 1.0, clip, 1.0); t.append(clock() - start)
predict_s = statistics.median(t)
pos, neg, subj = encode(clip, "a photo of a sks toy"), encode(clip, "blurry"), encode(clip_s, "a photo of a sks toy")
latent = core.EmptyLatentImage().generate(cfg["resolution"], cfg["resolution"], 1)[0]
steps = cfg["steps"]
ksampler = core.KSampler()
hm = core.NODE_CLASS_MAPPINGS["SubjectHyperNet_HMCFGKSampler"]()
def plain(seed):
    return ksampler.sample(model, seed, steps, 7.0, "euler", "normal", pos, neg, latent, 1.0)
def hmcfg(seed, implementation):
    return hm.sample(seed, steps, "euler", "normal", latent, 1.0, model=model, subject_lora=lora, positive=pos, negative=neg,
                     cfg_text=7.0, cfg_subject=2.0, subject_start=0.0, subject_end=1.0, subject_positive=subj, implementation=implementation)
cases = {"plain KSampler (CFG, 2 predictions)": lambda s: plain(s), "HM-CFG comfy_hooks (3 predictions)": lambda s: hmcfg(s, "comfy_hooks"),
         "HM-CFG batched (3 predictions)": lambda s: hmcfg(s, "batched")}
for fn in cases.values():
    fn(0)  # warm-up (loads, hook patch caches)
times = {k: [] for k in cases}
for r in range(cfg["repeats"]):
    for name, fn in cases.items():
        start = clock(); fn(r + 1); times[name].append((clock() - start) / steps)
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize() / 2**20
before = rss()
for i in range(cfg["memory_runs"]):
    hmcfg(100 + i, "comfy_hooks"); hmcfg(200 + i, "batched")
after = rss()
result = {"predict_s": predict_s, "per_step_s": {k: statistics.median(v) for k, v in times.items()}, "rss_before_mb": before, "rss_after_mb": after,
          "device": str(comfy.model_management.get_torch_device())}
"""


def prepare_models(work: Path, full_sd15: bool = False, full_sdxl: bool = False) -> tuple[dict, dict, int]:
    """Model folders under ``work`` for a benchmark run in ComfyUI: the checkpoint (the smallest SD1.5-shaped fixture,
    or a full-size SD1.5/SDXL UNet with random weights, built once into .cache/), the fixture's CLIP vision and a random
    hypernetwork for it (heads N(0, 0.02), so its LoRA is not zero). Returns (folders, file names, target layers)."""
    import subprocess

    import torch

    from hypernet import FeatureSpec, HyperNetConfig, HyperNetwork, LidbConfig, locate_targets, save_hypernet
    from training.backbone import load_backbone

    comfy_root = ensure_comfyui()
    files = build_model_files(comfy_root, REPO / ".cache")
    (work / "checkpoints").mkdir()
    ckpt = files["checkpoint"]
    if full_sd15:
        ckpt = REPO / ".cache" / "bench_full_sd15.safetensors"
        if not ckpt.exists():
            subprocess.run([sys.executable, "-c", FULL_SD15, str(comfy_root), str(ckpt), str(files["checkpoint"])], check=True)
    if full_sdxl:
        ckpt = REPO / ".cache" / "bench_full_sdxl.safetensors"
        if not ckpt.exists():
            small = build_sdxl_model_files(comfy_root, REPO / ".cache")["checkpoint"]
            subprocess.run([sys.executable, "-c", FULL_SDXL, str(comfy_root), str(ckpt), str(small)], check=True)
    (work / "checkpoints" / ckpt.name).symlink_to(ckpt)
    if full_sdxl:  # the same names and shapes from the shipped configs, without reading 7 GB into float32
        from training.backbone import sdxl_target_layers

        layers, arch = sdxl_target_layers(), "sdxl"
    else:
        backbone = load_backbone(str(ckpt))
        layers, arch = locate_targets(backbone.unet, backbone.text_encoders).layers, backbone.arch
        del backbone
    torch.manual_seed(0)
    config = HyperNetConfig(features=FeatureSpec(dim=1024, tokens=257, encoder="ViT-L/14"), width=256, depth=2, heads=8, iterations=4, lidb=LidbConfig())
    hypernet = HyperNetwork(config, layers)
    with torch.no_grad():
        for p in hypernet.heads.weights:
            p.normal_(0, 0.02)
    (work / "hypernets").mkdir()
    save_hypernet(work / "hypernets" / "bench.safetensors", hypernet, base_arch=arch)
    folders = {"checkpoints": [work / "checkpoints"], "hypernets": [work / "hypernets"], "clip_vision": [files["clip_vision"].parent]}
    return folders, {"ckpt": ckpt.name, "hypernet": "bench.safetensors", "clip_vision": files["clip_vision"].name}, len(layers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full-sd15", action="store_true", help="full-size SD1.5 UNet (random weights) instead of the smallest SD1.5-shaped one")
    parser.add_argument("--full-sdxl", action="store_true", help="full-size SDXL UNet (random weights, both text encoders) instead")
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--memory-runs", type=int, default=20, help="repeated HM-CFG runs of each implementation for the memory-growth check")
    parser.add_argument("--json", help="also write the numbers to this JSON file (benchmarks/sd15.py reads it)")
    args = parser.parse_args()
    import torch

    comfy_root = ensure_comfyui()
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        models, names, layers = prepare_models(work, args.full_sd15, args.full_sdxl)
        bench = {**names, "resolution": args.resolution, "steps": args.steps, "repeats": args.repeats, "memory_runs": args.memory_runs, "cpu_clock": clock.CPU_TIME}
        code = "spec['bench'] = " + repr(bench) + "\n" + CODE
        report = run_in_comfyui(comfy_root, work / "run", models=models, prompts=[], code=code, timeout=7200)
    if "code_error" in report:
        raise SystemExit(report["code_error"])
    result = report["code_result"]
    plain = result["per_step_s"]["plain KSampler (CFG, 2 predictions)"]
    model = "full-size SDXL UNet" if args.full_sdxl else "full-size SD1.5 UNet" if args.full_sd15 else "smallest SD1.5-shaped UNet"
    print(f"ComfyUI 0.3.75, {model} (random), {args.resolution}px, "
          f"{args.steps} steps x {args.repeats} repeats, device {result['device']}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'sampler':40s} {'s/step':>8s} {'ratio':>7s}")
    for name, value in result["per_step_s"].items():
        print(f"{name:40s} {value:8.4f} {value / plain:7.3f}")
    print(f"Predict Subject LoRA (CLIP vision + hypernet, {layers} layers): {result['predict_s'] * 1000:.0f} ms")
    print(f"RSS before / after {args.memory_runs} repeated HM-CFG runs of each implementation: {result['rss_before_mb']:.0f} / {result['rss_after_mb']:.0f} MB")
    if args.json:
        Path(args.json).write_text(json.dumps({**result, "resolution": args.resolution, "full_sd15": args.full_sd15, "full_sdxl": args.full_sdxl, "clock": clock.UNIT,
                                               "layers": layers}, indent=1))


if __name__ == "__main__":
    main()
