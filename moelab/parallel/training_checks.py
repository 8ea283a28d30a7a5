"""The checks of training under expert parallelism, run on every rank of a group by
tests/test_parallel_training.py (one spawn of `run_ranks` runs them all, in order, so the collectives line up).

The reference of each is the single-process computation on the global batch, run on every rank from the same
seeds: the plain `Trainer` on a copy of the model taken before it was made expert-parallel, or the plain model's
forward and backward on every rank's sequences concatenated. Each case returns numbers and flags; the test
compares them (and compares the ranks with each other).
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist

from ..models import MoEForCausalLM
from ..training import Trainer
from .checks import run_cases
from .layer import expert_parallel
from .train import tiny_config, tiny_data, tiny_lm
from .training import (ExpertParallelTrainer, all_reduce_gradients, clip_grad_norm_global, expert_parallel_loss,
                       gather_full_model, replicated_parameters, save_expert_parallel, sharded_parameters)

HISTORY_COLUMNS = ("loss", "lm_loss", "aux_loss", "z_loss", "grad_norm", "val_loss")
CLIP = 0.01  # a max_norm far below the tiny model's gradient norms (about 0.5 to 1): every clip scales


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-4, atol: float = 1e-10) -> bool:
    return a.shape == b.shape and bool(torch.allclose(a.double(), b.double(), rtol=rtol, atol=atol))


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max()) if a.shape == b.shape else float("inf")


def compare_trainer(rank: int, world_size: int, recipe: str, **config_fields) -> dict:
    """`ExpertParallelTrainer` against `Trainer` on the global batch: both histories, and the weights after the
    run (the EP model's experts gathered) compared with the reference's, tensor by tensor (rtol 1e-4)."""
    config = tiny_config(**config_fields)
    model = tiny_lm(recipe, seed=0)
    reference = copy.deepcopy(model)
    reference_history = Trainer(reference, tiny_data(), config).train()
    trainer = ExpertParallelTrainer(model, tiny_data(), config)
    history = trainer.train()
    full = gather_full_model(model)
    ref_state = reference.state_dict()
    state = full.state_dict()
    weights = {name: {"close": _close(state[name], ref), "max_diff": _max_diff(state[name], ref)}
               for name, ref in ref_state.items()}
    biases = {name: layer.router.expert_bias.tolist() for name, layer in model.moe_layers().items()
              if layer.router.expert_bias is not None}
    return {"history": history.to_dict("list"), "reference_history": reference_history.to_dict("list"),
            "weights": weights, "same_keys": sorted(state) == sorted(ref_state), "biases": biases,
            "sharded": sorted(sharded_parameters(model)), "replicated": len(replicated_parameters(model)),
            "rows": trainer._micro_batch(0, 0).shape[0],  # this rank's sequences of a micro-batch
            "reference_state": {name: value.clone() for name, value in ref_state.items()}}


def zero_target_rank(rank: int, world_size: int) -> dict:
    """Rank 1's labels are all -100: its loss share is finite (no 0 / 0), and after the all-reduce and the
    global-norm clipping every gradient equals the single-process gradient on the global batch with those labels,
    clipped by torch's clip_grad_norm_. Then a global batch with no target at all: a ValueError on every rank."""
    model = tiny_lm("bias_global", seed=1)  # every loss term in the gradient
    reference = copy.deepcopy(model)
    input_ids = tiny_data().sample("train", 2 * world_size, 12, torch.Generator().manual_seed(5)).input_ids
    labels = input_ids.clone()
    labels[2:4] = -100  # rank 1's rows
    expert_parallel(model)
    rows, row_labels = (torch.tensor_split(t, world_size)[rank] for t in (input_ids, labels))
    out = expert_parallel_loss(model, rows, row_labels)
    out.loss.backward()
    all_reduce_gradients(model)
    ref_out = reference(input_ids, labels=labels)
    ref_out.loss.backward()
    # a max_norm far below the norm, so both scale: the clipped gradients compare below too
    norm = clip_grad_norm_global(model, CLIP)
    ref_norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), CLIP)

    total = {name: getattr(out, name).detach().double().clone() for name in ("loss", "lm_loss", "aux_loss")}
    for value in total.values():
        dist.all_reduce(value)
    diffs = {f"loss {name}": abs(float(value) - float(getattr(ref_out, name).detach()))
             / abs(float(getattr(ref_out, name).detach())) for name, value in total.items()}
    finite = bool(torch.isfinite(out.loss.detach())) and all(bool(torch.isfinite(p.grad).all()) for p in model.parameters())
    L = model.config.moe.num_experts // world_size
    for name, param in model.named_parameters():
        ref_grad = reference.get_parameter(name).grad
        if name in sharded_parameters(model):
            ref_grad = ref_grad[rank * L:(rank + 1) * L]
        diffs[f"grad {name}"] = _max_diff(param.grad, ref_grad) / max(float(ref_grad.abs().max()), 1e-12)

    error = None
    try:
        expert_parallel_loss(model, rows, torch.full_like(rows, -100))
    except ValueError as caught:
        error = str(caught)
    return {"norm": float(norm), "reference_norm": float(ref_norm), "max_norm": CLIP,
            "rank_loss": float(out.loss.detach()), "rank_targets": int((row_labels[:, 1:] != -100).sum()), "finite": finite,
            "relative_diffs": diffs, "no_target_error": error}


def save_and_load(rank: int, world_size: int, save_directory: str) -> dict:
    """`save_expert_parallel` writes one folder; `from_pretrained` loads it as a single-process model whose
    logits equal the EP model's (and whose weights equal the model before it was sharded); `gather_full_model`
    with dst gives the model on that rank only."""
    model = tiny_lm("bias_global", seed=2)
    with torch.no_grad():  # a non-zero bias, so the saved buffer is checked too
        for layer in model.moe_layers().values():
            layer.router.expert_bias.copy_(torch.linspace(-0.1, 0.1, layer.config.num_experts))
    original = copy.deepcopy(model)
    expert_parallel(model)
    folder = save_expert_parallel(model, save_directory)
    loaded = MoEForCausalLM.from_pretrained(folder)
    input_ids = torch.randint(0, 64, (3, 10), generator=torch.Generator().manual_seed(7))  # the same on every rank
    with torch.no_grad():
        ep_logits = model(input_ids).logits
        loaded_logits = loaded(input_ids).logits
    ref_state = original.state_dict()
    weights_equal = all(torch.equal(value, ref_state[name]) for name, value in loaded.state_dict().items()) \
        and sorted(loaded.state_dict()) == sorted(ref_state)
    on_one = gather_full_model(model, dst=1)
    return {"logits_diff": _max_diff(loaded_logits, ep_logits), "logits_scale": float(ep_logits.abs().max()),
            "weights_equal": weights_equal, "loaded_type": type(loaded).__name__,
            "loaded_layers": sorted(type(layer).__name__ for layer in loaded.moe_layers().values()),
            "dst_1_gets_model": on_one is not None, "loaded_experts": loaded.model.layers[0].moe.experts
            .gate_up_proj.shape[0]}


def default_cases(save_directory: str) -> dict[str, tuple]:
    """name -> (function, kwargs), in the order they run."""
    return {
        # dropless, 2 micro-batches a step: the bias update and the global-batch balancing loss from summed counts
        "trainer/bias_global": (compare_trainer, dict(recipe="bias_global", grad_accum=2)),
        # a max_norm far below the gradient's norm: every step clips, by the global norm
        "trainer/batch_clip": (compare_trainer, dict(recipe="batch", grad_clip=CLIP)),
        # uneven rows per rank (5 sequences over 2 ranks) and the per-sequence balancing loss
        "trainer/sequence_uneven": (compare_trainer, dict(recipe="sequence", batch_size=5)),
        "zero_target_rank/clipped": (zero_target_rank, {}),
        "save_and_load": (save_and_load, dict(save_directory=save_directory)),
    }


def run_training_checks(rank: int, save_directory: str, names: list[str] | None = None) -> dict[str, dict]:
    """Run the named cases of `default_cases` (all by default) in order on this rank; returns name -> result."""
    return run_cases(rank, default_cases(save_directory), names)
