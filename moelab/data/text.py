"""Real English text that ships with moelab: the frozen Python help() pages, read as bytes.

corpus/python_docs.txt is made by scripts/freeze_corpus.py from `pydoc_data.topics` of CPython 3.11.7 (that
text changes between patch releases, so it is frozen rather than read from the running Python), under the PSF
License (corpus/LICENSE-PSF.txt). It is printable ASCII and newlines, so one byte is one character. Its SHA-256
is checked on every load: every machine trains on the same bytes.
"""

from __future__ import annotations

import functools
import hashlib
from importlib import resources

import numpy as np
import torch

from ..core.config import check_float, check_int
from .batches import Batch, TokenDataset

CORPUS_FILE = "corpus/python_docs.txt"
CORPUS_SHA256 = "6aa20b0abdb629d2695505f08d552a000a425c3f57c006f2d20a594c51222139"
CORPUS_BYTES = 375_815


class ByteTokenizer:
    """Text to its UTF-8 bytes and back: V = 256, no training, no unknown token."""

    vocab_size = 256

    def encode(self, text: str) -> torch.Tensor:
        """[N] int64, N the number of UTF-8 bytes of `text`."""
        if not isinstance(text, str):
            raise ValueError(f"text must be a str, got {type(text).__name__}")
        return torch.from_numpy(np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64))

    def decode(self, ids) -> str:
        """The text of byte ids [N] (a tensor or a list of ints in [0, 256)); bad UTF-8 becomes U+FFFD."""
        ids = ids if isinstance(ids, torch.Tensor) else torch.as_tensor(ids, dtype=torch.int64)
        if ids.dim() != 1 or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise ValueError(f"ids must be a 1-D tensor of integer byte ids, got {ids.dtype} of shape "
                             f"{tuple(ids.shape)}")
        if ids.numel() and (ids.min() < 0 or ids.max() > 255):
            raise ValueError(f"ids must be byte ids in [0, 256), got values in [{ids.min()}, {ids.max()}]")
        return bytes(ids.to(torch.uint8).cpu().numpy()).decode("utf-8", errors="replace")


@functools.lru_cache(maxsize=1)
def corpus_bytes() -> bytes:
    """The frozen corpus, after checking it is the committed file (ValueError otherwise)."""
    data = resources.files(__package__).joinpath(CORPUS_FILE).read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != CORPUS_SHA256:
        raise ValueError(f"moelab/data/{CORPUS_FILE} was changed: its SHA-256 is {digest}, expected {CORPUS_SHA256} "
                         f"({len(data)} bytes, expected {CORPUS_BYTES}); restore it from git or re-run "
                         "scripts/freeze_corpus.py and update CORPUS_SHA256")
    return data


class TextCorpus(TokenDataset):
    """Random windows of a byte string: the first bytes are "train", the last `validation_fraction` "validation".

    The validation split is the last floor(N * validation_fraction) bytes, the train split all bytes before it:
    disjoint, together the whole text, and no window crosses from one into the other.
    """

    num_topics = None

    def __init__(self, data: bytes, validation_fraction: float = 0.1, name: str = "text"):
        if not isinstance(data, (bytes, bytearray)):
            raise ValueError(f"data must be bytes, got {type(data).__name__}")
        check_float("validation_fraction", validation_fraction)
        num_validation = int(len(data) * validation_fraction)
        if validation_fraction >= 1 or not 1 <= num_validation < len(data):
            raise ValueError(f"validation_fraction must be in (0, 1) and leave both splits non-empty for "
                             f"{len(data)} bytes, got {validation_fraction!r}")
        self.name, self.vocab_size, self.tokenizer = name, 256, ByteTokenizer()
        ids = torch.from_numpy(np.frombuffer(bytes(data), dtype=np.uint8).astype(np.int64))  # [N]
        self.train_ids = ids[:len(data) - num_validation]  # [N_train]
        self.validation_ids = ids[len(data) - num_validation:]  # [N_validation]

    def _sample(self, split: str, batch_size: int, seq_len: int, generator: torch.Generator) -> Batch:
        ids = self.train_ids if split == "train" else self.validation_ids
        check_int("seq_len", seq_len, 1, len(ids), f"the length of the {split} split")
        starts = torch.randint(0, len(ids) - seq_len + 1, (batch_size, 1), generator=generator)  # [B, 1]
        return Batch(ids[starts + torch.arange(seq_len)], None)  # [B, S]


def text_corpus(validation_fraction: float = 0.1) -> TextCorpus:
    """The frozen Python documentation as a `TextCorpus` of bytes (V = 256, no topics)."""
    return TextCorpus(corpus_bytes(), validation_fraction, name="python_docs")
