"""MultiBackboneForCausalLM: per-backbone experts_implementation dicts, image-conditioned generate, save/load."""

from __future__ import annotations

import pytest
import torch

import moelab
from moelab.models.multibackbone import MoEVisionConfig, MultiBackboneConfig, patchify

VALID_KEYS = r"valid keys are \['', 'text_config', 'vision_config'\]"


@pytest.fixture(scope="module")
def model():
    return moelab.MultiBackboneForCausalLM(seed=0)


@pytest.fixture
def prompt():
    return torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(0))  # [B, S]


@pytest.fixture
def pixels(model):
    return moelab.synthetic_pixel_values(model.config.vision_config, batch_size=2, seed=0)  # [B, C, Hi, Wi]


def backends_by_group(model):
    """{"text_config": {backends of its layers}, "vision_config": {...}} read from the layers themselves."""
    return {"text_config": {layer.moe.get_experts_implementation() for layer in model.language_model.layers},
            "vision_config": {layer.moe.get_experts_implementation() for layer in model.vision_model.layers}}


# ------------------------------------------------------------------------------------------------ config


def test_config_round_trip_and_dicts():
    config = MultiBackboneConfig()
    again = MultiBackboneConfig.from_dict(config.to_dict())
    assert again == config and isinstance(again.vision_config, MoEVisionConfig)
    assert config.vision_config.num_patches == 16
    with pytest.raises(ValueError, match=r"unknown MultiBackboneConfig fields \['audio_config'\]"):
        MultiBackboneConfig.from_dict({"audio_config": {}})
    with pytest.raises(ValueError, match="vision_config must be a moelab.MoEVisionConfig"):
        MultiBackboneConfig(vision_config=3)


@pytest.mark.parametrize("kwargs, match", [
    ({"image_size": 10, "patch_size": 4}, r"image_size \(10\) must be divisible by patch_size \(4\)"),
    ({"hidden_size": 30, "num_attention_heads": 4}, r"hidden_size \(30\) must be divisible by num_attention_heads"),
    ({"patch_size": 0}, "patch_size must be in"),
])
def test_vision_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MoEVisionConfig(**kwargs)


def test_patchify_matches_explicit_slicing():
    pixels = torch.randn(2, 3, 8, 8)
    patches = patchify(pixels, 4)  # [B, 4, 48]
    expected = torch.stack([pixels[:, :, 4 * r:4 * r + 4, 4 * c:4 * c + 4].reshape(2, -1)
                            for r in range(2) for c in range(2)], dim=1)
    assert torch.equal(patches, expected)


# ------------------------------------------------------------------------------------------------ selection


def test_string_applies_to_all_backbones():
    m = moelab.MultiBackboneForCausalLM(experts_implementation="eager", seed=0)
    assert m.get_experts_implementation() == {"": "eager", "text_config": "eager", "vision_config": "eager"}
    assert backends_by_group(m) == {"text_config": {"eager"}, "vision_config": {"eager"}}


def test_empty_key_applies_to_all_and_a_sub_config_overrides():
    m = moelab.MultiBackboneForCausalLM(experts_implementation={"": "batched_mm", "vision_config": "eager"}, seed=0)
    assert m.get_experts_implementation() == {"": "batched_mm", "text_config": "batched_mm", "vision_config": "eager"}
    assert backends_by_group(m) == {"text_config": {"batched_mm"}, "vision_config": {"eager"}}
    m.set_experts_implementation({"text_config": "grouped_mm"})  # missing keys keep their backend
    assert m.get_experts_implementation() == {"": "batched_mm", "text_config": "grouped_mm", "vision_config": "eager"}
    m.set_experts_implementation({"": "eager"})  # "" reaches every backbone
    assert backends_by_group(m) == {"text_config": {"eager"}, "vision_config": {"eager"}}
    m.set_experts_implementation("batched_mm")
    assert m.get_experts_implementation() == {"": "batched_mm", "text_config": "batched_mm",
                                              "vision_config": "batched_mm"}
    # get() is the snapshot set() takes back
    snapshot = {"": "grouped_mm", "text_config": "eager", "vision_config": "batched_mm"}
    m.set_experts_implementation(snapshot)
    assert m.get_experts_implementation() == snapshot
    assert backends_by_group(m) == {"text_config": {"eager"}, "vision_config": {"batched_mm"}}


def test_unknown_key_names_the_valid_keys():
    with pytest.raises(ValueError, match=r"unknown experts_implementation key\(s\) \['audio_config'\]; " + VALID_KEYS):
        moelab.MultiBackboneForCausalLM(experts_implementation={"audio_config": "eager"})


def test_failed_set_changes_nothing():
    start = {"": "grouped_mm", "text_config": "eager", "vision_config": "grouped_mm"}
    m = moelab.MultiBackboneForCausalLM(experts_implementation=start, seed=0)
    layers_before = backends_by_group(m)
    bad_requests = [
        ({"text_config": "batched_mm", "visual": "eager"}, VALID_KEYS),  # a good entry next to a bad key
        ({"": "batched_mm", "vision_config": "fast"}, r"experts_implementation\['vision_config'\]: unknown"),
        (42, "must be a str or a dict"),
    ]
    for request, match in bad_requests:
        with pytest.raises(ValueError, match=match):
            m.set_experts_implementation(request)
        assert m.get_experts_implementation() == start
        assert backends_by_group(m) == layers_before


# ------------------------------------------------------------------------------------------------ generate


def test_image_conditions_the_text(model, prompt, pixels):
    with_image = model(prompt, pixels).logits
    assert with_image.shape == (2, 5, 256)
    assert not torch.allclose(with_image, model(prompt, -pixels).logits)
    assert not torch.allclose(with_image, model(prompt).logits)


def test_kv_cache_with_image_equals_full_recompute(model, prompt, pixels):
    full = model(prompt, pixels).logits  # [B, S, V]
    cache = moelab.KVCache()
    first = model(prompt[:, :3], pixels, past_key_values=cache).logits
    assert cache.get_seq_length() == 16 + 3  # image patches + text
    rest = [model(prompt[:, i:i + 1], past_key_values=cache).logits for i in (3, 4)]
    torch.testing.assert_close(torch.cat([first, *rest], dim=1), full, rtol=1e-5, atol=1e-5)
    cached = model.generate(prompt, pixel_values=pixels, max_new_tokens=5, output_logits=True)
    recomputed = model.generate(prompt, pixel_values=pixels, max_new_tokens=5, use_cache=False, output_logits=True)
    assert torch.equal(cached.sequences, recomputed.sequences)
    torch.testing.assert_close(cached.logits, recomputed.logits, rtol=1e-5, atol=1e-5)


def test_greedy_tokens_identical_for_every_backend_mix(model, prompt, pixels):
    mixes = [{"": "eager"}, {"": "batched_mm"}, {"": "grouped_mm"},
             {"text_config": "eager", "vision_config": "grouped_mm"}]
    outputs = []
    for mix in mixes:
        model.set_experts_implementation(mix)
        out = model.generate(prompt, pixel_values=pixels, max_new_tokens=6)
        selection = model.get_experts_implementation()
        prefill = out.backends_used["prefill"]
        assert {prefill[f"vision_model.layers.{i}.moe"] for i in range(2)} == {selection["vision_config"]}
        assert {prefill[f"language_model.layers.{i}.moe"] for i in range(2)} == {selection["text_config"]}
        for stage in [label for label in out.backends_used if label.startswith("decode")]:
            # the image is in the cache: decode runs the text layers only
            assert out.backends_used[stage] == {f"language_model.layers.{i}.moe": selection["text_config"]
                                                for i in range(2)}
        outputs.append(out.sequences)
    model.set_experts_implementation("grouped_mm")
    for sequences in outputs[1:]:
        assert torch.equal(sequences, outputs[0])


def test_gpu_policy_switches_only_the_grouped_mm_entries(prompt, pixels):
    selection = {"": "eager", "text_config": "eager", "vision_config": "grouped_mm"}
    m = moelab.MultiBackboneForCausalLM(experts_implementation=selection, seed=0)
    # use_cache=False reruns the vision encoder in every decode step, so both backbones show up in decode
    out = m.generate(prompt, pixel_values=pixels, max_new_tokens=3, use_cache=False,
                     decode_backends=moelab.decode_backends("cuda"))
    prefill, decode = out.stage_backends("prefill"), out.stage_backends("decode")
    assert prefill["vision_model.layers.0.moe"] == {"grouped_mm"}
    assert decode["vision_model.layers.0.moe"] == {"batched_mm"}  # grouped_mm -> batched_mm
    assert prefill["language_model.layers.0.moe"] == decode["language_model.layers.0.moe"] == {"eager"}  # untouched
    assert m.get_experts_implementation() == selection
    assert backends_by_group(m) == {"text_config": {"eager"}, "vision_config": {"grouped_mm"}}


def test_switch_restored_when_generation_raises(prompt, pixels):
    selection = {"": "grouped_mm", "text_config": "grouped_mm", "vision_config": "eager"}
    m = moelab.MultiBackboneForCausalLM(experts_implementation=selection, seed=0)

    def fail_in_decode(module, args):
        if moelab.current_stage() == moelab.Stage("decode", 0):
            raise RuntimeError("boom")

    handle = m.lm_head.register_forward_pre_hook(fail_in_decode)
    with pytest.raises(RuntimeError, match="boom"):
        m.generate(prompt, pixel_values=pixels, max_new_tokens=4, decode_backends=moelab.decode_backends("cuda"))
    handle.remove()
    assert m.get_experts_implementation() == selection
    assert backends_by_group(m) == {"text_config": {"grouped_mm"}, "vision_config": {"eager"}}


def test_pixel_values_errors(model, prompt):
    with pytest.raises(ValueError, match=r"pixel_values must have shape \[2, 3, 16, 16\]"):
        model(prompt, torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match="pixel_values must be a floating tensor"):
        model(prompt, torch.zeros(2, 3, 16, 16, dtype=torch.long))


def test_image_tokens_count_against_max_positions():
    config = MultiBackboneConfig(text_config=moelab.MoEModelConfig(max_position_embeddings=20))
    m = moelab.MultiBackboneForCausalLM(config, seed=0)
    pixels = moelab.synthetic_pixel_values(config.vision_config)
    with pytest.raises(ValueError, match="prefill of 19 positions exceeds max_position_embeddings = 20"):
        m.generate(torch.zeros(1, 3, dtype=torch.long), pixel_values=pixels, max_new_tokens=2)


# ------------------------------------------------------------------------------------------------ save / load


def test_save_load_round_trip_with_a_dict(model, prompt, pixels, tmp_path):
    model.save_pretrained(tmp_path)
    choice = {"": "batched_mm", "vision_config": "eager"}
    loaded = moelab.MultiBackboneForCausalLM.from_pretrained(tmp_path, experts_implementation=choice)
    assert loaded.config == model.config
    assert loaded.get_experts_implementation() == {"": "batched_mm", "text_config": "batched_mm",
                                                   "vision_config": "eager"}
    reference = model.generate(prompt, pixel_values=pixels, max_new_tokens=5).sequences
    assert torch.equal(loaded.generate(prompt, pixel_values=pixels, max_new_tokens=5).sequences, reference)
    loaded.set_experts_implementation("grouped_mm")
    assert torch.equal(loaded(prompt, pixels).logits, model(prompt, pixels).logits)  # same backend: bitwise
    low = moelab.load_pretrained(tmp_path, dtype=torch.bfloat16)
    assert isinstance(low, moelab.MultiBackboneForCausalLM) and low.dtype == torch.bfloat16
    assert low.generate(prompt, pixel_values=pixels, max_new_tokens=2).sequences.shape == (2, 7)
    with pytest.raises(ValueError, match="load it with moelab.MultiBackboneForCausalLM"):
        moelab.MoEForCausalLM.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=VALID_KEYS):
        moelab.MultiBackboneForCausalLM.from_pretrained(tmp_path, experts_implementation={"text": "eager"})


def test_a_backbone_config_edited_past_its_weights_is_named(model, tmp_path):
    import json

    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    vision = {**config["vision_config"], "num_hidden_layers": 5}
    (tmp_path / "config.json").write_text(json.dumps({**config, "vision_config": vision}))
    with pytest.raises(ValueError, match=r"sets vision_config.num_hidden_layers = 5, but .* holds 2 layers "
                                         r"\(vision_model.layers.0-1\)"):
        moelab.MultiBackboneForCausalLM.from_pretrained(tmp_path)
    text = {**config["text_config"], "vocab_size": 1000}
    (tmp_path / "config.json").write_text(json.dumps({**config, "text_config": text}))
    with pytest.raises(ValueError, match=r"'language_model.embed_tokens.weight' has shape \[256, 64\], the config "
                                         r"expects \[1000, 64\] \(config.json's text_config.vocab_size = 1000\)"):
        moelab.MultiBackboneForCausalLM.from_pretrained(tmp_path)
