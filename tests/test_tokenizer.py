"""Prompts -> token ids: HashTokenizer's CLIP-shaped output, prompt checks, tokenizer choice, and
the real CLIP BPE read from vocabulary files in the real format (benchmarks/synthetic_vocabulary.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks import synthetic_vocabulary as vocabulary
from runtime.artifacts.weights import TOKENIZER_FILES, WeightsSource, write_weights_manifest
from runtime.errors import InputError, WeightsError
from runtime.inputs.tokenizer import (
    MAX_PROMPT_CHARS,
    CLIPTokenizerFiles,
    HashTokenizer,
    check_prompt,
    load_tokenizer,
)

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


def weights_folder(root, text_encoder_trained: bool, tokenizer_files: tuple[str, ...] = ()):
    """A weights folder whose manifest lists a text encoder or not (stub files: the tokenizer's
    choice reads only the manifest and the tokenizer folder)."""
    parts = {}
    if text_encoder_trained:
        (root / "text_encoder").mkdir(parents=True)
        (root / "text_encoder" / "config.json").write_text("{}")
        (root / "text_encoder" / "model.safetensors").write_bytes(b"stub")
        parts["text_encoder"] = {"source": "test"}
    write_weights_manifest(root, {"parts": parts})
    if tokenizer_files:
        vocabulary.write_vocabulary(root / "tokenizer")
        for name in set(TOKENIZER_FILES) - set(tokenizer_files):
            (root / "tokenizer" / name).unlink()
    return WeightsSource(path=root)


@pytest.mark.parametrize("files", [(), ("vocab.json",)], ids=["no tokenizer folder", "merges.txt missing"])
def test_trained_text_encoder_without_its_tokenizer_is_refused(tiny, tmp_path, files):
    weights = weights_folder(tmp_path, text_encoder_trained=True, tokenizer_files=files)
    with pytest.raises(WeightsError, match="the text encoder is trained but tokenizer/ .* is missing"):
        load_tokenizer(tiny, weights)
    with pytest.raises(WeightsError, match="real weights need their tokenizer"):
        weights.check("refadgen", ("text_encoder",))


def test_folder_with_a_random_text_encoder_uses_the_hash_tokenizer(tiny, tmp_path):
    weights = weights_folder(tmp_path, text_encoder_trained=False, tokenizer_files=TOKENIZER_FILES)
    assert isinstance(load_tokenizer(tiny, weights), HashTokenizer)


PROMPTS = ["a sneaker on a wooden table, soft light", "a red sneaker", "a blue sneaker", "studio photo of a sneaker", ""]


@pytest.fixture
def real_vocabulary(tiny, tmp_path):
    pytest.importorskip("transformers")
    weights = weights_folder(tmp_path, text_encoder_trained=True, tokenizer_files=TOKENIZER_FILES)
    return load_tokenizer(tiny, weights), json.loads((tmp_path / "tokenizer" / "vocab.json").read_text())


def test_real_vocabulary_files_give_the_library_tokenizers_ids(real_vocabulary, tmp_path):
    from transformers import CLIPTokenizer

    tokenizer, vocab = real_vocabulary
    assert isinstance(tokenizer, CLIPTokenizerFiles)
    library = CLIPTokenizer.from_pretrained(str(tmp_path / "tokenizer"))
    expected = library(PROMPTS, padding="max_length", max_length=LENGTH, truncation=True)["input_ids"]
    np.testing.assert_array_equal(tokenizer(PROMPTS), np.array(expected, dtype=np.int64))
    # and the ids are the vocabulary's own, whole words: BOS, the words, EOS, EOS padding
    (row,) = tokenizer(["A red  Sneaker, soft light"])
    words = [vocab[w + "</w>"] for w in ("a", "red", "sneaker", ",", "soft", "light")]
    assert row.tolist() == [vocab[vocabulary.BOS], *words] + [vocab[vocabulary.EOS]] * (LENGTH - 1 - len(words))


def test_real_vocabulary_gives_different_ids_to_different_prompts(real_vocabulary):
    tokenizer, vocab = real_vocabulary
    ids = tokenizer(PROMPTS)
    assert ids.shape == (len(PROMPTS), LENGTH) and ids.dtype == np.int64
    assert len({row.tobytes() for row in ids}) == len(PROMPTS)
    assert len(tokenizer.tokenizer) == len(vocab)  # the files were read (the constructor path read 2 tokens)
