"""Inspection: traces hold the tensors each backend really used, per layer and stage; hooks vanish when off."""

from __future__ import annotations

import gc
import re
import weakref
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import pytest
import torch
from torch import nn

import moelab
from moelab.core import steps as steps_module
from moelab.inspection import Call, InspectionWarning, Step, Trace
from moelab.core.stage import generation_stage

ROOT = Path(__file__).resolve().parents[1]
BACKENDS = ["eager", "batched_mm", "grouped_mm", "capacity", "block_aligned"]
T, H, I, E, K = 12, 32, 48, 6, 2


@pytest.fixture
def config():
    return moelab.MoEConfig(hidden_size=H, intermediate_size=I, num_experts=E, top_k=K)


@pytest.fixture
def x():
    return torch.randn(T, H, generator=torch.Generator().manual_seed(0))


def traced(backend, config, x, **kwargs):
    moe = moelab.SparseMoE(config, backend, seed=0)
    with moelab.inspect(moe, **kwargs) as trace, torch.no_grad():
        out, routing = moe(x, return_router_output=True)
    return moe, trace, out, routing


def documented_steps() -> dict[str, list[tuple[str, set[str]]]]:
    """docs/steps.md's table -> {backend: [(step, keys)]}, `all` rows prepended/appended as the code emits them."""
    rows = {}
    for line in (ROOT / "docs" / "steps.md").read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 4 or not cells[1].startswith("`"):
            continue
        backend, step, tensors, context = cells
        name = re.match(r"`(\w+)`", step).group(1)
        keys = set(re.findall(r"`(\w+)`", tensors)) | set(re.findall(r"`(\w+)`", context))
        rows.setdefault(backend, []).append((name, keys))
    return rows


# ---------------------------------------------------------------------------------------------- the steps


@pytest.mark.parametrize("backend", BACKENDS)
def test_steps_and_keys_match_the_documented_table(backend, config, x):
    _, trace, _, _ = traced(backend, config, x)
    documented = documented_steps()
    expected = documented["all"][:1] + documented[backend]  # route, then the backend's own steps
    seen = []
    for step in trace.steps:
        if seen and seen[-1][0] == step.name == "expert":
            continue  # eager: one `expert` step per hit expert
        seen.append((step.name, set(step.tensors) | set(step.info)))
    assert seen == expected
    for step in trace.steps:
        assert step.explanation.endswith(".") and len(step.explanation) > 20, step.name
        assert step.layer == "SparseMoE" and step.backend == backend and step.stage is None


@pytest.mark.parametrize("tokens", [1, 64])
def test_auto_step_then_the_chosen_backends_steps(tokens, config):
    moe = moelab.SparseMoE(config, "auto", seed=0)
    with moelab.inspect(moe) as trace, torch.no_grad():
        moe(torch.randn(tokens, H))
    documented = documented_steps()
    (name, keys), = documented["auto"]
    step = trace[name]
    assert set(step.info) == keys and step["pairs"] == tokens * K and step["chosen"] in BACKENDS
    after = [s.name for s in trace.steps[2:]]
    expected = [n for n, _ in documented[step["chosen"]]]
    assert [n for i, n in enumerate(after) if i == 0 or not (n == after[i - 1] == "expert")] == expected
    memory = trace.memory  # the model follows the chosen backend; the `auto` step itself allocates nothing
    assert memory.analytic_bytes.isna().tolist() == [False, True] + [False] * (len(memory) - 2)
    assert memory.recorded_bytes.drop(index=1).tolist() == memory.analytic_bytes.drop(index=1).tolist()


def test_shared_expert_step_is_documented(x):
    cfg = moelab.MoEConfig(hidden_size=H, intermediate_size=I, num_experts=E, top_k=K,
                           shared_expert_intermediate_size=16)
    _, trace, _, _ = traced("grouped_mm", cfg, x)
    (name, keys), = documented_steps()["all (shared expert)"]
    assert trace.steps[-1].name == name and set(trace[name].tensors) == keys


@pytest.mark.parametrize("backend", BACKENDS)
def test_route_step_holds_the_router_output_objects(backend, config, x):
    _, trace, _, routing = traced(backend, config, x)
    route = trace["route"]
    for key in ("router_logits", "router_probs", "top_k_index", "top_k_weights"):
        assert route.tensors[key] is getattr(routing, key)  # the same objects, not copies
    assert route.derived == {"tokens_per_expert"}
    torch.testing.assert_close(route["tokens_per_expert"], torch.bincount(routing.top_k_index.flatten(), minlength=E))


def test_grouped_mm_sort_offsets_unsort(config, x):
    _, trace, _, routing = traced("grouped_mm", config, x)
    flat = routing.top_k_index.flatten()
    perm, sorted_ids = trace["sort"]["perm"], trace["sort"]["sorted_expert_ids"]
    assert torch.equal(torch.sort(perm).values, torch.arange(T * K))  # a permutation
    assert torch.equal(flat[perm], sorted_ids) and bool((sorted_ids.diff() >= 0).all())
    assert torch.equal(perm, torch.sort(flat, stable=True).indices)  # stable: ties keep token order
    offsets = trace["offsets"]["offsets"]
    assert offsets.dtype == torch.int32 and offsets[-1].item() == T * K
    assert torch.equal(offsets.long(), torch.cumsum(torch.bincount(flat, minlength=E), 0))
    assert "tokens_per_expert" in trace["offsets"].derived
    gather = trace["gather"]
    assert torch.equal(gather["token_idx"], perm // K)
    torch.testing.assert_close(gather["sorted_states"], x[perm // K])
    inv = trace["unsort"]["inv_perm"]
    assert torch.equal(perm[inv], torch.arange(T * K))
    torch.testing.assert_close(trace["unsort"]["unsorted"], trace["weigh"]["weighted"][inv])
    assert trace["up_proj"]["path"] in ("native", "fallback") and trace["up_proj"]["path_reason"]


def test_grouped_mm_fallback_path_is_recorded(config, x):
    with moelab.backends.force_fallback():
        _, trace, _, _ = traced("grouped_mm", config, x)
    assert trace["up_proj"]["path"] == trace["down_proj"]["path"] == "fallback"
    assert "force_fallback" in trace["up_proj"]["path_reason"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batched_mm_duplicated_bytes(config, x, dtype):
    moe = moelab.SparseMoE(config, "batched_mm", dtype=dtype, seed=0)
    with moelab.inspect(moe) as trace, torch.no_grad():
        moe(x.to(dtype))
    step = trace["gather_weights"]
    itemsize = torch.empty((), dtype=dtype).element_size()
    copies = step["gate_up_weights"].nbytes + step["down_weights"].nbytes
    assert copies == T * K * 3 * I * H * itemsize
    assert step["gate_up_proj"] is moe.experts.gate_up_proj and step["down_proj"] is moe.experts.down_proj
    assert step["gate_up_weights"].data_ptr() != moe.experts.gate_up_proj.data_ptr()  # a real copy
    torch.testing.assert_close(step["gate_up_weights"], moe.experts.gate_up_proj[trace["route"]["top_k_index"].flatten()])
    assert copies / (step["gate_up_proj"].nbytes + step["down_proj"].nbytes) == pytest.approx(T * K / E)


def test_eager_expert_steps(config, x):
    _, trace, out, routing = traced("eager", config, x)
    experts = trace.find("expert")
    hit = torch.unique(routing.top_k_index).tolist()
    assert [s["expert_id"] for s in experts] == hit
    assert torch.equal(trace["expert_mask"]["expert_hit"], torch.tensor(hit))
    for step in experts:
        slots, tokens = torch.where(routing.top_k_index.T == step["expert_id"])  # slot-major, as the mask
        assert torch.equal(step["token_idx"], tokens) and torch.equal(step["top_k_pos"], slots)
        torch.testing.assert_close(step["tokens"], x[tokens])
    assert trace["reduce"]["output"].data_ptr() == out.data_ptr()  # the layer returns a view of it
    with pytest.raises(LookupError, match=r"steps are named 'expert'.*call 0"):
        trace["expert"]
    with pytest.raises(LookupError, match="call.find"):
        trace.calls[0]["expert"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_callback_edit_in_place_changes_the_output(backend, config, x):
    moe = moelab.SparseMoE(config, backend, seed=0)
    with torch.no_grad():
        baseline = moe(x)

    def zero_token_0(step):
        step.tensors["top_k_weights"][0].zero_()

    with moelab.inspect(moe, on={"route": zero_token_0}) as trace, torch.no_grad():
        out = moe(x)
    assert torch.equal(out[0], torch.zeros(H))
    torch.testing.assert_close(out[1:], baseline[1:])
    assert trace["route"]["top_k_weights"][0].abs().sum() == 0

    seen = []
    with moelab.inspect(moe) as trace, torch.no_grad():
        handle = trace.subscribe("route", zero_token_0)
        all_handle = trace.subscribe("*", lambda step: seen.append(step.name))
        out = moe(x)
        handle.remove()
        out_after = moe(x)
        all_handle.remove()
    assert torch.equal(out[0], torch.zeros(H)) and not torch.equal(out_after[0], torch.zeros(H))
    assert seen == [s.name for s in trace.steps] and len(trace.calls) == 2


def test_subscribed_name_that_never_runs_warns(config, x):
    moe = moelab.SparseMoE(config, "batched_mm", seed=0)
    with pytest.warns(InspectionWarning, match=r"\['srot'\] never ran"):
        with moelab.inspect(moe, on={"srot": lambda step: None}), torch.no_grad():
            moe(x)
    with pytest.raises(TypeError, match="callable"):
        moelab.inspect(moe, on={"sort": 3})


# ---------------------------------------------------------------------------------------------- layers, stages


class TwoLayerModel(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.layers = nn.ModuleList(nn.ModuleDict({"moe": moelab.SparseMoE(config, "grouped_mm", seed=i)})
                                    for i in range(2))

    def forward(self, hidden):
        for layer in self.layers:
            hidden = hidden + layer["moe"](hidden)
        return hidden


def test_two_layer_model_separates_layers_and_decode_steps(config):
    model = TwoLayerModel(config)
    model.layers[1]["moe"].set_experts_implementation("eager")
    with moelab.inspect(model) as trace, torch.no_grad():
        with generation_stage("prefill"):
            model(torch.randn(5, H))
        for step in range(2):
            with generation_stage("decode", step):
                model(torch.randn(1, H))
    got = [(c.layer, c.stage, c.decode_step, c.backend, c.num_tokens) for c in trace.calls]
    assert got == [("layers.0.moe", "prefill", None, "grouped_mm", 5), ("layers.1.moe", "prefill", None, "eager", 5),
                   ("layers.0.moe", "decode", 0, "grouped_mm", 1), ("layers.1.moe", "decode", 0, "eager", 1),
                   ("layers.0.moe", "decode", 1, "grouped_mm", 1), ("layers.1.moe", "decode", 1, "eager", 1)]
    for call in trace.calls:
        assert call.steps[0].name == "route" and call.steps[-1].name == "reduce"
        assert {s.layer for s in call.steps} == {call.layer} and {s.call for s in call.steps} == {call.index}
    with pytest.raises(LookupError, match=r"6 steps are named 'route'.*call 0 \(layers.0.moe, prefill\).*decode 1"):
        trace["route"]
    assert trace.find("route", layer="layers.1.moe", stage="decode", decode_step=1)[0].call == 5
    assert trace.calls[2]["sort"]["perm"].shape == (K,)
    frame = trace.to_frame()
    assert set(frame.layer) == {"layers.0.moe", "layers.1.moe"} and set(frame.decode_step.dropna()) == {0, 1}


def test_real_model_generate_is_traced_per_stage():
    model = moelab.MoEForCausalLM(moelab.MoEModelConfig(num_hidden_layers=2), experts_implementation="grouped_mm",
                                  seed=0)
    with moelab.inspect(model) as trace:
        model.generate(torch.randint(0, 256, (1, 4)), max_new_tokens=3, decode_backends={"grouped_mm": "batched_mm"})
    stages = [(c.layer.rsplit(".", 2)[-2], c.stage, c.decode_step, c.backend) for c in trace.calls]
    assert stages[:2] == [("0", "prefill", None, "grouped_mm"), ("1", "prefill", None, "grouped_mm")]
    assert stages[2:4] == [("0", "decode", 0, "batched_mm"), ("1", "decode", 0, "batched_mm")]
    assert trace.unattributed == 0


def test_inspecting_experts_alone_has_no_route_step(config, x):
    moe = moelab.SparseMoE(config, "grouped_mm", seed=0)
    with torch.no_grad():
        routing = moe.router(x)
        with moelab.inspect(moe.experts) as trace:
            moe.experts(x, routing.top_k_index, routing.top_k_weights)
    assert [c.layer for c in trace.calls] == ["Experts"]
    assert trace.steps[0].name == "sort" and not trace.find("route")
    assert trace.memory.recorded_bytes.tolist() == trace.memory.analytic_bytes.tolist()


def test_module_without_moe_layers_warns():
    with pytest.warns(InspectionWarning, match="contains no MoE layer"):
        with moelab.inspect(nn.Linear(2, 2)) as trace:
            pass
    assert trace.calls == []
    with pytest.raises(ValueError, match="takes an nn.Module"):
        moelab.inspect(lambda x: x)


def test_steps_outside_the_inspected_module_are_not_kept(config, x):
    inspected, other = moelab.SparseMoE(config, "eager", seed=0), moelab.SparseMoE(config, "eager", seed=1)
    with moelab.inspect(inspected) as trace, torch.no_grad():
        _, routing = other(x, return_router_output=True)
    hit = len(torch.unique(routing.top_k_index))
    assert trace.calls == [] and trace.unattributed == 1 + 1 + hit + 1  # route, expert_mask, expert per hit, reduce
    assert "outside the inspected layers" in repr(trace)


def test_custom_backend_shows_up_like_the_builtins(config, x):
    def doubling(experts, hidden_states, top_k_index, top_k_weights):
        doubled = hidden_states * 2
        moelab.record_step("double", "Double every token (a toy backend).", doubled=doubled,
                           derived={"norm": lambda: doubled.norm()})
        return doubled

    moelab.ExpertsInterface.register("doubling_test", doubling, overwrite=True)
    try:
        moe = moelab.SparseMoE(config, "doubling_test", seed=0)
        with moelab.inspect(moe) as trace, torch.no_grad():
            out = moe(x)
    finally:
        moelab.ExpertsInterface.unregister("doubling_test")
    assert [s.name for s in trace.steps] == ["route", "double"]
    step = trace["double"]
    assert step.backend == "doubling_test" and step["doubled"].data_ptr() == out.data_ptr()
    assert step.derived == {"norm"} and step["norm"] == pytest.approx(out.norm().item())
    assert trace.memory.analytic_bytes.isna().all()  # no memory model for a custom backend


def test_backend_that_records_nothing_warns(config, x):
    moelab.ExpertsInterface.register("silent_test", lambda e, h, i, w: h.clone(), overwrite=True)
    try:
        moe = moelab.SparseMoE(config, "silent_test", seed=0)
        with pytest.warns(InspectionWarning, match=r"ran but recorded no steps.*silent_test"):
            with moelab.inspect(moe.experts), torch.no_grad():
                moe.experts(x, torch.zeros(T, K, dtype=torch.long), torch.ones(T, K))
    finally:
        moelab.ExpertsInterface.unregister("silent_test")


# ---------------------------------------------------------------------------------------------- off means free


def _live_probe():
    """A backend that hands a weakref to its intermediate to the test."""
    refs = []

    def probe(experts, hidden_states, top_k_index, top_k_weights):
        intermediate = hidden_states * 3
        refs.append(weakref.ref(intermediate))
        moelab.record_step("probe", "Keep a reference to an intermediate.", intermediate=intermediate)
        return intermediate - hidden_states * 2

    return probe, refs


def test_no_inspection_records_nothing_and_keeps_nothing_alive(config, x):
    probe, refs = _live_probe()
    moelab.ExpertsInterface.register("probe_test", probe, overwrite=True)
    try:
        moe = moelab.SparseMoE(config, "probe_test", seed=0)
        with torch.no_grad():
            moe(x)
        gc.collect()
        assert steps_module._recorders == [] and refs[-1]() is None  # nothing recorded, nothing kept

        with moelab.inspect(moe) as trace, torch.no_grad():
            moe(x)
        assert refs[-1]() is trace["probe"]["intermediate"]  # the trace holds it ...
        assert steps_module._recorders == [] and not trace.active
        del trace
        gc.collect()
        assert refs[-1]() is None  # ... and nothing else does
        assert not moe._forward_pre_hooks and not moe._forward_hooks
        assert not moe.experts._forward_pre_hooks and not moe.experts._forward_hooks
    finally:
        moelab.ExpertsInterface.unregister("probe_test")


def test_hooks_are_removed_on_error(config, x):
    moe = moelab.SparseMoE(config, "grouped_mm", seed=0)
    with pytest.raises(ValueError, match="hidden_states must have shape"):
        with moelab.inspect(moe):
            moe(torch.randn(3, H + 1))
    assert steps_module._recorders == []
    assert not moe._forward_pre_hooks and not moe._forward_hooks and not moe.experts._forward_hooks
    with pytest.raises(RuntimeError, match="boom"), moelab.inspect(moe) as trace:
        moe(x)
        raise RuntimeError("boom")
    assert steps_module._recorders == [] and len(trace.calls) == 1 and not moe._forward_hooks


def test_keep_tensors_false_keeps_shapes_and_still_calls_back(config, x):
    seen = []
    moe = moelab.SparseMoE(config, "grouped_mm", seed=0)
    with moelab.inspect(moe, keep_tensors=False, on={"sort": lambda s: seen.append(s["perm"].device.type)}) as trace:
        with torch.no_grad():
            moe(x)
    assert seen == ["cpu"]  # the callback saw the real tensor
    perm = trace["sort"]["perm"]
    assert perm.device.type == "meta" and perm.shape == (T * K,) and perm.dtype == torch.int64
    S = T * K  # the bytes of every recorded tensor, float32 and int64, from the shapes (derived views excluded)
    route = T * E * 4 + T * E * 4 + S * 8 + S * 4  # router_logits, router_probs, top_k_index, top_k_weights
    experts = (S * 8 + S * 8 + E * 4 + S * 8 + S * H * 4 + S * 2 * I * 4 + S * I * 4 + S * H * 4 + S * H * 4
               + S * 8 + S * H * 4 + T * H * 4)  # sort, offsets, gather, up_proj, act, down_proj, ..., reduce
    assert trace.to_frame().bytes.tolist() == [s.nbytes for s in trace.steps]
    assert trace.to_frame().bytes.sum() == route + experts


# ---------------------------------------------------------------------------------------------- torch.compile


@pytest.mark.parametrize("backend", ["batched_mm", "grouped_mm"])
def test_fullgraph_compile_captures_the_hooked_backends(backend, config, x):
    torch._dynamo.reset()
    moe = moelab.SparseMoE(config, backend, seed=0)
    routing = moe.router(x)
    experts = moe.experts
    with torch.no_grad():
        expected = experts(x, routing.top_k_index, routing.top_k_weights)
        fn = moelab.ExpertsInterface.get(backend)
        compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
        got = compiled(experts, x, routing.top_k_index, routing.top_k_weights)
        torch.testing.assert_close(got, expected)
        # with an inspection active the recorder list is non-empty: still one graph, still nothing recorded
        with pytest.warns(InspectionWarning, match="no MoE layer"), moelab.inspect(moe) as trace:
            again = compiled(experts, x, routing.top_k_index, routing.top_k_weights)
    torch.testing.assert_close(again, expected)
    assert trace.steps == []

    # the whole layer, compiled with fullgraph, run while its uncompiled original is inspected: the inspection hooks
    # are traced too and step aside, so the graph stays whole; the trace says nothing ran uncompiled
    compiled_layer = torch.compile(moe, fullgraph=True, backend="aot_eager")
    with pytest.warns(InspectionWarning, match="no MoE layer of the inspected SparseMoE ran"):
        with moelab.inspect(moe) as trace, torch.no_grad():
            out = compiled_layer(x)
    assert trace.calls == []
    with torch.no_grad():
        torch.testing.assert_close(out, moe(x))


def test_inspecting_a_compiled_module_says_steps_are_not_recorded(config, x):
    torch._dynamo.reset()
    moe = moelab.SparseMoE(config, "batched_mm", seed=0)
    compiled = torch.compile(moe, backend="aot_eager")
    with pytest.warns(InspectionWarning, match="not recorded under compilation"):
        with moelab.inspect(compiled) as trace, torch.no_grad():
            out = compiled(x)
    assert trace.calls == [] and out.shape == x.shape
    moe.forward = torch.compile(moe.forward, backend="aot_eager")  # the transformers-docs way
    with pytest.warns(InspectionWarning, match="not recorded under compilation"):
        with moelab.inspect(moe), torch.no_grad():
            moe(x)


# ---------------------------------------------------------------------------------------------- display


@pytest.mark.parametrize("backend", BACKENDS)
def test_text_and_html_display(backend, config, x):
    _, trace, _, _ = traced(backend, config, x)
    text = repr(trace)
    assert text.startswith("Trace (finished): 1 MoE call(s)") and "route" in text and "reduce" in text
    html = trace._repr_html_()
    assert html.count("<table") == 1 and "router_logits" in html and "(derived)" in html
    step = trace.steps[1]
    assert str(list(next(iter(step.tensors.values())).shape)) in repr(step)
    assert "<table" in step._repr_html_() and "<table" in trace.calls[0]._repr_html_()
    assert repr(trace.calls[0]).startswith("call 0: layer SparseMoE")
    frame = trace.to_frame()
    assert len(frame) == len(trace.steps) and {"step", "explanation", "tensors", "bytes"} <= set(frame.columns)
    per_tensor = trace.to_frame("tensor")
    assert per_tensor.bytes.sum() == sum(t.nbytes for s in trace.steps for t in s.tensors.values())
    assert step.to_frame().columns.tolist() == ["key", "shape", "dtype", "bytes", "derived", "copied"]
    if backend == "grouped_mm":  # CPU inference: the fast path, whose copies the renderings mark
        assert trace.calls[0].code_path == "cpu_lean" and "(cpu_lean path)" in repr(trace.calls[0])
        assert "sorted_states[24, 32]^" in text and "^ a copy taken at the step" in text
        assert "sorted_states (copy)" in html and "sorted_states (copy)" in repr(trace["gather"])
    else:
        assert trace.calls[0].code_path is None and "^" not in text and "(copy)" not in html


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("options", [{}, {"shared_expert_intermediate_size": 16, "norm_topk_prob": False},
                                     {"hidden_act": "gelu", "top_k_weights_float32": True, "dtype": torch.bfloat16}])
def test_trace_memory_recorded_bytes_equal_the_analytic_ones(options, grad, x):
    options = dict(options)
    dtype = options.pop("dtype", torch.float32)
    config = moelab.MoEConfig(hidden_size=H, intermediate_size=I, num_experts=E, top_k=K, **options)
    for backend in BACKENDS:
        moe = moelab.SparseMoE(config, backend, seed=0, dtype=dtype)
        with moelab.inspect(moe) as trace, torch.set_grad_enabled(grad):
            moe(x.to(dtype))  # grad: the parameters require grad, so grouped_mm takes its plain path
        assert trace.calls[0].code_path == ({"grouped_mm": "plain" if grad else "cpu_lean"}.get(backend))
        memory = trace.memory
        assert not memory.analytic_bytes.isna().any(), backend
        assert memory.recorded_bytes.tolist() == memory.analytic_bytes.tolist(), backend
        assert memory.attrs["analytic_peak_bytes"][0] == trace.calls[0].memory_estimate().peak_bytes


def test_isinstance_and_exports(config, x):
    _, trace, _, _ = traced("grouped_mm", config, x)
    assert isinstance(trace, moelab.Trace) and moelab.Trace is Trace
    assert isinstance(trace.calls[0], Call) and isinstance(trace.steps[0], Step)
    assert len(trace) == len(list(trace)) == 10
    with pytest.raises(KeyError, match="no step 'gather_weights'"):
        trace["gather_weights"]
    with pytest.raises(RuntimeError, match="already recording"):
        with trace:
            with trace:
                pass


# ---------------------------------------------------------------------------------------------- plots


def _labelled(ax):
    assert ax.get_xlabel() and ax.get_ylabel(), "axes must be labelled"


def test_plots_render_headless_with_the_expected_artists(config, x):
    from matplotlib.collections import LineCollection
    from matplotlib.figure import Figure

    from moelab.inspection import plots

    _, trace, _, routing = traced("grouped_mm", config, x)
    fig = plots.plot_tokens_per_expert(trace)
    ax = fig.axes[0]
    assert isinstance(fig, Figure) and len(ax.patches) == E  # one bar per expert
    assert [p.get_height() for p in ax.patches] == torch.bincount(routing.top_k_index.flatten(), minlength=E).tolist()
    _labelled(ax)

    fig = plots.plot_routing(trace)
    image = fig.axes[0].images[0]
    assert image.get_array().shape == (T, E)
    assert image.get_array().sum() == pytest.approx(routing.top_k_weights.sum().item(), rel=1e-5)
    _labelled(fig.axes[0])

    fig = plots.plot_permutation(trace)
    ax = fig.axes[0]
    assert len(ax.images) == 2 and any(isinstance(c, LineCollection) for c in ax.collections)
    offsets_lines = [c for c in ax.collections if isinstance(c, LineCollection) and len(c.get_segments()) == E]
    assert offsets_lines, "the E offsets are marked"
    _labelled(ax)

    fig = moelab.memory.plot_memory(config, num_tokens=64)
    modelled = list(moelab.memory.MODELLED_BACKENDS)  # one panel per backend with a memory model
    assert [a.get_title().split(",")[0] for a in fig.axes] == modelled
    for ax, backend in zip(fig.axes, modelled):
        estimate = moelab.memory.analytic(config, 64, backend)
        assert len(ax.patches) == len(estimate.steps)
        _labelled(ax)

    fig = moelab.memory.plot_duplication(config, [1, 4, 16, 64])
    line = fig.axes[0].lines[0]
    assert list(line.get_ydata()) == pytest.approx([t * K / E for t in (1, 4, 16, 64)])
    _labelled(fig.axes[0])

    for backend in BACKENDS:
        _, trace, _, _ = traced(backend, config, x)
        fig = trace.plot()
        assert isinstance(fig, Figure) and len([a for a in fig.axes if a.get_label() != "<colorbar>"]) >= 4
        fig.canvas.draw()  # renders with Agg

    _, eager_trace, _, _ = traced("eager", config, x)
    with pytest.raises(ValueError, match="permutation is grouped_mm's"):
        plots.plot_permutation(eager_trace)


def test_record_step_copies_only_while_recording(config, x):
    seen = []

    def overwriting(experts, hidden_states, top_k_index, top_k_weights):
        buffer = hidden_states * 2
        moelab.record_step("double", "Double every token, then reuse the buffer.", doubled=buffer, copy=("doubled",))
        seen.append(buffer)
        return buffer.add_(1)  # overwrites what the step showed

    moelab.ExpertsInterface.register("overwriting_test", overwriting, overwrite=True)
    try:
        moe = moelab.SparseMoE(config, "overwriting_test", seed=0)
        with torch.no_grad():
            moe(x)  # no inspection: record_step returns at once, nothing is copied
            with moelab.inspect(moe) as trace:
                out = moe(x)
    finally:
        moelab.ExpertsInterface.unregister("overwriting_test")
    step = trace["double"]
    assert step.copied == {"doubled"} and step.to_frame().copied.tolist() == [True]
    assert torch.equal(step["doubled"], x * 2) and torch.equal(out, x * 2 + 1)  # the value at the step
    assert step["doubled"].data_ptr() != seen[-1].data_ptr() and step.new_bytes == x.nbytes
    with pytest.raises(ValueError, match="copy names"):
        with moelab.inspect(moe):
            moelab.record_step("bad", "A copy of a key the step does not have.", copy=("missing",))


def test_calls_from_other_threads_are_not_recorded_and_the_trace_says_so(config, x):
    import threading

    moe = moelab.SparseMoE(config, "eager", seed=0)
    with moelab.inspect(moe) as trace, torch.no_grad():
        worker = threading.Thread(target=lambda: moe(torch.randn(5, H)))  # e.g. a data-loader thread
        worker.start()
        worker.join()
        moe(x)
    assert [call.num_tokens for call in trace.calls] == [T]  # only the inspecting thread's call
    assert {step.call for step in trace.steps} == {0} and trace.unattributed == 0
    assert trace.other_thread_calls == 1
    assert "1 MoE call(s) from other threads not recorded" in repr(trace)


def test_calls_frame_and_to_frame_name_the_stage_as_the_printed_trace_does():
    model = moelab.MoEForCausalLM(moelab.MoEModelConfig(num_hidden_layers=2), seed=0)
    prompt = torch.randint(0, 256, (1, 3), generator=torch.Generator().manual_seed(0))
    with moelab.inspect(model) as trace:
        model.generate(prompt, max_new_tokens=2)
    calls = trace.calls_frame()
    expected = [moelab.stage_label(c.stage, c.decode_step) for c in trace.calls]
    assert list(calls.stage) == expected == ["prefill"] * 2 + ["decode 0"] * 2
    assert list(calls.tokens) == [c.num_tokens for c in trace.calls] == [3, 3, 1, 1]
    assert list(calls.layer) == [c.layer for c in trace.calls]
    assert list(calls.steps) == [len(c.steps) for c in trace.calls]
    steps = trace.to_frame()
    assert set(steps.stage) == {"prefill", "decode 0"}
    with moelab.inspect(model) as plain:
        model(prompt)
    assert set(plain.to_frame().stage) == {"forward"} == set(plain.calls_frame().stage)
    assert set(plain.memory.stage) == {"forward"}


def test_a_footnote_is_printed_only_with_its_mark_even_when_the_tensor_list_is_cut(config, x):
    moe = moelab.SparseMoE(config, "eager", seed=0)
    with moelab.inspect(moe) as trace:
        moe(x)
    text = str(trace)
    route = trace["route"]
    assert route.derived and len(route.tensors) > 4  # a derived tensor beyond the four shown
    assert "* derived for display" in text
    route_line = next(line for line in text.splitlines() if " route " in line)
    assert "*" in route_line  # the cut list carries the hidden tensor's mark: "+1 more*"
