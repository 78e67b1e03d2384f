import torch

from hypernet import LoraWeights, locate_targets
from testkit.tiny_models import tiny_text_encoder, tiny_unet


def lora_of(layers, batch=None):
    lead = () if batch is None else (batch,)
    down = {l.name: torch.arange(float(torch.Size([*lead, 2, l.in_features]).numel())).reshape(*lead, 2, l.in_features) for l in layers}
    up = {l.name: torch.ones(*lead, l.out_features, 2) for l in layers}
    return LoraWeights(down, up)


def test_restricted_to_a_component_or_to_names_keeps_order_and_shares_tensors():
    unet, text_encoder = tiny_unet(), tiny_text_encoder()
    whole = locate_targets(unet, [text_encoder])
    lora = lora_of(whole.layers)
    unet_only = locate_targets(unet)
    assert lora.restricted_to("lora_unet").names == unet_only.names == lora.restricted_to(unet_only.modules).names
    assert lora.restricted_to("lora_te").names == [n for n in whole.names if n not in unet_only.modules]
    assert lora.restricted_to("lora_te2").names == []
    picked = lora.restricted_to([whole.names[3], whole.names[0]])
    assert picked.names == [whole.names[0], whole.names[3]] and picked.down[whole.names[0]] is lora.down[whole.names[0]]
    assert whole.restricted_to("lora_unet").names == unet_only.names
    assert whole.restricted_to("lora_unet").modules == unet_only.modules


def test_repeated_tiles_interleaves_or_copies_a_shared_lora():
    layers = locate_targets(tiny_unet()).layers[:2]
    name = layers[0].name
    per_sample = lora_of(layers, batch=2)
    a, b = per_sample.down[name]
    assert [torch.equal(x, y) for x, y in zip(per_sample.repeated(3).down[name], [a, b, a, b, a, b])] == [True] * 6
    assert [torch.equal(x, y) for x, y in zip(per_sample.repeated(2, interleave=True).down[name], [a, a, b, b])] == [True] * 4
    assert per_sample.repeated(1) is per_sample
    shared = lora_of(layers)
    copies = shared.repeated(3)
    assert copies.batch_size == 3 and all(torch.equal(copy, shared.down[name]) for copy in copies.down[name])
    assert copies.up[name].shape == (3, *shared.up[name].shape)


def test_repeated_lets_gradients_flow_back_to_the_factors():
    layers = locate_targets(tiny_unet()).layers[:1]
    lora = lora_of(layers, batch=2)
    for tensor in (*lora.down.values(), *lora.up.values()):
        tensor.requires_grad_()
    name = layers[0].name
    lora.repeated(3, interleave=True).down[name].sum().backward()
    assert torch.equal(lora.down[name].grad, torch.full_like(lora.down[name], 3.0))
