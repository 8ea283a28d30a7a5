"""Property tests of the experts layer: on random valid shapes, dtypes and routings every registered backend agrees
with eager (forward, and the four gradients in float32); random invalid inputs always raise ValueError or TypeError
from moelab's own checks, with a message naming the argument.

Derandomised and bounded (T <= 12, H, I <= 8, E <= 6), so the file stays a few seconds on one core.
"""

from __future__ import annotations

import contextlib
import math
import traceback

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import moelab
from conftest import make_moe

BACKENDS = [name for name in moelab.ExpertsInterface.names() if name != "eager"]  # each compared with eager
SMALL = settings(deadline=None, derandomize=True, database=None, max_examples=20,
                 suppress_health_check=[HealthCheck.function_scoped_fixture])  # the autouse seed fixture is harmless
# eager's tolerances against each backend: twice test_backends' tolerances against the float64 reference, since
# both sides of the comparison round (see there for how each is derived)
TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.bfloat16: dict(atol=4e-2, rtol=4e-2)}
GRAD_TOL = dict(atol=1e-4, rtol=1e-4)  # the backward sums over tokens and slots as well: a looser float32 bound


@st.composite
def problems(draw, dtypes=(torch.float32, torch.bfloat16), min_tokens=0):
    """(sizes, dtype, hidden_states, top_k_index, top_k_weights): any valid call, at least `min_tokens` tokens."""
    T = draw(st.one_of(st.sampled_from(range(min_tokens, 2)), st.integers(2, 12)))  # T = 0 and 1 drawn often
    H, I, E = draw(st.integers(1, 8)), draw(st.integers(1, 8)), draw(st.integers(1, 6))
    k = draw(st.integers(1, E))
    dtype = draw(st.sampled_from(dtypes))
    weights_float32 = dtype != torch.float32 and draw(st.booleans())  # Mixtral's float32 top_k_weights
    # any expert ids, repeats and skew included (all on one expert, some experts empty): the layer accepts them all
    ids = draw(st.lists(st.integers(0, E - 1), min_size=T * k, max_size=T * k))
    seed = draw(st.integers(0, 2 ** 16))
    generator = torch.Generator().manual_seed(seed)
    hidden_states = torch.randn(T, H, generator=generator).to(dtype)
    top_k_index = torch.tensor(ids, dtype=torch.long).reshape(T, k)
    top_k_weights = torch.rand(T, k, generator=generator).to(torch.float32 if weights_float32 else dtype)
    return (T, H, I, E, k, seed), dtype, hidden_states, top_k_index, top_k_weights


def experts_for(sizes, dtype):
    T, H, I, E, k, seed = sizes
    return make_moe(H, I, E, k, dtype=dtype, backend="eager", seed=seed).experts


def run(experts, backend, *args):
    experts.set_experts_implementation(backend)
    return experts(*args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@SMALL
@given(data=st.data(), grad_mode=st.booleans())
def test_every_backend_agrees_with_eager_on_the_forward(dtype, data, grad_mode):
    sizes, dtype, hidden_states, top_k_index, top_k_weights = data.draw(problems(dtypes=(dtype,)), label="problem")
    experts = experts_for(sizes, dtype)
    with contextlib.nullcontext() if grad_mode else torch.no_grad():  # no_grad: the CPU inference fast paths
        expected = run(experts, "eager", hidden_states, top_k_index, top_k_weights)
        for backend in BACKENDS:
            out = run(experts, backend, hidden_states, top_k_index, top_k_weights)
            assert out.shape == hidden_states.shape and out.dtype == dtype, backend  # float32 weights cast back
            torch.testing.assert_close(out, expected, **TOL[dtype], msg=lambda m: f"{backend}: {m}")


def gradients(experts, backend, hidden_states, top_k_index, top_k_weights, grad_output):
    """d(sum(out * grad_output)) / (hidden_states, top_k_weights, gate_up_proj, down_proj)."""
    inputs = [hidden_states.clone().requires_grad_(), top_k_weights.clone().requires_grad_()]
    out = run(experts, backend, inputs[0], top_k_index, inputs[1])
    wrt = [*inputs, experts.gate_up_proj, experts.down_proj]
    # materialize: a backend may not touch an expert nobody chose at all: its gradient is 0, not None
    return torch.autograd.grad((out * grad_output).sum(), wrt, allow_unused=True, materialize_grads=True)


@SMALL
@given(problem=problems(dtypes=(torch.float32,), min_tokens=0))
def test_every_backend_agrees_with_eager_on_the_gradients(problem):
    sizes, dtype, hidden_states, top_k_index, top_k_weights = problem
    experts = experts_for(sizes, dtype)
    grad_output = torch.randn(hidden_states.shape, generator=torch.Generator().manual_seed(sizes[-1] + 1))
    expected = gradients(experts, "eager", hidden_states, top_k_index, top_k_weights, grad_output)
    for backend in BACKENDS:
        got = gradients(experts, backend, hidden_states, top_k_index, top_k_weights, grad_output)
        for name, g, e in zip(("hidden_states", "top_k_weights", "gate_up_proj", "down_proj"), got, expected):
            torch.testing.assert_close(g, e, **GRAD_TOL, msg=lambda m: f"{backend}, d/d{name}: {m}")


# ---------------------------------------------------------------------------------------------- invalid inputs

H, I, E, K, T = 4, 6, 3, 2, 5  # the sizes of the invalid-input calls


def valid_call():
    x = torch.randn(T, H)
    return {"hidden_states": x, "top_k_index": torch.randint(0, E, (T, K)), "top_k_weights": torch.rand(T, K)}


# each breaks one argument of a valid call: (argument, what it becomes)
BREAKS = {
    "hidden_states": [lambda v: v[0], lambda v: v[None], lambda v: v[:, :-1], lambda v: v.double(),
                      lambda v: v.half(), lambda v: v.long(), lambda v: v.bool(), lambda v: v.tolist(),
                      lambda v: None, lambda v: v.numpy()],
    "top_k_index": [lambda v: v[:-1], lambda v: v[:, :0], lambda v: v[:, 0], lambda v: v.float(), lambda v: v.bool(),
                    lambda v: v + E, lambda v: v - E, lambda v: v.fill_(-1), lambda v: v.tolist(), lambda v: 0],
    "top_k_weights": [lambda v: v[:, :1], lambda v: v[None], lambda v: v.double(), lambda v: v.long(),
                      lambda v: v.bool(), lambda v: v.tolist(), lambda v: 1.0],
}


def raised_in_moelab(error: BaseException) -> bool:
    """Whether the innermost frame of `error`'s traceback is moelab's own code (a check), not torch's."""
    frames = traceback.extract_tb(error.__traceback__)
    return bool(frames) and "/moelab/" in frames[-1].filename.replace("\\", "/")


@settings(deadline=None, derandomize=True, database=None, max_examples=60)
@given(argument=st.sampled_from(sorted(BREAKS)), which=st.integers(0, 9),
       backend=st.sampled_from(moelab.ExpertsInterface.names()))
def test_a_broken_argument_is_named_by_a_value_or_type_error(argument, which, backend):
    torch.manual_seed(which)
    experts = make_moe(H, I, E, K, backend=backend).experts
    call = valid_call()
    breaks = BREAKS[argument]
    call[argument] = breaks[which % len(breaks)](call[argument])
    with pytest.raises((ValueError, TypeError)) as info:
        experts(**call)
    assert argument in str(info.value), info.value
    assert raised_in_moelab(info.value), "".join(traceback.format_exception(info.value))


CONFIG_FIELDS = {"hidden_size": 8, "intermediate_size": 8, "num_experts": 4, "top_k": 2}
NOT_NUMBERS = [True, None, "8", [8]]
NOT_FINITE = [math.nan, math.inf, -math.inf]
BAD_CONFIG_VALUES = {  # field -> values that are never valid for it
    **{name: [0, -1, -3, 2.0, 0.5, *NOT_NUMBERS, *NOT_FINITE] for name in CONFIG_FIELDS},
    "top_k": [0, -1, 5, 2.0, *NOT_NUMBERS, *NOT_FINITE],  # 5 > num_experts = 4
    "shared_expert_intermediate_size": [-1, -3, 2.0, *NOT_NUMBERS, *NOT_FINITE],
    "initializer_range": [0, 0.0, -1, -0.5, *NOT_NUMBERS, *NOT_FINITE],
    "router_jitter": [-0.1, 1, 1.5, *NOT_NUMBERS, *NOT_FINITE],
    "capacity_factor": [0, -1.0, True, "8", *NOT_FINITE],  # None is valid: dropless
    "norm_topk_prob": [0, 1, None, "yes"],
    "hidden_act": ["swiglu", None, 3],
    "drop_policy": ["random", None],
}


@settings(deadline=None, derandomize=True, database=None, max_examples=60)
@given(data=st.data(), field=st.sampled_from(sorted(BAD_CONFIG_VALUES)))
def test_a_bad_config_value_is_named_by_a_value_error(data, field):
    value = data.draw(st.sampled_from(BAD_CONFIG_VALUES[field]), label="value")
    with pytest.raises(ValueError) as info:
        moelab.MoEConfig(**{**CONFIG_FIELDS, field: value})
    assert str(info.value).startswith(field), info.value
    assert raised_in_moelab(info.value)


@SMALL
@given(problem=problems(), shape=st.sampled_from(["flat", "batched", "3d-wrong", "width"]))
def test_the_layer_takes_t_h_and_b_s_h_and_names_anything_else(problem, shape):
    sizes, dtype, hidden_states, _, _ = problem
    T_, H_, I_, E_, k_, seed = sizes
    moe = make_moe(H_, I_, E_, k_, dtype=dtype, backend="grouped_mm", seed=seed)
    x = {"flat": hidden_states, "batched": hidden_states[None], "3d-wrong": hidden_states[None, None],
         "width": torch.cat([hidden_states, hidden_states[:, :1]], dim=1)}[shape]
    if shape in ("flat", "batched"):
        assert moe(x).shape == x.shape
        return
    with pytest.raises(ValueError, match="hidden_states must have shape") as info:
        moe(x)
    assert raised_in_moelab(info.value)


@settings(deadline=None, derandomize=True, database=None, max_examples=30)
@given(backend=st.sampled_from(moelab.ExpertsInterface.names()), num_tokens=st.integers(2 * 10 ** 6, 8 * 10 ** 6),
       budget_mib=st.integers(64, 256))
def test_a_call_too_big_for_memory_is_the_memory_guard_error_before_anything_is_allocated(backend, num_tokens,
                                                                                          budget_mib):
    """Any backend, any T too big for a drawn budget: MemoryGuardError from moelab's check, naming the backend
    and the switch that turns the guard off. The inputs are expanded views (the checks before the guard take
    O(T * k) bytes, a few MiB here; every estimate is above 256 MiB at these T)."""
    from unittest import mock

    experts = make_moe(H, I, E, K, backend=backend).experts
    x = torch.randn(1, H).expand(num_tokens, H)  # [T, H]: one row seen T times, no T * H bytes
    top_k_index = torch.tensor([[0, 1]]).expand(num_tokens, K)  # [T, k]
    top_k_weights = torch.full((1, K), 0.5).expand(num_tokens, K)  # [T, k]
    with mock.patch("moelab.core.memory_guard.available_memory", return_value=budget_mib * 2 ** 20):
        with pytest.raises(moelab.MemoryGuardError) as info:
            experts(x, top_k_index, top_k_weights)
    error = info.value
    assert error.needed_bytes > error.budget_bytes == budget_mib * 2 ** 20
    assert error.num_tokens == num_tokens and error.max_tokens < num_tokens
    assert error.backend in str(error) and "MOELAB_MEMORY_GUARD" in str(error)
    assert backend == "auto" or error.backend == backend  # auto names the backend it chose
    assert raised_in_moelab(error), "".join(traceback.format_exception(error))
