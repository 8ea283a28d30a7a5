"""Train a tiny MoE LM with its experts sharded over the ranks `torchrun` starts, printing each step's loss.

    torchrun --nproc-per-node 2 --master-addr 127.0.0.1 --master-port 29500 -m moelab.parallel.train --steps 5
    python -m torch.distributed.run --nproc-per-node 2 ... -m moelab.parallel.train --recipe bias_global

Rank 0 prints one line a step, `step <n> loss <loss> lm_loss <lm_loss> grad_norm <norm>` (floats as Python's repr),
then `val_loss <loss>`; `--single-process` runs the same recipe with the plain `Trainer` on the global batch, no
torchrun, and prints the same lines, so the two outputs compare line by line. `--save DIR` writes the trained
model as one single-process folder (`save_expert_parallel`). The recipe (`tiny_lm`, `tiny_config`, `RECIPES`) is
the one tests/test_parallel_training.py checks.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.distributed as dist

from ..core.config import MoEConfig
from ..data.planted import planted_topics
from ..models import MoEForCausalLM, MoEModelConfig
from ..training import Trainer, TrainingConfig
from .launch import init_process_group_from_env
from .training import ExpertParallelTrainer, save_expert_parallel

MODEL_FIELDS = ("router_aux_loss_coef", "router_z_loss_coef", "router_aux_loss_scope")
# name -> the MoEConfig / MoEModelConfig fields of a recipe; each exercises what ranks must agree on
RECIPES = {
    "plain": {},
    # aux-loss-free bias (its update from all-reduced counts), the global-batch balancing loss and the z-loss
    "bias_global": {"expert_bias": True, "expert_bias_update_rate": 1e-2, "router_aux_loss_scope": "global",
                    "router_aux_loss_coef": 1e-2, "router_z_loss_coef": 1e-3},
    "batch": {"router_aux_loss_coef": 1e-2, "router_aux_loss_scope": "batch"},
    "sequence": {"router_aux_loss_coef": 1e-2, "router_aux_loss_scope": "sequence", "router_z_loss_coef": 1e-3},
}


def tiny_lm(recipe: str = "plain", seed: int = 0, dtype: torch.dtype = torch.float64,
            experts_implementation: str = "grouped_mm", num_experts: int = 4, top_k: int = 2) -> MoEForCausalLM:
    """A 2-layer MoE LM (H = I = 16, E = 4, k = 2, vocab 64), dropless, with the fields of `RECIPES[recipe]`."""
    if recipe not in RECIPES:
        raise ValueError(f"recipe must be one of {list(RECIPES)}, got {recipe!r}")
    fields = dict(RECIPES[recipe])
    model_fields = {key: fields.pop(key) for key in MODEL_FIELDS if key in fields}
    moe = MoEConfig(hidden_size=16, intermediate_size=16, num_experts=num_experts, top_k=top_k, **fields)
    config = MoEModelConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, moe=moe,
                            **model_fields)
    return MoEForCausalLM(config, experts_implementation, dtype=dtype, seed=seed)


def tiny_data():
    """Planted Markov topics over 64 tokens (seeded)."""
    return planted_topics(4, 64, seed=0)


def tiny_config(**overrides) -> TrainingConfig:
    """5 steps of 4 sequences x 16 tokens, a warmup of 2, lr 1e-2, no clipping; `overrides` replace fields."""
    fields = dict(steps=5, batch_size=4, seq_len=16, warmup_steps=2, lr=1e-2, grad_clip=None, eval_batches=1,
                  progress=False)
    return TrainingConfig(**{**fields, **overrides})


def step_lines(history) -> list[str]:
    """The lines printed for a history: one per step, then the validation loss of the last step."""
    lines = [f"step {int(row.step)} loss {row.loss!r} lm_loss {row.lm_loss!r} grad_norm {row.grad_norm!r}"
             for row in history.itertuples()]
    return lines + [f"val_loss {float(history['val_loss'].iloc[-1])!r}"]


def parse_lines(text: str) -> dict[str, list[float]]:
    """`step_lines` output (amid other output) back as {"loss": [...], "lm_loss": [...], "grad_norm": [...],
    "val_loss": [...]}."""
    values = {"loss": [], "lm_loss": [], "grad_norm": [], "val_loss": []}
    for line in text.splitlines():
        words = line.split()
        if len(words) == 8 and words[0] == "step":
            for name, value in zip(words[2::2], words[3::2]):
                values[name].append(float(value))
        elif len(words) == 2 and words[0] == "val_loss":
            values["val_loss"].append(float(words[1]))
    return values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moelab.parallel.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="bias_global", choices=list(RECIPES))
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=4, help="the global micro-batch, split over the ranks")
    parser.add_argument("--seq-len", type=int, default=16)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--grad-clip", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    parser.add_argument("--backend", default="grouped_mm", help="the experts backend")
    parser.add_argument("--save", default=None, help="a folder for the trained model (single-process format)")
    parser.add_argument("--single-process", action="store_true", help="the plain Trainer, no torchrun")
    args = parser.parse_args(argv)
    config = tiny_config(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                         grad_accum=args.grad_accum, grad_clip=args.grad_clip, seed=args.seed,
                         warmup_steps=min(2, args.steps))
    model = tiny_lm(args.recipe, seed=args.seed, dtype=getattr(torch, args.dtype),
                    experts_implementation=args.backend)
    if args.single_process:
        trainer = Trainer(model, tiny_data(), config)
        print("\n".join(step_lines(trainer.train())), flush=True)
        if args.save:
            model.save_pretrained(args.save)
        return 0
    rank, _ = init_process_group_from_env(backend="gloo")  # the model is on the CPU
    try:
        trainer = ExpertParallelTrainer(model, tiny_data(), config)
        history = trainer.train()
        if args.save:
            save_expert_parallel(model, args.save)
        if rank == 0:
            print("\n".join(step_lines(history)), flush=True)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
