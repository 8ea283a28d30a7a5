"""Run moelab's backends inside a transformers MoE model, so `moelab.inspect(hf_model)` can watch every step.

transformers' own backends expose no intermediate tensors (and its `eager` is the experts class's own `forward`,
which bypasses its `ExpertsInterface`). So while inspecting, every experts module of the model runs *moelab's*
backend of the same name on the module's own weights (`gate_up_proj`, `down_proj`, `act_fn`: the layout is the
same), registered in transformers' registry under `moelab_<name>` and selected with the public
`model.set_experts_implementation(...)`. Forward hooks add what the block computes outside the experts module:
the `route` step (from the router's outputs) and, for Qwen2-MoE, the `shared_expert` step. Generation stages
(prefill / decode n) are published from the model's cache, as `moelab.generate` publishes them for moelab models.

`moelab_backends(model)` does all of that for the duration of a `with` block and restores everything on exit
(also on error): the model's experts implementation (`model.get_experts_implementation()` before == after), the
registry (transformers' `ExpertsInterface._global_mapping` is never touched; the `moelab_*` entries live in the
shared `ALL_EXPERTS_FUNCTIONS` instance's own mapping, added with `registry[name] = fn` and removed with
`del registry[name]`, its public MutableMapping API) and every hook. Nothing private is patched.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn
import torch.nn.functional as F

from ..backends import ExpertsInterface as MoelabExpertsInterface
from ..core.config import MoEConfig
from ..core.stage import generation_stage
from ..core.steps import record_step
from ..inspection import register_adapter
from ._require import experts_registry, require_transformers, transformers_loaded
from .convert import family_of, moe_config_from_block

__all__ = ["HFMoELayer", "moelab_backends", "find_moe_layers", "is_transformers_model", "NAMESAKE_BACKENDS",
           "registered_name", "summary_note", "inspection_context"]

NAMESAKE_BACKENDS = ("eager", "batched_mm", "grouped_mm")  # transformers' backends with a moelab backend of that name
_PREFIX = "moelab_"


def registered_name(backend: str) -> str:
    """The name moelab's `backend` is registered under in transformers' registry while inspecting."""
    return _PREFIX + backend


@dataclass(eq=False)
class HFMoELayer:
    """One MoE block of a transformers model, as inspection sees it.

    name: its qualified name in the model (`model.layers.0.mlp`); block: the block (router + experts [+ shared
    expert]); experts, router: its experts module and router; config: its sizes and router choices as a
    `MoEConfig` (for the memory model); transformers_backend: what transformers runs there; backend: the moelab
    backend that runs in its place while inspecting (same name).
    """

    name: str
    block: nn.Module
    experts: nn.Module
    router: nn.Module | None
    config: MoEConfig | None
    transformers_backend: str | None = None
    backend: str | None = None
    _shared_output: list = field(default_factory=list, repr=False)

    @property
    def sizes(self) -> dict:
        """num_experts, hidden_size, intermediate_size, top_k, norm_topk_prob (what `moelab.inspect` reads)."""
        num_experts, two_i, hidden_size = self.experts.gate_up_proj.shape
        sizes = {"num_experts": int(num_experts), "hidden_size": int(hidden_size),
                 "intermediate_size": int(two_i) // 2}
        if self.config is not None:
            sizes.update(top_k=self.config.top_k, norm_topk_prob=self.config.norm_topk_prob)
        elif getattr(self.router, "top_k", None) is not None:
            sizes.update(top_k=int(self.router.top_k),
                         norm_topk_prob=bool(getattr(self.router, "norm_topk_prob", True)))
        return sizes

    @property
    def note(self) -> str:
        """One sentence for the trace: what ran here instead of transformers' backend, and why."""
        return (f"{self.name}: moelab's {self.backend} ran on the model's own weights in place of transformers' "
                f"{self.transformers_backend} (transformers' backends expose no intermediate tensors)")


def is_transformers_model(module: nn.Module) -> bool:
    """True for a transformers `PreTrainedModel`; never imports transformers (False when it is not loaded)."""
    if not transformers_loaded():
        return False
    transformers = require_transformers()
    return isinstance(module, transformers.PreTrainedModel)


def inspection_context(module: nn.Module):
    """What `moelab.inspect(module)` enters for transformers: `moelab_backends(module)` for a transformers model,
    None for anything else (without importing transformers). A transformers block or experts module alone raises:
    its backend can only be switched through its model."""
    if not transformers_loaded():
        return None
    if is_transformers_model(module):
        return moelab_backends(module)
    if any(_is_experts_module(m) for m in module.modules()):
        raise ValueError(f"{type(module).__name__} holds transformers experts modules but is not a transformers "
                         "model: inspect the model itself, moelab.inspect(model) (moelab switches the experts "
                         "backend with model.set_experts_implementation, which only the model has)")
    return None


def _is_experts_module(module: nn.Module) -> bool:
    # what `@use_experts_implementation` gives an experts class, plus the weights moelab's backends read
    return (type(module).__module__.startswith("transformers.") and hasattr(module, "has_gate")
            and hasattr(module, "gate_up_proj") and hasattr(module, "down_proj") and hasattr(module, "act_fn"))


def _layout_problem(experts: nn.Module) -> str | None:
    """Why moelab's backends cannot run this experts module (None when they can)."""
    expected = {"has_gate": True, "has_bias": False, "is_transposed": False, "is_concatenated": True,
                "has_post_expert_norm": False, "_is_expert_parallel": False}
    for attr, value in expected.items():
        if getattr(experts, attr, value) != value:
            return f"{attr}={getattr(experts, attr)!r} (moelab's backends need {attr}={value})"
    gate_up, down = experts.gate_up_proj, experts.down_proj
    expected_down = (gate_up.shape[0], gate_up.shape[2], gate_up.shape[1] // 2) if gate_up.dim() == 3 else None
    if gate_up.dim() != 3 or tuple(down.shape) != expected_down:
        return f"gate_up_proj {list(gate_up.shape)} / down_proj {list(down.shape)} are not [E, 2I, H] / [E, H, I]"
    return None


def summary_note(layers: list[HFMoELayer]) -> str:
    """One sentence for a trace: which moelab backends ran in place of which transformers ones, and why."""
    pairs = sorted({(layer.backend, layer.transformers_backend) for layer in layers})
    ran = ", ".join(f"moelab's {ours} in place of transformers' {theirs}" for ours, theirs in pairs) or "nothing"
    return (f"transformers model: {ran} in its {len(layers)} MoE layer(s), on the model's own weights "
            "(transformers' backends expose no intermediate tensors); all restored on exit")


def _block_config(block: nn.Module) -> MoEConfig | None:
    try:
        family_of(block)
    except ValueError:
        return None  # a family moelab does not convert: still inspectable, without a MoEConfig
    return moe_config_from_block(block)


def find_moe_layers(model: nn.Module) -> list[HFMoELayer]:
    """Every experts module of `model` with its block (the parent holding it as `.experts`), in module order."""
    require_transformers()
    named = dict(model.named_modules())
    layers = []
    for name, module in named.items():
        if not _is_experts_module(module):
            continue
        parent_name = name.rpartition(".")[0]
        block = named.get(parent_name, module) if name.rpartition(".")[2] == "experts" else module
        router = getattr(block, "gate", None) if block is not module else None
        layers.append(HFMoELayer(name=parent_name if block is not module else name, block=block, experts=module,
                                 router=router if isinstance(router, nn.Module) else None,
                                 config=_block_config(block) if block is not module else None))
    return layers


# --- the backends transformers calls while inspecting -----------------------------------------------------------

def _make_adapter(backend: str):
    def run_moelab_backend(experts, hidden_states, top_k_index, top_k_weights):
        """transformers calls this as its experts backend: run moelab's backend of the same name on the module."""
        output = MoelabExpertsInterface.get(backend)(experts, hidden_states, top_k_index, top_k_weights)  # [T, H]
        # NOTE: float32 top_k_weights (Mixtral) give a float32 sum: cast back, as transformers' backends do
        return output.to(hidden_states.dtype)

    run_moelab_backend.__name__ = run_moelab_backend.__qualname__ = f"moelab_{backend}_on_transformers"
    return run_moelab_backend


# one function per backend for the whole process: nested inspections recognise them by identity
_ADAPTERS = {name: _make_adapter(name) for name in NAMESAKE_BACKENDS}


@contextlib.contextmanager
def _registered(registry):
    """Add the `moelab_*` backends to transformers' shared registry instance; remove exactly those on exit."""
    added = []
    try:
        for backend, fn in _ADAPTERS.items():
            name = registered_name(backend)
            if name in registry:
                if registry[name] is fn:
                    continue  # an enclosing inspection registered it and will remove it
                raise RuntimeError(f"transformers' ExpertsInterface already has a backend named {name!r} that is not "
                                   "moelab's; unregister it before inspecting with moelab")
            registry[name] = fn
            added.append(name)
        yield
    finally:
        for name in reversed(added):
            del registry[name]


# --- steps the block computes outside its experts module ----------------------------------------------------------

def _route_hook(layer: HFMoELayer):
    num_experts = int(layer.experts.gate_up_proj.shape[0])

    def hook(module, args, output):
        if not (isinstance(output, tuple) and len(output) == 3):
            return  # a router with another signature: no route step
        router_logits, top_k_weights, top_k_index = output  # [T, E], [T, k], [T, k]
        record_step("route", "The router scores every expert, keeps the top k per token and renormalises.",
                    router_logits=router_logits, top_k_index=top_k_index, top_k_weights=top_k_weights,
                    derived={"router_probs": lambda: torch.softmax(router_logits, dim=-1, dtype=torch.float32),
                             "tokens_per_expert": lambda: torch.bincount(top_k_index.reshape(-1),
                                                                         minlength=num_experts)})
    return hook


def _shared_expert_hooks(layer: HFMoELayer):
    def keep_output(module, args, output):
        layer._shared_output[:] = [output]

    def record(module, args, gate_logits):
        shared_output = layer._shared_output.pop() if layer._shared_output else None
        tensors = {} if shared_output is None else {"shared_output": shared_output}
        record_step("shared_expert", "Every token also goes through the shared expert, scaled by a sigmoid gate "
                    "and added to the routed output.", **tensors,
                    derived={"shared_gate": lambda: F.sigmoid(gate_logits)})
    return keep_output, record


class _StagePublisher:
    """Publish `prefill` / `decode n` while the model runs with a cache (as transformers' `generate` does)."""

    def __init__(self):
        self.decode_step = 0
        self.open: list = []

    def pre_hook(self, module, args, kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        get_seq_length = getattr(cache, "get_seq_length", None)
        if not callable(get_seq_length):
            self.open.append(None)  # a plain forward: no stage
            return
        if get_seq_length() == 0:
            self.decode_step = 0
            stage = generation_stage("prefill")
        else:
            stage = generation_stage("decode", self.decode_step)
            self.decode_step += 1
        stage.__enter__()
        self.open.append(stage)

    def post_hook(self, module, args, kwargs, output):
        stage = self.open.pop() if self.open else None
        if stage is not None:
            stage.__exit__(None, None, None)


_ACTIVE: dict[int, list[HFMoELayer]] = {}  # id(model) -> its layers, while a moelab_backends block is open


@contextlib.contextmanager
def moelab_backends(model: nn.Module, *, publish_stages: bool = True):
    """While inside, every experts module of the transformers `model` runs moelab's backend of the same name.

    Yields the list of `HFMoELayer` (one per MoE block, with `.backend`, `.transformers_backend`, `.note`).
    Raises ValueError, changing nothing, when a block uses a backend moelab does not have (only `eager`,
    `batched_mm`, `grouped_mm` do) or a weight layout moelab's backends cannot read. On exit the model's experts
    implementation, transformers' registry and the model's hooks are exactly as before, also on error.
    """
    require_transformers()
    if not is_transformers_model(model):
        raise ValueError(f"moelab_backends takes a transformers PreTrainedModel, got {type(model).__name__}")
    if id(model) in _ACTIVE:  # nested: the enclosing block already switched, hooked and registered everything
        yield _ACTIVE[id(model)]
        return
    layers = find_moe_layers(model)
    before = model.get_experts_implementation()
    configs = {"": model.config, **{key: getattr(model.config, key, None) for key in model.config.sub_configs}}
    requested = dict(before)
    for key, implementation in before.items():
        users = [layer for layer in layers if layer.experts.config is configs[key]]
        if not users:
            continue  # a sub-model without MoE layers keeps its setting
        if implementation not in NAMESAKE_BACKENDS:
            raise ValueError(f"{users[0].name} runs transformers' {implementation!r} experts backend, which moelab "
                             f"cannot show: moelab has {list(NAMESAKE_BACKENDS)}. Switch first, e.g. "
                             f"model.set_experts_implementation('grouped_mm')")
        requested[key] = registered_name(implementation)
        for layer in users:
            layer.transformers_backend = layer.backend = implementation
    orphans = [layer.name for layer in layers if layer.backend is None]
    if orphans:
        raise ValueError(f"experts modules {orphans} use a config that is neither the model's nor one of its "
                         "sub_configs: moelab cannot switch their backend through model.set_experts_implementation")
    for layer in layers:
        problem = _layout_problem(layer.experts)
        if problem:
            raise ValueError(f"moelab's backends cannot run {layer.name}: {problem}")

    _, registry = experts_registry()
    with contextlib.ExitStack() as stack:
        stack.enter_context(_registered(registry))
        stack.callback(model.set_experts_implementation, before)  # runs even if the switch below fails halfway
        model.set_experts_implementation(requested)
        switched = model.get_experts_implementation()
        if switched != requested:
            raise RuntimeError(f"model.set_experts_implementation({requested}) left {switched}")
        for layer in layers:
            if layer.router is not None:
                stack.callback(layer.router.register_forward_hook(_route_hook(layer)).remove)
            shared, gate = getattr(layer.block, "shared_expert", None), getattr(layer.block, "shared_expert_gate", None)
            if isinstance(shared, nn.Module) and isinstance(gate, nn.Module):
                keep_output, record = _shared_expert_hooks(layer)
                stack.callback(shared.register_forward_hook(keep_output).remove)
                stack.callback(gate.register_forward_hook(record).remove)
        if publish_stages:
            stages = _StagePublisher()
            stack.callback(model.register_forward_pre_hook(stages.pre_hook, with_kwargs=True).remove)
            stack.callback(model.register_forward_hook(stages.post_hook, with_kwargs=True, always_call=True).remove)
        _ACTIVE[id(model)] = layers
        stack.callback(_ACTIVE.pop, id(model))
        yield layers


@contextlib.contextmanager
def _inspection_session(context):
    with context as layers:
        yield layers, summary_note(layers)


def inspection_adapter(module: nn.Module):
    """The adapter `moelab.inspection` calls: None unless `module` is a transformers model (see
    `moelab.inspection.adapters`); registered when `moelab.hf` is imported (which `import moelab` does)."""
    context = inspection_context(module)
    return None if context is None else _inspection_session(context)


register_adapter("transformers", inspection_adapter)
