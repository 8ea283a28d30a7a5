"""Weights both ways between a transformers MoE block and `moelab.SparseMoE`, and transformers' own experts on them.

The layouts are already the same (`gate_up_proj [E, 2I, H]` gate rows first, `down_proj [E, H, I]`, router
`weight [E, H]`), so a conversion is a renaming plus a check that the two compute the same function. What each
family's router does, read off transformers 5 (`models/<family>/modeling_<family>.py`):

| family      | its MoE block            | router: top k of float32 softmax, then | top_k_weights | shared expert |
| ----------- | ------------------------ | -------------------------------------- | ------------- | ------------- |
| `olmoe`     | `OlmoeSparseMoeBlock`    | renormalised if `norm_topk_prob`       | input dtype   | -             |
| `qwen2_moe` | `Qwen2MoeSparseMoeBlock` | renormalised if `norm_topk_prob`       | input dtype   | sigmoid-gated |
| `mixtral`   | `MixtralSparseMoeBlock`  | always renormalised                    | float32       | -             |

Mixtral's "always renormalised" equals a softmax over the k kept logits; its weights stay float32, so its experts
weigh and sum in float32 (`MoEConfig(norm_topk_prob=True, top_k_weights_float32=True)` says exactly that).
Mixtral's `router_jitter_noise` acts only in training and has no moelab counterpart.
"""

from __future__ import annotations

import importlib
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from ..core.activations import ACTIVATIONS
from ..core.config import MoEConfig
from ..layer.experts import Experts
from ..layer.moe import SparseMoE
from ._require import experts_registry, require_transformers

__all__ = ["FAMILIES", "family_of", "moe_config_from_block", "from_transformers", "to_transformers",
           "copy_weights", "transformers_config", "transformers_experts", "transformers_backends"]


@dataclass(frozen=True)
class Family:
    """Where one transformers MoE family keeps its block, and the names its config gives our sizes."""

    name: str  # transformers' model_type
    module: str  # the modeling module
    block: str  # class names in `module`
    experts: str
    config: str
    causal_lm: str
    num_experts_key: str  # config field for E
    intermediate_key: str  # config field for I (the experts' width)
    renormalises: bool | None  # True: always; None: as `norm_topk_prob` says
    top_k_weights_float32: bool
    shared_expert: bool

    def classes(self):
        """(block class, experts class, config class), imported now."""
        module = self._module()
        return getattr(module, self.block), getattr(module, self.experts), getattr(module, self.config)

    def causal_lm_class(self):
        return getattr(self._module(), self.causal_lm)

    def _module(self):
        require_transformers()
        return importlib.import_module(self.module)


FAMILIES: dict[str, Family] = {
    "olmoe": Family(
        "olmoe", "transformers.models.olmoe.modeling_olmoe", block="OlmoeSparseMoeBlock", experts="OlmoeExperts",
        config="OlmoeConfig", causal_lm="OlmoeForCausalLM", num_experts_key="num_experts",
        intermediate_key="intermediate_size", renormalises=None, top_k_weights_float32=False, shared_expert=False),
    "qwen2_moe": Family(
        "qwen2_moe", "transformers.models.qwen2_moe.modeling_qwen2_moe", block="Qwen2MoeSparseMoeBlock",
        experts="Qwen2MoeExperts", config="Qwen2MoeConfig", causal_lm="Qwen2MoeForCausalLM",
        num_experts_key="num_experts", intermediate_key="moe_intermediate_size", renormalises=None,
        top_k_weights_float32=False, shared_expert=True),
    "mixtral": Family(
        "mixtral", "transformers.models.mixtral.modeling_mixtral", block="MixtralSparseMoeBlock",
        experts="MixtralExperts", config="MixtralConfig", causal_lm="MixtralForCausalLM",
        num_experts_key="num_local_experts", intermediate_key="intermediate_size", renormalises=True,
        top_k_weights_float32=True, shared_expert=False),
}

# moelab's state-dict keys -> the transformers block's (everything else has the same name: Qwen2-MoE's shared expert
# included, as moelab names its parts after `Qwen2MoeMLP`)
_MOELAB_TO_HF = {"router.weight": "gate.weight"}
_HF_TO_MOELAB = {v: k for k, v in _MOELAB_TO_HF.items()}


def family_spec(name: str) -> Family:
    if name not in FAMILIES:
        raise ValueError(f"unknown family {name!r}; moelab converts {sorted(FAMILIES)}")
    return FAMILIES[name]


def family_of(block: nn.Module) -> str:
    """The family name (`"olmoe"`, `"qwen2_moe"`, `"mixtral"`) of a transformers MoE block; ValueError otherwise."""
    require_transformers()
    for family in FAMILIES.values():
        if isinstance(block, family.classes()[0]):
            return family.name
    raise ValueError(f"{type(block).__name__} is not a transformers MoE block moelab converts; it converts "
                     f"{', '.join(f.block for f in FAMILIES.values())}")


def transformers_backends() -> list[str]:
    """The experts backends transformers knows now: `eager` (the class's own loop) and its `ExpertsInterface`."""
    _, registry = experts_registry()
    return ["eager", *[name for name in registry.keys() if name != "eager"]]


def _check_backend(name: str) -> str:
    valid = transformers_backends()
    if name not in valid:
        raise ValueError(f"unknown transformers experts backend {name!r}; valid names are {valid}")
    return name


def _hidden_act_of(module: nn.Module) -> str:
    config = getattr(module, "config", None)
    name = getattr(config, "hidden_act", None)
    if name not in ACTIVATIONS:
        raise ValueError(f"the block's hidden_act {name!r} has no moelab equivalent; moelab has {sorted(ACTIVATIONS)}")
    return name


def moe_config_from_block(block: nn.Module) -> MoEConfig:
    """The `MoEConfig` of a transformers MoE block: sizes from its weights, the router's choices from the family."""
    family = family_spec(family_of(block))
    num_experts, two_i, hidden_size = block.experts.gate_up_proj.shape
    shared = 0
    if family.shared_expert:
        shared = int(block.shared_expert.gate_proj.weight.shape[0])
    if family.renormalises is None:
        norm_topk_prob = bool(block.gate.norm_topk_prob)
    else:
        norm_topk_prob = family.renormalises
    if getattr(block, "jitter_noise", 0) and block.training:
        warnings.warn(f"{type(block).__name__} has router_jitter_noise={block.jitter_noise}, which transformers "
                      "applies in training mode; moelab's SparseMoE has no router jitter", UserWarning, stacklevel=3)
    initializer_range = float(getattr(block.experts.config, "initializer_range", 0.02) or 0.02)
    return MoEConfig(hidden_size=int(hidden_size), intermediate_size=int(two_i) // 2, num_experts=int(num_experts),
                     top_k=int(block.gate.top_k), norm_topk_prob=norm_topk_prob,
                     hidden_act=_hidden_act_of(block.experts), initializer_range=initializer_range,
                     shared_expert_intermediate_size=shared, top_k_weights_float32=family.top_k_weights_float32)


def _check_same_function(config: MoEConfig, family: Family) -> None:
    """Raise when `config` computes something the family's block cannot (rather than approximating it)."""
    problems = []
    if family.renormalises is True and not config.norm_topk_prob:
        problems.append(f"{family.name} always renormalises the top-k weights (norm_topk_prob=True)")
    if config.top_k_weights_float32 != family.top_k_weights_float32:
        problems.append(f"{family.name} keeps top_k_weights in "
                        f"{'float32' if family.top_k_weights_float32 else 'the input dtype'} "
                        f"(top_k_weights_float32={family.top_k_weights_float32})")
    if family.shared_expert != bool(config.shared_expert_intermediate_size):
        problems.append(f"{family.name} blocks {'always' if family.shared_expert else 'never'} have a shared expert "
                        f"(shared_expert_intermediate_size {'> 0' if family.shared_expert else '= 0'})")
    problems += training_mechanics(config, family.name)
    if problems:
        raise ValueError(f"this SparseMoE is not a {family.name} block: " + "; ".join(problems))


def training_mechanics(config: MoEConfig, family_name: str) -> list[str]:
    """What of `config`'s routing mechanics (moelab's training lab) no transformers block of the family has."""
    problems = []
    if config.router_scoring != "softmax":
        problems.append(f"{family_name} scores experts with a softmax (router_scoring={config.router_scoring!r})")
    if config.expert_bias:
        problems.append(f"{family_name} has no aux-loss-free expert bias (expert_bias=True)")
    for name in ("capacity_factor", "eval_capacity_factor"):
        if getattr(config, name) is not None:
            problems.append(f"{family_name} is dropless ({name}={getattr(config, name)})")
    if config.router_jitter:
        problems.append(f"{family_name} has no jitter on the router input alone (router_jitter="
                        f"{config.router_jitter}; Mixtral's jitter_noise scales the experts' input too)")
    return problems


def _default_family(config: MoEConfig) -> str:
    if config.shared_expert_intermediate_size:
        return "qwen2_moe"
    return "mixtral" if config.top_k_weights_float32 else "olmoe"


def transformers_config(config: MoEConfig, family: str | None = None, **kwargs):
    """The family's transformers config (e.g. `OlmoeConfig`) with the sizes and router choices of `config`.

    `family` defaults to the one `config` describes (shared expert: `qwen2_moe`; float32 top_k_weights: `mixtral`;
    else `olmoe`); `kwargs` go to the config (e.g. `experts_implementation="batched_mm"`, `num_hidden_layers=2`).
    """
    family = family_spec(family or _default_family(config))
    _check_same_function(config, family)
    fields = {"hidden_size": config.hidden_size, family.intermediate_key: config.intermediate_size,
              family.num_experts_key: config.num_experts, "num_experts_per_tok": config.top_k,
              "hidden_act": config.hidden_act, "initializer_range": config.initializer_range}
    if family.renormalises is None:
        fields["norm_topk_prob"] = config.norm_topk_prob
    if family.shared_expert:
        fields["shared_expert_intermediate_size"] = config.shared_expert_intermediate_size
    if family.name == "mixtral":
        fields["router_jitter_noise"] = 0.0
    if "experts_implementation" in kwargs:
        _check_backend(kwargs["experts_implementation"])
    config_class = family.classes()[2]
    return config_class(**{**fields, **kwargs})


def copy_weights(source: nn.Module, target: nn.Module) -> nn.Module:
    """Copy every weight of `source` into `target`, one a `SparseMoE` and the other a transformers block of the
    same function (checked). Values are cast to `target`'s dtype and device. Returns `target`."""
    if isinstance(source, SparseMoE) == isinstance(target, SparseMoE):
        raise ValueError("copy_weights takes one moelab.SparseMoE and one transformers MoE block, got "
                         f"{type(source).__name__} and {type(target).__name__}")
    moe, block = (source, target) if isinstance(source, SparseMoE) else (target, source)
    theirs = moe_config_from_block(block)
    ours = moe.config
    fields = ("hidden_size", "intermediate_size", "num_experts", "top_k", "norm_topk_prob", "hidden_act",
              "shared_expert_intermediate_size", "top_k_weights_float32", "router_scoring", "router_jitter",
              "expert_bias", "capacity_factor", "eval_capacity_factor")
    different = [f"{f}: SparseMoE {getattr(ours, f)!r}, block {getattr(theirs, f)!r}" for f in fields
                 if getattr(ours, f) != getattr(theirs, f)]
    if different:
        raise ValueError(f"the SparseMoE and the {type(block).__name__} compute different functions: "
                         + "; ".join(different))
    rename = _MOELAB_TO_HF if source is moe else _HF_TO_MOELAB
    state = {rename.get(key, key): value for key, value in source.state_dict().items()}
    with torch.no_grad():
        target.load_state_dict(state, strict=True)
    return target


def from_transformers(block: nn.Module, experts_implementation: str = "grouped_mm") -> SparseMoE:
    """A `moelab.SparseMoE` with a copy of `block`'s weights (same dtype and device) that computes what `block`
    computes. `experts_implementation` names the moelab backend it runs."""
    config = moe_config_from_block(block)
    weight = block.experts.gate_up_proj
    # seed=0: building the layer must not draw from the global RNG (its values are overwritten anyway)
    moe = SparseMoE(config, experts_implementation, dtype=weight.dtype, device=weight.device, seed=0)
    return copy_weights(block, moe).train(block.training)


def to_transformers(moe: SparseMoE, family: str | None = None, *, experts_implementation: str = "grouped_mm",
                    **config_kwargs) -> nn.Module:
    """A new transformers MoE block of `family` with a copy of `moe`'s weights (same dtype and device), running
    transformers' own `experts_implementation` (`"eager"`, `"batched_mm"`, `"grouped_mm"`, ...).

    `family` defaults to the one `moe.config` describes (see `transformers_config`); a family that cannot compute
    what `moe` computes raises a ValueError saying why. The block's config is `block.experts.config`.
    """
    if not isinstance(moe, SparseMoE):
        raise ValueError(f"to_transformers takes a moelab.SparseMoE, got {type(moe).__name__}")
    config = transformers_config(moe.config, family, experts_implementation=experts_implementation, **config_kwargs)
    block_class = family_spec(family or _default_family(moe.config)).classes()[0]
    weight = moe.experts.gate_up_proj
    with torch.device("meta"):  # no allocation, no draw from the global RNG: every weight is overwritten below
        block = block_class(config)
    block = block.to_empty(device=weight.device).to(weight.dtype)
    return copy_weights(moe, block).train(moe.training)


def transformers_experts(moe: SparseMoE | Experts, backend: str = "grouped_mm", family: str | None = None):
    """transformers' experts module running transformers' own `backend` on `moe`'s expert weights.

    The module *shares* moelab's `gate_up_proj` and `down_proj` parameters (identical weights, no copy), so
    `hf_experts(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H]` and
    `moe.experts(...)` compute on the very same tensors. `backend` is one of `transformers_backends()`.
    `family` only picks the class (the three families' experts modules are identical); it defaults to the one
    `moe.config` describes. Use it to compare moelab's backends with transformers' (`--compare-transformers`).
    """
    if isinstance(moe, SparseMoE):
        experts, config = moe.experts, moe.config
    elif isinstance(moe, Experts):
        experts = moe
        act = next((name for name, fn in ACTIVATIONS.items() if fn is moe.act_fn), None)
        if act is None:
            raise ValueError("this Experts module's act_fn is not one of moelab.activations.ACTIVATIONS")
        config = MoEConfig(hidden_size=moe.hidden_size, intermediate_size=moe.intermediate_size,
                           num_experts=moe.num_experts, top_k=1, hidden_act=act)
    else:
        raise ValueError(f"transformers_experts takes a moelab.SparseMoE or Experts, got {type(moe).__name__}")
    family = family_spec(family or _default_family(config))
    fields = {"hidden_size": config.hidden_size, family.intermediate_key: config.intermediate_size,
              family.num_experts_key: config.num_experts, "num_experts_per_tok": 1, "hidden_act": config.hidden_act,
              "experts_implementation": _check_backend(backend)}
    _, experts_class, config_class = family.classes()
    with torch.device("meta"):
        hf_experts = experts_class(config_class(**fields))
    hf_experts.gate_up_proj = experts.gate_up_proj  # the same Parameter objects
    hf_experts.down_proj = experts.down_proj
    return hf_experts
