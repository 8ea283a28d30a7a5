"""Config validation, the registry, runtime switching, the router and clear errors for bad input."""

import pytest
import torch

import moelab
from conftest import BACKENDS, make_moe
from reference import reference_experts, reference_router


# --- MoEConfig ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("field, value, message", [
    ("top_k", 0, r"top_k must be in \[1, num_experts = 4\], got 0"),
    ("top_k", 5, r"top_k must be in \[1, num_experts = 4\], got 5"),
    ("hidden_size", 0, r"hidden_size must be in \[1, inf\]"),
    ("intermediate_size", -3, r"intermediate_size must be in \[1, inf\]"),
    ("num_experts", 2.0, r"num_experts must be an int"),
    ("hidden_act", "swiglu", r"hidden_act must be one of \[.*'silu'.*\], got 'swiglu'"),
    ("initializer_range", 0.0, r"initializer_range must be a finite float > 0"),
    ("initializer_range", float("inf"), r"initializer_range must be a finite float > 0"),
    ("norm_topk_prob", 1, r"norm_topk_prob must be a bool"),
])
def test_config_rejects_bad_values(field, value, message):
    kwargs = dict(hidden_size=8, intermediate_size=16, num_experts=4, top_k=2)
    kwargs[field] = value
    with pytest.raises(ValueError, match=message):
        moelab.MoEConfig(**kwargs)


def test_config_round_trips_through_a_dict():
    cfg = moelab.MoEConfig(hidden_size=8, intermediate_size=16, num_experts=4, top_k=2, hidden_act="gelu")
    assert moelab.MoEConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown MoEConfig fields"):
        moelab.MoEConfig.from_dict({**cfg.to_dict(), "n_experts": 3})


def test_init_is_reproducible_under_a_seed_and_follows_initializer_range():
    cfg = moelab.MoEConfig(hidden_size=64, intermediate_size=128, num_experts=8, top_k=2, initializer_range=0.05)
    a, b, c = moelab.SparseMoE(cfg, seed=1), moelab.SparseMoE(cfg, seed=1), moelab.SparseMoE(cfg, seed=2)
    for pa, pb, pc in zip(a.parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb) and not torch.equal(pa, pc)
    assert abs(a.experts.gate_up_proj.std().item() - 0.05) < 0.002
    assert abs(a.experts.gate_up_proj.mean().item()) < 0.002
    torch.manual_seed(3)
    d = moelab.SparseMoE(cfg)
    torch.manual_seed(3)
    assert torch.equal(d.router.weight, moelab.SparseMoE(cfg).router.weight)
    bf16 = moelab.SparseMoE(cfg, seed=1, dtype=torch.bfloat16)  # same model, rounded
    assert torch.equal(bf16.experts.down_proj, a.experts.down_proj.to(torch.bfloat16))


def test_parameter_layout_is_the_transformers_one():
    moe = make_moe(hidden_size=8, intermediate_size=12, num_experts=3)
    assert moe.router.weight.shape == (3, 8)
    assert moe.experts.gate_up_proj.shape == (3, 24, 8)  # [E, 2I, H], gate rows first
    assert moe.experts.down_proj.shape == (3, 8, 12)  # [E, H, I]
    # gate rows first: zeroing the up half zeroes the expert's output
    x = torch.randn(4, 8)
    idx, w = torch.zeros(4, 1, dtype=torch.long), torch.ones(4, 1)
    with torch.no_grad():
        moe.experts.gate_up_proj[0, 12:] = 0
    assert torch.count_nonzero(moe.experts(x, idx, w)) == 0


# --- the registry ------------------------------------------------------------------------------------------

@pytest.fixture
def scratch_backend():
    yield "scratch"
    if "scratch" in moelab.ExpertsInterface.names():
        moelab.ExpertsInterface.unregister("scratch")


def test_registry_names_get_and_overwrite(scratch_backend):
    assert set(BACKENDS) <= set(moelab.ExpertsInterface.names())
    first = moelab.ExpertsInterface.get("eager")
    moelab.ExpertsInterface.register(scratch_backend, first)
    with pytest.raises(ValueError, match="already registered.*overwrite=True"):
        moelab.ExpertsInterface.register(scratch_backend, moelab.ExpertsInterface.get("batched_mm"))
    assert moelab.ExpertsInterface.get(scratch_backend) is first
    second = moelab.ExpertsInterface.get("batched_mm")
    moelab.ExpertsInterface.register(scratch_backend, second, overwrite=True)
    assert moelab.ExpertsInterface.get(scratch_backend) is second
    with pytest.raises(ValueError, match=r"unknown experts_implementation 'nope'; valid names are \["):
        moelab.ExpertsInterface.get("nope")
    with pytest.raises(TypeError, match="fn must be callable"):
        moelab.ExpertsInterface.register("x", 3)


def test_a_backend_defined_in_a_notebook_cell_registers_and_runs(scratch_backend):
    # exec'd source has no file behind it, exactly like a Jupyter cell: nothing may inspect the source
    cell = (
        "import torch\n"
        "def my_experts(experts, hidden_states, top_k_index, top_k_weights):\n"
        "    out = torch.zeros_like(hidden_states)\n"
        "    for t in range(hidden_states.shape[0]):\n"
        "        for j in range(top_k_index.shape[1]):\n"
        "            e = int(top_k_index[t, j])\n"
        "            gate, up = (experts.gate_up_proj[e] @ hidden_states[t]).chunk(2)\n"
        "            out[t] += top_k_weights[t, j] * (experts.down_proj[e] @ (experts.act_fn(gate) * up))\n"
        "    return out\n"
    )
    namespace = {}
    exec(compile(cell, "<ipython-input-1>", "exec"), namespace)
    moelab.ExpertsInterface.register(scratch_backend, namespace["my_experts"])
    moe = make_moe(backend=scratch_backend)
    x = torch.randn(6, 16)
    mine = moe(x)
    moe.set_experts_implementation("eager")
    torch.testing.assert_close(mine, moe(x), atol=1e-5, rtol=1e-5)


def test_a_backend_returning_the_wrong_shape_is_named(scratch_backend):
    moelab.ExpertsInterface.register(scratch_backend, lambda experts, h, i, w: h[:1])
    with pytest.raises(RuntimeError, match="experts backend 'scratch' returned \\[1, 16\\], expected .*\\[5, 16\\]"):
        make_moe(backend=scratch_backend)(torch.randn(5, 16))


def test_failed_switch_changes_nothing():
    moe = make_moe(backend="batched_mm")
    with pytest.raises(ValueError, match=r"unknown experts_implementation 'fast'; valid names are \[.*'eager'"):
        moe.set_experts_implementation("fast")
    assert moe.get_experts_implementation() == "batched_mm"
    with pytest.raises(ValueError, match="unknown experts_implementation"):
        make_moe(backend="fast")


# --- router and load balancing -------------------------------------------------------------------------------

@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_router_matches_reference(norm_topk_prob):
    moe = make_moe(16, 32, 6, 3, norm_topk_prob=norm_topk_prob).to(torch.bfloat16)
    x = torch.randn(10, 16).to(torch.bfloat16)
    out = moe.router(x)
    logits, probs, index, weights = reference_router(x, moe.router.weight, 3, norm_topk_prob)
    assert out.router_probs.dtype == torch.float32 and out.top_k_weights.dtype == torch.bfloat16
    assert out.top_k_index.shape == (10, 3) and out.top_k_index.dtype == torch.long
    torch.testing.assert_close(out.router_logits.double(), logits, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(out.router_probs.double(), probs, atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(out.top_k_weights.double(), weights, atol=1e-2, rtol=1e-2)


def test_load_balancing_loss():
    E, k, T = 4, 2, 8
    # perfectly balanced: uniform probabilities, every expert gets T*k/E assignments -> 1.0
    balanced = moelab.RouterOutput(torch.zeros(T, E), torch.full((T, E), 1 / E),
                                   torch.arange(T * k).remainder(E).view(T, k), torch.full((T, k), 0.5))
    assert moelab.load_balancing_loss(balanced).item() == pytest.approx(1.0)
    # collapsed on experts 0 and 1: f = [.5, .5, 0, 0], P = [.45, .45, .05, .05] -> 4 * .45 = 1.8
    probs = torch.tensor([0.45, 0.45, 0.05, 0.05]).expand(T, E)
    collapsed = moelab.RouterOutput(probs.log(), probs, torch.tensor([[0, 1]]).expand(T, k), torch.ones(T, k) / 2)
    assert moelab.load_balancing_loss(collapsed).item() == pytest.approx(1.8)
    # differentiable through the probabilities
    moe = make_moe()
    _, routing = moe(torch.randn(5, 16), return_router_output=True)
    moelab.load_balancing_loss(routing).backward()
    assert moe.router.weight.grad is not None and moe.router.weight.grad.abs().sum() > 0


def test_load_balancing_loss_matches_transformers():
    hf = pytest.importorskip("transformers.models.mixtral.modeling_mixtral")
    moe = make_moe(16, 32, 6, 2)
    _, routing = moe(torch.randn(20, 16), return_router_output=True)
    theirs = hf.load_balancing_loss_func((routing.router_logits,), num_experts=6, top_k=2)
    torch.testing.assert_close(moelab.load_balancing_loss(routing), theirs / 2)


# --- clear errors --------------------------------------------------------------------------------------------

def test_bad_layer_input_names_the_argument():
    moe = make_moe()
    with pytest.raises(ValueError, match=r"hidden_states must have shape \[T, 16\] or \[B, S, 16\], got \[2, 3, 4, 16\]"):
        moe(torch.randn(2, 3, 4, 16))
    with pytest.raises(ValueError, match=r"hidden_states must have shape .* got \[5, 15\]"):
        moe(torch.randn(5, 15))
    with pytest.raises(ValueError, match="hidden_states dtype torch.float64 does not match"):
        moe(torch.randn(5, 16, dtype=torch.float64))
    with pytest.raises(ValueError, match="hidden_states must be a torch.Tensor"):
        moe([[0.0] * 16])


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_experts_input_names_the_argument(backend):
    experts = make_moe(backend=backend).experts
    x, idx, w = torch.randn(4, 16), torch.randint(0, 4, (4, 2)), torch.rand(4, 2)
    cases = [
        ((x[None], idx, w), r"hidden_states must have shape \[T, 16\]"),
        ((x, idx[:3], w), r"top_k_index must have shape \[T, k\] with T = 4"),
        ((x, idx, w[:, :1]), r"top_k_weights must have the shape of top_k_index \[4, 2\], got \[4, 1\]"),
        ((x, idx + 4, w), r"top_k_index values must be in \[0, num_experts = 4\), got values in \[4, 7\]"),
        ((x, idx - 4, w), r"top_k_index values must be in \[0, num_experts = 4\)"),
        ((x, idx.float(), w), r"top_k_index must be an integer tensor"),
        ((x, idx, w.double()), r"top_k_weights dtype torch.float64 does not match"),
        ((x.half(), idx, w.half()), r"hidden_states dtype torch.float16 does not match the experts' weights"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            experts(*args)


def test_int32_routing_is_accepted():
    moe = make_moe()
    x, idx, w = torch.randn(4, 16), torch.randint(0, 4, (4, 2)), torch.rand(4, 2)
    torch.testing.assert_close(moe.experts(x, idx.int(), w), moe.experts(x, idx, w))
    ref = reference_experts(x, idx, w, moe.experts.gate_up_proj, moe.experts.down_proj)
    torch.testing.assert_close(moe.experts(x, idx, w).double(), ref, atol=1e-5, rtol=1e-4)


def test_layer_dtype_by_name_and_unrunnable_dtypes_refused():
    cfg = moelab.MoEConfig(hidden_size=8, intermediate_size=8, num_experts=4, top_k=2)
    assert moelab.SparseMoE(cfg, dtype="bfloat16", seed=0).experts.gate_up_proj.dtype == torch.bfloat16
    for bad in (torch.float8_e4m3fn, torch.int8, "int8", "bf16"):
        with pytest.raises(ValueError, match=r"dtype must be a floating torch.dtype or one of"):
            moelab.SparseMoE(cfg, dtype=bad)


@pytest.mark.parametrize("bound", [float("nan"), float("inf"), -1.0])
def test_crossover_bounds_must_be_finite(bound):
    from moelab.backends import CrossoverTable

    with pytest.raises(ValueError, match=r"upper bounds .* must be increasing finite numbers >= 0"):
        CrossoverTable(rules={"cpu/*/eager": [[bound, "eager"], [None, "grouped_mm"]]})


def test_a_backend_returning_a_meta_tensor_is_named(scratch_backend):
    # a meta tensor has the right shape and dtype, but no values: it must not pass for an output
    moelab.ExpertsInterface.register(scratch_backend, lambda experts, h, i, w: torch.empty_like(h, device="meta"))
    with pytest.raises(RuntimeError, match=r"experts backend 'scratch' returned a tensor on meta, expected one on cpu"):
        make_moe(backend=scratch_backend)(torch.randn(5, 16))


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_jit_trace_is_refused_with_the_reason(backend):
    # eager traced at T=1 replays that call's experts at T=32: a wrong answer, no error
    moe = make_moe(backend=backend)
    with pytest.raises(RuntimeError, match=r"torch.jit.trace cannot record an MoE layer: .*top_k_index.*"
                                           r"torch.compile or torch.export"):
        torch.jit.trace(moe, torch.randn(1, 16), check_trace=False)


def test_weights_cast_to_a_dtype_the_layer_cannot_run_are_named_before_the_forward():
    moe = make_moe().to(torch.float8_e4m3fn)  # SparseMoE(dtype=float8) is refused; .to() is the other way there
    x = torch.randn(3, 16).to(torch.float8_e4m3fn)
    with pytest.raises(ValueError, match=r"the layer's weights are torch.float8_e4m3fn, a dtype moelab cannot run; "
                                         r"use one of \['float32', 'bfloat16', 'float16', 'float64'\]"):
        moe(x)
    with pytest.raises(ValueError, match=r"the experts' weights are torch.float8_e4m3fn"):
        moe.experts(x, torch.zeros(3, 2, dtype=torch.long), torch.ones(3, 2).to(torch.float8_e4m3fn))
