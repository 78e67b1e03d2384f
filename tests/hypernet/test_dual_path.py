"""Dual-path blending: the pure blend, the hook, and sampling with it (alpha 1 = the adapted model, alpha 0 = the
vanilla model reading the hard prompt, in between = a real mixture)."""

import pytest
import torch
from torch import nn

from hypernet import locate_targets
from hypernet.dual_path import attach_dual_path, blend, vanilla_context
from hypernet.lora import LoraWeights


def test_blend_and_hook_mix_each_layer_with_its_vanilla_call():
    torch.testing.assert_close(blend(torch.tensor([2.0]), torch.tensor([4.0]), 0.25), torch.tensor([3.5]))
    layer = nn.Linear(3, 2)
    x = torch.randn(4, 3)
    calls = []

    def vanilla(module, args, kwargs):
        calls.append(args[0].shape)
        return module(*args, **kwargs) * 0  # a vanilla path that outputs zeros
    with attach_dual_path({"layer": layer}, 0.3, vanilla):
        out = layer(x)
    torch.testing.assert_close(out, 0.3 * layer(x))
    assert calls == [x.shape]  # one vanilla call per forward, no recursion
    assert not layer._forward_hooks
    with attach_dual_path({"layer": layer}, {"layer": 1.0}, vanilla):
        torch.testing.assert_close(layer(x), layer.forward(x))


def test_vanilla_context_gives_positive_rows_the_hard_prompt_and_the_other_rows_their_own_context():
    context = torch.randn(4, 3, 2)  # two chunks (ComfyUI's uncond, then cond) of two rows, three tokens
    hard = torch.randn(1, 3, 2)
    out = vanilla_context(context, [False, True], hard)
    assert torch.equal(out[:2], context[:2]) and torch.equal(out[2:], hard.expand(2, 3, 2))
    longer = torch.randn(1, 6, 2)  # another token count: both repeated to the common multiple, as ComfyUI batches prompts
    out = vanilla_context(context, [True, False], longer)
    assert out.shape == (4, 6, 2) and torch.equal(out[:2], longer.expand(2, 6, 2)) and torch.equal(out[2:], context[2:].repeat(1, 2, 1))
    query = torch.randn(2, 5, 2)

    def attention(keys):
        return torch.softmax(query @ keys.transpose(1, 2), -1) @ keys

    torch.testing.assert_close(attention(out[2:]), attention(context[2:]))  # a repeated token list is the same attention
    with pytest.raises(ValueError, match="equal chunks"):
        vanilla_context(context, [True, False, True], hard)


@pytest.fixture(scope="module")
def toy():
    from training.backbone import load_backbone

    backbone = load_backbone("toy")
    unet_targets, text_targets = locate_targets(backbone.unet), locate_targets(None, [backbone.text_encoder])
    generator = torch.Generator().manual_seed(0)
    layers = unet_targets.layers + text_targets.layers
    lora = LoraWeights({l.name: torch.randn(1, l.in_features, generator=generator) * 0.3 for l in layers},
                       {l.name: torch.randn(l.out_features, 1, generator=generator) * 0.3 for l in layers})
    word_id = backbone.tokenizer("blue", add_special_tokens=False).input_ids[0]
    embedding = backbone.text_encoder.get_input_embeddings().weight[word_id].detach() * 1.5 + 0.01  # nearest real word: "blue"
    return backbone, unet_targets, text_targets, lora, embedding, word_id


def test_dual_path_sampling_spans_the_adapted_and_the_vanilla_model(toy):
    from training.sampling import _nearest_words, sample

    backbone, unet_targets, text_targets, lora, embedding, word_id = toy
    prompts = ["a photo of a sks toy on a red background"] * 2
    common = dict(lora=lora, unet_modules=unet_targets.modules, text_modules=text_targets.modules, steps=3, resolution=64, seed=1,
                  token_embedding=embedding, placeholder="sks")
    adapted = sample(backbone, prompts, mode="lora", **common)
    assert torch.equal(_nearest_words(backbone, embedding.unsqueeze(0), "sks")[0], backbone.text_encoder.get_input_embeddings().weight[word_id])
    one = sample(backbone, prompts, mode="dual", dual_alpha=1.0, **common)
    zero = sample(backbone, prompts, mode="dual", dual_alpha=0.0, **common)
    half = sample(backbone, prompts, mode="dual", dual_alpha=0.5, **common)
    vanilla = sample(backbone, [p.replace("sks", "blue") for p in prompts], mode="base", steps=3, resolution=64, seed=1)
    torch.testing.assert_close(one, adapted, atol=1e-4, rtol=0)
    torch.testing.assert_close(zero, vanilla, atol=1e-4, rtol=0)
    gap = (adapted - vanilla).abs().mean()
    assert gap > 0.01  # the two paths draw different images, so the checks above can fail
    assert (half - adapted).abs().mean() > 0.1 * gap and (half - vanilla).abs().mean() > 0.1 * gap
