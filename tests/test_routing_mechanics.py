"""The training mechanics of the router (issue 12): sigmoid scoring, jitter, the expert bias, capacity and the drop
channel, each against an independent float64 or pure-Python computation of its formula."""

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

import moelab
from moelab import ExpertsInterface, MoEConfig, SparseMoE
from moelab.layer import drop_by_position, drop_by_probs, expert_capacity
from reference import reference_experts

BACKENDS = ExpertsInterface.names()


def config(**fields):
    return MoEConfig(**{**dict(hidden_size=16, intermediate_size=8, num_experts=4, top_k=2), **fields})


# -------------------------------------------------------------------------------- scoring and the expert bias


@pytest.mark.parametrize("norm", [True, False])
def test_sigmoid_scoring_matches_the_float64_formula(norm):
    moe = SparseMoE(config(router_scoring="sigmoid", norm_topk_prob=norm), "eager", seed=0)
    x = torch.randn(12, 16, generator=torch.Generator().manual_seed(1))
    out = moe.router(x)
    scores = torch.sigmoid(x.double() @ moe.router.weight.double().T)  # [T, E], DeepSeek-V3 eq. 15
    assert torch.allclose(out.router_probs.double(), scores, atol=1e-6)
    assert not torch.allclose(out.router_probs.sum(-1), torch.ones(12))  # sigmoid scores do not sum to 1
    expected, index = torch.topk(scores, 2, dim=-1)
    if norm:
        expected = expected / expected.sum(-1, keepdim=True)
    assert torch.equal(out.top_k_index, index)
    assert torch.allclose(out.top_k_weights.double(), expected, atol=1e-6)
    assert not out.dropped.any()


def test_the_default_router_is_unchanged_and_has_no_bias_buffer():
    moe = SparseMoE(config(), "eager", seed=0)
    assert moe.router.expert_bias is None and "router.expert_bias" not in moe.state_dict()
    x = torch.randn(9, 16)
    out = moe.router(x)
    probs = torch.softmax(x @ moe.router.weight.T, dim=-1)
    weights, index = torch.topk(probs, 2, dim=-1)
    assert torch.equal(out.top_k_index, index)
    assert torch.allclose(out.top_k_weights, weights / weights.sum(-1, keepdim=True))


def test_the_expert_bias_changes_the_choice_but_not_the_weights():
    moe = SparseMoE(config(expert_bias=True, norm_topk_prob=False), "eager", seed=0)
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(2))
    before = moe.router(x)
    with torch.no_grad():
        moe.router.expert_bias.copy_(torch.tensor([1.0, 0.0, 0.0, 0.0]))  # expert 0 always wins the choice
    after = moe.router(x)
    assert (after.top_k_index[:, 0] == 0).all() and not (before.top_k_index[:, 0] == 0).all()
    # the weight of every chosen pair is the unbiased score at that expert
    assert torch.equal(after.top_k_weights, before.router_probs.gather(-1, after.top_k_index))
    assert torch.equal(after.router_probs, before.router_probs)


def test_the_expert_bias_update_follows_the_formula():
    moe = SparseMoE(config(expert_bias=True, expert_bias_update_rate=0.01), "eager", seed=0)
    load = torch.tensor([10, 2, 4, 4])  # mean 5
    moe.router.update_expert_bias(load)
    moe.router.update_expert_bias(torch.tensor([5, 5, 5, 5]))  # balanced: sign 0, no move
    assert torch.equal(moe.router.expert_bias, torch.tensor([-0.01, 0.01, 0.01, 0.01]))
    with pytest.raises(ValueError, match=r"tokens_per_expert must be a tensor of shape \[4\]"):
        moe.router.update_expert_bias(torch.ones(3))
    with pytest.raises(ValueError, match="no expert_bias"):
        SparseMoE(config(), "eager", seed=0).router.update_expert_bias(load)


def test_the_expert_bias_stays_float32_has_no_gradient_and_is_saved():
    moe = SparseMoE(config(expert_bias=True), "eager", seed=0)
    with torch.no_grad():
        moe.router.expert_bias.copy_(torch.tensor([1e-3, 2e-3, -3e-3, 1.0 + 1e-3]))
    values = moe.router.expert_bias.clone()
    moe.to(torch.bfloat16)
    assert moe.router.weight.dtype == torch.bfloat16
    assert moe.router.expert_bias.dtype == torch.float32 and torch.equal(moe.router.expert_bias, values)
    assert not moe.router.expert_bias.requires_grad
    assert "router.expert_bias" in moe.state_dict() and all(p is not moe.router.expert_bias for p in moe.parameters())


def test_jitter_applies_in_training_mode_only():
    moe = SparseMoE(config(router_jitter=0.1), "eager", seed=0)
    x = torch.randn(8, 16)
    moe.eval()
    clean = moe.router(x).router_logits
    assert torch.equal(clean, x @ moe.router.weight.T)
    moe.train()
    torch.manual_seed(5)
    noisy = moe.router(x).router_logits
    torch.manual_seed(5)
    expected = (x * torch.empty_like(x).uniform_(0.9, 1.1)) @ moe.router.weight.T  # Switch: x * U(1-eps, 1+eps)
    assert torch.allclose(noisy, expected) and not torch.allclose(noisy, clean)


@pytest.mark.parametrize("field, value, match", [
    ("router_scoring", "tanh", "router_scoring must be one of"), ("router_jitter", 1.0, "router_jitter must be in"),
    ("router_jitter", -0.1, "router_jitter"), ("expert_bias", 1, "expert_bias must be a bool"),
    ("expert_bias_update_rate", 0.0, "expert_bias_update_rate"), ("capacity_factor", 0.0, "capacity_factor"),
    ("eval_capacity_factor", math.inf, "eval_capacity_factor"), ("drop_policy", "random", "drop_policy must be"),
])
def test_bad_mechanics_fields_are_refused_by_name(field, value, match):
    with pytest.raises(ValueError, match=match):
        config(**{field: value})


def test_configs_saved_before_the_mechanics_still_load():
    old = {"hidden_size": 16, "intermediate_size": 8, "num_experts": 4, "top_k": 2, "norm_topk_prob": True,
           "hidden_act": "silu", "initializer_range": 0.02, "shared_expert_intermediate_size": 0,
           "top_k_weights_float32": False}
    cfg = MoEConfig.from_dict(old)
    assert cfg.router_scoring == "softmax" and cfg.capacity_factor is None and not cfg.expert_bias


# ------------------------------------------------------------------------------------------------ capacity


def python_drops(top_k_index, scores, capacity, policy):
    """A pure-Python reference: walk the pairs in the policy's order, keep the first `capacity` per expert."""
    T, k = top_k_index.shape
    pairs = [(j, t) for j in range(k) for t in range(T)]  # GShard: every first choice, then every second ...
    if policy == "probs":
        pairs = sorted(pairs, key=lambda p: -float(scores[p[1], p[0]]))  # Python's sort is stable
    taken, dropped = {}, torch.zeros(T, k, dtype=torch.bool)
    for j, t in pairs:
        e = int(top_k_index[t, j])
        taken[e] = taken.get(e, 0) + 1
        dropped[t, j] = taken[e] > capacity
    return dropped


@settings(max_examples=60, deadline=None)
@given(T=st.integers(0, 24), E=st.integers(1, 6), k=st.integers(1, 3), cf=st.floats(0.1, 2.0),
       seed=st.integers(0, 2**16), policy=st.sampled_from(["position", "probs"]))
def test_drop_policies_equal_the_python_reference(T, E, k, cf, seed, policy):
    k = min(k, E)
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(T, E, generator=g)
    # ties on purpose: scores on a coarse grid
    scores = (scores * 4).round() / 4
    top_k_scores, top_k_index = torch.topk(scores + torch.rand(T, E, generator=g) * 1e-3, k, dim=-1)
    top_k_scores = scores.gather(-1, top_k_index)
    capacity = expert_capacity(cf, T, k, E)
    assert capacity == math.ceil(cf * T * k / E)
    if policy == "position":
        dropped = drop_by_position(top_k_index, capacity, E)
    else:
        dropped = drop_by_probs(top_k_index, top_k_scores, capacity, E)
    assert torch.equal(dropped, python_drops(top_k_index, top_k_scores, capacity, policy))
    kept = torch.bincount(top_k_index[~dropped], minlength=E)
    routed = torch.bincount(top_k_index.reshape(-1), minlength=E)
    assert torch.equal(kept, routed.clamp(max=capacity))  # every expert keeps min(its pairs, C)


def float64_capacity_moe(x, router_weight, gate_up_proj, down_proj, top_k, dropped_expected):
    """float64 reference of the layer with exactly the given pairs zeroed (kept weights not renormalised)."""
    probs = torch.softmax(x @ router_weight.T, dim=-1)  # [T, E]
    weights, index = torch.topk(probs, top_k, dim=-1)
    weights = (weights / weights.sum(-1, keepdim=True)).masked_fill(dropped_expected, 0.0)
    return reference_experts(x, index, weights, gate_up_proj, down_proj)


@pytest.mark.parametrize("policy", ["position", "probs"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_capacity_layer_equals_the_float64_reference_with_gradients(policy, backend):
    moe = SparseMoE(config(capacity_factor=0.75, drop_policy=policy), backend, seed=0).train()
    x = torch.randn(20, 16, generator=torch.Generator().manual_seed(3), requires_grad=True)
    out, routing = moe(x, return_router_output=True)
    probs = torch.softmax(x.detach().double() @ moe.router.weight.detach().double().T, dim=-1)
    scores, index = torch.topk(probs, 2, dim=-1)
    expected_drops = python_drops(index, scores, expert_capacity(0.75, 20, 2, 4), policy)
    assert torch.equal(routing.top_k_index, index) and torch.equal(routing.dropped, expected_drops)
    assert routing.dropped.any() and (routing.top_k_weights[routing.dropped] == 0).all()

    names = ("router.weight", "experts.gate_up_proj", "experts.down_proj")
    params = dict(moe.named_parameters())
    x64 = x.detach().double().requires_grad_()
    params64 = [params[n].detach().double().requires_grad_() for n in names]
    expected = float64_capacity_moe(x64, *params64, 2, expected_drops)
    assert torch.allclose(out.double(), expected, atol=1e-5)
    grad_out = torch.randn(20, 16, generator=torch.Generator().manual_seed(4))
    out.backward(grad_out)
    expected.backward(grad_out.double())
    assert torch.allclose(x.grad.double(), x64.grad, atol=1e-5)
    for name, p64 in zip(names, params64):
        assert torch.allclose(params[name].grad.double(), p64.grad, atol=1e-5), name


def test_a_token_whose_every_pair_drops_gets_only_the_shared_expert():
    cfg = config(capacity_factor=0.25, shared_expert_intermediate_size=8)
    moe = SparseMoE(cfg, "grouped_mm", seed=0).train()
    x = torch.randn(16, 16, generator=torch.Generator().manual_seed(6))
    out, routing = moe(x, return_router_output=True)
    all_dropped = routing.dropped.all(dim=-1)
    assert all_dropped.any()
    shared = torch.sigmoid(moe.shared_expert_gate(x)) * moe.shared_expert(x)
    assert torch.allclose(out[all_dropped], shared[all_dropped], atol=1e-6)


def test_drop_aware_backends_compute_no_dropped_pair():
    moe = SparseMoE(config(capacity_factor=0.5), "eager", seed=0).train()
    x = torch.randn(16, 16)
    with moelab.inspect(moe) as trace:
        _, routing = moe(x, return_router_output=True)
    kept = int((~routing.dropped).sum())
    rows = sum(step.tensors["token_idx"].numel() for step in trace.calls[0].steps if step.name == "expert")
    assert rows == kept < routing.dropped.numel()
    route = next(step for step in trace.calls[0].steps if step.name == "route")
    assert torch.equal(route.tensors["kept"], ~routing.dropped)
    assert torch.equal(route.tensors["dropped_per_expert"], torch.bincount(routing.top_k_index[routing.dropped],
                                                                           minlength=4))
    moe.set_experts_implementation("grouped_mm")
    with moelab.inspect(moe) as trace:
        moe(x)
    sort = next(step for step in trace.calls[0].steps if step.name == "sort")
    assert sort.tensors["perm"].numel() == kept


def test_a_transformers_signature_backend_gives_the_same_output_under_drops():
    calls = []

    def plain(experts, hidden_states, top_k_index, top_k_weights):  # knows nothing of drops
        calls.append(top_k_weights.clone())
        return ExpertsInterface.get("batched_mm")(experts, hidden_states, top_k_index, top_k_weights)

    ExpertsInterface.register("test_plain_signature", plain, overwrite=True)
    try:
        moe = SparseMoE(config(capacity_factor=0.5), "eager", seed=0).train()
        x = torch.randn(16, 16)
        expected, routing = moe(x, return_router_output=True)
        moe.set_experts_implementation("test_plain_signature")
        assert torch.allclose(moe(x), expected, atol=1e-6)
        assert (calls[-1][routing.dropped] == 0).all()
        # a caller handing Experts nonzero weights for dropped pairs still gets them zeroed
        ones = torch.ones_like(routing.top_k_weights)
        assert torch.allclose(moe.experts(x, routing.top_k_index, ones, routing.dropped),
                              ExpertsInterface.get("eager")(moe.experts, x, routing.top_k_index,
                                                            ones.masked_fill(routing.dropped, 0)), atol=1e-6)
    finally:
        ExpertsInterface.unregister("test_plain_signature")


def test_capacity_follows_the_mode():
    moe = SparseMoE(config(capacity_factor=0.5), "eager", seed=0)
    x = torch.randn(16, 16)
    assert moe.train().router(x).dropped.any()
    assert not moe.eval().router(x).dropped.any()  # eval_capacity_factor None: dropless
    moe = SparseMoE(config(eval_capacity_factor=0.5), "eager", seed=0)
    assert moe.eval().router(x).dropped.any() and not moe.train().router(x).dropped.any()


def test_bad_dropped_masks_are_refused():
    moe = SparseMoE(config(), "eager", seed=0)
    x = torch.randn(4, 16)
    routing = moe.router(x)
    with pytest.raises(ValueError, match="dropped must be None or a bool tensor"):
        moe.experts(x, routing.top_k_index, routing.top_k_weights, torch.zeros(4, 2))
    with pytest.raises(ValueError, match="dropped must be None or a bool tensor"):
        moe.experts(x, routing.top_k_index, routing.top_k_weights, torch.zeros(4, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="accepts_dropped must be a bool"):
        ExpertsInterface.register("x", lambda *a: None, accepts_dropped="yes")
    assert ExpertsInterface.accepts_dropped("eager") and not ExpertsInterface.accepts_dropped("batched_mm")


# ------------------------------------------------------------------------------------- models and generation


def tiny_model(**moe_fields):
    moe = config(hidden_size=32, intermediate_size=16, **moe_fields)
    return moelab.MoEForCausalLM(moelab.MoEModelConfig(vocab_size=32, hidden_size=32, num_hidden_layers=2,
                                                       num_attention_heads=2, moe=moe), "eager", seed=0)


def test_generate_runs_in_eval_mode_and_restores_the_mode():
    model = tiny_model(router_jitter=0.5).train()
    ids = torch.tensor([[1, 2, 3]])
    first = model.generate(ids, max_new_tokens=4).sequences
    assert model.training
    assert torch.equal(first, model.eval().generate(ids, max_new_tokens=4).sequences)  # no jitter in generate
    assert not model.training


def test_generate_refuses_an_eval_capacity():
    model = tiny_model(eval_capacity_factor=1.0)
    with pytest.raises(ValueError, match="capacity drops are not causal"):
        model.generate(torch.tensor([[1, 2]]), max_new_tokens=2)


def test_a_model_with_every_mechanic_saves_and_loads(tmp_path):
    model = tiny_model(router_scoring="sigmoid", expert_bias=True, capacity_factor=1.0, drop_policy="probs")
    for moe in model.moe_layers().values():
        moe.router.update_expert_bias(torch.tensor([9, 1, 3, 3]))
    model.save_pretrained(tmp_path)
    loaded = moelab.MoEForCausalLM.from_pretrained(tmp_path, dtype="bfloat16")
    for name, moe in loaded.moe_layers().items():
        assert moe.config == model.moe_layers()[name].config
        assert moe.router.expert_bias.dtype == torch.float32
        assert torch.equal(moe.router.expert_bias, model.moe_layers()[name].router.expert_bias)
    ids = torch.randint(0, 32, (2, 8))
    assert torch.allclose(moelab.MoEForCausalLM.from_pretrained(tmp_path)(ids).logits, model(ids).logits, atol=1e-6)


@pytest.mark.hf
@pytest.mark.parametrize("fields, match", [
    (dict(router_scoring="sigmoid"), "softmax"), (dict(expert_bias=True), "expert bias"),
    (dict(capacity_factor=1.0), "dropless"), (dict(router_jitter=0.1), "jitter"),
])
def test_the_transformers_converters_refuse_what_they_cannot_express(fields, match):
    pytest.importorskip("transformers")
    from moelab.hf import to_transformers
    with pytest.raises(ValueError, match=match):
        to_transformers(SparseMoE(config(**fields), "eager", seed=0))
