"""moelab.data: the data of the training lab, all of it in the repository (nothing is downloaded).

- `batches`: `Batch` (token ids [B, S], and the topic of each token where one is known) and `TokenDataset`, what
  every dataset implements: `sample(split, batch_size, seq_len, generator)`, `validation_batches(...)`;
- `planted`: `planted_topics`, sequences from K known generators (unigram or Markov), labelled per token, so
  expert specialisation can be measured against the truth;
- `text`: `text_corpus`, real English (the Python docs, frozen in corpus/), and `ByteTokenizer` (V = 256).

Dimension letters as in `moelab.core`, except S, which here is the positions of a sequence (seq_len; a model
forward calls them N). Imports torch, numpy, the standard library and `moelab.core` only.
"""

from .batches import MAX_TOKENS, Batch, TokenDataset
from .planted import PlantedTopics, planted_topics
from .text import ByteTokenizer, TextCorpus, text_corpus

__all__ = ["Batch", "TokenDataset", "MAX_TOKENS", "PlantedTopics", "planted_topics", "ByteTokenizer", "TextCorpus",
           "text_corpus"]
