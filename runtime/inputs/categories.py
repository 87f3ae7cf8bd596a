"""Product categories for the background pipeline: the words of its prompt, and where those
words sit among the prompt's tokens.

The category-common prompt is "a photo of C in the background of D": C the product's class
noun, D the category's identifier, a rare word that training binds to the category's common
background style. The table ships in `runtime/data/categories.json`; a user file of the same
shape extends it, and its entries replace built-in ones of the same name:

    {"sneakers": {"noun": "sneakers", "identifier": "sks"}, "kettle": {"noun": "electric kettle", "identifier": "qvw"}}

Names are matched lower-cased. Nouns are up to 40 characters of letters, digits, spaces,
hyphens and apostrophes; identifiers one lower-case word of 2 to 20 letters or digits, unique
across the table (two categories with one identifier would share one learned style).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from runtime.errors import InputError
from runtime.inputs.files import read_capped
from runtime.inputs.tokenizer import Tokenizer

PROMPT_PREFIX = "a photo of"
PROMPT_LINK = "in the background of"
_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,39}$")
_NOUN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 '\-]{0,39}$")
_IDENTIFIER = re.compile(r"^[a-z0-9]{2,20}$")
MAX_FILE_BYTES = 1 << 20


@dataclass(frozen=True)
class Category:
    name: str
    noun: str
    identifier: str

    @property
    def parts(self) -> tuple[str, str, str, str]:
        return (PROMPT_PREFIX, self.noun, PROMPT_LINK, self.identifier)

    @property
    def prompt(self) -> str:
        return " ".join(self.parts)


def builtin_table() -> dict[str, Category]:
    text = resources.files("runtime").joinpath("data/categories.json").read_text()
    return _parse(json.loads(text), "built-in categories.json")


def load_categories(extra: str | Path | None = None) -> dict[str, Category]:
    """The built-in table, extended (entries replaced by name) by the JSON file `extra`."""
    table = builtin_table()
    if extra is not None:
        table.update(_parse(_read_json(Path(extra)), str(extra)))
    _check_unique_identifiers(table)
    return table


def get_category(name: str, extra: str | Path | None = None) -> Category:
    table = load_categories(extra)
    if not isinstance(name, str) or name.strip().lower() not in table:
        raise InputError("category", f"expected one of {', '.join(sorted(table))} (add more with --categories FILE)", repr(name))
    return table[name.strip().lower()]


def _read_json(path: Path) -> object:
    raw = read_capped(path, "categories", MAX_FILE_BYTES, "a JSON file")
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError("categories", "expected a JSON object of {name: {noun, identifier}}", f"{path}: {e}") from None


def _parse(data: object, where: str) -> dict[str, Category]:
    if not isinstance(data, dict):
        raise InputError("categories", f"{where}: expected a JSON object of {{name: {{noun, identifier}}}}", type(data).__name__)
    table = {}
    for raw_name, entry in data.items():
        name = raw_name.strip().lower()
        if not _NAME.match(name):
            raise InputError("categories", f"{where}: names are 1-40 of a-z, 0-9, '_', '-'", repr(raw_name))
        if not isinstance(entry, dict) or set(entry) != {"noun", "identifier"}:
            got = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
            raise InputError("categories", f"{where}: {raw_name}: expected exactly the keys noun and identifier", got)
        noun, identifier = entry["noun"], entry["identifier"]
        if not isinstance(noun, str) or not _NOUN.match(noun):
            raise InputError("categories", f"{where}: {raw_name}.noun: expected up to 40 letters, digits, spaces, - or '", repr(noun))
        if not isinstance(identifier, str) or not _IDENTIFIER.match(identifier):
            raise InputError("categories", f"{where}: {raw_name}.identifier: expected one word of 2-20 a-z or 0-9", repr(identifier))
        table[name] = Category(name, " ".join(noun.split()), identifier)
    return table


def _check_unique_identifiers(table: dict[str, Category]) -> None:
    seen: dict[str, str] = {}
    for category in table.values():
        other = seen.setdefault(category.identifier, category.name)
        if other != category.name:
            raise InputError("categories", f"identifier {category.identifier!r} is used by both {other} and {category.name}")


@dataclass(frozen=True)
class PromptTokens:
    """The category prompt's token ids (L,) int64 and 0/1 float32 markers (L,) of C's and D's tokens."""

    ids: np.ndarray
    class_tokens: np.ndarray
    identifier_tokens: np.ndarray


def prompt_tokens(tokenizer: Tokenizer, category: Category) -> PromptTokens:
    """Tokenize the category prompt and mark which positions hold C and which hold D.

    Each part is tokenized alone; the whole prompt must tokenize to their concatenation (true
    of CLIP's BPE, which splits on whitespace before merging, and of the hash tokenizer), so
    the parts' lengths give the positions. A noun or identifier may span several tokens.
    """
    full = tokenizer([category.prompt])[0]
    eos = int(tokenizer([""])[0][1])
    pieces = [_content(tokenizer([part])[0], eos) for part in category.parts]
    content = _content(full, eos)
    if sum(len(p) for p in pieces) + 2 > full.shape[0]:
        raise InputError("category", f"prompt {category.prompt!r} does not fit the text encoder's {full.shape[0]} tokens")
    if not np.array_equal(content, np.concatenate(pieces)):
        raise InputError("category", f"prompt {category.prompt!r}: its parts do not tokenize separately; cannot locate C and D")
    starts = 1 + np.cumsum([0] + [len(p) for p in pieces])  # position 0 is BOS
    class_tokens = np.zeros(full.shape[0], dtype=np.float32)
    identifier_tokens = np.zeros(full.shape[0], dtype=np.float32)
    class_tokens[starts[1]:starts[2]] = 1.0
    identifier_tokens[starts[3]:starts[4]] = 1.0
    return PromptTokens(full.astype(np.int64), class_tokens, identifier_tokens)


def _content(ids: np.ndarray, eos: int) -> np.ndarray:
    """The ids between BOS and the first EOS."""
    ends = np.flatnonzero(ids[1:] == eos)
    return ids[1 : 1 + (int(ends[0]) if ends.size else ids.shape[0] - 1)]
