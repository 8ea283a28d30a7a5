"""`Batch`, the tokens of one training step, and `TokenDataset`, what every dataset of the lab implements."""

from __future__ import annotations

import abc
from dataclasses import dataclass

import torch

from ..core.config import check_int

SPLITS = ("train", "validation")
# The most tokens one call makes. Each token costs a few int64/float64 words while a batch is drawn (ids, topics,
# uniforms, indices: about 32 bytes), so the cap keeps one call near half a GiB whatever the arguments.
MAX_TOKENS = 2 ** 24


@dataclass
class Batch:
    """The token ids of one step and, for planted data, the topic that generated each token."""

    input_ids: torch.Tensor  # [B, S] int64
    topics: torch.Tensor | None  # [B, S] int64 ground-truth topic per token, or None (real text has none)

    def to(self, device) -> Batch:
        return Batch(self.input_ids.to(device), None if self.topics is None else self.topics.to(device))


def check_split(split) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def check_tokens(name: str, num_tokens: int) -> None:
    """ValueError unless `num_tokens` (the product `name` spells out) is within `MAX_TOKENS`."""
    if num_tokens > MAX_TOKENS:
        raise ValueError(f"{name} = {num_tokens} tokens is above the cap of MAX_TOKENS = 2**24 = {MAX_TOKENS}; "
                         "ask for fewer or smaller batches")


class TokenDataset(abc.ABC):
    """Token sequences in a "train" and a "validation" split, drawn from a generator the caller owns.

    vocab_size: V, token ids are in [0, V). num_topics: the number of planted topics, or None (real text).
    name: a short label for plots and logs. Batches are made on the CPU; `Batch.to` moves one.
    """

    vocab_size: int
    num_topics: int | None
    name: str

    def sample(self, split: str, batch_size: int, seq_len: int, generator: torch.Generator) -> Batch:
        """`batch_size` sequences of `seq_len` tokens from `split`, every random choice drawn from `generator`.

        Nothing else is random, so a trainer that seeds a generator from (seed, step) gets each step's batch back.
        """
        check_split(split)
        check_int("batch_size", batch_size, 1)
        check_int("seq_len", seq_len, 1)
        check_tokens("batch_size * seq_len", batch_size * seq_len)
        if not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
            raise ValueError(f"generator must be a CPU torch.Generator (batches are made on the CPU), "
                             f"got {generator!r}")
        return self._sample(split, batch_size, seq_len, generator)

    def validation_batches(self, batch_size: int, seq_len: int, num_batches: int, seed: int = 0) -> list[Batch]:
        """`num_batches` validation batches from a generator seeded with `seed`: the same list every call."""
        check_int("batch_size", batch_size, 1)
        check_int("seq_len", seq_len, 1)
        check_int("num_batches", num_batches, 1)
        check_int("seed", seed, 0, 2 ** 63 - 1)
        check_tokens("num_batches * batch_size * seq_len", num_batches * batch_size * seq_len)
        generator = torch.Generator().manual_seed(seed)
        return [self.sample("validation", batch_size, seq_len, generator) for _ in range(num_batches)]

    @abc.abstractmethod
    def _sample(self, split: str, batch_size: int, seq_len: int, generator: torch.Generator) -> Batch:
        """`sample` after its arguments were checked."""
