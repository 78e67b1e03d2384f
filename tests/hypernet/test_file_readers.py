"""Every reader accepts every valid safetensors file, whatever its first bytes (the header length's low byte).

A file is recognised by parsing what it claims to be; only a file that does not parse as safetensors is
named as a pickle or zip archive. Each reader is swept over header lengths whose first bytes include 0x80
and "PK" (the first bytes of a pickle and of a zip).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from hypernet import FeatureSpec, HyperNetConfig, HyperNetwork, LidbConfig, load_hypernet, load_subject_lora, locate_targets, predict_subject_lora, save_hypernet
from hypernet.errors import FileFormatError
from hypernet.files import expand_compact_subject_lora, read_safetensors
from testkit.safetensors_layout import PK_LENGTH, first_bytes_cases, header_length, lengths_with_every_low_byte, with_header_length
from testkit.tiny_models import tiny_text_encoder, tiny_unet

SPEC = FeatureSpec(dim=16, tokens=4, encoder="test-encoder")


@pytest.fixture(scope="module")
def tiny_hypernet():
    bound = locate_targets(tiny_unet(), [tiny_text_encoder()])
    config = HyperNetConfig(features=SPEC, width=32, depth=1, heads=4, iterations=1, lidb=LidbConfig(a=8, b=6, seed=3))
    torch.manual_seed(0)
    hypernet = HyperNetwork(config, bound.layers)
    with torch.no_grad():
        for weight in hypernet.heads.weights:
            weight.normal_(0, 0.05)
    return hypernet.eval()


def test_read_safetensors_accepts_every_first_byte(tmp_path):
    source = tmp_path / "source.safetensors"
    save_file({"w": torch.arange(6.0).reshape(2, 3)}, source, metadata={"note": "x"})
    lengths = lengths_with_every_low_byte(source)
    firsts = set()
    for length in lengths:
        path = with_header_length(source, tmp_path / "padded.safetensors", length)
        firsts.add(path.read_bytes()[:1])
        tensors, metadata = read_safetensors(path, "test file")
        assert torch.equal(tensors["w"], torch.arange(6.0).reshape(2, 3)) and metadata == {"note": "x"}
    assert len(firsts) == 256 and PK_LENGTH in lengths
    assert with_header_length(source, tmp_path / "pk.safetensors", PK_LENGTH).read_bytes()[:2] == b"PK"


def test_a_valid_safetensors_file_is_read_whatever_its_name(tmp_path):
    path = tmp_path / "weights.ckpt"  # a pickle suffix, but the content parses as safetensors
    save_file({"w": torch.ones(2)}, path)
    assert torch.equal(read_safetensors(path, "test file")[0]["w"], torch.ones(2))


@pytest.mark.parametrize("name, writer, message", [
    ("zip.safetensors", lambda p: torch.save({"w": torch.ones(2)}, p), "is a zip archive"),
    ("legacy.safetensors", lambda p: torch.save({"w": torch.ones(2)}, p, _use_new_zipfile_serialization=False), "is a pickle"),
    ("plain.pt", lambda p: p.write_bytes(b"not a safetensors file at all"), "is a .pt file"),
    ("garbage.safetensors", lambda p: p.write_bytes(b"\x80\x04" + b"\xff" * 62), "is a pickle"),
])
def test_files_that_do_not_parse_as_safetensors_are_named(tmp_path, name, writer, message):
    path = tmp_path / name
    writer(path)
    with pytest.raises(FileFormatError, match=f"{message}.*only .safetensors files are loaded"):
        read_safetensors(path, "test file")


def test_every_freshly_saved_hypernetwork_reads_back(tiny_hypernet, tmp_path):
    # Our writer pads the header to 8 bytes: the provenance text steps the header length through all 32 low
    # bytes a saved file can start with (0x80 among them: 1 in 32 files used to be refused).
    firsts = set()
    for extra in range(0, 256, 8):
        path = save_hypernet(tmp_path / "h.safetensors", tiny_hypernet, base_arch="sd15", provenance={"note": "x" * extra})
        firsts.add(path.read_bytes()[0])
        loaded, info = load_hypernet(path)
        assert info.provenance["note"] == "x" * extra
    assert len(firsts) == 32 and 0x80 in firsts


def _sweep(source: Path, folder: Path, lengths, read):
    for length in lengths:
        path = with_header_length(source, folder / source.name, length)
        assert header_length(path) == length
        read(path)


def test_hypernetwork_reader_accepts_every_first_byte(tiny_hypernet, tmp_path):
    source = save_hypernet(tmp_path / "source" / "h.safetensors", tiny_hypernet, base_arch="sd15")
    features = torch.randn(1, SPEC.tokens, SPEC.dim, generator=torch.Generator().manual_seed(0))
    expected = tiny_hypernet.predict(features).trainables
    (tmp_path / "out").mkdir()

    def read(path):
        loaded, _ = load_hypernet(path)
        got = loaded.predict(features).trainables
        assert all(torch.equal(got[n], expected[n]) for n in expected)

    _sweep(source, tmp_path / "out", lengths_with_every_low_byte(source, step=3), read)


def test_standard_and_compact_subject_lora_readers_accept_every_first_byte(tiny_hypernet, tmp_path):
    subject = predict_subject_lora(tiny_hypernet, torch.randn(1, SPEC.tokens, SPEC.dim), base_arch="sd15")
    standard = subject.save(tmp_path / "source" / "s.safetensors")
    compact = subject.save_compact(tmp_path / "source" / "c.compact.safetensors")
    (tmp_path / "out").mkdir()

    def read_standard(path):
        lora, _ = load_subject_lora(path)
        assert all(torch.equal(lora.delta(n), subject.lora.delta(n)) for n in subject.lora.names)

    def read_compact(path):
        lora, layers, _ = expand_compact_subject_lora(path)
        assert layers == subject.layers and all(torch.equal(lora.up[n], subject.lora.up[n]) for n in subject.lora.names)

    _sweep(standard, tmp_path / "out", lengths_with_every_low_byte(standard, step=3), read_standard)
    _sweep(compact, tmp_path / "out", lengths_with_every_low_byte(compact, step=3), read_compact)


def test_clip_vision_file_and_shard_readers_accept_every_first_byte(tmp_path):
    from training.image_encoder import load_image_encoder, save_image_encoder

    encoder = load_image_encoder("tiny")
    image = torch.rand(1, 40, 40, 3, generator=torch.Generator().manual_seed(0))
    expected = encoder.features(image)
    source = save_image_encoder(encoder, tmp_path / "source" / "clip_vision.safetensors")
    (tmp_path / "out").mkdir()
    _sweep(source, tmp_path / "out", first_bytes_cases(source),
           lambda path: torch.testing.assert_close(load_image_encoder(str(path)).features(image), expected, rtol=0, atol=0))

    folder = tmp_path / "sharded"
    encoder.model.save_pretrained(folder, max_shard_size="20KB")
    shards = sorted(folder.glob("model-*.safetensors"))
    assert len(shards) >= 2 and (folder / "model.safetensors.index.json").is_file()
    cases = [first_bytes_cases(shard) for shard in shards]
    for index in range(max(len(c) for c in cases)):  # every shard padded at once, each through its own cases
        for shard, lengths in zip(shards, cases):
            with_header_length(shard, shard, lengths[index % len(lengths)])
        assert load_image_encoder(str(folder)).features(image).shape == expected.shape


def test_toy_text_encoder_reader_accepts_every_first_byte(tmp_path):
    from training.toy_model import TOY_DIR, load_toy_text_encoder, toy_available

    if not toy_available():
        pytest.skip("the toy model is not shipped in this checkout")
    source = TOY_DIR / "text_encoder.safetensors"
    ids = torch.tensor([[49406, 320, 1125, 49407]])
    with torch.no_grad():
        expected = load_toy_text_encoder()(ids).last_hidden_state
    for length in first_bytes_cases(source):
        with_header_length(source, tmp_path / "text_encoder.safetensors", length)
        with torch.no_grad():
            assert torch.equal(load_toy_text_encoder(tmp_path)(ids).last_hidden_state, expected)


# A small single-file SD1.5 checkpoint in the original (LDM) key layout, written by ComfyUI's own model classes
# in a subprocess whose sys.path starts with the ComfyUI root (the repo's nodes/ would shadow ComfyUI's nodes.py).
_TINY_CHECKPOINT = textwrap.dedent("""
    import sys, torch
    root, out = sys.argv[1:3]
    sys.path.insert(0, root)
    import comfy.cli_args
    comfy.cli_args.args.cpu = True
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    from comfy.taesd.taesd import TAESD
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNetModel(image_size=8, in_channels=4, out_channels=4, model_channels=32, num_res_blocks=1, channel_mult=[1],
                     transformer_depth=[1], transformer_depth_middle=1, transformer_depth_output=[1, 1], context_dim=48,
                     num_heads=8, use_spatial_transformer=True, use_linear_in_transformer=False, legacy=False,
                     operations=comfy.ops.manual_cast)
    text = CLIPTextModel(CLIPTextConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=12,
                                        max_position_embeddings=77, vocab_size=49408, hidden_act="quick_gelu"))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # ComfyUI's ops leave the weights uninitialised: small random values, norm weights 1
        for name, param in unet.named_parameters():
            param.copy_(torch.ones_like(param) if "norm" in name and name.endswith("weight") else torch.randn(param.shape, generator=generator) * 0.05)
    state = {"model.diffusion_model." + k: v for k, v in unet.state_dict().items()}
    state.update({"first_stage_model." + k: v for k, v in TAESD().state_dict().items()})
    for k, v in text.state_dict().items():
        state["cond_stage_model.transformer." + (k if k.startswith("text_model.") else "text_model." + k)] = v
    save_file({k: v.contiguous() for k, v in state.items()}, out)
""")


def test_single_file_backbone_reader_accepts_every_first_byte(comfyui_root, tmp_path):
    from training.backbone import load_backbone

    source = tmp_path / "source.safetensors"
    result = subprocess.run([sys.executable, "-c", _TINY_CHECKPOINT, str(comfyui_root), str(source)], capture_output=True, text=True,
                            timeout=600, env={**os.environ, "PYTHONPATH": "", "HF_HUB_OFFLINE": "1"}, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    sample, t, context = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([10]), torch.randn(1, 77, 48)
    reference = load_backbone(str(source)).unet
    with torch.no_grad():
        output = reference(sample, t, context).sample
    assert torch.isfinite(output).all() and output.abs().max() > 0
    expected = reference.state_dict()
    (tmp_path / "out").mkdir()

    def read(path):  # the same weights, bit for bit (outputs may differ in the last bit between runs of threaded kernels)
        got = load_backbone(str(path)).unet.state_dict()
        assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)

    _sweep(source, tmp_path / "out", first_bytes_cases(source)[:2], read)  # 0x80 and "PK"
