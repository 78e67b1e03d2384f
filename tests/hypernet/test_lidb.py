import torch

from hypernet.lidb import LidbBasis, LidbConfig, orthonormal_rows
from hypernet.targets import TargetLayer, locate_targets
from testkit.tiny_models import SD15_UNET_CONFIG

LAYERS = [TargetLayer("lora_unet_a_to_q", 320, 320), TargetLayer("lora_unet_b_to_k", 768, 640), TargetLayer("lora_te_c_q_proj", 48, 24)]
# Pinned: the bases are a file format. If this changes, old compact LoRAs no longer expand correctly.
GOLDEN = "52e02a032565b12e"  # first 16 hex digits of the checksum of LAYERS' bases at seed 7


def test_sd15_defaults_have_26400_trainable_numbers():
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET_CONFIG)
        text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12))
    layers = locate_targets(unet, [text_encoder]).layers
    config = LidbConfig()
    assert (config.rank, config.a, config.b) == (1, 100, 50)
    assert sum(config.trainables_per_layer(layer) for layer in layers) == 26_400


def test_aux_rows_are_orthonormal_with_constant_magnitude():
    for dim, count in [(320, 100), (768, 50), (1280, 100), (33, 20), (1024, 1024)]:
        rows = orthonormal_rows(count, dim, seed=3, layer_name="x", role="down").double()
        assert rows.shape == (count, dim)
        assert torch.allclose(rows @ rows.T, torch.eye(count, dtype=torch.float64), atol=1e-6)
        magnitudes = rows.abs()[rows != 0]
        assert torch.allclose(magnitudes, magnitudes[0].expand_as(magnitudes))  # every nonzero entry +-c


def test_bases_are_bit_identical_across_rebuilds_dtypes_and_default_devices():
    reference = LidbBasis(LAYERS, LidbConfig(seed=7))
    old_dtype = torch.get_default_dtype()
    try:
        torch.set_default_dtype(torch.float64)
        with torch.device("meta"):
            rebuilt = LidbBasis(LAYERS, LidbConfig(seed=7))
    finally:
        torch.set_default_dtype(old_dtype)
    for layer in LAYERS:
        for a, b in zip(reference.aux(layer.name), rebuilt.aux(layer.name)):
            assert a.device.type == b.device.type == "cpu" and a.dtype == b.dtype == torch.float32
            assert torch.equal(a, b)
    assert reference.checksum() == rebuilt.checksum()
    assert LidbBasis(LAYERS, LidbConfig(seed=8)).checksum() != reference.checksum()
    # a moved/cast copy still checksums the same (checksum is over float32 CPU bits)
    assert LidbBasis(LAYERS, LidbConfig(seed=7)).to(torch.float64).checksum() == reference.checksum()


def test_golden_checksum_pins_the_algorithm():
    # Computed once with this algorithm (SplitMix64 + Sylvester Hadamard); independent of platform.
    assert LidbBasis(LAYERS, LidbConfig(seed=7)).checksum()[:16] == GOLDEN


def test_expansion_matches_the_paper_formula_and_is_an_isometry():
    basis = LidbBasis(LAYERS, LidbConfig(rank=2, a=10, b=6, seed=1))
    generator = torch.Generator().manual_seed(0)
    trainables = {l.name: torch.randn(basis.config.trainables_per_layer(l), generator=generator) for l in LAYERS}
    lora = basis.expand(trainables)
    for layer in LAYERS:
        a_train, b_train = basis.split(layer.name, trainables[layer.name])
        a_aux, b_aux = basis.aux(layer.name)
        assert a_train.shape == (10, 2) and b_train.shape == (2, 6)
        delta = a_aux @ a_train @ b_train @ b_aux
        assert torch.allclose(lora.delta(layer.name), delta, atol=1e-6)
        assert delta.shape == (layer.out_features, layer.in_features)
        # orthonormal aux bases preserve the norm of the small core
        assert torch.allclose(delta.norm(), (a_train @ b_train).norm(), rtol=1e-5)
    exact = basis.expand_exact(trainables)
    assert all(torch.allclose(exact.up[n], lora.up[n], atol=1e-6) for n in lora.names)


def test_per_layer_dims_are_clamped_to_the_layer_width():
    basis = LidbBasis(LAYERS, LidbConfig())
    up_aux, down_aux = basis.aux("lora_te_c_q_proj")
    assert up_aux.shape == (24, 24) and down_aux.shape == (48, 48)
    assert basis.config.trainables_per_layer(LAYERS[2]) == 24 + 48


def test_learned_aux_mode_makes_bases_trainable_and_persistent():
    basis = LidbBasis(LAYERS, LidbConfig(learned_aux=True))
    state = basis.state_dict()
    assert len(state) == 2 * len(LAYERS) and all(p.requires_grad for p in basis.parameters())
    frozen = LidbBasis(LAYERS, LidbConfig())
    assert frozen.state_dict() == {} and list(frozen.parameters()) == []
    assert torch.equal(basis.aux(LAYERS[0].name)[0].detach(), frozen.aux(LAYERS[0].name)[0])
