"""Planted topics: token sequences whose every token comes from one of K known generators.

Why: on real text nobody knows which tokens "belong together", so whether experts specialise is a matter of
taste. Here each token carries the topic that generated it (`Batch.topics`), so specialisation becomes a number,
e.g. the normalised mutual information between the expert a token is routed to and its topic.

A sequence is a run of segments. Each segment has a length drawn uniformly from `segment_length` and one topic;
the first topic is uniform, each next one uniform over the other K - 1 (so every segment boundary is a topic
change and the topics stay equally frequent). The first segment starts at a random phase, so position 0 is not
always a boundary. Within a segment the tokens follow that topic's generator:

- kind="unigram": topic k is a categorical `topic_distributions[k]` [V] over the shared vocabulary;
- kind="markov": topic k is a first-order Markov chain, `transitions[k, a, b]` = P(next = b | previous = a);
  the previous token may come from the segment before, and a sequence's first token is uniform over V.

`planted_topics` draws the generators from a Dirichlet(concentration) (numpy, seeded): a small concentration
gives peaked rows, so topics overlap a little but are told apart easily.
"""

from __future__ import annotations

import numpy as np
import torch

from ..core.config import check_float, check_int
from .batches import SPLITS, Batch, TokenDataset

KINDS = ("unigram", "markov")
MAX_TOPICS = 1024
MAX_VOCAB = 2 ** 16
MAX_TABLE = 2 ** 24  # float64 entries of the generator tables (and again of their CDFs): 128 MiB each at most


def _check_segment_length(segment_length) -> tuple[int, int]:
    ok = isinstance(segment_length, (tuple, list)) and len(segment_length) == 2 and all(
        isinstance(n, int) and not isinstance(n, bool) for n in segment_length)
    if not ok or not 1 <= segment_length[0] <= segment_length[1] <= 2 ** 20:
        raise ValueError(f"segment_length must be a (min, max) pair of ints with 1 <= min <= max <= 2**20, got "
                         f"{segment_length!r}")
    return int(segment_length[0]), int(segment_length[1])


def _flat_cdf(rows: torch.Tensor) -> torch.Tensor:
    """Row r's CDF shifted up by r, all rows in one increasing [R * V] vector (rows [R, V] sum to 1).

    Then one `searchsorted` draws a token from a different row for every position: look up r + u. float64 keeps
    the shift's rounding below 1e-10 of probability for R up to MAX_TABLE.
    """
    offsets = torch.arange(rows.shape[0], dtype=torch.float64)[:, None]  # [R, 1]
    return (rows.cumsum(-1) + offsets).reshape(-1)


def _draw(flat_cdf: torch.Tensor, row: torch.Tensor, u: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """A token id per entry of `row` (which CDF) and `u` (a uniform in [0, 1)), both the same shape."""
    index = torch.searchsorted(flat_cdf, row.double() + u, right=True) - row * vocab_size
    return index.clamp_(0, vocab_size - 1)  # rounding at a row's end must not spill into the next row


def _split_generator(generator: torch.Generator, split: str) -> torch.Generator:
    # One draw from the caller's generator seeds the stream and the split picks one of two streams from it, so a
    # generator in a given state never gives the same tokens to "train" and "validation".
    seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator))
    return torch.Generator().manual_seed(2 * seed + SPLITS.index(split))


class PlantedTopics(TokenDataset):
    """A `TokenDataset` of segments from K known generators (see the module docstring).

    kind: "unigram" or "markov". distributions: the topic distributions [K, V] (unigram) or the transition
    matrices [K, V, V] (markov), float64 rows that sum to 1. segment_length: (min, max) tokens of a segment.
    """

    def __init__(self, kind: str, distributions: torch.Tensor, segment_length=(16, 64), name: str = "planted"):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        dims = 2 if kind == "unigram" else 3
        if not isinstance(distributions, torch.Tensor) or distributions.dim() != dims or (
                dims == 3 and distributions.shape[1] != distributions.shape[2]):
            shape = "[K, V]" if dims == 2 else "[K, V, V]"
            got = tuple(distributions.shape) if isinstance(distributions, torch.Tensor) else type(distributions)
            raise ValueError(f"distributions must be a {shape} tensor for kind={kind!r}, got {got}")
        num_topics, vocab_size = distributions.shape[0], distributions.shape[-1]
        check_int("num_topics", num_topics, 1, MAX_TOPICS)
        check_int("vocab_size", vocab_size, 2, MAX_VOCAB)
        if distributions.numel() > MAX_TABLE:
            raise ValueError(f"distributions has {distributions.numel()} entries, above MAX_TABLE = 2**24; use fewer "
                             "topics or a smaller vocab_size")
        distributions = distributions.detach().to("cpu", torch.float64)
        if not (torch.isfinite(distributions).all() and (distributions >= 0).all()
                and torch.allclose(distributions.sum(-1), torch.ones((), dtype=torch.float64), atol=1e-6)):
            raise ValueError("distributions must be finite and non-negative, each row summing to 1")
        self.kind, self.name = kind, name
        self.num_topics, self.vocab_size = num_topics, vocab_size
        self.segment_length = _check_segment_length(segment_length)
        self.topic_distributions = distributions if kind == "unigram" else None  # [K, V]
        self.transitions = distributions if kind == "markov" else None  # [K, V, V]
        self._cdf = _flat_cdf(distributions.reshape(-1, vocab_size))  # [K * V] or [K * V * V]

    def _sample(self, split: str, batch_size: int, seq_len: int, generator: torch.Generator) -> Batch:
        generator = _split_generator(generator, split)
        topics = self._topics(batch_size, seq_len, generator)  # [B, S]
        u = torch.rand(batch_size, seq_len, dtype=torch.float64, generator=generator)  # [B, S]
        if self.kind == "unigram":
            return Batch(_draw(self._cdf, topics, u, self.vocab_size), topics)
        ids = torch.empty(batch_size, seq_len, dtype=torch.int64)  # [B, S]
        ids[:, 0] = torch.randint(0, self.vocab_size, (batch_size,), generator=generator)
        rows = topics * self.vocab_size  # [B, S] + the previous token: the transition row of each position
        for s in range(1, seq_len):  # a Markov chain is sequential in S; each step is vectorised over B
            ids[:, s] = _draw(self._cdf, rows[:, s] + ids[:, s - 1], u[:, s], self.vocab_size)
        return Batch(ids, topics)

    def _topics(self, batch_size: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
        """The topic of every position [B, S], constant over each segment."""
        low, high = self.segment_length
        num_segments = seq_len // low + 2  # enough to reach position S - 1 even after the first one is cut short
        lengths = torch.randint(low, high + 1, (batch_size, num_segments), generator=generator)  # [B, M]
        phase = (torch.rand(batch_size, generator=generator) * lengths[:, 0]).long()  # [B] in [0, first length)
        ends = lengths.cumsum(1) - phase[:, None]  # [B, M] the position after each segment, increasing
        k = self.num_topics
        steps = torch.randint(1, max(k, 2), (batch_size, num_segments), generator=generator)  # [B, M] in [1, K)
        steps[:, 0] = torch.randint(0, k, (batch_size,), generator=generator)
        segment_topic = steps.cumsum(1) % k  # [B, M], a step of 1..K-1 mod K never repeats the topic
        positions = torch.arange(seq_len).expand(batch_size, seq_len)  # [B, S]
        segment = torch.searchsorted(ends, positions.contiguous(), right=True)  # [B, S] the segment of a position
        return segment_topic.gather(1, segment)


def planted_topics(num_topics: int = 4, vocab_size: int = 64, *, kind: str = "markov", segment_length=(16, 64),
                   concentration: float = 0.1, seed: int = 0) -> PlantedTopics:
    """K = `num_topics` topics over a vocabulary of V = `vocab_size`, each drawn from Dirichlet(`concentration`).

    kind="unigram": a [K, V] table of topic distributions; kind="markov": K transition matrices [K, V, V], one
    Dirichlet row per previous token. `seed` fixes the generators; batches are random only in `sample`'s
    generator. With K = 1 every token has topic 0.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    check_int("num_topics", num_topics, 1, MAX_TOPICS)
    check_int("vocab_size", vocab_size, 2, MAX_VOCAB)
    check_float("concentration", concentration)
    check_int("seed", seed, 0, 2 ** 63 - 1)
    shape = (num_topics, vocab_size) if kind == "unigram" else (num_topics, vocab_size, vocab_size)
    if int(np.prod(shape)) > MAX_TABLE:
        raise ValueError(f"num_topics * vocab_size{' * vocab_size' if kind == 'markov' else ''} = {np.prod(shape)} "
                         f"is above MAX_TABLE = 2**24 generator entries; use fewer topics or a smaller vocab_size")
    rows = np.random.default_rng(seed).dirichlet(np.full(vocab_size, float(concentration)), size=shape[:-1])
    name = f"planted-{kind}-K{num_topics}-V{vocab_size}-seed{seed}"
    return PlantedTopics(kind, torch.from_numpy(rows), segment_length=segment_length, name=name)
