"""The seeded runs of the training notebooks and tests, one function each, so a claim and its check use one recipe.

- `balancing_run(method, ...)`: a tiny MoE LM on planted topics, its routers tilted towards expert 0
  (`tilt_router`), trained with no balancing, the Switch loss, the aux-loss-free bias or the z-loss.
- `specialisation_run(...)`: a tiny MoE LM on planted unigram topics, trained with the Switch loss; the experts
  come to split the topics (measured by NMI, `moelab.training.normalized_mutual_information`).
Both are small enough for a notebook cell (a few seconds on 2 CPU cores).
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from ..core.config import MoEConfig
from ..data.planted import planted_topics
from ..models.causal_lm import MoEForCausalLM
from ..models.configs import MoEModelConfig
from .collapse import tilt_router
from .config import TrainingConfig
from .probe import RoutingSample, route_batches
from .trainer import Trainer

METHODS = ("none", "switch", "bias", "z_loss")
DEFAULT_COEFFICIENTS = {"none": 0.0, "switch": 1e-2, "bias": 1e-3, "z_loss": 1e-3}


@dataclass
class Run:
    """One finished run: its trainer (model, history) and the routing of held-out tokens before and after."""

    trainer: Trainer
    before: RoutingSample
    after: RoutingSample

    @property
    def history(self) -> pd.DataFrame:
        return self.trainer.history

    @property
    def model(self) -> MoEForCausalLM:
        return self.trainer.model


def tiny_moe_lm(num_experts: int, top_k: int, seed: int, experts_implementation: str = "grouped_mm",
                **fields) -> MoEForCausalLM:
    """A 2-layer MoE LM over a 64-token vocabulary (H = I = 32); `fields` go to MoEConfig or MoEModelConfig."""
    model_fields = {k: fields.pop(k) for k in ("router_aux_loss_coef", "router_z_loss_coef", "router_aux_loss_scope")
                    if k in fields}
    moe = MoEConfig(hidden_size=32, intermediate_size=32, num_experts=num_experts, top_k=top_k, **fields)
    config = MoEModelConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, moe=moe,
                            **model_fields)
    return MoEForCausalLM(config, experts_implementation, seed=seed)


def balancing_run(method: str = "none", coefficient: float | None = None, *, steps: int = 100, seed: int = 0,
                  logit_offset: float = 0.6, experts_implementation: str = "grouped_mm", callback=None,
                  progress: bool = False) -> Run:
    """Collapse and recovery: 8 experts, top-1 (Switch), routers tilted towards expert 0 by `logit_offset`.

    method: "none", "switch" (load-balancing loss, `coefficient` default 1e-2), "bias" (aux-loss-free, update
    rate default 1e-3) or "z_loss" (router z-loss only, default 1e-3: it shrinks the logits, it does not balance).
    Balance is measured on 4096 held-out tokens (8 x 64 x 8, top-1: 4096 pairs).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}")
    coefficient = DEFAULT_COEFFICIENTS[method] if coefficient is None else coefficient
    fields = {"switch": {"router_aux_loss_coef": coefficient},
              "bias": {"expert_bias": True, "expert_bias_update_rate": coefficient},
              "z_loss": {"router_z_loss_coef": coefficient}}.get(method, {})
    data = planted_topics(4, 64, seed=0)
    model = tiny_moe_lm(8, 1, seed, experts_implementation, **fields)
    tilt_router(model, data.validation_batches(8, 64, 1, seed=123)[0].input_ids, logit_offset=logit_offset)
    held_out = data.validation_batches(8, 64, 8, seed=1)
    before = route_batches(model, held_out)
    trainer = Trainer(model, data, TrainingConfig(steps=steps, batch_size=16, seq_len=64, seed=seed,
                                                  progress=progress), callback=callback)
    trainer.train()
    return Run(trainer, before, route_batches(model, held_out))


def specialisation_run(*, steps: int = 100, seed: int = 0, num_experts: int = 4, top_k: int = 1,
                       aux_loss_coef: float = 1e-2, experts_implementation: str = "grouped_mm",
                       progress: bool = False) -> Run:
    """Planted unigram topics (4 topics over 64 tokens), 4 experts top-1, the Switch loss at `aux_loss_coef`."""
    data = planted_topics(4, 64, kind="unigram", seed=0)
    model = tiny_moe_lm(num_experts, top_k, seed, experts_implementation, router_aux_loss_coef=aux_loss_coef)
    held_out = data.validation_batches(8, 64, 8, seed=1)
    before = route_batches(model, held_out)
    trainer = Trainer(model, data, TrainingConfig(steps=steps, batch_size=16, seq_len=64, seed=seed,
                                                  progress=progress))
    trainer.train()
    return Run(trainer, before, route_batches(model, held_out))
