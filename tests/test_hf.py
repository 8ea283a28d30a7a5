"""moelab.hf: weights both ways, parity with transformers' own backends, and inspecting transformers models.

Tiny models (hidden 32, intermediate 64, 8 experts, top-2, 2 layers) with random weights under a seed; nothing
is downloaded. Every test runs with transformers' registry checked by identity before and after.
"""

import subprocess
import sys
import textwrap

import pytest
import torch

transformers = pytest.importorskip("transformers")

import moelab  # noqa: E402
import moelab.hf as hf  # noqa: E402
from transformers.integrations import moe as hf_moe  # noqa: E402

BACKENDS = ("eager", "batched_mm", "grouped_mm")
FAMILIES = ("olmoe", "qwen2_moe", "mixtral")
HIDDEN, INTERMEDIATE, EXPERTS, TOP_K, SHARED = 32, 64, 8, 2, 48
ATOL = {torch.float32: 1e-5, torch.bfloat16: 3e-2}  # outputs are O(1)
RTOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}

TRANSFORMERS_OWN = {"batched_mm": hf_moe.batched_mm_experts_forward, "grouped_mm": hf_moe.grouped_mm_experts_forward}


def tiny_model(family: str, dtype=torch.float32, seed: int = 0):
    """A 2-layer CausalLM of `family`, weights N(0, 1/H) under `seed`: outputs O(1), routing far from ties."""
    model = hf.tiny_model(family, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_experts=EXPERTS,
                          top_k=TOP_K, num_layers=2, shared_expert_intermediate_size=SHARED, dtype=dtype, seed=seed)
    assert len(hf.find_moe_layers(model)) == 2
    return model


def blocks(model):
    return [layer.mlp for layer in model.model.layers]


def registry_snapshot():
    return dict(hf_moe.ExpertsInterface._global_mapping), dict(hf_moe.ALL_EXPERTS_FUNCTIONS.items())


def assert_registry_is(snapshot):
    """transformers' registry holds exactly the functions of `snapshot`, by identity."""
    for now, then in zip(registry_snapshot(), snapshot):
        assert now.keys() == then.keys()
        assert all(now[key] is then[key] for key in then)


def assert_transformers_own_registry():
    global_mapping, instance = registry_snapshot()
    for name, fn in TRANSFORMERS_OWN.items():
        assert global_mapping[name] is fn and instance[name] is fn
    assert not [name for name in instance if name.startswith("moelab")]


@pytest.fixture(autouse=True)
def _registry_untouched():
    snapshot = registry_snapshot()
    yield
    assert_registry_is(snapshot)


@pytest.fixture(scope="module")
def models():
    """One float32 model per family, shared by the tests that only read it (each restores its backend)."""
    return {family: tiny_model(family) for family in FAMILIES}


def hidden_states(dtype, seed=1, shape=(2, 9, HIDDEN)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


# --- the extra is optional -------------------------------------------------------------------------------------

def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)


def test_moelab_works_without_transformers_and_names_the_extra():
    result = run_python("""
        import sys
        sys.modules["transformers"] = None  # as if it were not installed: importing it raises ImportError
        import torch, moelab, moelab.hf
        moe = moelab.SparseMoE(moelab.MoEConfig(hidden_size=8, intermediate_size=16, num_experts=4, top_k=2), seed=0)
        with moelab.inspect(moe) as trace:
            moe(torch.randn(3, 8))
        assert trace.calls and "route" in [s.name for s in trace.steps]
        try:
            moelab.hf.from_transformers(moe)
        except ImportError as error:
            print("IMPORT ERROR:", error)
    """)
    assert result.returncode == 0, result.stderr
    assert "IMPORT ERROR:" in result.stdout and "pip install -e" in result.stdout and ".[hf]" in result.stdout


def test_importing_moelab_and_inspecting_moelab_modules_never_imports_transformers():
    result = run_python("""
        import sys, torch, moelab, moelab.hf
        moe = moelab.SparseMoE(moelab.MoEConfig(hidden_size=8, intermediate_size=16, num_experts=4, top_k=2), seed=0)
        with moelab.inspect(moe):
            moe(torch.randn(3, 8))
        print("transformers" in sys.modules)
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


# --- conversion ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_conversion_round_trips_the_weights_exactly(family, models):
    block = blocks(models[family])[0]
    moe = hf.from_transformers(block)
    assert hf.family_of(block) == family
    assert (moe.config.shared_expert_intermediate_size > 0) == (family == "qwen2_moe")
    assert moe.config.top_k_weights_float32 == (family == "mixtral")
    back = hf.to_transformers(moe, family)
    assert type(back) is type(block)
    theirs, again = block.state_dict(), back.state_dict()
    assert theirs.keys() == again.keys()
    for key in theirs:
        assert torch.equal(theirs[key], again[key]), key
    assert torch.equal(moe.router.weight, block.gate.weight)
    assert moe.experts.gate_up_proj.data_ptr() != block.experts.gate_up_proj.data_ptr()  # a copy, not a view


def test_conversion_keeps_dtype_and_does_not_touch_the_global_rng(models):
    block = blocks(models["olmoe"])[0]
    state = torch.random.get_rng_state()
    moe = hf.from_transformers(block.to(torch.bfloat16))
    back = hf.to_transformers(moe)
    block.float()
    assert torch.equal(torch.random.get_rng_state(), state)
    assert moe.router.weight.dtype == torch.bfloat16 and back.experts.down_proj.dtype == torch.bfloat16


def test_conversion_refuses_what_a_family_cannot_compute():
    plain = moelab.SparseMoE(moelab.MoEConfig(hidden_size=8, intermediate_size=16, num_experts=4, top_k=2), seed=0)
    with pytest.raises(ValueError, match="qwen2_moe blocks always have a shared expert"):
        hf.to_transformers(plain, "qwen2_moe")
    with pytest.raises(ValueError, match="mixtral always renormalises"):
        hf.to_transformers(moelab.SparseMoE(moelab.MoEConfig(8, 16, 4, 2, norm_topk_prob=False)), "mixtral")
    with pytest.raises(ValueError, match="mixtral keeps top_k_weights in float32"):
        hf.to_transformers(plain, "mixtral")
    with pytest.raises(ValueError, match="unknown family 'deepseek'"):
        hf.to_transformers(plain, "deepseek")
    with pytest.raises(ValueError, match="unknown transformers experts backend 'fast'"):
        hf.to_transformers(plain, experts_implementation="fast")
    block = hf.to_transformers(plain)
    wider = moelab.SparseMoE(moelab.MoEConfig(hidden_size=8, intermediate_size=32, num_experts=4, top_k=2))
    with pytest.raises(ValueError, match="intermediate_size: SparseMoE 32, block 16"):
        hf.copy_weights(wider, block)
    with pytest.raises(ValueError, match="is not a transformers MoE block"):
        hf.from_transformers(torch.nn.Linear(2, 2))


# --- parity with transformers' own backends, outside any inspection ------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_moelab_backends_equal_transformers_backends_on_identical_weights(family, dtype):
    model = tiny_model(family, dtype)
    x = hidden_states(dtype)
    assert_transformers_own_registry()
    for backend in BACKENDS:
        model.set_experts_implementation(backend)
        for block in blocks(model):
            theirs = block(x)
            ours = hf.from_transformers(block, experts_implementation=backend)(x)
            assert ours.dtype == theirs.dtype == dtype
            torch.testing.assert_close(ours, theirs, atol=ATOL[dtype], rtol=RTOL[dtype])
    assert_transformers_own_registry()


def test_compare_with_transformers_reports_every_layer_and_backend_and_restores_the_model(models):
    model = models["olmoe"]
    model.set_experts_implementation("eager")
    try:
        frame = hf.compare_with_transformers(model, num_tokens=10)
        assert model.get_experts_implementation() == {"": "eager"}
    finally:
        model.set_experts_implementation("grouped_mm")
    assert list(frame["backend"]) == [b for b in BACKENDS for _ in range(2)]
    assert (frame["max_abs_diff"] <= 1e-5).all() and (frame["max_abs_output"] > 0.1).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_transformers_experts_runs_transformers_backend_on_the_same_weights(backend):
    moe = moelab.SparseMoE(moelab.MoEConfig(HIDDEN, INTERMEDIATE, EXPERTS, TOP_K, initializer_range=HIDDEN ** -0.5),
                           experts_implementation=backend, seed=0)
    theirs = hf.transformers_experts(moe, backend)
    assert theirs.gate_up_proj is moe.experts.gate_up_proj and theirs.down_proj is moe.experts.down_proj
    assert theirs.config._experts_implementation == backend
    x = hidden_states(torch.float32, shape=(11, HIDDEN))
    routing = moe.router(x)
    expected = moe.experts(x, routing.top_k_index, routing.top_k_weights)
    got = theirs(x, routing.top_k_index, routing.top_k_weights)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert hf.transformers_experts(moe.experts, backend).down_proj is moe.experts.down_proj
    with pytest.raises(ValueError, match="valid names are"):
        hf.transformers_experts(moe, "fast")


# --- inspecting a transformers model ----------------------------------------------------------------------------

def step_names(call):
    return [step.name for step in call.steps]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_inspect_traces_every_layer_with_moelabs_steps(family, backend, models):
    model = models[family]
    model.set_experts_implementation(backend)
    ids = torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            expected = model(ids).logits
            with moelab.inspect(model) as trace:
                assert model.get_experts_implementation() == {"": hf.registered_name(backend)}
                logits = model(ids).logits
        assert model.get_experts_implementation() == {"": backend}
        torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
        names = [f"model.layers.{i}.mlp" for i in range(2)]
        assert [call.layer for call in trace.calls] == names
        assert all(call.backend == backend and call.stage is None for call in trace.calls)
        assert any(backend in note and "transformers" in note for note in trace.notes)
        for call, block in zip(trace.calls, blocks(model)):
            # the same steps, in the same order, as moelab's own layer with the same weights and backend
            moe = hf.from_transformers(block, experts_implementation=backend)
            with torch.no_grad(), moelab.inspect(moe) as own:
                moe(_input_of(model, ids, block))
            assert step_names(call) == step_names(own.calls[0])
            assert torch.equal(call["route"].tensors["top_k_index"], own.calls[0]["route"].tensors["top_k_index"])
            assert call.num_tokens == 6 and call.sizes["top_k"] == TOP_K
            if family != "qwen2_moe":  # the memory model has no shared expert
                assert call.memory_estimate() is not None
                assert not trace.memory.query(f"call == {call.index}")["analytic_bytes"].isna().any()
    finally:
        model.set_experts_implementation("grouped_mm")


def _input_of(model, ids, block):
    """The hidden states `block` receives in a plain forward of `ids` (captured with a hook)."""
    seen = []
    handle = block.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    try:
        model(ids)
    finally:
        handle.remove()
    return seen[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_generation_is_unchanged_under_inspection_and_after(family, models):
    model = models[family]
    ids = torch.randint(3, 64, (1, 5), generator=torch.Generator().manual_seed(1))
    kwargs = dict(max_new_tokens=4, do_sample=False, min_new_tokens=4)
    before = model.generate(ids, **kwargs)
    with moelab.inspect(model) as trace:
        during = model.generate(ids, **kwargs)
    after = model.generate(ids, **kwargs)
    assert torch.equal(before, during) and torch.equal(before, after)
    stages = [(call.stage, call.decode_step) for call in trace.calls[::2]]
    assert stages == [("prefill", None)] + [("decode", n) for n in range(3)]
    assert [call.num_tokens for call in trace.calls] == [5, 5] + [1, 1] * 3
    assert_transformers_own_registry()


def test_everything_is_restored_also_on_error(models):
    model = models["olmoe"]
    model.set_experts_implementation("batched_mm")
    hooks = lambda: [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]  # noqa: E731
    before = hooks()
    with pytest.raises(RuntimeError, match="boom"):
        with moelab.inspect(model):
            assert hf.registered_name("batched_mm") in hf_moe.ALL_EXPERTS_FUNCTIONS
            model(torch.tensor([[3, 4, 5]]))
            raise RuntimeError("boom")
    assert model.get_experts_implementation() == {"": "batched_mm"} and hooks() == before
    assert moelab.current_stage() is None
    assert_transformers_own_registry()
    model.set_experts_implementation("grouped_mm")


def test_a_backend_moelab_does_not_have_is_refused_and_nothing_changes(models):
    model = models["mixtral"]
    registry = hf_moe.ALL_EXPERTS_FUNCTIONS
    registry["my_experts"] = hf_moe.batched_mm_experts_forward  # a user's own backend, in the public mapping
    try:
        model.set_experts_implementation("my_experts")
        with pytest.raises(ValueError, match="runs transformers' 'my_experts' experts backend"):
            with moelab.inspect(model):
                pass
        assert model.get_experts_implementation() == {"": "my_experts"}
        assert not [name for name in registry if name.startswith("moelab")]
    finally:
        model.set_experts_implementation("grouped_mm")
        del registry["my_experts"]


def test_a_block_alone_is_refused_with_a_pointer_to_the_model(models):
    with pytest.raises(ValueError, match=r"inspect the model itself, moelab.inspect\(model\)"):
        with moelab.inspect(blocks(models["olmoe"])[0]):
            pass


def test_nested_inspections_share_the_registration(models):
    model = models["olmoe"]
    with moelab.inspect(model) as outer:
        with moelab.inspect(model) as inner:
            model(torch.tensor([[3, 4, 5]]))
        assert hf.registered_name("grouped_mm") in hf_moe.ALL_EXPERTS_FUNCTIONS
        model(torch.tensor([[3, 4]]))
    assert len(inner.calls) == 2 and len(outer.calls) == 4
    assert model.get_experts_implementation() == {"": "grouped_mm"}
