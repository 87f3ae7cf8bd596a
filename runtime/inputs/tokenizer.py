"""Prompt -> CLIP token ids, (N, 77) int64, padded with the end-of-text id as SD 1.5 does.

A trained text encoder reads the ids of its own vocabulary: the weights folder's `tokenizer/`
(vocab.json, merges.txt and the tokenizer's configs), loaded by transformers' CLIPTokenizer.
A folder whose text encoder is trained but has no tokenizer is refused
(WeightsSource.check), never tokenized some other way. A randomly initialised text encoder has
no vocabulary to be faithful to: `HashTokenizer` maps each lower-cased word and punctuation mark
to a stable id in the vocabulary, so different prompts give different ids and the same prompt
always gives the same ids, with CLIP's special ids and padding.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

from runtime.artifacts.weights import WeightsSource
from runtime.errors import InputError, WeightsError
from runtime.presets import Preset

MAX_PROMPT_CHARS = 2000
_WORDS = re.compile(r"[^\W\d_]+|\d|[^\w\s]", re.UNICODE)


class Tokenizer(Protocol):
    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        """(N, max_length) int64."""


def check_prompt(field: str, text: object) -> str:
    if not isinstance(text, str):
        raise InputError(field, "expected a string", type(text).__name__)
    if len(text) > MAX_PROMPT_CHARS:
        raise InputError(field, f"expected at most {MAX_PROMPT_CHARS} characters", len(text))
    bad = [c for c in text if unicodedata.category(c) in ("Cc", "Cs") and c not in "\t\n"]
    if bad:
        raise InputError(field, "must not contain control characters", repr(bad[0]))
    return text


class HashTokenizer:
    """Deterministic word-hash tokenizer for random-init presets (see module docstring)."""

    def __init__(self, vocab_size: int, max_length: int):
        self.vocab_size = vocab_size
        self.max_length = max_length
        self.bos, self.eos = vocab_size - 2, vocab_size - 1  # CLIP: 49406, 49407

    def _id(self, word: str) -> int:
        digest = hashlib.blake2b(word.encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") % (self.vocab_size - 2)

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        ids = np.full((len(texts), self.max_length), self.eos, dtype=np.int64)
        for row, text in enumerate(texts):
            words = [self._id(w) for w in _WORDS.findall(unicodedata.normalize("NFC", text).lower())]
            tokens = [self.bos, *words[: self.max_length - 2], self.eos]
            ids[row, : len(tokens)] = tokens
        return ids


class CLIPTokenizerFiles:
    """The real CLIP BPE tokenizer from a local folder (needs transformers).

    Loaded with `from_pretrained(folder)`: under transformers 5 the constructor's `vocab_file` /
    `merges_file` keywords are ignored (a 2-token vocabulary: every prompt the same ids)."""

    def __init__(self, folder: Path, max_length: int):
        try:
            from transformers import CLIPTokenizer
        except ImportError as e:
            raise WeightsError(f"{folder}: reading a CLIP tokenizer needs transformers: pip install 'adgen[export]'") from e
        self.tokenizer = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
        vocabulary = len(self.tokenizer)
        if vocabulary <= len(self.tokenizer.all_special_tokens):
            raise WeightsError(f"{folder}: the tokenizer loaded with {vocabulary} tokens: vocab.json and merges.txt unread")
        self.max_length = max_length

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        encoded = self.tokenizer(
            list(texts), padding="max_length", max_length=self.max_length, truncation=True, return_tensors="np"
        )
        return encoded["input_ids"].astype(np.int64)


def load_tokenizer(preset: Preset, weights: WeightsSource) -> Tokenizer:
    """The weights folder's CLIP tokenizer when its text encoder is trained, else the hash tokenizer."""
    folder = weights.tokenizer_folder()
    if folder is None:
        return HashTokenizer(preset.text.vocab_size, preset.text.max_length)
    return CLIPTokenizerFiles(folder, preset.text.max_length)


def describe_tokenizer(tokenizer: Tokenizer) -> str:
    """For the report: which tokenizer turned the prompts into ids."""
    if isinstance(tokenizer, CLIPTokenizerFiles):
        return f"CLIP BPE ({len(tokenizer.tokenizer)} tokens)"
    return "hash tokenizer (random-init text encoder: no vocabulary)"
