"""A CLIP BPE vocabulary in the real file format (vocab.json + merges.txt), small enough to write
in a test: the 512 byte-level symbols (with and without `</w>`), one merge chain per word making
the whole word one token, then the two special tokens, as OpenAI's and Hugging Face's files are
laid out. Torch-free."""

from __future__ import annotations

import json
from pathlib import Path

WORDS = ("a", "sneaker", "on", "wooden", "table", "red", "blue", "studio", "photo", "of", "soft", "light", ",")
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def byte_symbols() -> list[str]:
    """GPT-2/CLIP's byte -> printable unicode map, in CLIP's vocabulary order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]  # mapped past 255, in byte order
    return [chr(c) for c in (*printable, *(256 + i for i in range(len(others))))]


def merge_chain(word: str) -> list[tuple[str, str]]:
    """The merges that join `word` left to right into one `word</w>` token."""
    pieces = [*word[:-1], word[-1] + "</w>"]
    merges, joined = [], pieces[0]
    for piece in pieces[1:]:
        merges.append((joined, piece))
        joined += piece
    return merges


def write_vocabulary(folder: Path, words: tuple[str, ...] = WORDS) -> dict[str, int]:
    """Write vocab.json and merges.txt (and the tokenizer's config) into `folder`; returns the vocabulary."""
    folder.mkdir(parents=True, exist_ok=True)
    symbols = byte_symbols()
    merges = list(dict.fromkeys(m for word in words for m in merge_chain(word)))
    tokens = [*symbols, *(s + "</w>" for s in symbols), *("".join(m) for m in merges), BOS, EOS]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(tokens))}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77, "tokenizer_class": "CLIPTokenizer"}))
    return vocab
