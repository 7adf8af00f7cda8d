"""CLIP's real tokenizer from the BPE merges shipped as package data (runner/models/data/)."""

from __future__ import annotations

import fnmatch
import hashlib
import json
from importlib import resources
from pathlib import Path

import pytest

from airflow_comfy.runner.models.files import ModelFileError
from airflow_comfy.runner.models.tokenizers import (
    CLIP_BPE_FILE,
    CLIP_VOCAB_SIZE,
    bytes_to_unicode,
    clip_vocabulary,
    load_tokenizer,
    shipped_bpe_file,
    shipped_clip_tokenizer,
    shipped_merges,
)
from airflow_comfy.runner.text import tokenize_weighted

REPO = Path(__file__).resolve().parents[1]
BPE_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
BOS, EOS = 49406, 49407

# Published ids (input text -> ids with BOS/EOS), from other projects' tests of the openai/clip-vit-* tokenizer:
PUBLISHED = [
    # elixir-nx/bumblebee, test/bumblebee/text/clip_tokenizer_test.exs ("encoding model input")
    ("a photo of a cat", [BOS, 320, 1125, 539, 320, 2368, EOS]),
    ("a photo of a dog", [BOS, 320, 1125, 539, 320, 1929, EOS]),
    # huggingface/transformers, tests/models/clip/test_tokenization_clip.py (input_string / expected_token_ids:
    # lower-casing, digits one by one, punctuation, accents, CJK and Thai bytes, "<s>" as plain text)
    ("This is a test\nI was born in 92000, and this is falsé.\n生活的真谛是\nHi  Hello\nHi   Hello\n\n \n  \n Hello\n"
     "<s>\nhi<s>there\nThe following string should be properly encoded: Hello.\nBut ird and ปี   ird   ด\n"
     "Hey how are you doing",
     [BOS, 589, 533, 320, 1628, 328, 739, 2683, 530, 280, 273, 271, 271, 271, 267, 537, 589, 533, 2778, 82, 4166,
      269, 33375, 162, 112, 119, 163, 248, 226, 41570, 164, 108, 249, 42891, 363, 1883, 3306, 1883, 3306, 3306,
      283, 338, 285, 1883, 283, 338, 285, 997, 518, 3473, 9696, 1535, 655, 12560, 524, 33703, 281, 3306, 269, 767,
      2770, 537, 1777, 505, 20278, 2770, 38825, 2189, 829, 631, 592, 1960, EOS]),
]


@pytest.fixture(scope="module")
def clip_tok():
    return shipped_clip_tokenizer()


def test_shipped_bpe_file_is_the_recorded_one():
    data = shipped_bpe_file().read_bytes()
    assert hashlib.sha256(data).hexdigest() == BPE_SHA256
    readme = (resources.files("airflow_comfy.runner.models") / "data" / "README.md").read_text(encoding="utf-8")
    assert BPE_SHA256 in readme and "open_clip_torch" in readme
    licence = (resources.files("airflow_comfy.runner.models") / "data" / "LICENSE").read_text(encoding="utf-8")
    assert "MIT" in licence and "Copyright (c) 2021 OpenAI" in licence


def test_package_data_ships_the_bpe_file_its_readme_and_licence():
    """What a wheel holds: pyproject's package-data globs (relative to airflow_comfy/) must match the files."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    config = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    globs = config["tool"]["setuptools"]["package-data"]["airflow_comfy"]
    for name in (CLIP_BPE_FILE, "README.md", "LICENSE"):
        relative = f"runner/models/data/{name}"
        assert (REPO / "airflow_comfy" / relative).is_file()
        assert any(fnmatch.fnmatch(relative, g) for g in globs), f"{relative} is not package data"


def test_vocabulary_layout(clip_tok):
    vocab = clip_tok.get_vocab()
    assert len(vocab) == CLIP_VOCAB_SIZE
    assert vocab["<|startoftext|>"] == BOS and vocab["<|endoftext|>"] == EOS
    chars = list(bytes_to_unicode().values())
    assert vocab[chars[0]] == 0 and vocab[chars[0] + "</w>"] == 256  # "!" and "!</w>"
    assert clip_vocabulary([("i", "n")]) == {**{c: i for i, c in enumerate(chars)},
                                             **{c + "</w>": 256 + i for i, c in enumerate(chars)},
                                             "in": 512, "<|startoftext|>": 513, "<|endoftext|>": 514}


@pytest.mark.parametrize(("text", "expected"), PUBLISHED, ids=["cat", "dog", "transformers"])
def test_published_ids(clip_tok, text, expected):
    assert clip_tok(text)["input_ids"] == expected


def _byte_token(char: str) -> int:
    """The id of a one-character word: its byte character with ``</w>``."""
    return 256 + list(bytes_to_unicode()).index(ord(char))


def test_comfy_weighting_through_the_prompt_parser(clip_tok):
    tokens = tokenize_weighted(clip_tok, "(a photo:1.2) of a [cat]")  # [ ] are plain text in ComfyUI
    assert tokens.chunks[0][:9] == [(BOS, 1.0), (320, 1.2), (1125, 1.2), (539, 1.0), (320, 1.0),
                                    (_byte_token("["), 1.0), (2368, 1.0), (_byte_token("]"), 1.0), (EOS, 1.0)]
    assert tokens.chunks[0][9:] == [(EOS, 1.0)] * 68  # SD 1.x / CLIP-L pad with the end token
    nested = tokenize_weighted(clip_tok, "((a cat)), (a dog:0.8)")
    assert [(t, round(w, 4)) for t, w in nested.chunks[0][1:8]] == [
        (320, 1.21), (2368, 1.21), (_byte_token(","), 1.0), (320, 0.8), (1929, 0.8), (EOS, 1.0), (EOS, 1.0)]
    bigg = tokenize_weighted(clip_tok, "a photo of a cat", pad_token=0)  # SDXL's OpenCLIP-bigG pads with "!"
    assert [t for t, _ in bigg.chunks[0][:9]] == [BOS, 320, 1125, 539, 320, 2368, EOS, 0, 0]


def test_load_tokenizer_uses_the_shipped_vocabulary_offline(tmp_path):
    checkpoint = tmp_path / "checkpoints" / "real.safetensors"
    tok = load_tokenizer(checkpoint, tmp_path, vocab_size=CLIP_VOCAB_SIZE)
    assert tok("a photo of a cat")["input_ids"] == PUBLISHED[0][1]
    bigg = load_tokenizer(checkpoint, tmp_path, vocab_size=CLIP_VOCAB_SIZE, pad_token="!")
    assert bigg.pad_token == "!" and tok.pad_token == "<|endoftext|>"
    with pytest.raises(ModelFileError, match="no CLIP tokenizer found for the text encoder, whose vocabulary has 1000 tokens"):
        load_tokenizer(checkpoint, tmp_path, vocab_size=1000)


def test_tokenizer_folder_overrides_the_shipped_vocabulary(tmp_path, clip_tok):
    vocab = dict(clip_tok.get_vocab())
    vocab["cat</w>"], vocab["dog</w>"] = vocab["dog</w>"], vocab["cat</w>"]
    merges = shipped_merges()
    folder = tmp_path / "tokenizers" / "clip"
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
                                       encoding="utf-8")
    tok = load_tokenizer(tmp_path / "checkpoints" / "real.safetensors", tmp_path, vocab_size=CLIP_VOCAB_SIZE)
    assert tok("a cat")["input_ids"] == [BOS, 320, 1929, EOS]
