"""CLIP tokenizers: built in memory from a CLIP-layout vocabulary and BPE merges.

CLIP's BPE merges (``data/bpe_simple_vocab_16e6.txt.gz``, OpenAI CLIP, MIT licence; provenance in
``data/README.md``) ship with the package, so real SD 1.x, SD 2.x and SDXL checkpoints need no extra files: their
CLIP and OpenCLIP text encoders all use CLIP's 49,408-token vocabulary (OpenCLIP pads with ``!``, id 0). A tokenizer folder (``vocab.json`` + ``merges.txt`` [+ ``tokenizer_config.json``]) overrides it;
the folders looked at, in order: a diffusers folder's own ``tokenizer/``, ``<models>/tokenizers/<checkpoint
stem>/``, a ``tokenizer/`` folder beside the checkpoint, ``<models>/tokenizers/clip/``. The tokenizer's
vocabulary size must match the text encoder's.
"""

from __future__ import annotations

import gzip
import json
import threading
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airflow_comfy.runner.models.files import ModelFileError, _label, file_key

if TYPE_CHECKING:  # importlib.resources.abc is Python 3.11+
    from importlib.resources.abc import Traversable

CLIP_BOS = "<|startoftext|>"
CLIP_EOS = "<|endoftext|>"
CLIP_VOCAB_SIZE = 49408
CLIP_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's (and GPT-2's) reversible byte -> printable character table, printable bytes first."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    table: dict[int, str] = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def make_clip_tokenizer(vocab: Mapping[str, int], merges: list[tuple[str, str]], *, pad_token: str = CLIP_EOS,
                        model_max_length: int = 77) -> Any:
    """A transformers CLIPTokenizer built in memory from a CLIP-layout vocabulary and BPE merges."""
    from transformers import CLIPTokenizer

    try:
        return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), pad_token=pad_token,
                             model_max_length=model_max_length)
    except TypeError:  # transformers 4: file-based constructor
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            vocab_file = Path(tmp) / "vocab.json"
            merges_file = Path(tmp) / "merges.txt"
            vocab_file.write_text(json.dumps(dict(vocab)), encoding="utf-8")
            merges_file.write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
            return CLIPTokenizer(vocab_file=str(vocab_file), merges_file=str(merges_file), pad_token=pad_token,
                                 model_max_length=model_max_length)


def read_merges(text: str) -> list[tuple[str, str]]:
    merges = []
    for line in text.splitlines():
        if not line.strip() or line.startswith("#version"):
            continue
        first, _, second = line.strip().partition(" ")
        if second:
            merges.append((first, second))
    return merges


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


_TOKENIZER_CACHE: dict[tuple, Any] = {}
_TOKENIZER_LOCK = threading.Lock()


def tokenizer_from_dir(folder: Path, *, pad_token: str | None = None, model_max_length: int = 77) -> Any:
    """A CLIPTokenizer from ``vocab.json`` + ``merges.txt`` (+ ``tokenizer_config.json`` for the pad token)."""
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
    pad = pad_token or _token_text(config.get("pad_token")) or CLIP_EOS
    key = (file_key(folder), pad, model_max_length)
    with _TOKENIZER_LOCK:
        if key in _TOKENIZER_CACHE:
            return _TOKENIZER_CACHE[key]
    try:
        vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
        merges = read_merges((folder / "merges.txt").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelFileError(f"tokenizer {folder}: cannot read vocab.json/merges.txt: {exc}") from exc
    tokenizer = make_clip_tokenizer(vocab, merges, pad_token=pad, model_max_length=model_max_length)
    with _TOKENIZER_LOCK:
        _TOKENIZER_CACHE[key] = tokenizer
    return tokenizer


def shipped_bpe_file() -> Traversable:
    """CLIP's BPE merges file, shipped as package data (``data/``; see the README there)."""
    return resources.files("airflow_comfy.runner.models") / "data" / CLIP_BPE_FILE


def clip_vocabulary(merges: list[tuple[str, str]]) -> dict[str, int]:
    """CLIP's vocabulary from its merges: the 256 byte characters, the same with ``</w>``, one token per
    merge, then the start and end tokens."""
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + [CLIP_BOS, CLIP_EOS]
    return {token: i for i, token in enumerate(tokens)}


def shipped_merges() -> list[tuple[str, str]]:
    """The merges CLIP uses: the first 49,408 - 256 * 2 - 2 lines after the file's version header."""
    lines = gzip.decompress(shipped_bpe_file().read_bytes()).decode("utf-8").split("\n")
    return [tuple(line.split()) for line in lines[1:CLIP_VOCAB_SIZE - 256 * 2 - 2 + 1]]


def shipped_clip_tokenizer(*, pad_token: str = CLIP_EOS, model_max_length: int = 77) -> Any:
    """The real CLIP tokenizer (49,408 tokens) from the shipped BPE merges file."""
    key = ("shipped", CLIP_BPE_FILE, pad_token, model_max_length)
    with _TOKENIZER_LOCK:
        if key in _TOKENIZER_CACHE:
            return _TOKENIZER_CACHE[key]
    merges = shipped_merges()
    tokenizer = make_clip_tokenizer(clip_vocabulary(merges), merges, pad_token=pad_token,
                                    model_max_length=model_max_length)
    with _TOKENIZER_LOCK:
        _TOKENIZER_CACHE[key] = tokenizer
    return tokenizer


def tokenizer_search_dirs(path: Path, models_root: Path | None) -> list[Path]:
    """Where the CLIP tokenizer of checkpoint ``path`` is looked for, in order."""
    dirs: list[Path] = []
    if path.is_dir():
        dirs.append(path / "tokenizer")
    stem = path.name if path.is_dir() else path.stem
    if models_root is not None:
        dirs.append(models_root / "tokenizers" / stem)
    dirs.append(path.parent / "tokenizer")
    if models_root is not None:
        dirs.append(models_root / "tokenizers" / "clip")
    return dirs


_TEXT_ENCODERS = {
    ("sd1", "text_encoder"): "SD 1.x text encoder (CLIP ViT-L/14)",
    ("sd2", "text_encoder"): "SD 2.x text encoder (OpenCLIP ViT-H/14)",
    ("sdxl", "text_encoder"): "SDXL first text encoder (CLIP ViT-L/14)",
    ("sdxl", "text_encoder_2"): "SDXL second text encoder (OpenCLIP ViT-bigG/14)",
    ("sdxl_refiner", "text_encoder_2"): "SDXL refiner's text encoder (OpenCLIP ViT-bigG/14)",
}


def text_encoder_name(family: str | None, role: str = "text_encoder") -> str:
    """What an error calls the text encoder ``role`` of ``family`` (``"SD 2.x text encoder (OpenCLIP
    ViT-H/14)"``), so that it names the model being loaded; "text encoder" when the family is not known."""
    return _TEXT_ENCODERS.get((family or "", role), "text encoder")


def load_tokenizer(path: Path, models_root: Path | None, *, vocab_size: int, pad_token: str | None = None,
                   model_max_length: int = 77, label: str | None = None, encoder: str = "text encoder") -> Any:
    """The CLIP tokenizer for checkpoint ``path``; its vocabulary must have ``vocab_size`` tokens. ``encoder``
    (:func:`text_encoder_name`) is what the errors call the text encoder it is for."""
    label = label or _label(path)
    searched = tokenizer_search_dirs(path, models_root)
    tokenizer = None
    source = ""
    for folder in searched:
        if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            tokenizer = tokenizer_from_dir(folder, pad_token=pad_token, model_max_length=model_max_length)
            source = str(folder)
            break
    if tokenizer is None and vocab_size == CLIP_VOCAB_SIZE:
        tokenizer = shipped_clip_tokenizer(pad_token=pad_token or CLIP_EOS, model_max_length=model_max_length)
        source = f"the shipped {CLIP_BPE_FILE}"
    if tokenizer is None:
        where = ", ".join(str(d) for d in searched)
        raise ModelFileError(
            f"{label}: no CLIP tokenizer found for the {encoder}, whose vocabulary has {vocab_size} tokens "
            f"(searched {where}; the shipped CLIP BPE has {CLIP_VOCAB_SIZE}): put that encoder's vocab.json and "
            f"merges.txt into <models>/tokenizers/clip/")
    if len(tokenizer) != vocab_size:
        raise ModelFileError(
            f"{label}: the tokenizer from {source} has {len(tokenizer)} tokens but the {encoder} has "
            f"{vocab_size}; a made-up vocabulary gives wrong text embeddings. Provide the {encoder}'s own "
            f"vocab.json and merges.txt in <models>/tokenizers/clip/ (a real SD 1.x, SD 2.x or SDXL checkpoint "
            f"needs none: they use CLIP's {CLIP_VOCAB_SIZE:,}-token BPE, which ships with the runner)")
    return tokenizer


def clear_tokenizer_cache() -> None:
    with _TOKENIZER_LOCK:
        _TOKENIZER_CACHE.clear()
