"""The canonical target list is the same whether the UNet is diffusers' or ComfyUI's own module."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from hypernet import locate_targets
from testkit.tiny_models import tiny_sdxl_unet, tiny_text_encoder, tiny_unet

REPO = Path(__file__).resolve().parents[2]

# ComfyUI UNetModel configs equivalent to tiny_models.tiny_unet / tiny_sdxl_unet.
COMFY_CONFIGS = {
    "sd15": dict(image_size=8, in_channels=4, out_channels=4, model_channels=32, num_res_blocks=1, channel_mult=[1, 2],
                 transformer_depth=[1, 0], transformer_depth_middle=1, transformer_depth_output=[1, 1, 0, 0],
                 context_dim=32, num_head_channels=8, use_spatial_transformer=True, use_linear_in_transformer=False),
    "sdxl": dict(image_size=8, in_channels=4, out_channels=4, model_channels=32, num_res_blocks=2, channel_mult=[1, 2, 2],
                 transformer_depth=[0, 0, 2, 2, 2, 2], transformer_depth_middle=2, transformer_depth_output=[0, 0, 0, 2, 2, 2, 2, 2, 2],
                 context_dim=48, num_head_channels=8, use_spatial_transformer=True, use_linear_in_transformer=True),
}

SCRIPT = """
import json, sys
sys.path.insert(0, sys.argv[1]); sys.path.append(sys.argv[2])
import comfy.cli_args; comfy.cli_args.args.cpu = True
import comfy.ops, torch
from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
from comfy.clip_model import CLIPTextModel
from hypernet import locate_targets
unet = UNetModel(**json.loads(sys.argv[3]), operations=comfy.ops.disable_weight_init)
text = CLIPTextModel(dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64,
                           hidden_act="quick_gelu", vocab_size=1000, max_position_embeddings=77, eos_token_id=2), torch.float32, "cpu", comfy.ops.disable_weight_init)
print(json.dumps([[l.name, l.in_features, l.out_features] for l in locate_targets(unet, [text]).layers]))
"""


def comfy_targets(comfy_root: Path, config: dict) -> list:
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(comfy_root), str(REPO), json.dumps(config)],
        capture_output=True, text=True, cwd=comfy_root, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return [tuple(x) for x in json.loads(result.stdout.strip().splitlines()[-1])]


@pytest.mark.comfyui
@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_comfyui_and_diffusers_modules_give_the_same_canonical_list(comfyui_root, arch):
    unet = tiny_unet() if arch == "sd15" else tiny_sdxl_unet()
    expected = [(l.name, l.in_features, l.out_features) for l in locate_targets(unet, [tiny_text_encoder()]).layers]
    assert comfy_targets(comfyui_root, COMFY_CONFIGS[arch]) == expected
