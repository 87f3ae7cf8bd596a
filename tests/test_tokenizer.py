"""Prompts -> token ids: HashTokenizer's CLIP-shaped output, prompt checks, tokenizer choice."""

from __future__ import annotations

import numpy as np
import pytest

from runtime.artifacts.weights import WeightsSource
from runtime.errors import InputError
from runtime.inputs.tokenizer import MAX_PROMPT_CHARS, HashTokenizer, check_prompt, load_tokenizer

VOCAB = 49408
LENGTH = 77
BOS, EOS = VOCAB - 2, VOCAB - 1


@pytest.fixture
def tokenizer():
    return HashTokenizer(VOCAB, LENGTH)


def test_output_is_n_by_77_int64(tokenizer):
    ids = tokenizer(["a sneaker on a wooden table", "", "perfume bottle"])
    assert ids.shape == (3, LENGTH)
    assert ids.dtype == np.int64


def test_ids_start_with_bos_and_end_words_with_eos_then_eos_padding(tokenizer):
    (row,) = tokenizer(["a sneaker on a wooden table, soft light"])
    words = 9  # a sneaker on a wooden table , soft light
    assert row[0] == BOS == 49406
    assert np.all((row[1 : 1 + words] >= 0) & (row[1 : 1 + words] < BOS))
    assert np.all(row[1 + words :] == EOS)
    assert EOS == 49407


def test_empty_prompt_is_bos_then_eos(tokenizer):
    (row,) = tokenizer([""])
    assert row[0] == BOS
    assert np.all(row[1:] == EOS)


def test_same_prompt_gives_same_ids(tokenizer):
    first = tokenizer(["a sneaker on a wooden table"])
    again = HashTokenizer(VOCAB, LENGTH)(["a sneaker on a wooden table", "something else"])
    np.testing.assert_array_equal(first[0], again[0])


def test_different_prompts_give_different_ids(tokenizer):
    ids = tokenizer(["a sneaker on a wooden table", "a sneaker on a marble table", "a red sneaker", "a blue sneaker"])
    assert len({row.tobytes() for row in ids}) == 4


def test_long_prompts_are_truncated_to_77_with_eos_last(tokenizer):
    prompt = " ".join(f"word{chr(97 + i % 26)}{chr(97 + i // 26)}" for i in range(200))
    (row,) = tokenizer([prompt])
    assert row.shape == (LENGTH,)
    assert row[0] == BOS
    assert row[-1] == EOS
    assert np.all(row[1:-1] < BOS)


def test_long_prompts_agree_on_their_first_75_words(tokenizer):
    words = [f"w{chr(97 + i % 26)}{chr(97 + i // 26 % 26)}" for i in range(120)]
    short, long = tokenizer([" ".join(words[:75]), " ".join(words)])
    np.testing.assert_array_equal(short, long)


def test_rows_do_not_depend_on_the_rest_of_the_batch(tokenizer):
    alone = tokenizer(["a sneaker"])
    batched = tokenizer(["x " * 100, "a sneaker", ""])
    np.testing.assert_array_equal(batched[1], alone[0])


@pytest.mark.parametrize("text", ["bad\x00prompt", "escape \x1b[31m", "bell\x07", "del\x7f", "c1 \x85 control"])
def test_check_prompt_rejects_control_characters(text):
    with pytest.raises(InputError) as excinfo:
        check_prompt("prompt", text)
    assert excinfo.value.field == "prompt"
    assert str(excinfo.value).startswith("prompt: must not contain control characters")


def test_check_prompt_allows_tabs_and_newlines():
    assert check_prompt("prompt", "line one\n\tline two") == "line one\n\tline two"


@pytest.mark.parametrize("value,type_name", [(None, "NoneType"), (42, "int"), (b"bytes", "bytes"), (["a"], "list")])
def test_check_prompt_rejects_non_strings(value, type_name):
    with pytest.raises(InputError) as excinfo:
        check_prompt("negative_prompt", value)
    assert excinfo.value.field == "negative_prompt"
    assert str(excinfo.value) == f"negative_prompt: expected a string (got {type_name})"


def test_check_prompt_rejects_over_long_prompts():
    assert check_prompt("prompt", "a" * MAX_PROMPT_CHARS) == "a" * MAX_PROMPT_CHARS
    with pytest.raises(InputError) as excinfo:
        check_prompt("prompt", "a" * (MAX_PROMPT_CHARS + 1))
    assert excinfo.value.field == "prompt"
    assert str(excinfo.value) == f"prompt: expected at most {MAX_PROMPT_CHARS} characters (got {MAX_PROMPT_CHARS + 1})"


def test_load_tokenizer_gives_hash_tokenizer_for_random_init(tiny):
    tokenizer = load_tokenizer(tiny, WeightsSource(seed=0))
    assert isinstance(tokenizer, HashTokenizer)
    assert (tokenizer.vocab_size, tokenizer.max_length) == (tiny.text.vocab_size, tiny.text.max_length)


@pytest.mark.parametrize("files", [(), ("vocab.json",)], ids=["no tokenizer folder", "merges.txt missing"])
def test_load_tokenizer_gives_hash_tokenizer_for_a_folder_without_tokenizer_files(tiny, tmp_path, files):
    for name in files:
        (tmp_path / "tokenizer").mkdir(exist_ok=True)
        (tmp_path / "tokenizer" / name).write_text("{}")
    tokenizer = load_tokenizer(tiny, WeightsSource(path=tmp_path))
    assert isinstance(tokenizer, HashTokenizer)
    prompts = ["a sneaker on a wooden table", ""]
    np.testing.assert_array_equal(tokenizer(prompts), load_tokenizer(tiny, WeightsSource(seed=0))(prompts))
