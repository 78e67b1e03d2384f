"""Training inputs: subject folders, the synthetic world, the image encoder and the backbone loaders."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from training.backbone import BackboneError, load_backbone, native_resolution, tiny_backbone
from training.data import DataError, SubjectFolderDataset
from training.image_encoder import ImageEncoderError, load_image_encoder, save_image_encoder
from training.synthetic import SyntheticWorld, write_synthetic_dataset


def write_image(path, size=(40, 30), mode="RGB", colour=(200, 10, 10)):
    Image.new(mode, size, colour if mode != "L" else 128).save(path)


def test_folder_layouts_captions_and_unreadable_files(tmp_path, caplog):
    write_image(tmp_path / "single.png")  # one subject per top-level image
    (tmp_path / "dog").mkdir()
    write_image(tmp_path / "dog" / "a.jpg", (64, 48))
    write_image(tmp_path / "dog" / "b.png", (50, 50), mode="RGBA", colour=(0, 0, 255, 0))  # transparent -> white
    write_image(tmp_path / "dog" / "c.webp", (33, 60), mode="L")
    (tmp_path / "dog" / "a.txt").write_text("a {token} {class_word} on grass")
    (tmp_path / "dog" / "class.txt").write_text("dog")
    (tmp_path / "dog" / "broken.png").write_bytes(b"\x89PNG not really")
    (tmp_path / "notes.md").write_text("ignored")
    with caplog.at_level(logging.WARNING):
        data = SubjectFolderDataset(tmp_path, 32, class_word="thing", placeholder="sks")
    assert [s.subject_id for s in data.subjects] == ["dog", "single"]
    assert len(data.skipped) == 1 and "skipped 1 unreadable" in caplog.text
    assert len(data) == 4
    generator = torch.Generator().manual_seed(0)
    sample = data.get(0, generator)
    assert sample.pixels.shape == (3, 32, 32) and -1 <= sample.pixels.min() <= sample.pixels.max() <= 1
    assert sample.caption == "a sks dog on grass" and sample.subject_id == "dog"
    assert sample.reference.shape[-1] == 3 and sample.reference.dtype == torch.float32
    assert data.get(1, generator).caption == "a photo of a sks dog"  # template with the class word
    assert data.get(3, generator).caption == "a photo of a sks thing"
    rgba = data.reference(0, 1)
    assert torch.allclose(rgba, torch.ones_like(rgba))  # fully transparent pixels composite onto white
    gray = data.reference(0, 2)
    assert gray.shape == (60, 33, 3) and torch.allclose(gray[..., 0], gray[..., 1])


def test_augmentation_is_a_function_of_the_generator(tmp_path):
    write_synthetic_dataset(tmp_path, 3, 2, size=32, seed=1)
    data = SubjectFolderDataset(tmp_path, 32, flip_prob=0.5)
    a = [data.get(i, torch.Generator().manual_seed(9)).pixels for i in range(len(data))]
    b = [data.get(i, torch.Generator().manual_seed(9)).pixels for i in range(len(data))]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    plain = SubjectFolderDataset(tmp_path, 32, flip_prob=0.0).get(0, torch.Generator().manual_seed(0)).pixels
    outcomes = []
    for seed in range(16):
        pixels = data.get(0, torch.Generator().manual_seed(seed)).pixels
        assert torch.equal(pixels, plain) or torch.equal(pixels, plain.flip(-1))
        outcomes.append(torch.equal(pixels, plain.flip(-1)))
    assert 0 < sum(outcomes) < 16  # flip_prob 0.5: both outcomes occur


def test_empty_or_missing_folders_are_refused(tmp_path):
    with pytest.raises(DataError, match="data folder not found"):
        SubjectFolderDataset(tmp_path / "missing", 32)
    (tmp_path / "x.jpg").write_bytes(b"garbage")
    with pytest.raises(DataError, match="no readable images.*1 unreadable"):
        SubjectFolderDataset(tmp_path, 32)


def test_synthetic_world_splits_are_disjoint_and_deterministic(tmp_path):
    world = SyntheticWorld(seed=3)
    train, heldout = world.subjects(200, "train"), world.subjects(100, "heldout")
    assert not {s.id for s in train} & {s.id for s in heldout}
    assert train == SyntheticWorld(seed=3).subjects(200, "train")
    import random

    context = world.sample_context(random.Random(0))
    first = np.asarray(world.render(train[0], context, 64))
    assert first.shape == (64, 64, 3) and np.array_equal(first, np.asarray(world.render(train[0], context, 64)))
    assert not np.array_equal(first, np.asarray(world.render(train[1], context, 64)))
    assert world.caption(context, "sks").startswith("a photo of a sks toy on a ")
    assert "sks" not in world.caption(context)
    folder = write_synthetic_dataset(tmp_path, 2, 3, size=48)
    subject_dirs = sorted(p for p in folder.iterdir() if p.is_dir())
    assert len(subject_dirs) == 2 and len(list(subject_dirs[0].glob("*.png"))) == 3
    assert (subject_dirs[0] / "labels.json").exists()


def test_image_encoder_shapes_preprocessing_and_errors(tmp_path):
    encoder = load_image_encoder("tiny")
    image = torch.rand(2, 50, 80, 3)
    assert encoder.preprocess(image).shape == (2, 3, 32, 32)
    assert encoder.features(image, "penultimate_hidden_states").shape == (2, 17, 32)
    assert encoder.features(image, "image_embeds").shape == (2, 1, 32)
    mixed = encoder.features([torch.rand(1, 40, 40, 4), torch.rand(1, 90, 30, 3)], "last_hidden_state")
    assert mixed.shape == (2, 17, 32)
    spec = encoder.feature_spec("penultimate_hidden_states")
    assert (spec.dim, spec.tokens, spec.image_size) == (32, 17, 32)
    # a ComfyUI-format file of the same weights gives the same features
    path = save_image_encoder(encoder, tmp_path / "clip_vision.safetensors")
    reloaded = load_image_encoder(str(path))
    assert torch.allclose(reloaded.features(image, "last_hidden_state"), encoder.features(image, "last_hidden_state"), atol=1e-6)
    # without a config, a non-standard width cannot be read back faithfully: refused, not guessed
    save_file({k: v.contiguous() for k, v in encoder.model.state_dict().items()}, tmp_path / "bare.safetensors")
    with pytest.raises(ImageEncoderError, match="width 32 is not a known family"):
        load_image_encoder(str(tmp_path / "bare.safetensors"))
    with pytest.raises(ImageEncoderError, match="expected a CLIP vision"):
        save_file({"model.diffusion_model.x": torch.zeros(1)}, tmp_path / "ckpt.safetensors")
        load_image_encoder(str(tmp_path / "ckpt.safetensors"))
    with pytest.raises(ValueError, match="only .safetensors files"):
        torch.save({}, tmp_path / "clip.pt")
        load_image_encoder(str(tmp_path / "clip.pt"))


def test_diffusers_folder_round_trip_and_refusals(tmp_path):
    source = tiny_backbone(seed=4)
    folder = tmp_path / "model"
    for name in ("unet", "text_encoder", "vae", "tokenizer", "noise_scheduler"):
        getattr(source, name).save_pretrained(folder / ("scheduler" if name == "noise_scheduler" else name))
    (folder / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    loaded = load_backbone(str(folder))
    x, t, c = torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.randn(1, 77, 32)
    with torch.no_grad():
        assert torch.allclose(loaded.unet(x, t, c).sample, source.unet(x, t, c).sample, atol=1e-6)
    assert loaded.tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert not any(p.requires_grad for p in loaded.unet.parameters())
    with pytest.raises(BackboneError, match="not a complete diffusers model folder"):
        (tmp_path / "partial" / "unet").mkdir(parents=True)
        (tmp_path / "partial" / "model_index.json").write_text("{}")
        load_backbone(str(tmp_path / "partial"))


UNET = "model.diffusion_model."
CLIP_L_SDXL = "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight"
BIG_G_SDXL = "conditioner.embedders.1.model.token_embedding.weight"


def keys_file(path, keys) -> str:
    """A tiny file with a real checkpoint's key layout (the refusals read only the names)."""
    save_file({key: torch.zeros(1) for key in keys}, path)
    return str(path)


@pytest.mark.parametrize("keys, message", [
    ([UNET + "label_emb.0.0.weight", UNET + "input_blocks.0.0.weight", CLIP_L_SDXL],
     r"is an SDXL checkpoint with CLIP-L only; both text encoders are needed "
     r"\(CLIP-L at conditioner.embedders.0.transformer.\*, OpenCLIP bigG at conditioner.embedders.1.model.\*\)"),
    ([UNET + "label_emb.0.0.weight", UNET + "input_blocks.0.0.weight", BIG_G_SDXL], "is an SDXL checkpoint with OpenCLIP bigG only; both text encoders are needed"),
    ([UNET + "label_emb.0.0.weight", UNET + "input_blocks.0.0.weight", "conditioner.embedders.0.model.token_embedding.weight"],
     "is an SDXL refiner checkpoint .*refiners are not supported: supported are SD1.5-family and SDXL-family"),
    ([UNET + "input_blocks.0.0.weight", "cond_stage_model.model.token_embedding.weight"], "is an SD2.x checkpoint .*supported are SD1.5-family and SDXL-family"),
    ([UNET + "joint_blocks.0.context_block.attn.qkv.weight", "text_encoders.clip_l.transformer.text_model.final_layer_norm.weight"],
     r"is an SD3 \(MMDiT\) checkpoint; supported are SD1.5-family and SDXL-family"),
    (["double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight"], "is a Flux checkpoint; supported are SD1.5-family and SDXL-family"),
    (["lora_unet_x.lora_down.weight"], "is a LoRA"),
    (["vision_model.embeddings.class_embedding"], "is a CLIP vision model"),
])
def test_single_file_refusals_name_what_was_found_and_what_is_supported(tmp_path, keys, message):
    path = keys_file(tmp_path / "model.safetensors", keys)
    with pytest.raises(BackboneError, match=message):
        load_backbone(str(path))
    with pytest.raises(BackboneError, match=message):  # the resolution default reads the same header, and refuses the same way
        native_resolution(path)


def test_native_resolution_of_single_files_is_read_from_their_keys(tmp_path):
    sd15 = keys_file(tmp_path / "sd15.safetensors", [UNET + "input_blocks.0.0.weight", "cond_stage_model.transformer.text_model.x"])
    sdxl = keys_file(tmp_path / "sdxl.safetensors", [UNET + "label_emb.0.0.weight", CLIP_L_SDXL, BIG_G_SDXL])
    assert (native_resolution(sd15), native_resolution(sdxl)) == (512, 1024)


# ------------------------------------------------------------------------------ data reach the model as the user sees them

def test_truncated_image_is_skipped_at_scan_not_a_crash_when_drawn(tmp_path, caplog):
    write_image(tmp_path / "good.png")
    pixels = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "photo.jpg", quality=95)
    data = (tmp_path / "photo.jpg").read_bytes()
    (tmp_path / "photo.jpg").write_bytes(data[: len(data) * 2 // 3])  # header intact: Image.verify() passes it
    with caplog.at_level(logging.WARNING):
        dataset = SubjectFolderDataset(tmp_path, 32)
    assert [s.subject_id for s in dataset.subjects] == ["good"] and dataset.skipped == [tmp_path / "photo.jpg"]
    assert "skipped 1 unreadable image file(s)" in caplog.text and "photo.jpg" in caplog.text
    for index in range(len(dataset)):  # every image that is drawn decodes
        dataset.get(index, torch.Generator().manual_seed(0))


def test_image_over_the_decompression_bomb_limit_is_skipped_with_a_clear_warning(tmp_path, caplog, monkeypatch):
    write_image(tmp_path / "small.png", (20, 20))
    write_image(tmp_path / "huge.png", (100, 60))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2500)  # Pillow refuses more than twice this: 5,000 pixels
    with caplog.at_level(logging.WARNING):
        dataset = SubjectFolderDataset(tmp_path, 32)
    assert [s.subject_id for s in dataset.subjects] == ["small"] and dataset.too_large == [tmp_path / "huge.png"]
    assert "over Pillow's decompression-bomb limit of 5000 pixels (first: huge.png)" in caplog.text
    (tmp_path / "small.png").unlink()
    with pytest.raises(DataError, match="no readable images .* 1 over the decompression-bomb limit"):
        SubjectFolderDataset(tmp_path, 32)


def test_text_files_are_utf8_with_the_bom_dropped_and_other_encodings_refused_by_name(tmp_path):
    (tmp_path / "dog").mkdir()
    write_image(tmp_path / "dog" / "a.png")
    (tmp_path / "dog" / "a.txt").write_bytes("\ufeffa {token} café dog".encode("utf-8"))  # Notepad's UTF-8 with BOM
    (tmp_path / "dog" / "class.txt").write_bytes("\ufeffdog\n".encode("utf-8"))
    dataset = SubjectFolderDataset(tmp_path, 32)
    assert dataset.subjects[0].class_word == "dog"
    assert dataset.get(0, torch.Generator().manual_seed(0)).caption == "a sks café dog"
    (tmp_path / "dog" / "class.txt").write_bytes("dog".encode("utf-16"))
    with pytest.raises(DataError, match=r"dog/class.txt is UTF-16 text; save it as UTF-8"):
        SubjectFolderDataset(tmp_path, 32)
    (tmp_path / "dog" / "class.txt").unlink()
    (tmp_path / "dog" / "a.txt").write_bytes("a {token} café".encode("latin-1"))
    with pytest.raises(DataError, match=r"dog/a.txt is not UTF-8 text \(byte 13 is 0xe9\)"):  # at scan, not when drawn
        SubjectFolderDataset(tmp_path, 32)


def test_same_stem_images_are_separate_subjects_and_deeper_folders_are_counted(tmp_path, caplog):
    write_image(tmp_path / "a.png", colour=(255, 0, 0))
    write_image(tmp_path / "a.jpg", colour=(0, 0, 255))
    write_image(tmp_path / "b.png")
    (tmp_path / "b").mkdir()  # a folder subject of the same name as a top-level image
    write_image(tmp_path / "b" / "1.png")
    (tmp_path / "b" / "more" / "deeper").mkdir(parents=True)
    for name in ("2.png", "3.jpg"):
        write_image(tmp_path / "b" / "more" / name)
    write_image(tmp_path / "b" / "more" / "deeper" / "4.png")
    with caplog.at_level(logging.WARNING):
        dataset = SubjectFolderDataset(tmp_path, 32)
    ids = [s.subject_id for s in dataset.subjects]
    assert ids == ["a.jpg", "a.png", "b", "b.png"] and len(set(ids)) == len(ids)
    assert [len(s.images) for s in dataset.subjects] == [1, 1, 1, 1]
    assert "ignored 3 image(s) in folders below the subject folders" in caplog.text


def test_preoptimize_writes_one_file_per_subject_even_when_stems_collide(tmp_path):
    from training import preoptimize

    data = tmp_path / "data"
    data.mkdir()
    write_image(data / "a.png", (64, 64), colour=(255, 0, 0))
    write_image(data / "a.jpg", (64, 64), colour=(0, 0, 255))
    preoptimize.main(["--preopt-steps", "1", "--preset", "tiny", "--data", str(data), "--batch-size", "1", "--preopt-dir", str(tmp_path / "preopt"),
                      "--output-dir", str(tmp_path / "run")])
    assert sorted(p.name for p in (tmp_path / "preopt").iterdir()) == ["a.jpg.compact.safetensors", "a.png.compact.safetensors"]


def test_preoptimized_subjects_in_one_group_each_train_only_on_their_own_images():
    import torch

    from hypernet import LidbBasis, LidbConfig
    from hypernet.targets import TargetLayer
    from training.preoptimize import FixedSubjects

    layers = [TargetLayer("lora_unet_a", 8, 6), TargetLayer("lora_unet_b", 4, 4)]
    model = FixedSubjects(LidbBasis(layers, LidbConfig(rank=1, a=4, b=3, seed=0)), 3)
    with torch.no_grad():
        for value in model.values.values():
            value.normal_()
    model.rows = torch.tensor([0, 0, 2, 2, 1, 1])
    out = model(None)
    for name, per_sample in out.trainables.items():
        own = torch.stack([model.trainables(int(row))[name] for row in model.rows])
        assert torch.equal(per_sample, own)
    # a loss on subject 2's images only moves subject 2's trainables
    sum(lora.square().sum() for lora in (out.lora.up["lora_unet_a"][2:4], out.lora.down["lora_unet_b"][2:4])).backward()
    for value in model.values.values():
        assert value.grad[2].abs().sum() > 0 and value.grad[[0, 1]].abs().sum() == 0


def test_preoptimize_in_groups_trains_every_subject_of_every_group(tmp_path):
    from hypernet.files import load_compact_subject_lora
    from training import preoptimize

    data = tmp_path / "data"
    data.mkdir()
    for i, colour in enumerate([(255, 0, 0), (0, 0, 255), (0, 200, 0)]):
        write_image(data / f"s{i}.png", (64, 64), colour=colour)
    preoptimize.main(["--preopt-steps", "3", "--preopt-group", "2", "--preset", "tiny", "--data", str(data), "--batch-size", "1",
                      "--preopt-dir", str(tmp_path / "preopt"), "--output-dir", str(tmp_path / "run")])
    files = sorted((tmp_path / "preopt").iterdir())
    assert [p.name for p in files] == [f"s{i}.compact.safetensors" for i in range(3)]  # groups of 2 and 1
    ups = []
    for path in files:
        trainables, basis, _ = load_compact_subject_lora(path)
        a = {layer.name: basis.config.layer_dims(layer)[0] * basis.config.rank for layer in basis.layers}
        ups.append(torch.cat([value[: a[name]] for name, value in trainables.items()]))
    assert all(up.abs().max() > 0 for up in ups)  # the up factors start at zero: every subject was optimised
    assert (ups[0] - ups[1]).abs().max() > 0  # group mates are not tied together


COMFY_LOAD_IMAGE = """
import sys
root, folder, output = sys.argv[1:4]
sys.path.insert(0, root)  # before anything else: this repo's nodes/ package must not shadow ComfyUI's nodes.py
import comfy.cli_args
comfy.cli_args.args.cpu = True
import os, nodes
from safetensors.torch import save_file
loader = nodes.LoadImage()
save_file({name: loader.load_image(os.path.join(folder, name))[0][0].contiguous() for name in sorted(os.listdir(folder))}, output)
"""


def _png_rgb16(path, pixels: np.ndarray) -> None:
    """A 48-bit RGB PNG (Pillow cannot write one)."""
    import struct
    import zlib

    height, width, _ = pixels.shape
    rows = b"".join(b"\x00" + pixels[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def test_images_load_as_comfyui_load_image_loads_them(comfyui_root, tmp_path, caplog):
    import subprocess
    import sys

    from safetensors.torch import load_file

    from training.data import load_rgb

    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(folder / "rgb.png")
    for orientation in (3, 6, 8):  # rotated 180, 90 clockwise, 90 counter-clockwise
        exif = Image.Exif()
        exif[0x0112] = orientation
        Image.fromarray(pixels).save(folder / f"exif_{orientation}.jpg", exif=exif, quality=95)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(pixels).save(folder / "exif_6.png", exif=exif)
    ramp = (np.arange(24 * 40, dtype=np.uint32).reshape(24, 40) * 68).astype(np.uint16)  # 0 .. 65212
    Image.fromarray(ramp).save(folder / "gray16.png")
    _png_rgb16(folder / "rgb16.png", np.stack([ramp, ramp[::-1], 65535 - ramp], axis=-1))
    Image.fromarray(pixels).convert("P").save(folder / "palette.png")
    Image.fromarray(pixels).convert("L").save(folder / "gray.jpg")
    Image.fromarray(pixels).convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray(pixels).convert("1").save(folder / "bilevel.png")
    Image.fromarray(np.dstack([pixels, np.full((24, 40), 255, np.uint8)])).save(folder / "opaque_rgba.png")
    Image.fromarray(pixels).save(folder / "plain.webp", lossless=True)
    result = subprocess.run([sys.executable, "-c", COMFY_LOAD_IMAGE, str(comfyui_root), str(folder), str(tmp_path / "comfy.safetensors")],
                            capture_output=True, text=True, timeout=600, cwd=tmp_path, env={**os.environ, "PYTHONPATH": ""})
    assert result.returncode == 0, result.stderr[-3000:]
    theirs = load_file(tmp_path / "comfy.safetensors")
    assert len(theirs) == len(list(folder.iterdir())) == 13
    for name, image in theirs.items():
        ours = torch.from_numpy(np.asarray(load_rgb(folder / name), dtype=np.float32) / 255.0)
        assert ours.shape == image.shape and torch.equal(ours, image), name
    assert theirs["exif_6.jpg"].shape == theirs["exif_6.png"].shape == (40, 24, 3)  # EXIF rotation applied
    # the training data set reads them the same way, and says which 16-bit files ComfyUI clips
    with caplog.at_level(logging.WARNING):
        dataset = SubjectFolderDataset(folder, 32)
    assert "1 16-bit grayscale image(s)" in caplog.text and "gray16.png" in caplog.text
    index = [s.subject_id for s in dataset.subjects].index("exif_8")
    assert torch.equal(dataset.reference(index), theirs["exif_8.jpg"])
