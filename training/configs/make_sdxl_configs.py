"""Write the SDXL base configs in training/configs/sdxl/ from diffusers' and transformers' own config classes, offline.

The values are SDXL 1.0 base's published architecture (3 UNet levels of 320/640/1280 channels with 0/2/10
transformer blocks, 2048-wide context from two text encoders, size/crop micro-conditioning): the model classes
are built on the meta device (no memory, nothing downloaded) and their configs saved as the classes write them.
The tokenizers are SD1.5's CLIP BPE files (``sd15/tokenizer``); the second one pads with "!" as SDXL's does.
    python training/configs/make_sdxl_configs.py
"""

from __future__ import annotations

from pathlib import Path

import torch

OUT = Path(__file__).parent / "sdxl"


def main() -> None:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig

    with torch.device("meta"):
        unet = UNet2DConditionModel(
            sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
        )
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=1024,
            scaling_factor=0.13025, force_upcast=True,
        )
    unet.save_config(OUT / "unet")
    vae.save_config(OUT / "vae")
    DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                  prediction_type="epsilon", steps_offset=1, timestep_spacing="leading").save_config(OUT / "scheduler")
    common = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=1, layer_norm_eps=1e-5)
    clip_l = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, projection_dim=768,
                            hidden_act="quick_gelu", **common)
    clip_g = CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20, projection_dim=1280,
                            hidden_act="gelu", **common)
    clip_g.architectures = ["CLIPTextModelWithProjection"]
    clip_l.architectures = ["CLIPTextModel"]
    for name, config in (("text_encoder", clip_l), ("text_encoder_2", clip_g)):
        (OUT / name).mkdir(parents=True, exist_ok=True)
        config.save_pretrained(OUT / name)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
