"""`Trainer`: AdamW on a `MoEForCausalLM` over a `TokenDataset`, one optimizer step at a time, with its history.

One step: `grad_accum` micro-batches, each drawn from a generator seeded from (seed, step, micro-batch) with the
global RNG (the router jitter draws from it) seeded the same way, each forward's loss / grad_accum
backpropagated; the gradient clipped; AdamW; the schedule; the expert-bias update of every router that has one,
from the kept pairs each expert received over the step; one history row. Because every step seeds its own
randomness, a checkpoint needs no RNG state: `save_checkpoint` + `Trainer.resume` continues bit for bit.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ..core.config import check_int
from ..data import TokenDataset
from ..layer import GlobalLoad
from ..models import MoEForCausalLM, load_pretrained
from ..models.io import CONFIG_NAME, SAVE_ID_KEY
from .config import TrainingConfig
from .history import history_frame, history_row, layer_stats
from .schedule import warmup_cosine

MODEL_FOLDER = "model"  # in a checkpoint: the model, written by save_pretrained
STATE_NAME = "trainer_state.pt"  # in a checkpoint: optimizer, scheduler, step, history, config
VALIDATION_SEED = 0  # the same validation batches whatever the training seed, so runs compare


def micro_seeds(seed: int, step: int, micro: int) -> tuple[int, int]:
    """(data seed, global RNG seed) of micro-batch `micro` of 0-based step `step`: two independent streams."""
    data_seed, rng_seed = np.random.SeedSequence([seed, step, micro]).generate_state(2, dtype=np.uint64)
    return int(data_seed) >> 1, int(rng_seed) >> 1  # torch seeds are taken as int64


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices (linear, embedding, expert and router weights), none on norms and other vectors."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":  # kernels run asynchronously; the clock must wait for them
        torch.cuda.synchronize(device)


def _mean(values: list) -> torch.Tensor | None:
    return None if any(v is None for v in values) else torch.stack(values).mean()


class Trainer:
    """Trains `model` on `dataset` as `config` says; `train()` returns the history, one row per optimizer step.

    >>> trainer = Trainer(MoEForCausalLM(seed=0), text_corpus(), TrainingConfig(steps=50, progress=False))
    >>> history = trainer.train()          # a DataFrame (columns: moelab.training.history)
    >>> trainer.evaluate()                 # mean validation LM loss

    callback(trainer, row) runs after each step (row: that step's history row as a dict); returning True stops.
    NOTE: each step seeds the global torch RNG (for the router jitter), so code around a run that draws from it
    sees a fixed stream.
    """

    def __init__(self, model: MoEForCausalLM, dataset: TokenDataset, config: TrainingConfig | None = None, *,
                 callback=None):
        config = TrainingConfig() if config is None else config
        if not isinstance(model, MoEForCausalLM):
            raise ValueError(f"model must be a moelab.MoEForCausalLM, got {type(model).__name__}")
        if not isinstance(dataset, TokenDataset):
            raise ValueError(f"dataset must be a moelab.data.TokenDataset, got {type(dataset).__name__}")
        if not isinstance(config, TrainingConfig):
            raise ValueError(f"config must be a moelab.training.TrainingConfig, got {type(config).__name__}")
        if callback is not None and not callable(callback):
            raise ValueError(f"callback must be callable(trainer, row) or None, got {type(callback).__name__}")
        if dataset.vocab_size > model.config.vocab_size:
            raise ValueError(f"dataset {dataset.name!r} has vocab_size {dataset.vocab_size}, more than the model's "
                             f"vocab_size {model.config.vocab_size}")
        if config.seq_len > model.config.max_position_embeddings:
            raise ValueError(f"seq_len {config.seq_len} is above the model's max_position_embeddings "
                             f"{model.config.max_position_embeddings}")
        self.model, self.dataset, self.config, self.callback = model, dataset, config, callback
        self.optimizer = torch.optim.AdamW(param_groups(model, config.weight_decay), lr=config.lr,
                                           betas=config.betas)
        self.scheduler = warmup_cosine(self.optimizer, config.warmup_steps, config.steps, config.min_lr_ratio)
        self.step = 0  # optimizer steps done
        self._rows: list[dict] = []
        self._validation = None  # the validation batches, drawn on first use

    @property
    def history(self) -> pd.DataFrame:
        return history_frame(self._rows)

    # -- training -------------------------------------------------------------------------------------------

    def train(self, steps: int | None = None) -> pd.DataFrame:
        """Run `steps` more optimizer steps (default: to config.steps); returns the whole history."""
        left = self.config.steps - self.step
        steps = left if steps is None else steps
        check_int("steps", steps, 0, left, "the steps left, config.steps - trainer.step")
        with tqdm(total=steps, desc="training", unit="step", disable=not self.config.progress) as bar:
            for _ in range(steps):
                row = self.train_step()
                if self._due(self.config.eval_every) or self.step == self.config.steps:
                    row["val_loss"] = self.evaluate()  # the row is the history's own dict
                if self._due(self.config.checkpoint_every):
                    self.save_checkpoint(self.config.checkpoint_dir)
                bar.update()
                bar.set_postfix({k: f"{row[k]:.3f}" for k in ("loss", "val_loss") if not math.isnan(row[k])})
                if self.callback is not None and self.callback(self, row):
                    break
        return self.history

    def _due(self, every: int) -> bool:
        return every > 0 and self.step % every == 0

    def _micro_batch(self, step: int, micro: int) -> torch.Tensor:
        """The input ids [B, S] of one micro-batch, on the model's device; seeds the global RNG for its forward."""
        data_seed, rng_seed = micro_seeds(self.config.seed, step, micro)
        batch = self.dataset.sample("train", self.config.batch_size, self.config.seq_len,
                                    torch.Generator().manual_seed(data_seed))
        torch.manual_seed(rng_seed)  # the router jitter of this micro-batch's forward draws from it
        return batch.input_ids.to(self.model.device)

    def train_step(self) -> dict:
        """One optimizer step; returns its history row (also appended to the history)."""
        if self.step >= self.config.steps:
            raise ValueError(f"the run is done: trainer.step = {self.step} = config.steps")
        config, model = self.config, self.model
        model.train()
        _sync(model.device)
        start = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        # one GlobalLoad per optimizer step: the global-batch balancing loss counts over all its micro-batches
        global_load = GlobalLoad() if model.config.router_aux_loss_scope == "global" else None
        layers = list(model.moe_layers().values())
        routing = [[] for _ in layers]  # per layer: the RouterOutput of each micro-batch
        losses = {"loss": [], "lm_loss": [], "aux_loss": [], "z_loss": []}
        for micro in range(config.grad_accum):
            input_ids = self._micro_batch(self.step, micro)  # [B, S]
            out = self._forward(input_ids, global_load)
            (out.loss / config.grad_accum).backward()  # mean over micro-batches = the loss of the whole step
            for name, values in losses.items():
                value = getattr(out, name)
                values.append(None if value is None else value.detach())
            for outputs, router_output in zip(routing, out.router_outputs, strict=True):
                outputs.append(router_output)
        max_norm = config.grad_clip if config.grad_clip is not None else math.inf  # inf: measure, never scale
        grad_norm = self._finish_gradients(max_norm)
        lr = self.scheduler.get_last_lr()[0]  # the lr this step uses
        self.optimizer.step()
        self.scheduler.step()
        means, stats = self._step_summary(losses, routing)
        for layer, stat in zip(layers, stats):
            if layer.router.expert_bias is not None:  # aux-loss-free balancing: after the step, from its load
                layer.router.update_expert_bias(stat["tokens_per_expert"])
        self.step += 1
        grad_norm = float(grad_norm)
        _sync(model.device)
        elapsed = time.perf_counter() - start
        row = history_row(self.step, **means, lr=lr, grad_norm=grad_norm,
                          tokens_per_s=config.tokens_per_step / elapsed, val_loss=None, stats=stats,
                          biases=[layer.router.expert_bias for layer in layers])
        self._rows.append(row)
        return row

    # NOTE: `_micro_batch`, the three methods below and `_validation_loss` are where a run over several processes
    # differs (moelab.parallel.ExpertParallelTrainer overrides them: each rank's share of the batch, a globally
    # normalised loss, gradients all-reduced, counts summed over the ranks); on one process each is the plain
    # computation.

    def _forward(self, input_ids: torch.Tensor, global_load: GlobalLoad | None):
        """One micro-batch's forward: its `CausalLMOutput` (`loss` is what is backpropagated, with its router
        outputs)."""
        return self.model(input_ids, labels=input_ids, output_router_logits=True, global_load=global_load)

    def _finish_gradients(self, max_norm: float) -> torch.Tensor:
        """After the step's backward passes: clip the gradient to `max_norm`; returns its norm before clipping."""
        return torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)

    def _step_summary(self, losses: dict[str, list], routing: list[list]) -> tuple[dict, list[dict]]:
        """(each loss's mean over the step's micro-batches, each layer's `layer_stats` over the step)."""
        return {name: _mean(values) for name, values in losses.items()}, layer_stats(routing)

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean LM loss over `dataset.validation_batches(batch_size, seq_len, eval_batches)`, in eval mode."""
        if self._validation is None:
            self._validation = self.dataset.validation_batches(
                self.config.batch_size, self.config.seq_len, self.config.eval_batches, seed=VALIDATION_SEED)
        was_training = self.model.training
        self.model.eval()
        try:
            losses = []
            for batch in self._validation:
                input_ids = batch.input_ids.to(self.model.device)  # [B, S]
                losses.append(self._validation_loss(input_ids))
        finally:
            self.model.train(was_training)
        return torch.stack(losses).mean().item()  # equal-sized batches: the mean over all their tokens

    def _validation_loss(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The mean LM loss of one validation batch [B, S]."""
        return self.model(input_ids, labels=input_ids).lm_loss

    # -- checkpoints ----------------------------------------------------------------------------------------

    def save_checkpoint(self, directory) -> Path:
        """Write the model (`save_pretrained` into `directory/model`) and `directory/trainer_state.pt`
        (optimizer, scheduler, step, history, config); returns the folder. An existing checkpoint is replaced."""
        directory = Path(directory)
        self.model.save_pretrained(directory / MODEL_FOLDER)
        config_json = json.loads((directory / MODEL_FOLDER / CONFIG_NAME).read_text(encoding="utf-8"))
        state = {"step": self.step, "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "history": self._rows, "config": self.config.to_dict(),
                 "experts_implementation": self.model.get_experts_implementation(), "dataset": self.dataset.name,
                 # NOTE: ties the state to the weights of the same save: one interrupted between the two files
                 # leaves a state whose id no longer matches, and resuming refuses it
                 "model_save_id": config_json[SAVE_ID_KEY]}
        tmp = directory / (STATE_NAME + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, directory / STATE_NAME)  # a state file is whole or absent, never half-written
        return directory

    @classmethod
    def resume(cls, directory, dataset: TokenDataset, config: TrainingConfig | None = None, *, callback=None,
               experts_implementation: str | dict | None = None, device=None) -> Trainer:
        """A Trainer continuing the run saved in `directory`: its model, optimizer, scheduler, step and history.

        config: None keeps the saved one; experts_implementation: None keeps the saved backend choice.
        """
        state = _read_state(Path(directory))
        model = load_pretrained(Path(directory) / MODEL_FOLDER,
                                experts_implementation or state["experts_implementation"], device=device)
        config = TrainingConfig.from_dict(state["config"]) if config is None else config
        trainer = cls(model, dataset, config, callback=callback)
        trainer._load_state(state, dataset)
        return trainer

    def load_checkpoint(self, directory) -> None:
        """Load a checkpoint into this trainer (its model's weights, optimizer, scheduler, step, history); the
        trainer keeps its own config."""
        state = _read_state(Path(directory))
        saved = load_pretrained(Path(directory) / MODEL_FOLDER, device=self.model.device)
        self.model.load_state_dict(saved.state_dict())
        self._load_state(state, self.dataset)

    def _load_state(self, state: dict, dataset: TokenDataset) -> None:
        check_int("the checkpoint's step", state["step"], 0, self.config.steps, "config.steps")
        if state["dataset"] != dataset.name:
            warnings.warn(f"the checkpoint was trained on {state['dataset']!r}, resuming on {dataset.name!r}",
                          stacklevel=3)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = state["step"]
        self._rows = [dict(row) for row in state["history"]]


def _read_state(directory: Path) -> dict:
    """trainer_state.pt of a checkpoint, checked against the model saved beside it."""
    path = directory / STATE_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: {directory} is not a folder written by Trainer.save_checkpoint")
    state = torch.load(path, map_location="cpu", weights_only=True)
    config_path = directory / MODEL_FOLDER / CONFIG_NAME
    try:
        save_id = json.loads(config_path.read_text(encoding="utf-8")).get(SAVE_ID_KEY)
    except (OSError, ValueError) as error:
        raise ValueError(f"{config_path} is missing or unreadable ({error})") from None
    if save_id != state.get("model_save_id"):
        raise ValueError(f"{path} and {config_path} come from different saves: a checkpoint was interrupted; "
                         f"save it again")
    return state
