"""moelab.data: planted samples follow their generators, labels follow segments, batches replay from a seed, the
frozen corpus is the committed bytes and splits cleanly, the tokenizer round-trips, bad arguments are named."""

import hashlib
import importlib.util
import math
import platform
import tomllib
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import moelab.data
from moelab.data import MAX_TOKENS, Batch, ByteTokenizer, PlantedTopics, TokenDataset, planted_topics, text_corpus
from moelab.data import text as text_module

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "moelab" / "data" / "corpus" / "python_docs.txt"


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def assert_frequencies_match(counts: torch.Tensor, probs: torch.Tensor) -> None:
    """Observed counts [V] of n draws against probabilities [V]: every cell within 5 binomial sigmas."""
    n = counts.sum().item()
    expected = probs * n
    sigma = (n * probs * (1 - probs)).sqrt()
    assert ((counts.double() - expected).abs() <= 5 * sigma + 2).all(), (counts, expected)


def runs(row: torch.Tensor) -> list[tuple[int, int]]:
    """(value, length) of each run of equal values in a 1-D tensor."""
    values, lengths = torch.unique_consecutive(row, return_counts=True)
    return list(zip(values.tolist(), lengths.tolist()))


# ------------------------------------------------------------------------------------------------ planted topics
def test_unigram_tokens_follow_their_topics_distribution_and_topics_are_distinguishable():
    data = planted_topics(4, 32, kind="unigram", seed=1)
    batch = data.sample("train", 64, 512, gen(0))
    probs = data.topic_distributions  # [K, V]
    assert probs.shape == (4, 32) and data.transitions is None
    for k in range(4):
        counts = torch.bincount(batch.input_ids[batch.topics == k], minlength=32)
        assert counts.sum() > 5000  # topics are about equally frequent: ~8k tokens each
        assert_frequencies_match(counts, probs[k])
        empirical = counts.double() / counts.sum()
        for j in range(4):  # another topic's distribution is far from this topic's tokens
            if j != k:
                assert 0.5 * (empirical - probs[j]).abs().sum() > 0.3


def test_markov_transition_frequencies_follow_the_topics_chain():
    data = planted_topics(2, 16, kind="markov", seed=2)
    batch = data.sample("train", 64, 512, gen(0))
    assert data.transitions.shape == (2, 16, 16) and data.topic_distributions is None
    prev, nxt, topic = batch.input_ids[:, :-1], batch.input_ids[:, 1:], batch.topics[:, 1:]  # the chain of `nxt`
    counts = torch.bincount(((topic * 16 + prev) * 16 + nxt).reshape(-1), minlength=2 * 16 * 16).reshape(2, 16, 16)
    tested = 0
    for k in range(2):
        for a in range(16):
            if counts[k, a].sum() >= 200:
                assert_frequencies_match(counts[k, a], data.transitions[k, a])
                tested += 1
    assert tested >= 12  # peaked chains visit only some states often; enough rows are checked


@pytest.mark.parametrize("kind", ["unigram", "markov"])
def test_hand_made_topics_on_disjoint_halves_put_every_token_in_its_labels_half(kind):
    # topic 0 only emits ids in [0, 8), topic 1 only in [8, 16): the labels must match the tokens exactly
    half = torch.zeros(2, 16, dtype=torch.float64)
    half[0, :8], half[1, 8:] = 1 / 8, 1 / 8
    distributions = half if kind == "unigram" else half[:, None, :].expand(2, 16, 16).clone()
    data = PlantedTopics(kind, distributions, segment_length=(3, 7))
    batch = data.sample("train", 16, 200, gen(3))
    tail = slice(1, None) if kind == "markov" else slice(None)  # a chain's first token is uniform
    assert torch.equal((batch.input_ids[:, tail] >= 8).long(), batch.topics[:, tail])


def test_topics_are_constant_over_segments_of_the_given_lengths_and_change_at_each_boundary():
    data = planted_topics(3, 16, kind="unigram", segment_length=(5, 9), seed=0)
    batch = data.sample("validation", 32, 300, gen(1))
    assert batch.topics.min() >= 0 and batch.topics.max() < 3
    first_lengths = set()
    for row in batch.topics:
        segments = runs(row)
        assert all(a != b for (a, _), (b, _) in zip(segments, segments[1:]))
        assert all(5 <= n <= 9 for _, n in segments[1:-1]), segments
        assert 1 <= segments[0][1] <= 9 and 1 <= segments[-1][1] <= 9
        first_lengths.add(segments[0][1])
    assert min(first_lengths) < 5  # the first segment starts at a random phase
    shares = torch.bincount(batch.topics.reshape(-1), minlength=3) / batch.topics.numel()
    assert (shares - 1 / 3).abs().max() < 0.05


def test_one_topic_labels_everything_zero():
    batch = planted_topics(1, 8, seed=0).sample("train", 4, 50, gen(0))
    assert (batch.topics == 0).all()


def test_the_seed_fixes_the_generators():
    a, b = planted_topics(seed=5), planted_topics(seed=5)
    assert torch.equal(a.transitions, b.transitions)
    assert not torch.equal(a.transitions, planted_topics(seed=6).transitions)


# ------------------------------------------------------------------------------------------------ the interface
DATASETS = {
    "markov": lambda: planted_topics(4, 64, kind="markov"),
    "unigram": lambda: planted_topics(4, 64, kind="unigram"),
    "text": lambda: text_corpus(),
}


@pytest.mark.parametrize("which", sorted(DATASETS))
def test_a_batch_is_int64_ids_in_the_vocab_and_replays_from_its_generator_seed(which):
    data = DATASETS[which]()
    assert isinstance(data, TokenDataset) and isinstance(data.name, str) and data.name
    batch = data.sample("train", 8, 64, gen(7))
    assert isinstance(batch, Batch) and batch.input_ids.shape == (8, 64) and batch.input_ids.dtype == torch.int64
    assert 0 <= batch.input_ids.min() and batch.input_ids.max() < data.vocab_size
    if data.num_topics is None:
        assert batch.topics is None
    else:
        assert batch.topics.shape == (8, 64) and batch.topics.dtype == torch.int64
    again = data.sample("train", 8, 64, gen(7))
    assert torch.equal(batch.input_ids, again.input_ids)
    assert batch.topics is None or torch.equal(batch.topics, again.topics)
    assert not torch.equal(batch.input_ids, data.sample("train", 8, 64, gen(8)).input_ids)
    # the same generator state gives the two splits different tokens
    assert not torch.equal(batch.input_ids, data.sample("validation", 8, 64, gen(7)).input_ids)


@pytest.mark.parametrize("which", sorted(DATASETS))
def test_validation_batches_are_the_same_every_call_and_depend_on_the_seed(which):
    data = DATASETS[which]()
    first = data.validation_batches(4, 32, 3)
    second = DATASETS[which]().validation_batches(4, 32, 3)  # a fresh dataset object too
    assert len(first) == 3
    for a, b in zip(first, second):
        assert torch.equal(a.input_ids, b.input_ids)
    assert not torch.equal(first[0].input_ids, first[1].input_ids)
    assert not torch.equal(first[0].input_ids, data.validation_batches(4, 32, 3, seed=1)[0].input_ids)


def test_batch_to_moves_both_tensors():
    batch = planted_topics().sample("train", 2, 8, gen(0)).to("cpu")
    assert batch.input_ids.device.type == "cpu" and batch.topics.device.type == "cpu"
    assert Batch(torch.zeros(1, 2, dtype=torch.long), None).to("cpu").topics is None


# ------------------------------------------------------------------------------------------------ the corpus
def test_the_corpus_file_is_the_frozen_printable_ascii_one():
    data = CORPUS.read_bytes()
    assert hashlib.sha256(data).hexdigest() == text_module.CORPUS_SHA256
    assert len(data) == text_module.CORPUS_BYTES and 300_000 < len(data) <= 400_000
    assert all(b == 10 or 32 <= b <= 126 for b in set(data))
    assert text_module.corpus_bytes() == data
    assert (CORPUS.parent / "LICENSE-PSF.txt").read_text().count("PYTHON SOFTWARE FOUNDATION LICENSE VERSION 2") == 1


@pytest.mark.skipif(platform.python_version() != "3.11.7", reason="the corpus was frozen from CPython 3.11.7")
def test_the_freeze_script_remakes_the_file():
    spec = importlib.util.spec_from_file_location("freeze_corpus", ROOT / "scripts" / "freeze_corpus.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.corpus().encode("ascii") == CORPUS.read_bytes()


def test_a_changed_corpus_is_refused(monkeypatch):
    monkeypatch.setattr(text_module, "CORPUS_SHA256", "0" * 64)
    with pytest.raises(ValueError, match="was changed"):
        text_module.corpus_bytes.__wrapped__()  # the cached copy was checked against the real digest


def test_the_corpus_ships_in_the_wheel():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "corpus/*.txt" in config["tool"]["setuptools"]["package-data"]["moelab.data"]


@pytest.mark.parametrize("fraction", [0.1, 0.25])
def test_the_split_is_disjoint_covers_the_file_and_validation_is_the_tail(fraction):
    data = CORPUS.read_bytes()
    corpus = text_corpus(fraction)
    train, validation = bytes(corpus.train_ids.tolist()), bytes(corpus.validation_ids.tolist())
    assert train + validation == data
    assert len(validation) == math.floor(len(data) * fraction)


def test_text_windows_are_substrings_of_their_split():
    corpus = text_corpus()
    train, validation = bytes(corpus.train_ids.tolist()), bytes(corpus.validation_ids.tolist())
    for split, source in (("train", train), ("validation", validation)):
        for row in corpus.sample(split, 16, 100, gen(0)).input_ids:
            assert bytes(row.tolist()) in source
    whole = corpus.sample("validation", 3, len(validation), gen(0)).input_ids  # seq_len may be the whole split
    assert all(bytes(row.tolist()) == validation for row in whole)


# ------------------------------------------------------------------------------------------------ the tokenizer
@settings(max_examples=200, deadline=None)
@given(st.text())
def test_the_tokenizer_round_trips_any_text(text):
    tokenizer = ByteTokenizer()
    ids = tokenizer.encode(text)
    assert ids.dtype == torch.int64 and ids.tolist() == list(text.encode("utf-8"))
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode(ids.tolist()) == text


def test_decode_replaces_invalid_utf8_and_vocab_is_256():
    tokenizer = ByteTokenizer()
    assert tokenizer.vocab_size == 256 and text_corpus().vocab_size == 256
    assert tokenizer.decode(torch.tensor([104, 0xFF, 105])) == "h\ufffdi"
    assert tokenizer.decode(tokenizer.encode("ü")[:1]) == "\ufffd"  # half a character
    assert tokenizer.encode("").shape == (0,) and tokenizer.decode([]) == ""


# ------------------------------------------------------------------------------------------------ bad arguments
PLANTED = planted_topics()
TEXT = text_corpus()
BAD = [
    ("split", lambda: PLANTED.sample("test", 2, 8, gen(0))),
    ("batch_size", lambda: PLANTED.sample("train", 0, 8, gen(0))),
    ("batch_size", lambda: PLANTED.sample("train", True, 8, gen(0))),
    ("seq_len", lambda: PLANTED.sample("train", 2, 0, gen(0))),
    ("seq_len", lambda: TEXT.sample("validation", 1, len(TEXT.validation_ids) + 1, gen(0))),
    ("generator", lambda: PLANTED.sample("train", 2, 8, None)),
    ("generator", lambda: TEXT.sample("train", 2, 8, 0)),
    ("num_batches", lambda: PLANTED.validation_batches(2, 8, 0)),
    ("seed", lambda: PLANTED.validation_batches(2, 8, 1, seed=-1)),
    ("num_topics", lambda: planted_topics(0)),
    ("vocab_size", lambda: planted_topics(4, 1)),
    ("kind", lambda: planted_topics(kind="bigram")),
    ("segment_length", lambda: planted_topics(segment_length=(0, 4))),
    ("segment_length", lambda: planted_topics(segment_length=(5, 4))),
    ("segment_length", lambda: planted_topics(segment_length=8)),
    ("concentration", lambda: planted_topics(concentration=0)),
    ("concentration", lambda: planted_topics(concentration=float("nan"))),
    ("seed", lambda: planted_topics(seed=1.5)),
    ("distributions", lambda: PlantedTopics("unigram", torch.ones(2, 4))),
    ("distributions", lambda: PlantedTopics("markov", torch.full((2, 4), 0.25))),
    ("validation_fraction", lambda: text_corpus(0)),
    ("validation_fraction", lambda: text_corpus(1.0)),
    ("validation_fraction", lambda: text_corpus(1e-9)),
    ("ids", lambda: ByteTokenizer().decode([104, 300])),
    ("ids", lambda: ByteTokenizer().decode(torch.tensor([1.0]))),
    ("text", lambda: ByteTokenizer().encode(b"bytes")),
]


@pytest.mark.parametrize("name, call", BAD, ids=[f"{name}-{i}" for i, (name, _) in enumerate(BAD)])
def test_bad_arguments_raise_a_value_error_naming_them(name, call):
    with pytest.raises(ValueError, match=name):
        call()


def test_the_memory_caps_fire_before_anything_is_allocated():
    assert MAX_TOKENS == 2 ** 24
    with pytest.raises(ValueError, match=r"batch_size \* seq_len = 33554432 tokens is above the cap"):
        PLANTED.sample("train", 2 ** 13, 2 ** 12, gen(0))
    with pytest.raises(ValueError, match=r"num_batches \* batch_size \* seq_len"):
        TEXT.validation_batches(1024, 1024, 32)
    with pytest.raises(ValueError, match="MAX_TABLE"):
        planted_topics(2, 4096, kind="markov")  # 2 * 4096**2 = 2**25 transition entries
    assert planted_topics(2, 4096, kind="unigram").vocab_size == 4096  # [K, V] is small


def test_the_package_exports():
    assert set(moelab.data.__all__) >= {"Batch", "TokenDataset", "planted_topics", "PlantedTopics", "ByteTokenizer",
                                        "text_corpus", "TextCorpus"}
    assert moelab.data.__doc__.startswith("moelab.data") and "import" in moelab.data.__doc__.lower()
