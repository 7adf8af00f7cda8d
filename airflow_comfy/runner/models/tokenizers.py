"""CLIP tokenizers: built in memory from a CLIP-layout vocabulary and BPE merges.

Real checkpoints need CLIP's real BPE vocabulary (49,408 tokens), which is not shipped. It is looked up in
``<models>/tokenizers/<checkpoint stem>/``, then a ``tokenizer/`` folder beside the checkpoint, then
``<models>/tokenizers/clip/`` (each: ``vocab.json`` + ``merges.txt`` [+ ``tokenizer_config.json``]), then the
BPE file of the ``openai-clip`` package if it is installed (not imported). A diffusers folder's own
``tokenizer/`` comes first. The tokenizer's vocabulary size must match the text encoder's.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from airflow_comfy.runner.models.files import ModelFileError, _label, file_key

CLIP_BOS = "<|startoftext|>"
CLIP_EOS = "<|endoftext|>"


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


def openai_clip_bpe_file() -> Path | None:
    """``bpe_simple_vocab_16e6.txt.gz`` of the ``openai-clip`` package, when installed (never imported: its
    ``__init__`` needs torchvision)."""
    try:
        spec = importlib.util.find_spec("clip")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "bpe_simple_vocab_16e6.txt.gz"
        if candidate.is_file():
            return candidate
    return None


def tokenizer_from_bpe_gz(path: Path, *, pad_token: str = CLIP_EOS, model_max_length: int = 77) -> Any:
    """The real CLIP tokenizer (49,408 tokens) from OpenAI's BPE merges file."""
    key = (file_key(path), pad_token, model_max_length)
    with _TOKENIZER_LOCK:
        if key in _TOKENIZER_CACHE:
            return _TOKENIZER_CACHE[key]
    lines = gzip.decompress(path.read_bytes()).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1]]
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + [CLIP_BOS, CLIP_EOS]
    tokenizer = make_clip_tokenizer({t: i for i, t in enumerate(tokens)}, merges, pad_token=pad_token,
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


def load_tokenizer(path: Path, models_root: Path | None, *, vocab_size: int, pad_token: str | None = None,
                   model_max_length: int = 77, label: str | None = None) -> Any:
    """The CLIP tokenizer for checkpoint ``path``; its vocabulary must have ``vocab_size`` tokens."""
    label = label or _label(path)
    searched = tokenizer_search_dirs(path, models_root)
    tokenizer = None
    source = ""
    for folder in searched:
        if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            tokenizer = tokenizer_from_dir(folder, pad_token=pad_token, model_max_length=model_max_length)
            source = str(folder)
            break
    if tokenizer is None:
        bpe = openai_clip_bpe_file()
        if bpe is not None and vocab_size == 49408:
            tokenizer = tokenizer_from_bpe_gz(bpe, pad_token=pad_token or CLIP_EOS,
                                              model_max_length=model_max_length)
            source = str(bpe)
    if tokenizer is None:
        where = ", ".join(str(d) for d in searched)
        raise ModelFileError(
            f"{label}: no CLIP tokenizer found (searched {where}). Real SD 1.x/SDXL checkpoints need CLIP's BPE "
            f"vocabulary: put vocab.json and merges.txt (e.g. from the tokenizer/ folder of a diffusers SD 1.5 "
            f"model) into <models>/tokenizers/clip/, or install the 'openai-clip' package, which ships "
            f"bpe_simple_vocab_16e6.txt.gz")
    if len(tokenizer) != vocab_size:
        raise ModelFileError(
            f"{label}: the tokenizer from {source} has {len(tokenizer)} tokens but the text encoder has "
            f"{vocab_size}; a made-up vocabulary gives wrong text embeddings. Provide the matching vocab.json and "
            f"merges.txt (real SD 1.x/SDXL: CLIP's 49,408-token BPE) in <models>/tokenizers/clip/")
    return tokenizer


def clear_tokenizer_cache() -> None:
    with _TOKENIZER_LOCK:
        _TOKENIZER_CACHE.clear()
