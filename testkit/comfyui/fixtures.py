"""Model files of the real formats, random-initialised, for tests that run inside ComfyUI.

- the smallest checkpoint ComfyUI detects as SD1.5: UNet with model_channels 320, context_dim 768, one
  level, one res block, one transformer block (ComfyUI's own UNetModel class, so the key layout is
  exactly ComfyUI's), a TAESD VAE, and a CLIP-L text encoder (fp16);
- a CLIP-vision file in ComfyUI's models/clip_vision format: ViT-L/14 at 224 px, the smallest config
  ComfyUI's loader recognises;
- the smallest checkpoint ComfyUI detects as SDXL (:func:`build_sdxl_model_files`): ComfyUI matches SDXL on
  model_channels 320, linear projections, transformer depths [0, 0, 2, 2, 10, 10], a 2048-wide context and a
  2816-wide size/pooled embedding, so those stay; only the channel multipliers shrink to [1, 1, 1] (320
  channels at every level; real SDXL: 320/640/1280). Both text encoders are full size (ComfyUI builds CLIP-L
  and OpenCLIP bigG from fixed configs) and written by ComfyUI's own SDXL checkpoint-saving key conversion;
  TAESD VAE; everything fp16 (2.2 GB).
All are built in a subprocess whose sys.path starts with the ComfyUI root (the repo's ``nodes/``
package would shadow ComfyUI's ``nodes.py`` otherwise) and cached by a version key.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

FIXTURE_VERSION = "v4"
SDXL_FIXTURE_VERSION = "v1"
CHECKPOINT_NAME = "tiny_sd15.safetensors"
SDXL_CHECKPOINT_NAME = "tiny_sdxl.safetensors"
CLIP_VISION_NAME = "clip_vision_vit_l14.safetensors"

_PRELUDE = r"""
import math, sys, torch
comfy_root, out_dir, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
sys.path.insert(0, comfy_root)
import comfy.cli_args
comfy.cli_args.args.cpu = True
import comfy.ops
from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
from comfy.taesd.taesd import TAESD
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModelWithProjection

generator = torch.Generator().manual_seed(seed)

def init_(module, gain=1.0):
    # Deterministic random weights; norm weights are 1 (zeros would make the output constant and hide bugs).
    norms = {id(m.weight) for m in module.modules() if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)) and m.weight is not None}
    for name, param in module.named_parameters():
        with torch.no_grad():
            if id(param) in norms:
                param.fill_(1.0)
            elif param.dim() >= 2:
                bound = gain / math.sqrt(param[0].numel())
                param.copy_((torch.rand(param.shape, generator=generator) * 2 - 1) * bound)
            else:
                param.zero_()
    return module
"""

_SD15_BODY = r"""
unet = init_(UNetModel(image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=1, channel_mult=[1],
                       transformer_depth=[1], transformer_depth_middle=1, transformer_depth_output=[1, 1], context_dim=768,
                       num_heads=8, use_spatial_transformer=True, use_linear_in_transformer=False, legacy=False,
                       operations=comfy.ops.disable_weight_init))
taesd = init_(TAESD(), gain=2.0)  # keeps the decoded images in a visible range (not all mid-gray, not all clipped)
with torch.no_grad():
    taesd.vae_scale.fill_(1.0); taesd.vae_shift.fill_(0.0)
torch.manual_seed(seed)
text = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                                    max_position_embeddings=77, vocab_size=49408, hidden_act="quick_gelu", projection_dim=768))
state = {"model.diffusion_model." + k: v for k, v in unet.state_dict().items()}
state.update({"first_stage_model." + k: v for k, v in taesd.state_dict().items()})
for k, v in text.state_dict().items():
    k = k if k.startswith("text_model.") else "text_model." + k
    state["cond_stage_model.transformer." + k] = v.half() if v.is_floating_point() else v
save_file({k: v.contiguous() for k, v in state.items()}, out_dir + "/CHECKPOINT")
torch.manual_seed(seed + 1)
vision = CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                                        num_attention_heads=16, image_size=224, patch_size=14, projection_dim=768,
                                                        hidden_act="quick_gelu"))
save_file({k: v.half().contiguous() for k, v in vision.state_dict().items() if not k.endswith("position_ids")}, out_dir + "/CLIP_VISION")
print("ok")
"""
_SCRIPT = _PRELUDE + _SD15_BODY

_SDXL_BODY = r"""
import comfy.supported_models
from transformers import CLIPTextModelWithProjection
unet_config = dict(image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=2, channel_mult=[1, 1, 1],
                   transformer_depth=[0, 0, 2, 2, 10, 10], transformer_depth_middle=10, transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10],
                   context_dim=2048, num_head_channels=64, use_spatial_transformer=True, use_linear_in_transformer=True, legacy=False,
                   num_classes="sequential", adm_in_channels=2816)
unet = init_(UNetModel(**unet_config, operations=comfy.ops.disable_weight_init))
taesd = init_(TAESD(), gain=2.0)
with torch.no_grad():
    taesd.vae_scale.fill_(1.0); taesd.vae_shift.fill_(0.0)
torch.manual_seed(seed)  # transformers' own CLIP initialisation, as for the SD1.5 fixture's CLIP-L
clip_l = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                                      max_position_embeddings=77, vocab_size=49408, hidden_act="quick_gelu", projection_dim=768))
clip_g = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                                                    max_position_embeddings=77, vocab_size=49408, hidden_act="gelu", projection_dim=1280))
text = {}
for prefix, model in (("clip_l.transformer.", clip_l), ("clip_g.transformer.", clip_g)):
    for k, v in model.state_dict().items():
        if not k.startswith(("text_model.", "text_projection")):
            k = "text_model." + k
        text[prefix + k] = v
# ComfyUI's own SDXL checkpoint-saving conversion: CLIP-L under conditioner.embedders.0, bigG in OpenCLIP layout under .1
text = comfy.supported_models.SDXL(unet_config).process_clip_state_dict_for_saving(text)
state = {"model.diffusion_model." + k: v for k, v in unet.state_dict().items()}
state.update({"first_stage_model." + k: v for k, v in taesd.state_dict().items()})
state.update(text)
save_file({k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in state.items()}, out_dir + "/CHECKPOINT")
print("ok")
"""


def write_model_files(folder: Path, comfy_root: Path, seed: int = 0) -> dict[str, Path]:
    """Write both files into ``folder`` (deterministic from ``seed``): ``{'checkpoint': path, 'clip_vision': path}``.

    Example: ``write_model_files(tmp_path, comfy_root)["checkpoint"]`` -> ``tmp_path/tiny_sd15.safetensors``.
    Takes ~30 s on 2 cores (ViT-L and CLIP-L are ~430M random values); prefer :func:`build_model_files`.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _run_builder(_SCRIPT.replace("CHECKPOINT", CHECKPOINT_NAME).replace("CLIP_VISION", CLIP_VISION_NAME), folder, comfy_root, seed)
    return {"checkpoint": folder / CHECKPOINT_NAME, "clip_vision": folder / CLIP_VISION_NAME}


def _run_builder(script: str, folder: Path, comfy_root: Path, seed: int) -> None:
    # a subprocess with ComfyUI's root first on sys.path, and no PYTHONPATH pointing at the repo
    env = {**os.environ, "PYTHONPATH": "", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script, str(Path(comfy_root).resolve()), str(folder.resolve()), str(seed)],
                            capture_output=True, text=True, timeout=1800, env=env, cwd=str(folder))
    if result.returncode != 0:
        raise RuntimeError(f"building ComfyUI fixtures failed:\n{result.stderr[-4000:]}")


def build_sdxl_model_files(comfy_root: Path, cache_dir: Path, seed: int = 0) -> dict[str, Path]:
    """The smallest checkpoint ComfyUI detects as SDXL (see the module docstring), built once per cache folder.

    Example: ``build_sdxl_model_files(comfy_root, repo / ".cache")["checkpoint"]`` -> ``.../tiny_sdxl.safetensors``.
    The first build takes about a minute on 2 cores (820M random text-encoder values).
    """
    out = Path(cache_dir) / f"comfyui-fixtures-sdxl-{SDXL_FIXTURE_VERSION}-seed{seed}"
    files = {"checkpoint": out / SDXL_CHECKPOINT_NAME}
    marker = out / ".complete"
    if marker.exists() and files["checkpoint"].exists():
        return files
    out.mkdir(parents=True, exist_ok=True)
    marker.unlink(missing_ok=True)
    _run_builder((_PRELUDE + _SDXL_BODY).replace("CHECKPOINT", SDXL_CHECKPOINT_NAME), out, comfy_root, seed)
    marker.write_text("ok\n")
    return files


def build_model_files(comfy_root: Path, cache_dir: Path, seed: int = 0) -> dict[str, Path]:
    """:func:`write_model_files` once per ``cache_dir``/version/seed; later calls return the cached files.

    Example: ``build_model_files(comfy_root, repo / ".cache")["clip_vision"]``.
    """
    out = Path(cache_dir) / f"comfyui-fixtures-{FIXTURE_VERSION}-seed{seed}"
    files = {"checkpoint": out / CHECKPOINT_NAME, "clip_vision": out / CLIP_VISION_NAME}
    marker = out / ".complete"  # written last: an interrupted build is redone
    if marker.exists() and all(p.exists() for p in files.values()):
        return files
    marker.unlink(missing_ok=True)
    write_model_files(out, comfy_root, seed)
    marker.write_text("ok\n")
    return files


def layout_models(root: Path, files: dict[str, Path]) -> dict[str, list[Path]]:
    """Model folders as a user has them (links to ``files``), ready for ``run_prompts(models=...)``.

    ``root/checkpoints/tiny_sd15.safetensors``, ``root/clip_vision/clip_vision_vit_l14.safetensors`` and empty
    ``loras``, ``hypernets``; returns ``{folder_name: [folder]}``.
    Example: ``layout_models(tmp_path / "models", build_model_files(root, cache))["checkpoints"]``.
    """
    root = Path(root)
    folders = {}
    for folder, key in (("checkpoints", "checkpoint"), ("clip_vision", "clip_vision"), ("loras", None), ("hypernets", None)):
        (root / folder).mkdir(parents=True, exist_ok=True)
        if key:
            link = root / folder / files[key].name
            if not link.exists():
                link.symlink_to(Path(files[key]).resolve())
        folders[folder] = [root / folder]
    return folders
