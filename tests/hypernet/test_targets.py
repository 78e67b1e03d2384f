import torch
import pytest

from hypernet.targets import TargetLayer, describe_mismatch, layer_component, locate_targets, targets_hash
from hypernet.errors import TargetMismatchError
from testkit.tiny_models import SD15_UNET_CONFIG, tiny_sdxl_unet, tiny_text_encoder, tiny_unet


def test_sd15_on_meta_device_has_128_unet_and_48_text_encoder_layers():
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET_CONFIG)
        text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12))
    bound = locate_targets(unet, [text_encoder])
    unet_layers = [l for l in bound.layers if layer_component(l.name) == "lora_unet"]
    te_layers = [l for l in bound.layers if layer_component(l.name) == "lora_te"]
    assert (len(unet_layers), len(te_layers)) == (128, 48)
    # canonical order: down blocks, mid, up blocks; q, k, v, out; then text encoder layers 0..11
    assert bound.layers[0] == TargetLayer("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", 320, 320)
    assert bound.layers[3].name.endswith("attn1_to_out_0")
    assert bound.layers[5] == TargetLayer("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k", 768, 320)
    mid = [i for i, l in enumerate(bound.layers) if "mid_block" in l.name]
    assert mid == list(range(48, 56))
    assert bound.layers[127].name == "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn2_to_out_0"
    assert bound.layers[128] == TargetLayer("lora_te_text_model_encoder_layers_0_self_attn_q_proj", 768, 768)
    assert bound.layers[-1].name == "lora_te_text_model_encoder_layers_11_self_attn_out_proj"
    # the bound module is the real linear of that layer
    assert bound.modules[bound.layers[0].name] is unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q


def test_sdxl_shaped_unet_found_by_the_same_code():
    unet = tiny_sdxl_unet()
    te1, te2 = tiny_text_encoder(hidden_size=16), tiny_text_encoder(hidden_size=32)
    bound = locate_targets(unet, [te1, te2])
    names = bound.names
    # level 0 has no attention; levels 1-2 have 2 transformer blocks per attention
    assert not any("down_blocks_0" in n for n in names)
    assert "lora_unet_down_blocks_2_attentions_1_transformer_blocks_1_attn2_to_v" in names
    # attention modules: down 2 levels x 2 attentions x 2 blocks x (attn1, attn2); mid 2 blocks x 2; up 2 x 3 x 2 x 2
    assert sum(n.startswith("lora_unet_") for n in names) == (16 + 4 + 24) * 4
    assert names[-16].startswith("lora_te1_") and names[-1] == "lora_te2_text_model_encoder_layers_1_self_attn_out_proj"
    by_name = {l.name: l for l in bound.layers}
    assert by_name["lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k"] == TargetLayer(
        "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k", 48, 64
    )


def test_options_and_errors():
    unet = tiny_unet()
    only_te = locate_targets(unet, [tiny_text_encoder()], include_unet=False)
    assert all(n.startswith("lora_te_") for n in only_te.names) and len(only_te.names) == 8
    with pytest.raises(TargetMismatchError, match="no attention projections"):
        locate_targets(torch.nn.Sequential(torch.nn.Linear(3, 3)))


def test_hash_and_mismatch_description():
    a = locate_targets(tiny_unet()).layers
    b = locate_targets(tiny_unet(cross_attention_dim=16)).layers
    assert targets_hash(a) == targets_hash(list(a)) and targets_hash(a) != targets_hash(b)
    text = describe_mismatch(a, b)
    assert "with other shapes" in text and "attn2_to_k (32->32 expected, 16->32 found)" in text
    assert describe_mismatch(a, a[:-1]).startswith(f"{len(a)} layers expected, {len(a) - 1} found; 1 missing")


def test_layer_component_is_the_kohya_prefix_of_a_layer_or_key():
    assert layer_component("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q") == "lora_unet"
    assert layer_component("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight") == "lora_unet"
    assert layer_component("lora_te_text_model_encoder_layers_0_self_attn_q_proj") == "lora_te"
    assert layer_component("lora_te2_text_model_encoder_layers_3_self_attn_out_proj.alpha") == "lora_te2"
    assert layer_component("bundle_emb.sks.string_to_param.*") == ""
