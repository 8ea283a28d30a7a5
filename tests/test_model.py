"""MoEForCausalLM: config, KV cache, generate (greedy / sampling), the decode-time switch, selection, save/load."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import moelab
from moelab.models import KVCache, MoEModelConfig

BACKENDS = ["eager", "batched_mm", "grouped_mm"]


@pytest.fixture(scope="module")
def model():
    return moelab.MoEForCausalLM(seed=0)


@pytest.fixture
def prompt():
    return torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(0))  # [B, P]


def layer_backends(model):
    return {name: moe.get_experts_implementation() for name, moe in model.moe_layers().items()}


# ------------------------------------------------------------------------------------------------ config


def test_config_defaults_are_tiny_and_round_trip():
    config = MoEModelConfig()
    sizes = (config.vocab_size, config.hidden_size, config.num_hidden_layers, config.num_attention_heads)
    assert sizes == (256, 64, 2, 4)
    assert (config.moe.num_experts, config.moe.top_k, config.moe.hidden_size) == (8, 2, 64)
    again = MoEModelConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config


@pytest.mark.parametrize("kwargs, words", [
    ({"hidden_size": 64, "num_attention_heads": 5}, ["hidden_size (64)", "num_attention_heads (5)"]),
    ({"hidden_size": 12, "num_attention_heads": 4}, ["head dim", "even"]),
    ({"vocab_size": 0}, ["vocab_size", "[1"]),
    ({"num_hidden_layers": 1.5}, ["num_hidden_layers", "int"]),
    ({"rms_norm_eps": -1.0}, ["rms_norm_eps"]),
    ({"moe": moelab.MoEConfig(hidden_size=32, intermediate_size=8, num_experts=4, top_k=1)},
     ["moe.hidden_size (32)", "hidden_size (64)"]),
])
def test_config_validation_names_the_field(kwargs, words):
    with pytest.raises(ValueError) as error:
        MoEModelConfig(**kwargs)
    for word in words:
        assert word in str(error.value)


def test_config_from_dict_rejects_unknown_fields():
    with pytest.raises(ValueError, match="unknown MoEModelConfig fields \\['n_layer'\\]"):
        MoEModelConfig.from_dict({"n_layer": 3})


def test_seed_makes_the_model_reproducible():
    a, b, c = (moelab.MoEForCausalLM(seed=s) for s in (0, 0, 1))
    for (name, pa), pb, pc in zip(a.state_dict().items(), b.state_dict().values(), c.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)
    assert not torch.equal(a.model.layers[0].moe.experts.gate_up_proj, c.model.layers[0].moe.experts.gate_up_proj)
    low = moelab.MoEForCausalLM(seed=0, dtype="bfloat16")  # the same draw, rounded
    assert low.dtype == torch.bfloat16
    assert torch.equal(low.lm_head.weight, a.lm_head.weight.to(torch.bfloat16))


# ------------------------------------------------------------------------------------------------ forward


def test_forward_shapes_and_loss(model, prompt):
    out = model(prompt)
    assert out.logits.shape == (2, 6, 256) and out.past_key_values is None and out.loss is None
    out = model(prompt, labels=prompt)
    expected = F.cross_entropy(out.logits[:, :-1].reshape(-1, 256), prompt[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kv_cache_equals_full_recompute(model, prompt, backend):
    model.set_experts_implementation(backend)
    full = model(prompt).logits  # [B, 6, V], the reference: no cache
    cache = KVCache()
    chunks = [model(prompt[:, :3], past_key_values=cache).logits,  # prefill 3
              model(prompt[:, 3:5], past_key_values=cache).logits,  # 2 more at once (the masked path)
              model(prompt[:, 5:], past_key_values=cache).logits]  # 1 decode step
    assert cache.get_seq_length() == 6
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, rtol=1e-5, atol=1e-5)
    model.set_experts_implementation("grouped_mm")


def test_forward_rejects_bad_input_ids(model):
    with pytest.raises(ValueError, match=r"input_ids values must be in \[0, vocab_size = 256\)"):
        model(torch.tensor([[1, 256]]))
    with pytest.raises(ValueError, match=r"input_ids must have shape \[batch, seq_len\].*input_ids\[None\]"):
        model(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="input_ids must be an integer tensor"):
        model(torch.ones(1, 2))


def test_sequence_longer_than_max_positions_raises():
    tiny = moelab.MoEForCausalLM(MoEModelConfig(max_position_embeddings=4), seed=0)
    with pytest.raises(ValueError, match="max_position_embeddings = 4"):
        tiny(torch.zeros(1, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="max_new_tokens = 2 .* max_position_embeddings = 4"):
        tiny.generate(torch.zeros(1, 3, dtype=torch.long), max_new_tokens=2)


# ------------------------------------------------------------------------------------------------ generate


def test_greedy_tokens_identical_on_every_backend_and_each_really_ran(model, prompt):
    outputs = {}
    for backend in BACKENDS:
        model.set_experts_implementation(backend)
        outputs[backend] = model.generate(prompt, max_new_tokens=8, output_logits=True)
    model.set_experts_implementation("grouped_mm")
    reference = outputs["eager"]
    top2 = reference.logits.topk(2, dim=-1).values
    margin = (top2[..., 0] - top2[..., 1]).min()
    for backend, out in outputs.items():
        assert out.sequences.shape == (2, 14)
        assert torch.equal(out.sequences[:, :6], prompt)
        assert torch.equal(out.sequences, reference.sequences), backend
        # the test is meaningful: the backends differ by far less than the closest greedy decision
        assert (out.logits - reference.logits).abs().max() < margin / 100
        assert list(out.backends_used) == ["prefill"] + [f"decode {i}" for i in range(7)]
        for stage, layers in out.backends_used.items():
            assert layers == {"model.layers.0.moe": backend, "model.layers.1.moe": backend}, stage


def test_greedy_equals_an_argmax_loop_over_full_recompute(model, prompt):
    out = model.generate(prompt, max_new_tokens=6)
    sequences = prompt
    for _ in range(6):  # the independent reference: no cache, no generate()
        sequences = torch.cat([sequences, model(sequences).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out.sequences, sequences)
    no_cache = model.generate(prompt, max_new_tokens=6, use_cache=False, output_logits=True)
    cached = model.generate(prompt, max_new_tokens=6, output_logits=True)
    assert torch.equal(no_cache.sequences, sequences)
    torch.testing.assert_close(cached.logits, no_cache.logits, rtol=1e-5, atol=1e-5)


def test_sampling_is_reproducible_with_a_seed(model, prompt):
    kwargs = dict(max_new_tokens=10, do_sample=True, temperature=5.0)
    a, b = (model.generate(prompt, seed=7, **kwargs).sequences for _ in range(2))
    c = model.generate(prompt, seed=8, **kwargs).sequences
    assert torch.equal(a, b) and not torch.equal(a, c)
    d = model.generate(prompt, generator=torch.Generator().manual_seed(7), **kwargs).sequences
    assert torch.equal(a, d)
    greedy = model.generate(prompt, max_new_tokens=10).sequences
    assert torch.equal(model.generate(prompt, seed=1, max_new_tokens=10, do_sample=True, top_k=1).sequences, greedy)
    assert torch.equal(model.generate(prompt, seed=1, max_new_tokens=10, do_sample=True, top_p=1e-6).sequences,
                       greedy)


def test_sampling_draws_from_the_filtered_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).repeat(4000, 1)  # [B, V]
    generator = torch.Generator().manual_seed(0)
    draws = moelab.models.generation.next_token(logits, True, 1.0, None, None, generator)
    frequencies = torch.bincount(draws, minlength=4).float() / 4000
    torch.testing.assert_close(frequencies, logits[0].softmax(-1), atol=0.03, rtol=0)
    top2 = moelab.models.generation.next_token(logits, True, 1.0, 2, None, generator)
    assert set(top2.tolist()) == {0, 1}
    # top_p = 0.7: p = [0.64, 0.24, ...]; token 0 alone is short of 0.7, so tokens 0 and 1 stay
    nucleus = moelab.models.generation.next_token(logits, True, 1.0, None, 0.7, generator)
    assert set(nucleus.tolist()) == {0, 1}


def test_eos_stops_early_and_pads(model, prompt):
    free = model.generate(prompt, max_new_tokens=8).sequences  # [2, 14], no eos
    eos = int(free[0, 8])  # the third new token of sequence 0
    stop = int((free[0, 6:] == eos).nonzero()[0]) + 1  # new tokens up to and including its first eos
    alone = model.generate(prompt[:1], max_new_tokens=8, eos_token_id=eos).sequences
    assert torch.equal(alone, free[:1, :6 + stop])  # stopped right after eos
    both = model.generate(prompt, max_new_tokens=8, eos_token_id=eos).sequences
    for row, free_row in zip(both, free):
        hits = (free_row[6:] == eos).nonzero()
        if len(hits):  # identical up to the first eos, eos after it
            k = int(hits[0]) + 1
            assert torch.equal(row[:6 + k], free_row[:6 + k]) and (row[6 + k:] == eos).all()
        else:
            assert torch.equal(row, free_row[:len(row)])


def test_zero_new_tokens_returns_the_prompt(model, prompt):
    out = model.generate(prompt, max_new_tokens=0)
    assert torch.equal(out.sequences, prompt) and out.backends_used == {} and out.new_tokens.shape == (2, 0)


@pytest.mark.parametrize("kwargs, match", [
    ({"max_new_tokens": -1}, "max_new_tokens must be an int >= 0"),
    ({"max_new_tokens": 2.0}, "max_new_tokens must be an int"),
    ({"temperature": 0.0}, "temperature must be a finite float > 0"),
    ({"top_k": 0}, "top_k must be None or an int >= 1"),
    ({"top_p": 1.5}, r"top_p must be None or a float in \(0, 1\]"),
    ({"eos_token_id": 999}, "eos_token_id must be None or an int in"),
    ({"seed": 1, "generator": torch.Generator()}, "either seed or generator"),
    ({"decode_backends": {"grouped_mm": "nope"}}, "decode_backends: unknown experts_implementation 'nope'"),
])
def test_generate_rejects_bad_arguments(model, prompt, kwargs, match):
    with pytest.raises(ValueError, match=match):
        model.generate(prompt, **kwargs)


def test_generate_rejects_bad_input_ids(model):
    with pytest.raises(ValueError, match="input_ids values must be in"):
        model.generate(torch.tensor([[0, 300]]))
    with pytest.raises(ValueError, match="input_ids must have shape"):
        model.generate(torch.tensor([0, 1]))


def test_generate_publishes_the_stage(model, prompt):
    seen = []
    handle = model.lm_head.register_forward_pre_hook(lambda module, args: seen.append(moelab.current_stage()))
    try:
        model.generate(prompt, max_new_tokens=4)
    finally:
        handle.remove()
    assert seen == [moelab.Stage("prefill"), *(moelab.Stage("decode", i) for i in range(3))]
    assert moelab.current_stage() is None


# ------------------------------------------------------------------------------------------------ the decode switch


def test_decode_policy():
    assert moelab.decode_backends("cpu") == {}
    assert moelab.decode_backends(torch.device("cpu")) == {}
    assert moelab.decode_backends("cuda") == {"grouped_mm": "batched_mm"}
    assert moelab.decode_backends("cuda:1") == {"grouped_mm": "batched_mm"}
    with pytest.raises(ValueError, match="device_type must name a torch device type"):
        moelab.decode_backends("gpu-please")


def test_on_cpu_grouped_mm_stays_through_decode(model, prompt):
    assert model.device.type == "cpu"
    out = model.generate(prompt, max_new_tokens=4)
    assert {backend for layers in out.backends_used.values() for backend in layers.values()} == {"grouped_mm"}


def test_gpu_policy_runs_batched_mm_in_decode_and_restores(model, prompt):
    gpu_policy = moelab.decode_backends("cuda")
    out = model.generate(prompt, max_new_tokens=4, decode_backends=gpu_policy)
    assert out.stage_backends("prefill") == {"model.layers.0.moe": {"grouped_mm"}, "model.layers.1.moe": {"grouped_mm"}}
    assert out.stage_backends("decode") == {"model.layers.0.moe": {"batched_mm"}, "model.layers.1.moe": {"batched_mm"}}
    assert model.get_experts_implementation() == {"": "grouped_mm"}
    assert set(layer_backends(model).values()) == {"grouped_mm"}
    # the same tokens as the CPU schedule: the switch changes how, not what
    assert torch.equal(out.sequences, model.generate(prompt, max_new_tokens=4).sequences)


def test_gpu_policy_switches_only_grouped_mm(model, prompt):
    model.set_experts_implementation("eager")
    try:
        out = model.generate(prompt, max_new_tokens=3, decode_backends=moelab.decode_backends("cuda"))
        assert out.stage_backends("decode") == {"model.layers.0.moe": {"eager"}, "model.layers.1.moe": {"eager"}}
    finally:
        model.set_experts_implementation("grouped_mm")


def test_switch_is_restored_when_generation_raises(model, prompt):
    inside = []

    def fail_in_second_decode_step(module, args):
        stage = moelab.current_stage()
        if stage == moelab.Stage("decode", 1):
            inside.append(model.get_experts_implementation())
            raise RuntimeError("boom")

    handle = model.lm_head.register_forward_pre_hook(fail_in_second_decode_step)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            model.generate(prompt, max_new_tokens=5, decode_backends=moelab.decode_backends("cuda"))
    finally:
        handle.remove()
    assert inside == [{"": "batched_mm"}]  # it really was switched when the error hit
    assert model.get_experts_implementation() == {"": "grouped_mm"}
    assert set(layer_backends(model).values()) == {"grouped_mm"}
    assert moelab.current_stage() is None
    assert all(not moe.experts._forward_pre_hooks for moe in model.moe_layers().values())  # recorder removed


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_on_gpu_decode_runs_batched_mm():
    gpu = moelab.MoEForCausalLM(seed=0, dtype=torch.bfloat16, device="cuda")
    out = gpu.generate(torch.tensor([[1, 2, 3]], device="cuda"), max_new_tokens=4)
    assert set(out.stage_backends("prefill")["model.layers.0.moe"]) == {"grouped_mm"}
    assert set(out.stage_backends("decode")["model.layers.0.moe"]) == {"batched_mm"}
    assert gpu.get_experts_implementation() == {"": "grouped_mm"}


# ------------------------------------------------------------------------------------------------ selection


def test_selection_single_backbone():
    m = moelab.MoEForCausalLM(experts_implementation={"": "eager"}, seed=0)
    assert m.get_experts_implementation() == {"": "eager"} and set(layer_backends(m).values()) == {"eager"}
    m.set_experts_implementation("batched_mm")
    assert m.get_experts_implementation() == {"": "batched_mm"}
    assert set(layer_backends(m).values()) == {"batched_mm"}
    assert moelab.MoEForCausalLM(seed=0).get_experts_implementation() == {"": "grouped_mm"}  # the default


def test_failed_set_changes_nothing():
    m = moelab.MoEForCausalLM(experts_implementation="eager", seed=0)
    with pytest.raises(ValueError, match=r"unknown experts_implementation key\(s\) \['text_config'\]; "
                                         r"valid keys are \[''\]"):
        m.set_experts_implementation({"": "batched_mm", "text_config": "grouped_mm"})
    with pytest.raises(ValueError, match=r"experts_implementation\[''\]: unknown experts_implementation 'fast'; "
                                         r"valid names are"):
        m.set_experts_implementation("fast")
    with pytest.raises(ValueError, match="must be a str or a dict"):
        m.set_experts_implementation(["eager"])
    assert m.get_experts_implementation() == {"": "eager"} and set(layer_backends(m).values()) == {"eager"}
    with pytest.raises(ValueError, match="unknown experts_implementation 'fast'"):
        moelab.MoEForCausalLM(experts_implementation="fast")


# ------------------------------------------------------------------------------------------------ save / load


def test_save_load_round_trip(model, prompt, tmp_path):
    model.save_pretrained(tmp_path / "tiny")
    assert sorted(p.name for p in (tmp_path / "tiny").iterdir()) == ["config.json", "model.safetensors"]
    loaded = moelab.MoEForCausalLM.from_pretrained(tmp_path / "tiny")
    assert loaded.config == model.config and loaded.dtype == torch.float32
    assert loaded.get_experts_implementation() == {"": "grouped_mm"}
    assert torch.equal(loaded(prompt).logits, model(prompt).logits)
    assert torch.equal(loaded.generate(prompt, max_new_tokens=5).sequences,
                       model.generate(prompt, max_new_tokens=5).sequences)
    assert isinstance(moelab.load_pretrained(tmp_path / "tiny"), moelab.MoEForCausalLM)


def test_load_with_another_backend_and_dtype(model, prompt, tmp_path):
    model.save_pretrained(tmp_path)
    reference = model.generate(prompt, max_new_tokens=5).sequences
    for choice in ("eager", {"": "batched_mm"}):
        loaded = moelab.MoEForCausalLM.from_pretrained(tmp_path, experts_implementation=choice)
        name = choice if isinstance(choice, str) else choice[""]
        assert loaded.get_experts_implementation() == {"": name}
        assert set(layer_backends(loaded).values()) == {name}
        assert torch.equal(loaded.generate(prompt, max_new_tokens=5).sequences, reference)
    low = moelab.MoEForCausalLM.from_pretrained(tmp_path, dtype="bfloat16")
    assert low.dtype == torch.bfloat16 and all(p.dtype == torch.bfloat16 for p in low.parameters())
    assert torch.equal(low.lm_head.weight, model.lm_head.weight.to(torch.bfloat16))
    assert low.generate(prompt, max_new_tokens=3).sequences.shape == (2, 9)
    low.save_pretrained(tmp_path / "bf16")  # "auto" keeps the saved dtype
    assert moelab.MoEForCausalLM.from_pretrained(tmp_path / "bf16", dtype="auto").dtype == torch.bfloat16
    with pytest.raises(ValueError, match="dtype must be a floating torch.dtype"):
        moelab.MoEForCausalLM.from_pretrained(tmp_path, dtype="int8")


def test_load_errors_are_clear(model, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist; from_pretrained loads local folders"):
        moelab.MoEForCausalLM.from_pretrained(tmp_path / "nowhere")
    model.save_pretrained(tmp_path)
    config_path, weights_path = tmp_path / "config.json", tmp_path / "model.safetensors"
    config_text, weights = config_path.read_text(), weights_path.read_bytes()

    weights_path.write_bytes(weights[: len(weights) // 2])
    with pytest.raises(ValueError, match="model.safetensors is not a readable safetensors file"):
        moelab.MoEForCausalLM.from_pretrained(tmp_path)
    weights_path.unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors is missing"):
        moelab.MoEForCausalLM.from_pretrained(tmp_path)
    weights_path.write_bytes(weights)

    config_path.write_text(config_text[:-20])
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        moelab.MoEForCausalLM.from_pretrained(tmp_path)
    config_path.unlink()
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        moelab.MoEForCausalLM.from_pretrained(tmp_path)

    config = json.loads(config_text)
    config_path.write_text(json.dumps({**config, "hidden_size": 48, "moe": {**config["moe"], "hidden_size": 48}}))
    with pytest.raises(ValueError, match=r"tensor 'lm_head.weight' has shape \[256, 64\], "
                                         r"the config expects \[256, 48\]"):
        moelab.MoEForCausalLM.from_pretrained(tmp_path)
    config_path.write_text(json.dumps({**config, "num_hidden_layers": 3}))
    with pytest.raises(ValueError, match=r"sets num_hidden_layers = 3, but .* holds 2 layers \(model.layers.0-1\)"):
        moelab.MoEForCausalLM.from_pretrained(tmp_path)
    config_path.write_text(json.dumps({**config, "num_attention_heads": 5}))
    with pytest.raises(ValueError, match="config.json holds an invalid MoEModelConfig: hidden_size"):
        moelab.MoEForCausalLM.from_pretrained(tmp_path)
    config_path.write_text(json.dumps({**config, "model_type": "moelab_multi_backbone"}))
    with pytest.raises(ValueError, match="load it with moelab.MultiBackboneForCausalLM"):
        moelab.MoEForCausalLM.from_pretrained(tmp_path)


# ------------------------------------------------------------------------------------------------ one save, one folder


def _two_models():
    """Two models with the same tensor shapes but different configs (rope_theta, activation) and weights."""
    base = dict(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2)
    a = moelab.MoEForCausalLM(MoEModelConfig(**base), seed=0)
    moe_b = moelab.MoEConfig(hidden_size=16, intermediate_size=32, num_experts=8, top_k=2, hidden_act="relu")
    b = moelab.MoEForCausalLM(MoEModelConfig(**base, rope_theta=500.0, moe=moe_b), seed=1)
    return a, b


def test_files_of_two_saves_are_refused(tmp_path):
    a, b = _two_models()
    a.save_pretrained(tmp_path / "a")
    b.save_pretrained(tmp_path / "b")
    (tmp_path / "b" / "config.json").write_bytes((tmp_path / "a" / "config.json").read_bytes())  # A's config, B's weights
    with pytest.raises(ValueError, match=r"come from different saves .*save the model again"):
        moelab.MoEForCausalLM.from_pretrained(tmp_path / "b")


def test_a_save_interrupted_while_writing_the_weights_leaves_the_previous_save_whole(tmp_path, monkeypatch):
    a, b = _two_models()
    prompt = torch.tensor([[1, 2, 3]])
    a.save_pretrained(tmp_path)
    import moelab.models.io as model_io

    def fail(tensors, path, metadata=None):
        open(path, "wb").write(b"partial")  # half a file, then the disk is full
        raise OSError("No space left on device")

    monkeypatch.setattr(model_io, "save_file", fail)
    with pytest.raises(OSError, match="No space left"):
        b.save_pretrained(tmp_path)
    loaded = moelab.MoEForCausalLM.from_pretrained(tmp_path)  # still A, whole: config and weights
    assert loaded.config == a.config
    assert torch.equal(loaded(prompt).logits, a(prompt).logits)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]


def test_a_save_interrupted_while_writing_the_config_is_refused(tmp_path, monkeypatch):
    a, b = _two_models()
    a.save_pretrained(tmp_path)
    import moelab.models.io as model_io

    real_write = model_io._atomic_write

    def fail_on_config(path, write):
        if path.name == "config.json":
            raise OSError("interrupted")
        real_write(path, write)

    monkeypatch.setattr(model_io, "_atomic_write", fail_on_config)
    with pytest.raises(OSError, match="interrupted"):
        b.save_pretrained(tmp_path)  # B's weights are written, A's config stays
    monkeypatch.undo()
    with pytest.raises(ValueError, match="come from different saves"):
        moelab.MoEForCausalLM.from_pretrained(tmp_path)


def test_a_changed_byte_in_the_weights_is_caught(tmp_path):
    a, _ = _two_models()
    a.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x01  # one bit of the last tensor's data: the file still parses
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="does not match the checksum"):
        moelab.MoEForCausalLM.from_pretrained(tmp_path)


def test_folders_saved_before_save_ids_still_load(tmp_path):
    import json

    from safetensors.torch import save_file

    a, _ = _two_models()
    prompt = torch.tensor([[4, 5, 6]])
    a.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["moelab_save_id"], config["weights_sha256"]  # what moelab wrote before
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in a.state_dict().items()}, str(tmp_path / "model.safetensors"),
              metadata={"format": "pt"})
    loaded = moelab.MoEForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(loaded(prompt).logits, a(prompt).logits)


# ------------------------------------------------------------------------------------------------ config vs header


@pytest.mark.parametrize("field, value, message", [
    ("vocab_size", 2_000_000, r"tensor 'lm_head.weight' has shape \[32, 16\], the config expects \[2000000, 16\] "
                              r"\(config.json's vocab_size = 2000000\)"),
    ("num_hidden_layers", 2_000, r"config.json sets num_hidden_layers = 2000, but .*model.safetensors holds 1 "
                                 r"layer \(model.layers.0\)"),
])
def test_a_config_edited_past_its_weights_fails_before_anything_is_built(tmp_path, field, value, message):
    # NOTE: before the header check, each of these built the whole model first: 2,000,000 x 16 embedding and
    # head (~380 MiB with the init), or 2,000 layers (~120 MiB, seconds)
    a, _ = _two_models()
    a.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, field: value}))

    def load():
        with pytest.raises(ValueError, match=message):
            moelab.MoEForCausalLM.from_pretrained(tmp_path)

    import time

    start = time.perf_counter()
    load()
    assert time.perf_counter() - start < 1.0
    assert moelab.memory.measure(load).peak_bytes < 16 * 2 ** 20


def test_tensors_missing_unexpected_or_not_floating_are_named_from_the_header(tmp_path):
    from safetensors.torch import save_file

    a, _ = _two_models()
    a.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["moelab_save_id"], config["weights_sha256"]  # an old-style folder, so the files can be rewritten
    (tmp_path / "config.json").write_text(json.dumps(config))
    state = {k: v.contiguous() for k, v in a.state_dict().items()}
    for tensors, message in [
        ({k: v for k, v in state.items() if k != "lm_head.weight"}, r"missing tensors \['lm_head.weight'\], "
                                                                     r"unexpected tensors \[\]"),
        ({**state, "extra": torch.zeros(1)}, r"missing tensors \[\], unexpected tensors \['extra'\]"),
        ({**state, "lm_head.weight": state["lm_head.weight"].long()}, r"'lm_head.weight' has dtype I64, "
                                                                      r"expected a floating dtype"),
        ({**state, "lm_head.weight": state["lm_head.weight"].to(torch.float8_e4m3fn)},
         r"'lm_head.weight' has dtype F8_E4M3, expected a floating dtype moelab runs in \(float32, bfloat16"),
    ]:
        save_file(tensors, str(tmp_path / "model.safetensors"))
        with pytest.raises(ValueError, match=message):
            moelab.MoEForCausalLM.from_pretrained(tmp_path)


# ------------------------------------------------------------------------------------------------ what a user types


def test_input_ids_of_a_dtype_the_embedding_cannot_take_are_named(model):
    with pytest.raises(ValueError, match=r"input_ids must be an integer tensor of int64 or int32, got torch.uint8; "
                                         r"convert it with .long\(\)"):
        model(torch.tensor([[1, 2, 3]], dtype=torch.uint8))
    assert torch.equal(model(torch.tensor([[1, 2, 3]], dtype=torch.int32)).logits,
                       model(torch.tensor([[1, 2, 3]])).logits)


@pytest.mark.parametrize("labels, message", [
    ([[1, 2, 256]], r"labels values must be in \[0, vocab_size = 256\) or -100 \(ignored\), got values in \[2, 256\]"),
    ([[1, -5, 3]], r"labels values must be in \[0, vocab_size = 256\) or -100 \(ignored\), got values in \[-5, 3\]"),
    ([[1.0, 2.0, 3.0]], r"labels must be an integer tensor of token ids, got torch.float32"),
    ([[-100, -100, -100]], r"labels leave nothing to predict: every label after the first position is -100"),
    ([[7, -100, -100]], r"labels leave nothing to predict"),  # the first label is never a target
])
def test_labels_that_would_fail_in_cross_entropy_or_give_nan_are_named(model, labels, message):
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(ValueError, match=message):
        model(ids, labels=torch.tensor(labels))


def test_one_position_has_nothing_to_predict_and_some_ignored_labels_are_fine(model):
    with pytest.raises(ValueError, match=r"labels leave nothing to predict"):
        model(torch.tensor([[1]]), labels=torch.tensor([[1]]))
    out = model(torch.tensor([[1, 2, 3]]), labels=torch.tensor([[-100, 2, -100]]))
    expected = F.cross_entropy(out.logits[0, :1], torch.tensor([2]))
    torch.testing.assert_close(out.loss, expected)


def test_temperature_must_be_finite_and_a_tiny_one_samples_the_argmax(model, prompt):
    for temperature in (float("inf"), float("nan")):
        with pytest.raises(ValueError, match=r"temperature must be a finite float > 0"):
            model.generate(prompt, 2, do_sample=True, temperature=temperature)
    greedy = model.generate(prompt, 3).sequences
    # NOTE: logits / 1e-300 overflow to inf, and softmax of inf - inf is NaN: multinomial then raised
    assert torch.equal(model.generate(prompt, 3, do_sample=True, temperature=1e-300, seed=0).sequences, greedy)
