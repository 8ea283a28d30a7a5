"""Write moelab/data/corpus/python_docs.txt, the English corpus `moelab.data.text_corpus` trains on.

    .venv/bin/python scripts/freeze_corpus.py            # writes the file, prints its size and SHA-256

The text is `pydoc_data.topics.topics` (the help() pages of the Python documentation). It differs between
Python patch releases, so it is frozen in the repository instead of read at run time; the committed file was
made with CPython 3.11.7 (see moelab/data/corpus/LICENSE-PSF.txt). The recipe:

1. the topic texts in sorted key order, joined by "\\n" (each ends with one, so a blank line separates them);
2. typographic characters made ASCII by `ASCII_FOR` (curly quotes, dashes, ...), then every character that is
   not printable ASCII or "\\n" dropped, so one byte is one character;
3. whole topics kept while the file stays within `MAX_BYTES` (the repository stays small).

After re-freezing, put the printed SHA-256 into `CORPUS_SHA256` in moelab/data/text.py.
"""

from __future__ import annotations

import hashlib
import platform
from pathlib import Path

import pydoc_data.topics

OUT = Path(__file__).resolve().parent.parent / "moelab" / "data" / "corpus" / "python_docs.txt"
MAX_BYTES = 400_000
ASCII_FOR = {"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"', "\u2013": "-", "\u2014": "--",
             "\u2026": "...", "\u00df": "ss", "\u00b0": " degrees"}


def ascii_text(text: str) -> str:
    text = "".join(ASCII_FOR.get(c, c) for c in text)
    return "".join(c for c in text if c == "\n" or " " <= c <= "~")


def corpus() -> str:
    kept, size = [], -1  # n topics take n - 1 separators
    for key in sorted(pydoc_data.topics.topics):
        topic = ascii_text(pydoc_data.topics.topics[key])
        if size + 1 + len(topic) > MAX_BYTES:
            break  # whole topics only: a cut never falls inside one
        kept.append(topic)
        size += 1 + len(topic)
    return "\n".join(kept)


def main() -> None:
    data = corpus().encode("ascii")
    OUT.write_bytes(data)
    print(f"{OUT}: {len(data)} bytes from Python {platform.python_version()}")
    print(f"sha256 {hashlib.sha256(data).hexdigest()}")


if __name__ == "__main__":
    main()
