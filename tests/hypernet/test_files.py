import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import hypernet.files as files
from hypernet import (
    FeatureSpec,
    HyperNetConfig,
    HyperNetwork,
    LidbConfig,
    attach_lora,
    expand_compact_subject_lora,
    load_hypernet,
    load_subject_lora,
    locate_targets,
    predict_subject_lora,
    read_hypernet_info,
    save_hypernet,
)
from hypernet.errors import FileFormatError, TargetMismatchError
from hypernet.lidb import LidbBasis
from hypernet.targets import require_same_targets
from testkit.tiny_models import SD15_UNET_CONFIG, tiny_text_encoder, tiny_unet, unet_inputs

SPEC = FeatureSpec(dim=16, tokens=4, encoder="test-encoder")


def trained_like(hypernet, seed=0):
    # give the zero-initialised heads some weights so predictions are not trivially zero
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in hypernet.heads.weights:
            p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    return hypernet


@pytest.fixture
def setup(tmp_path):
    unet, encoder = tiny_unet(), tiny_text_encoder()
    bound = locate_targets(unet, [encoder])
    config = HyperNetConfig(features=SPEC, width=32, depth=1, heads=4, iterations=2, lidb=LidbConfig(a=8, b=6, seed=3))
    torch.manual_seed(0)
    hypernet = trained_like(HyperNetwork(config, bound.layers))
    path = save_hypernet(tmp_path / "h.safetensors", hypernet, base_arch="sd15", provenance={"steps": 3})
    return hypernet, unet, encoder, bound, path


def features(seed=0, n=1):
    return torch.randn(n, SPEC.tokens, SPEC.dim, generator=torch.Generator().manual_seed(seed))


def test_hypernet_round_trip_predicts_identically(setup):
    hypernet, _, _, bound, path = setup
    loaded, info = load_hypernet(path)
    assert info.base_arch == "sd15" and info.provenance == {"steps": 3} and info.layers == bound.layers
    assert "expects penultimate_hidden_states (4x16) from test-encoder" in info.summary()
    a, b = hypernet.eval().predict(features()), loaded.predict(features())
    assert all(torch.equal(a.trainables[n], b.trainables[n]) for n in bound.names)
    assert read_hypernet_info(path).config == hypernet.config


def test_learned_aux_bases_are_stored_and_restored(tmp_path, setup):
    _, _, _, bound, _ = setup
    config = HyperNetConfig(features=SPEC, width=32, depth=1, heads=4, iterations=1, lidb=LidbConfig(a=8, b=6, learned_aux=True))
    hypernet = HyperNetwork(config, bound.layers)
    with torch.no_grad():
        hypernet.basis.up_aux[bound.names[0]].add_(1.0)
    loaded, _ = load_hypernet(save_hypernet(tmp_path / "l.safetensors", hypernet, base_arch="sd15"))
    assert torch.equal(loaded.basis.aux(bound.names[0])[0], hypernet.basis.aux(bound.names[0])[0])


def rewrite(path, out, metadata_update=None, tensor_update=None):
    tensors = load_file(path)
    with open(path, "rb") as handle:
        header_len = int.from_bytes(handle.read(8), "little")
        metadata = json.loads(handle.read(header_len))["__metadata__"]
    metadata.update(metadata_update or {})
    tensors.update(tensor_update or {})
    save_file(tensors, out, metadata=metadata)
    return out


def test_bad_hypernet_files_fail_with_clear_messages(setup, tmp_path):
    hypernet, _, _, bound, path = setup
    with pytest.raises(FileFormatError, match="file not found"):
        load_hypernet(tmp_path / "missing.safetensors")
    data = path.read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(FileFormatError, match="corrupt or truncated"):
        load_hypernet(tmp_path / "truncated.safetensors")
    (tmp_path / "garbage.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(FileFormatError, match="not a valid safetensors"):
        load_hypernet(tmp_path / "garbage.safetensors")
    torch.save(hypernet.state_dict(), tmp_path / "h.ckpt")
    with pytest.raises(FileFormatError, match="only .safetensors files are loaded"):
        load_hypernet(tmp_path / "h.ckpt")
    with pytest.raises(FileFormatError, match="format version 99, made by a newer"):
        load_hypernet(rewrite(path, tmp_path / "v99.safetensors", {"format_version": "99"}))
    targets = json.loads(files.targets_to_json(bound.layers))
    targets[0][1] = 999
    with pytest.raises(FileFormatError, match="does not match its checksum"):
        load_hypernet(rewrite(path, tmp_path / "t.safetensors", {"targets": json.dumps(targets)}))
    key = next(k for k in hypernet.state_dict() if k.startswith("heads.weights"))
    nan = hypernet.state_dict()[key].clone()
    nan[0, 0, 0] = float("nan")
    with pytest.raises(FileFormatError, match="NaN/inf"):
        load_hypernet(rewrite(path, tmp_path / "nan.safetensors", tensor_update={key: nan}))
    with pytest.raises(FileFormatError, match="aux bases rebuilt from seed"):
        load_hypernet(rewrite(path, tmp_path / "aux.safetensors", {"lidb_aux_sha256": "0" * 64}))
    with pytest.raises(FileFormatError, match="does not match its own config"):
        load_hypernet(rewrite(path, tmp_path / "cfg.safetensors", {"config": json.dumps({**hypernet.config.to_dict(), "depth": 2})}))
    lora_path = predict_subject_lora(hypernet, features(), base_arch="sd15").save(tmp_path / "lora.safetensors")
    with pytest.raises(FileFormatError, match="not a subject hypernet file \\(it looks like subject_lora\\)"):
        load_hypernet(lora_path)


def test_mismatched_layer_list_is_named():
    other = locate_targets(tiny_unet(cross_attention_dim=16)).layers
    mine = locate_targets(tiny_unet()).layers
    with pytest.raises(TargetMismatchError, match="hypernet vs model: .*with other shapes"):
        require_same_targets(mine, other, "hypernet vs model")


def test_failed_write_leaves_the_previous_file_intact(setup, monkeypatch):
    hypernet, _, _, _, path = setup
    before = path.read_bytes()

    def broken_save(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(files, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_hypernet(path, hypernet, base_arch="sd15")
    assert path.read_bytes() == before
    assert sorted(os.listdir(path.parent)) == [path.name]


def test_standard_lora_loads_in_diffusers_with_the_same_output_as_the_hooks(setup, tmp_path):
    from diffusers import StableDiffusionPipeline

    hypernet, unet, encoder, bound, _ = setup
    subject = predict_subject_lora(hypernet, features(1, n=2), base_arch="sd15")
    path = subject.save(tmp_path / "subject.safetensors")
    sample, timesteps, context = unet_inputs(unet)
    ids = torch.randint(3, 1000, (2, 7))
    with torch.no_grad(), attach_lora(bound.modules, subject.lora):
        hooked_unet = unet(sample, timesteps, context).sample
        hooked_text = encoder(ids).last_hidden_state
    state, alphas = StableDiffusionPipeline.lora_state_dict(str(path))
    StableDiffusionPipeline.load_lora_into_unet(state, alphas, unet=unet)
    StableDiffusionPipeline.load_lora_into_text_encoder(state, alphas, text_encoder=encoder, prefix="text_encoder")
    with torch.no_grad():
        diffusers_unet = unet(sample, timesteps, context).sample
        diffusers_text = encoder(ids).last_hidden_state
    torch.testing.assert_close(diffusers_unet, hooked_unet, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(diffusers_text, hooked_text, rtol=1e-5, atol=1e-6)
    reloaded, metadata = load_subject_lora(path)
    assert metadata["ss_network_module"] == "networks.lora" and metadata["format"] == "subject_lora"
    assert all(torch.equal(reloaded.delta(n), subject.lora.delta(n)) for n in bound.names)


def test_compact_lora_is_small_and_expands_bit_exactly_to_the_standard_file(tmp_path):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET_CONFIG)
        text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12))
    layers = locate_targets(unet, [text_encoder]).layers
    basis = LidbBasis(layers, LidbConfig())
    generator = torch.Generator().manual_seed(0)
    trainables = {l.name: torch.randn(basis.config.trainables_per_layer(l), generator=generator) for l in layers}
    from hypernet.subject import SubjectLora

    subject = SubjectLora(layers, basis.expand_exact(trainables), "sd15", trainables, basis)
    compact = subject.save_compact(tmp_path / "subject.compact.safetensors")
    standard = subject.save(tmp_path / "subject.safetensors")
    assert compact.stat().st_size <= 120_000
    print(f"compact SD1.5 subject LoRA: {compact.stat().st_size} bytes; standard: {standard.stat().st_size} bytes")
    expanded, expanded_layers, _ = expand_compact_subject_lora(compact)
    assert expanded_layers == layers
    reference = load_file(standard)
    rebuilt = files.lora_to_kohya(expanded)
    assert reference.keys() == rebuilt.keys()
    assert all(torch.equal(reference[k], rebuilt[k]) for k in reference)


def test_compact_form_refused_for_learned_aux(setup, tmp_path):
    _, _, _, bound, _ = setup
    config = HyperNetConfig(features=SPEC, width=32, depth=1, heads=4, iterations=1, lidb=LidbConfig(a=8, b=6, learned_aux=True))
    subject = predict_subject_lora(HyperNetwork(config, bound.layers), features(), base_arch="sd15")
    assert not subject.can_save_compact
    with pytest.raises(ValueError, match="learned its own"):
        subject.save_compact(tmp_path / "c.safetensors")


# ----------------------------------------------------------------------------- damaged metadata

BAD_VALUES = [None, 0, -1, "x", [], 1.5, True, 10**9]  # None: the field is removed


def _damaged_variants(metadata: dict[str, str]):
    """(field, damaged metadata) for every metadata field and, in JSON fields, every nested field."""
    for key in metadata:
        for bad in [None, "", "null", "0", "[]", '"x"', "1e999", "abc{"]:
            damaged = dict(metadata)
            if bad is None:
                damaged.pop(key)
            else:
                damaged[key] = bad
            yield key, key, damaged
        try:
            parsed = json.loads(metadata[key])
        except ValueError:
            continue
        stack = [((), parsed)] if isinstance(parsed, dict) else []
        while stack:
            trail, node = stack.pop()
            for sub, value in node.items():
                if isinstance(value, dict):
                    stack.append((trail + (sub,), value))
                for bad in BAD_VALUES:
                    copy = json.loads(metadata[key])
                    leaf = copy
                    for part in trail:
                        leaf = leaf[part]
                    if bad is None:
                        leaf.pop(sub)
                    else:
                        leaf[sub] = bad
                    yield key, sub, {**metadata, key: json.dumps(copy)}


@pytest.mark.parametrize("kind", ["hypernetwork", "compact subject LoRA", "standard subject LoRA"])
def test_damaged_metadata_raises_file_format_error_naming_file_and_field(setup, tmp_path, kind):
    hypernet, _, _, _, hypernet_path = setup
    subject = predict_subject_lora(hypernet, features(), base_arch="sd15")
    source, load = {
        "hypernetwork": (hypernet_path, load_hypernet),
        "compact subject LoRA": (subject.save_compact(tmp_path / "c.safetensors"), files.load_compact_subject_lora),
        "standard subject LoRA": (subject.save(tmp_path / "s.safetensors"), load_subject_lora),
    }[kind]
    tensors, metadata = load_file(source), files.read_safetensors(source, "test")[1]
    tried = refused = 0
    for key, field, damaged in _damaged_variants(metadata):
        path = tmp_path / "damaged.safetensors"
        save_file(tensors, path, metadata=damaged)
        tried += 1
        try:
            load(path)
        except FileFormatError as error:  # anything else (ZeroDivisionError, TypeError, KeyError, ...) fails the test
            refused += 1
            message = str(error)
            assert path.name in message and (field in message or key in message), (key, field, damaged[key] if key in damaged else None, message)
    # most damage to the two formats of our own is detected; the standard (kohya) LoRA's metadata is informational
    assert tried > 40 and (refused > tried // 3 if kind != "standard subject LoRA" else refused == 0)


def test_huge_sizes_in_damaged_config_are_refused_before_allocating(setup, tmp_path):
    hypernet, _, _, _, path = setup
    config = hypernet.config.to_dict()
    for field, value in (("width", 2**20), ("depth", 10**6), ("token_embedding_dim", 10**9), ("iterations", 10**9)):
        damaged = rewrite(path, tmp_path / f"{field}.safetensors", {"config": json.dumps({**config, field: value})})
        with pytest.raises(FileFormatError, match=f"{damaged.name}.*{field}"):
            load_hypernet(damaged)


def test_damaged_lora_tensors_are_refused_and_alpha_zero_means_alpha_equals_rank(setup, tmp_path):
    hypernet, _, _, _, _ = setup
    subject = predict_subject_lora(hypernet, features(), base_arch="sd15")
    path = subject.save(tmp_path / "s.safetensors")
    state, name = load_file(path), subject.lora.names[0]
    assert subject.lora.up[name].abs().sum() > 0
    cases = {
        "alpha_zero": {f"{name}.alpha": torch.tensor(0.0)},
        "alpha_half": {f"{name}.alpha": torch.tensor(0.5 * subject.lora.rank(name))},
        "alpha_vector": {f"{name}.alpha": torch.ones(2)},
        "rank_zero": {f"{name}.lora_down.weight": state[f"{name}.lora_down.weight"][:0], f"{name}.lora_up.weight": state[f"{name}.lora_up.weight"][:, :0]},
        "ranks_differ": {f"{name}.lora_up.weight": torch.cat([state[f"{name}.lora_up.weight"]] * 2, dim=1)},
    }
    loaded = {}
    for case, update in cases.items():
        save_file({**state, **update}, tmp_path / f"{case}.safetensors")
        try:
            loaded[case] = load_subject_lora(tmp_path / f"{case}.safetensors")[0]
        except FileFormatError as error:
            loaded[case] = str(error)
    assert torch.equal(loaded["alpha_zero"].up[name], subject.lora.up[name])  # kohya: alpha 0 -> alpha = rank, scale 1
    assert torch.equal(loaded["alpha_half"].up[name], subject.lora.up[name] * 0.5)
    assert f"{name}.alpha should be one number" in loaded["alpha_vector"]
    assert "do not form a LoRA of rank >= 1" in loaded["rank_zero"] and "do not form a LoRA of rank >= 1" in loaded["ranks_differ"]
    del state[f"{name}.lora_down.weight"]
    save_file(state, tmp_path / "up_only.safetensors")
    with pytest.raises(FileFormatError, match="has an up factor but no down factor"):
        load_subject_lora(tmp_path / "up_only.safetensors")


# ----------------------------------------------------------------------------- how files are written

def test_exports_respect_the_umask_and_keep_an_existing_files_mode(setup, tmp_path):
    hypernet, _, _, _, _ = setup
    old = os.umask(0o022)
    try:
        fresh = save_hypernet(tmp_path / "fresh.safetensors", hypernet, base_arch="sd15")
        assert fresh.stat().st_mode & 0o777 == 0o644  # readable by a ComfyUI running as another user
        os.umask(0o077)
        assert save_hypernet(tmp_path / "private.safetensors", hypernet, base_arch="sd15").stat().st_mode & 0o777 == 0o600
        fresh.chmod(0o664)
        save_hypernet(fresh, hypernet, base_arch="sd15")  # overwriting keeps the file's own mode
        assert fresh.stat().st_mode & 0o777 == 0o664
    finally:
        os.umask(old)


def test_writing_to_a_symlinked_path_writes_through_the_link(setup, tmp_path):
    hypernet, _, _, _, _ = setup
    tmp_path = tmp_path / "links"
    (tmp_path / "store").mkdir(parents=True)
    target = tmp_path / "store" / "real.safetensors"
    target.write_bytes(b"old")
    link = tmp_path / "link.safetensors"
    link.symlink_to(target)
    save_hypernet(link, hypernet, base_arch="sd15")
    assert link.is_symlink() and link.resolve() == target.resolve()
    load_hypernet(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.safetensors", "store"]
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == ["real.safetensors"]


def test_two_saves_at_once_get_two_free_names_and_whole_files(tmp_path):
    import threading

    barrier = threading.Barrier(2)
    results = {}

    def save(label):
        def write(path):
            barrier.wait(timeout=30)  # both saves are mid-write before either takes a name
            files.write_safetensors_atomic({"w": torch.full((4,), float(label))}, {}, path)

        results[label] = files.save_to_free_name(tmp_path, "people/subject", ".safetensors", write)

    threads = [threading.Thread(target=save, args=(label,)) for label in (1, 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(p.name for p in results.values()) == ["subject_00001.safetensors", "subject_00002.safetensors"]
    assert {float(load_file(p)["w"][0]) for p in results.values()} == {1.0, 2.0}
    assert sorted(p.name for p in (tmp_path / "people").iterdir()) == ["subject_00001.safetensors", "subject_00002.safetensors"]
    # a taken name is never overwritten, and a failed save leaves nothing behind
    with pytest.raises(OSError, match="disk full"):
        files.save_to_free_name(tmp_path, "people/subject", ".safetensors", lambda path: (_ for _ in ()).throw(OSError("disk full")))
    assert len(list((tmp_path / "people").iterdir())) == 2


def test_orphan_temporary_files_are_removed_and_nothing_else(tmp_path):
    for name in (".checkpoint.pt.a1b2c3d4.tmp", ".hypernet.safetensors.k_9x2mzq.tmp", "keep.tmp", ".notes.tmp", "checkpoint.pt"):
        (tmp_path / name).write_bytes(b"x")
    removed = files.remove_orphan_temporaries(tmp_path)
    assert sorted(p.name for p in removed) == [".checkpoint.pt.a1b2c3d4.tmp", ".hypernet.safetensors.k_9x2mzq.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".notes.tmp", "checkpoint.pt", "keep.tmp"]


def test_predicted_word_embedding_travels_in_every_subject_file(setup, tmp_path):
    """Standard LoRA (A1111's bundled embedding), compact LoRA and a textual-inversion file all give it back;
    the LoRA factors read from the standard file are unchanged by it; files without one give None."""
    from hypernet.files import SubjectEmbedding, load_subject_embedding
    from hypernet.subject import SubjectLora

    hypernet, _, _, bound, _ = setup
    subject = predict_subject_lora(hypernet, features(1))
    assert subject.embedding is None
    plain = subject.save(tmp_path / "plain.safetensors")
    assert load_subject_embedding(plain) is None and load_subject_embedding(subject.save_compact(tmp_path / "plain.compact.safetensors")) is None
    with pytest.raises(files.HyperNetError, match="no word embedding"):
        subject.save_embedding(tmp_path / "none.safetensors")

    vector = torch.randn(32, generator=torch.Generator().manual_seed(7))
    with_word = SubjectLora(subject.layers, subject.lora, "sd15", subject.trainables, subject.basis, token_embedding=vector, placeholder="zwx")
    standard = with_word.save(tmp_path / "s.safetensors")
    compact = with_word.save_compact(tmp_path / "s.compact.safetensors")
    inversion = with_word.save_embedding(tmp_path / "s_embedding.safetensors")
    assert list(load_file(inversion)) == ["emb_params"] and load_file(inversion)["emb_params"].shape == (1, 32)
    assert "bundle_emb.zwx.string_to_param.*" in load_file(standard)
    for path in (standard, compact, inversion):
        found = load_subject_embedding(path)
        assert found.word == "zwx" and torch.equal(found.vectors[0], vector), path.name
    lora, _ = load_subject_lora(standard)
    assert sorted(lora.names) == sorted(subject.lora.names) and all(torch.equal(lora.down[n], subject.lora.down[n]) for n in lora.names)

    two = dict(load_file(standard), **{"bundle_emb.other.string_to_param.*": torch.zeros(1, 32)})
    save_file(two, tmp_path / "two.safetensors")
    with pytest.raises(FileFormatError, match="2 embeddings"):
        load_subject_embedding(tmp_path / "two.safetensors")
    with pytest.raises(files.HyperNetError, match="one token vector"):
        SubjectEmbedding("zwx", torch.zeros(2, 32))


def test_nearest_real_word_skips_special_pruned_and_excluded_rows():
    from hypernet.words import nearest_real_word, single_token_id

    table = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 0.0], [0.0, 1.0], [0.7, 0.7]])
    assert nearest_real_word(torch.tensor([1.0, 0.0]), table) == 0
    assert nearest_real_word(torch.tensor([1.0, 0.0]), table, excluded=[0]) == 1
    assert nearest_real_word(torch.tensor([0.2, 1.0]), table) == 3
    assert nearest_real_word(torch.tensor([1.0, 1.0]), table, excluded=[4]) in (1, 3)
    with pytest.raises(files.HyperNetError, match="size 3"):
        nearest_real_word(torch.ones(3), table)
    assert single_token_id([42], "sks") == 42
    with pytest.raises(files.HyperNetError, match="2 tokens"):
        single_token_id([1, 2], "two words")
