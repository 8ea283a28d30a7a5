"""`TrainingConfig`: the knobs of one training run, validated when it is made, and the guard on its size."""

from __future__ import annotations

from dataclasses import dataclass

from ..core.config import DictConfig, check_float, check_int

# The guard. The lab's sliders multiply into runs of any size; these caps keep the largest a widget can ask for
# near a minute of CPU and well inside a laptop's memory. They are sized for the default MoEModelConfig
# (~0.5M parameters) on 2 CPU cores, which trains at about 15-35k tokens/s with eager / grouped_mm: 2**20 tokens
# is 30-70 s. A micro-batch of 4096 tokens keeps the activations the backward needs near 100 MiB for that model;
# batched_mm copies each pair's expert weights ([T*k, 2I, H]), about 800 MiB a layer at that size, and is
# ~50x slower, which is the trade-off it is there to show. A script that means a bigger run raises the fields.
MAX_TOKENS = 2 ** 20  # tokens one run may process, training and validation together
MAX_BATCH_TOKENS = 2 ** 12  # batch_size * seq_len of one micro-batch


@dataclass
class TrainingConfig(DictConfig):
    """The config of one `Trainer` run.

    steps: optimizer steps of the whole run (the schedule spans them).
    batch_size, seq_len: the shape [B, S] of one micro-batch.
    grad_accum: micro-batches per optimizer step; a step sees grad_accum * batch_size * seq_len tokens.
    lr, weight_decay, betas: AdamW's; weight decay applies to matrices only (not norms).
    warmup_steps: linear warmup to lr, then cosine decay to min_lr_ratio * lr (`warmup_cosine`).
    grad_clip: None, or the max global gradient norm (torch.nn.utils.clip_grad_norm_).
    seed: every step's data and global RNG are seeded from (seed, step, micro-batch).
    eval_every: validation loss every that many steps (and after the last one); 0 = after the last step only.
    eval_batches: validation batches of [batch_size, seq_len] per evaluation.
    checkpoint_every: save a checkpoint into checkpoint_dir every that many steps; 0 = never.
    checkpoint_dir: the folder periodic checkpoints go to (the latest overwrites the previous one).
    progress: show a tqdm progress bar.
    max_tokens, max_batch_tokens: the guard; a run over them is refused (see MAX_TOKENS, MAX_BATCH_TOKENS).
    """

    steps: int = 100
    batch_size: int = 8
    seq_len: int = 64
    grad_accum: int = 1
    lr: float = 3e-3
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    grad_clip: float | None = 1.0
    seed: int = 0
    eval_every: int = 0
    eval_batches: int = 4
    checkpoint_every: int = 0
    checkpoint_dir: str | None = None
    progress: bool = True
    max_tokens: int = MAX_TOKENS
    max_batch_tokens: int = MAX_BATCH_TOKENS

    def __post_init__(self) -> None:
        check_int("steps", self.steps, 1)
        check_int("batch_size", self.batch_size, 1)
        check_int("seq_len", self.seq_len, 2)  # the LM loss predicts token t + 1 from token t
        check_int("grad_accum", self.grad_accum, 1)
        check_float("lr", self.lr)
        check_float("weight_decay", self.weight_decay, inclusive=True)
        self.betas = tuple(self.betas) if isinstance(self.betas, (list, tuple)) else self.betas  # JSON gives a list
        if not isinstance(self.betas, tuple) or len(self.betas) != 2:
            raise ValueError(f"betas must be a pair (beta1, beta2), got {self.betas!r}")
        for i, beta in enumerate(self.betas):
            check_float(f"betas[{i}]", beta, inclusive=True)
            if beta >= 1:
                raise ValueError(f"betas[{i}] must be in [0, 1), got {beta!r}")
        check_int("warmup_steps", self.warmup_steps, 0, self.steps, "steps")
        check_float("min_lr_ratio", self.min_lr_ratio, inclusive=True)
        if self.min_lr_ratio > 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        if self.grad_clip is not None:
            check_float("grad_clip", self.grad_clip)
        check_int("seed", self.seed, 0, 2 ** 63 - 1)
        check_int("eval_every", self.eval_every, 0)
        check_int("eval_batches", self.eval_batches, 1)
        check_int("checkpoint_every", self.checkpoint_every, 0)
        if self.checkpoint_dir is not None and not isinstance(self.checkpoint_dir, str):
            raise ValueError(f"checkpoint_dir must be a str path or None, got {type(self.checkpoint_dir).__name__}")
        if self.checkpoint_every and self.checkpoint_dir is None:
            raise ValueError("checkpoint_dir must be set when checkpoint_every > 0 (where would they go?)")
        if not isinstance(self.progress, bool):
            raise ValueError(f"progress must be a bool, got {self.progress!r}")
        check_int("max_tokens", self.max_tokens, 1)
        check_int("max_batch_tokens", self.max_batch_tokens, 1)
        self._check_size()

    @property
    def tokens_per_step(self) -> int:
        return self.grad_accum * self.batch_size * self.seq_len

    @property
    def num_evals(self) -> int:
        """Validation passes of a whole run: every eval_every steps, plus the last step."""
        if not self.eval_every:
            return 1
        return self.steps // self.eval_every + (self.steps % self.eval_every != 0)

    @property
    def total_tokens(self) -> int:
        """Tokens a whole run processes: steps * grad_accum * batch_size * seq_len, plus the validation passes
        (counted like training tokens, a generous figure for a forward without backward)."""
        return self.steps * self.tokens_per_step + self.num_evals * self.eval_batches * self.batch_size * self.seq_len

    def _check_size(self) -> None:
        batch_tokens = self.batch_size * self.seq_len
        if batch_tokens > self.max_batch_tokens:
            raise ValueError(f"batch_size * seq_len = {self.batch_size} * {self.seq_len} = {batch_tokens} tokens per "
                             f"micro-batch is above max_batch_tokens = {self.max_batch_tokens}; use grad_accum for "
                             f"bigger steps")
        if self.total_tokens > self.max_tokens:
            raise ValueError(f"the run would process {self.total_tokens} tokens (steps * grad_accum * batch_size * "
                             f"seq_len = {self.steps} * {self.grad_accum} * {self.batch_size} * {self.seq_len}, plus "
                             f"{self.num_evals} validation passes), above max_tokens = {self.max_tokens}; ask for fewer "
                             f"steps, smaller batches or fewer validation batches")
