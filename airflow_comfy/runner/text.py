"""ComfyUI's prompt semantics for SD 1.x, SD 2.x and SDXL (base and refiner) text encoders (CLIPTextEncode).

Written from ComfyUI 0.3.64's described behaviour (``comfy/sd1_clip.py``, ``comfy/sd2_clip.py``,
``comfy/sdxl_clip.py``, ``comfy/clip_model.py``, ``comfy/sd.py``), not from its source text.

Prompt syntax (:func:`parse_weighted_prompt`)
    Only parentheses are special. ``(text)`` multiplies the weight by 1.1 per level (``((a))`` = 1.21);
    ``(text:1.5)`` *replaces* the weight with 1.5 (``((a:1.5))`` = 1.5, ``((a):1.5)`` = 1.5 * 1.1); the weight
    is whatever follows the last ``:`` of the group and parses as a Python float, otherwise the ``:...`` stays
    text and only the 1.1 applies. ``[`` / ``]`` are ordinary characters (no A1111 de-emphasis). ``\\(`` and
    ``\\)`` are literal parentheses. Unbalanced parentheses never fail: an unclosed ``(`` makes the rest of the
    prompt literal text (the ``(`` included) at the enclosing weight; a stray ``)`` stays literal and, because
    the nesting counter goes negative, the parentheses after it on that level are literal too.

Tokens (:func:`tokenize_weighted`)
    Each weighted segment is split before every ``embedding:`` that follows whitespace (or starts the
    segment). ``embedding:<name>`` (the name ends at the first whitespace, ``<`` or ``[``; ``name`` or
    ``name.safetensors``; found in the embeddings folder or any folder below it, read by
    :mod:`airflow_comfy.runner.models.embeddings`, which records its SHA-256 in the run's snapshot) inserts the
    textual-inversion vectors with the segment's weight; the rest of that piece is tokenized as text. A missing
    or unusable embedding is dropped with a warning (ComfyUI logs ``embedding:<name> does not exist, ignoring``). Each text piece is
    tokenized *as a whole* (without BOS/EOS) into one token group. Groups are packed into windows of
    ``[BOS] + 75 tokens + [EOS]`` padded to 77: a group shorter than 8 tokens that would cross the 75-token
    boundary starts the next window (the current one is closed with EOS and padding); a group of 8 tokens or
    more is split at the boundary. SD 1.x and SDXL's CLIP-L pad with the EOS id (49407); the OpenCLIP tokenizers
    (SDXL's bigG, SD 2.x's ViT-H) pad with id 0 (ComfyUI's ``SDXLClipGTokenizer`` and ``SD2ClipHTokenizer``
    are built with ``pad_with_end=False``, and ``SDXLClipG`` / ``SD2ClipHModel`` declare
    ``special_tokens={"start": 49406, "end": 49407, "pad": 0}``).

Encoding (:func:`encode_prompt`)
    All windows (plus the empty prompt ``[BOS, EOS, pad...]`` when any weight is not 1) run as one batch with
    the causal mask only. For each token with weight ``w != 1``: ``z = (z - z_empty) * w + z_empty``, with
    ``z_empty`` the empty prompt's encoding at the same position. The windows are concatenated on the token
    axis (``[1, 77 * k, dim]``); the pooled output is the first window's (EOS position of the final-LayerNorm
    output; SDXL: bigG's ``text_projection`` of it, i.e. ``CLIPTextModelWithProjection.text_embeds``).

    Layers, as ComfyUI's ``SDClipModel`` does them: ``CLIPSetLastLayer(n)`` selects the output of encoder layer
    ``num_layers + n`` (``n = -1`` is the last layer, ``-2`` the penultimate; ``|n| > num_layers`` means the
    normal last-layer output).
      * SD 1.x (``layer_norm_hidden_state=True`` by default in ComfyUI's ``SDClipModel``, not overridden for
        SD 1.x): the selected hidden state goes through the final LayerNorm, so ``-1`` is the plain last
        hidden state and "clip skip 2" is ``final_layer_norm(hidden_states[-2])`` (as in A1111).
      * SDXL (``SDXLClipModel`` builds CLIP-L with ``layer="hidden", layer_idx=-2,
        layer_norm_hidden_state=False`` and ``SDXLClipG`` with ``layer="penultimate"`` and no final norm):
        without CLIPSetLastLayer both encoders use the raw penultimate hidden state; a CLIPSetLastLayer value
        is applied to both, still without the final LayerNorm. CLIP-L and bigG are concatenated on the
        channel axis (768 + 1280 = 2048), cut to the shorter token length. The SDXL refiner has bigG alone,
        encoded the same way (its cond is 1280 wide).
      * SD 2.x (``SD2ClipHModel``: OpenCLIP ViT-H, 24 layers, ``layer="penultimate"`` and the default
        ``layer_norm_hidden_state=True``; pad id 0): without CLIPSetLastLayer the penultimate hidden state
        *through the final LayerNorm* (unlike SDXL); a CLIPSetLastLayer value selects another layer, also
        normalised (``-1``: the plain last hidden state). The pooled output is ViT-H's ``text_projection``
        of the EOS position. Diffusers' SD 2.x text encoders store 23 layers; the indices still count 24
        (``-2`` is their last stored layer), see :data:`DROPPED_LAYERS_ATTR`.
    ``TextEncoder.layer`` is None without CLIPSetLastLayer: then each family's default applies (SD 1.x: the
    last layer; SD 2.x, SDXL: ``-2``); see :func:`encoder_settings`.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from airflow_comfy.runner.values import CondEntry, TextEncoder

log = logging.getLogger(__name__)

MAX_LENGTH = 77
"""Tokens per window: BOS + 75 + EOS."""
MAX_WORD_LENGTH = 8
"""Token groups at least this long may be split across windows; shorter ones move to the next window."""
EMBEDDING_PREFIX = "embedding:"

_ESC_CLOSE = "\0\1"
_ESC_OPEN = "\0\2"

Token = int | torch.Tensor
"""A token id, or one textual-inversion vector ``[dim]`` taking a token's place."""


# --------------------------------------------------------------------------------------------------- parsing


def _escape(text: str) -> str:
    return text.replace("\\)", _ESC_CLOSE).replace("\\(", _ESC_OPEN)


def _unescape(text: str) -> str:
    return text.replace(_ESC_CLOSE, ")").replace(_ESC_OPEN, "(")


def _top_level_groups(text: str) -> list[str]:
    """Split into runs of plain text and top-level ``(...)`` groups (the nesting counter may go negative)."""
    pieces: list[str] = []
    current = ""
    depth = 0
    for char in text:
        if char == "(":
            if depth == 0 and current:
                pieces.append(current)
                current = ""
            current += char
            depth += 1
        elif char == ")":
            depth -= 1
            current += char
            if depth == 0:
                pieces.append(current)
                current = ""
        else:
            current += char
    if current:
        pieces.append(current)
    return pieces


def _weights(text: str, weight: float) -> list[tuple[str, float]]:
    out: list[tuple[str, float]] = []
    for piece in _top_level_groups(text):
        if len(piece) >= 2 and piece[0] == "(" and piece[-1] == ")":
            inner = piece[1:-1]
            inner_weight = weight * 1.1
            colon = inner.rfind(":")
            if colon > 0:
                try:
                    inner_weight = float(inner[colon + 1:])
                    inner = inner[:colon]
                except ValueError:
                    pass
            out += _weights(inner, inner_weight)
        else:
            out.append((piece, weight))
    return out


def parse_weighted_prompt(text: str) -> list[tuple[str, float]]:
    """``text`` as ComfyUI weighs it: ``[(segment, weight), ...]`` in order, escapes resolved.

    >>> parse_weighted_prompt("a (b:1.5) ((c))")
    [('a ', 1.0), ('b', 1.5), (' ', 1.0), ('c', 1.2100000000000002)]
    """
    return [(_unescape(segment), weight) for segment, weight in _weights(_escape(text), 1.0)]


# ----------------------------------------------------------------------------------------------- embeddings


@dataclass
class _EmbeddingStore:
    root: str | None
    key: str
    dim: int | None
    warnings: list[str]
    context: Any = None
    """The run (``allow_pickle``; ``model_files`` records each embedding's SHA-256), or None."""
    cache: dict[str, torch.Tensor | None] = field(default_factory=dict)

    def load(self, name: str) -> torch.Tensor | None:
        """``[n, dim]`` float32 vectors, or None (with a warning) when missing or unusable."""
        if name in self.cache:
            return self.cache[name]
        vectors = self._load(name)
        self.cache[name] = vectors
        return vectors

    def _load(self, name: str) -> torch.Tensor | None:
        from airflow_comfy.runner.models.embeddings import EmbeddingNotFoundError, load_embedding
        from airflow_comfy.runner.models.files import ModelFileError

        if not self.root or not name:
            return None
        try:
            return load_embedding(self.context, name, key=self.key, width=self.dim, embeddings_dir=self.root)
        except EmbeddingNotFoundError:
            return None
        except ModelFileError as exc:  # an unusable file is skipped like ComfyUI does, with the reason
            self.warnings.append(f"embedding:{name}: {exc}; ignoring it")
            return None

    def lookup(self, text: str) -> tuple[torch.Tensor | None, str, str]:
        """``text`` follows ``embedding:``: ``(vectors, name, leftover text)``."""
        words = text.split()
        name, leftover = words[0], " ".join(words[1:])
        cut = re.search(r"[<\[]", name)
        if cut is not None:
            leftover = name[cut.start():] + (" " + leftover if leftover else "")
            name = name[:cut.start()]
        vectors = self.load(name)
        if vectors is None:
            stripped = name.strip(",")
            if len(stripped) < len(name):  # "embedding:foo," -> foo, and the comma stays text
                vectors = self.load(stripped)
                return vectors, stripped if vectors is not None else name, f"{name[len(stripped):]} {leftover}"
        return vectors, name, leftover


# ----------------------------------------------------------------------------------------------- tokenizing


@dataclass
class TokenizedPrompt:
    """One tokenizer's view of a prompt: 77-token windows of ``(token, weight)``."""

    chunks: list[list[tuple[Token, float]]]
    start_token: int
    end_token: int
    pad_token: int
    token_count: int
    """Prompt tokens, embedding vectors included; BOS, EOS and padding excluded."""
    embeddings: list[str] = field(default_factory=list)
    missing_embeddings: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _special_tokens(tokenizer: Any) -> tuple[int, int]:
    empty = list(tokenizer("")["input_ids"])
    if len(empty) < 2:
        raise ValueError("the CLIP tokenizer must add a start and an end token")
    return int(empty[0]), int(empty[1])


def _token_ids(tokenizer: Any, text: str) -> list[int]:
    return [int(t) for t in tokenizer(text, verbose=False)["input_ids"][1:-1]]


def tokenize_weighted(tokenizer: Any, text: str, *, embeddings_dir: str | None = None,
                      embedding_key: str = "clip_l", embedding_dim: int | None = None,
                      pad_token: int | None = None, max_length: int = MAX_LENGTH,
                      context: Any = None) -> TokenizedPrompt:
    """Tokenize ``text`` with ComfyUI's weights, embeddings and window packing.

    ``tokenizer`` is a transformers CLIP tokenizer (adds BOS and EOS). ``pad_token`` None pads with the EOS id
    (SD 1.x, CLIP-L); SDXL's bigG passes 0. ``embedding_key`` picks the tensor of multi-encoder embedding files
    and ``embedding_dim`` rejects vectors of another size. ``embeddings_dir`` None behaves like an empty
    embeddings folder (every ``embedding:`` name is missing). ``context``: the run, whose snapshot records each
    embedding file's SHA-256 (and which may allow pickle files).
    """
    start, end = _special_tokens(tokenizer)
    pad = end if pad_token is None else int(pad_token)
    warnings: list[str] = []
    store = _EmbeddingStore(embeddings_dir, embedding_key, embedding_dim, warnings, context)
    used: list[str] = []
    missing: list[str] = []

    groups: list[list[tuple[Token, float]]] = []
    for segment, weight in parse_weighted_prompt(text):
        parts = re.split(r"(?<=\s)" + re.escape(EMBEDDING_PREFIX), segment)
        pieces = [parts[0]] + [EMBEDDING_PREFIX + p for p in parts[1:]]
        for piece in (p for p in pieces if p):
            word = piece
            rest = piece[len(EMBEDDING_PREFIX):].strip("\n")
            if piece.startswith(EMBEDDING_PREFIX) and rest.strip():
                vectors, name, leftover = store.lookup(rest)
                if vectors is None:
                    message = f"embedding:{name} does not exist, ignoring"
                    log.warning(message)
                    warnings.append(message)
                    missing.append(name)
                else:
                    used.append(name)
                    groups.append([(vector, weight) for vector in vectors])
                if not leftover:
                    continue
                word = leftover
            groups.append([(t, weight) for t in _token_ids(tokenizer, word)])

    chunks = _pack(groups, start, end, pad, max_length)
    return TokenizedPrompt(chunks=chunks, start_token=start, end_token=end, pad_token=pad,
                           token_count=sum(len(g) for g in groups), embeddings=used,
                           missing_embeddings=missing, warnings=warnings)


def _pack(groups: list[list[tuple[Token, float]]], start: int, end: int, pad: int,
          max_length: int) -> list[list[tuple[Token, float]]]:
    room = max_length - 1  # a window's last place is always EOS
    chunks: list[list[tuple[Token, float]]] = []
    window: list[tuple[Token, float]] = [(start, 1.0)]
    chunks.append(window)
    for group in groups:
        splittable = len(group) >= MAX_WORD_LENGTH
        while group:
            if len(window) + len(group) <= room:
                window.extend(group)
                break
            free = room - len(window)
            if splittable:
                window.extend(group[:free])
                group = group[free:]
                window.append((end, 1.0))
            else:
                window.append((end, 1.0))
                window.extend([(pad, 1.0)] * free)
            window = [(start, 1.0)]
            chunks.append(window)
    window.append((end, 1.0))
    window.extend([(pad, 1.0)] * (max_length - len(window)))
    return chunks


# ------------------------------------------------------------------------------------------------ encoding


def _text_core(model: torch.nn.Module) -> torch.nn.Module:
    """The module holding ``final_layer_norm`` (transformers 5: the CLIPTextModel itself; 4: ``text_model``)."""
    if hasattr(model, "final_layer_norm"):
        return model
    return _text_core(model.text_model)


DROPPED_LAYERS_ATTR = "comfy_dropped_layers"
"""Set on a text model whose last layer(s) its files leave out (diffusers' SD 2.x text encoders have 23 of
OpenCLIP ViT-H's 24 layers): layer indices still count from the full stack, as ComfyUI's do."""


def _num_layers(model: torch.nn.Module) -> int:
    return len(_text_core(model).encoder.layers)


def _select_hidden(output: Any, model: torch.nn.Module, layer: int | None, layer_norm_hidden: bool) -> torch.Tensor:
    present = _num_layers(model)
    num_layers = present + int(getattr(model, DROPPED_LAYERS_ATTR, 0))
    if layer is None or abs(layer) > num_layers:
        return output.last_hidden_state
    index = layer if layer >= 0 else num_layers + layer
    if index >= present and present < num_layers:
        raise ValueError(f"CLIP layer {layer} is the text encoder's layer {index + 1} of {num_layers}, which its "
                         f"files leave out (only {present} are stored)")
    if index >= num_layers:
        return output.last_hidden_state
    hidden = output.hidden_states[index + 1]  # hidden_states[0] is the embedding output
    if layer_norm_hidden:
        hidden = _text_core(model).final_layer_norm(hidden)
    return hidden


def encode_tokens(model: torch.nn.Module, tokens: TokenizedPrompt, *, layer: int | None = None,
                  layer_norm_hidden: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode ``tokens`` with ComfyUI's weighting: ``(cond [1, 77 * k, dim], pooled [1, dim'])``, float32 on
    the CPU. ``layer`` None is the last layer after the final LayerNorm; otherwise see the module docstring.
    The pooled output is projected when ``model`` has a ``text_projection``."""
    chunks = [list(chunk) for chunk in tokens.chunks]
    sections = len(chunks)
    length = max(len(c) for c in chunks)
    has_weights = any(w != 1.0 for chunk in chunks for _, w in chunk)
    if has_weights:
        empty = [tokens.start_token, tokens.end_token] + [tokens.pad_token] * (length - 2)
        chunks.append([(t, 1.0) for t in empty])

    device = next(model.parameters()).device
    ids, vectors, eos_positions = [], [], []
    for row, chunk in enumerate(chunks):
        row_ids = []
        for position, (token, _) in enumerate(chunk):
            if isinstance(token, torch.Tensor):
                vectors.append((row, position, token))
                row_ids.append(0)  # placeholder: its embedding is replaced below
            else:
                row_ids.append(int(token))
        ids.append(row_ids)
        eos_positions.append(row_ids.index(tokens.end_token) if tokens.end_token in row_ids else len(row_ids) - 1)
    input_ids = torch.tensor(ids, dtype=torch.long, device=device)

    def insert_vectors(_module: torch.nn.Module, _inputs: Any, embedded: torch.Tensor) -> torch.Tensor:
        embedded = embedded.clone()
        for row, position, vector in vectors:
            embedded[row, position] = vector.to(device=embedded.device, dtype=embedded.dtype)
        return embedded

    handle = model.get_input_embeddings().register_forward_hook(insert_vectors) if vectors else None
    try:
        with torch.no_grad():
            output = model(input_ids=input_ids, output_hidden_states=True)
            out = _select_hidden(output, model, layer, layer_norm_hidden).float()
            rows = torch.arange(len(chunks), device=output.last_hidden_state.device)
            pooled = output.last_hidden_state[rows, torch.tensor(eos_positions, device=rows.device)]
            projection = getattr(model, "text_projection", None)
            if projection is not None:
                pooled = projection(pooled)
    finally:
        if handle is not None:
            handle.remove()

    z = out[:sections]
    if has_weights:
        weights = torch.tensor([[w for _, w in chunk] for chunk in chunks[:sections]], dtype=torch.float32,
                               device=z.device).unsqueeze(-1)
        z_empty = out[-1:]
        z = torch.where(weights != 1.0, (z - z_empty) * weights + z_empty, z)
    cond = z.reshape(1, sections * z.shape[1], z.shape[2]).cpu()
    return cond, pooled[0:1].float().cpu()


def _embedding_dim(model: torch.nn.Module) -> int:
    return int(model.get_input_embeddings().weight.shape[-1])


_FAMILY_ENCODERS = {
    # family: (tokenizer pad id per encoder (None = EOS), embedding keys, default layer, final norm on it)
    "sd1": ((None,), ("clip_l",), None, True),
    "sd2": ((0,), ("clip_l",), -2, True),
    "sdxl": ((None, 0), ("clip_l", "clip_g"), -2, False),
    "sdxl_refiner": ((0,), ("clip_g",), -2, False),
}


def encoder_settings(clip: TextEncoder) -> tuple[int | None, list[tuple[Any, torch.nn.Module, int | None, str]],
                                                 bool]:
    """How ComfyUI encodes for ``clip.family``: ``(layer, [(tokenizer, model, pad id, embedding key)],
    final LayerNorm on the selected layer)``. ``layer`` is CLIPSetLastLayer's value, else the family's default.

    SD 2.x (ComfyUI's ``SD2ClipHModel``: ``layer="penultimate"``, ``SDClipModel``'s default
    ``layer_norm_hidden_state=True``, ``special_tokens`` pad 0; ``SD2ClipHTokenizer`` with ``pad_with_end=False``
    and the default embedding key): the penultimate layer through the final LayerNorm, padded with id 0. The
    SDXL refiner encodes with bigG alone, as SDXL's bigG (penultimate, no final norm, pad 0)."""
    if clip.family not in _FAMILY_ENCODERS:
        raise ValueError(f"text encoding for model family {clip.family!r} is not supported "
                         f"({', '.join(_FAMILY_ENCODERS)})")
    pads, keys, default_layer, layer_norm_hidden = _FAMILY_ENCODERS[clip.family]
    if len(clip.models) != len(pads) or len(clip.tokenizers) != len(pads):
        raise ValueError(f"a {clip.family} text encoder needs {len(pads)} tokenizer(s) and model(s), not "
                         f"{len(clip.tokenizers)} and {len(clip.models)}")
    layer = getattr(clip, "layer", None)
    effective = default_layer if layer is None else layer
    encoders = list(zip(clip.tokenizers, clip.models, pads, keys, strict=True))
    return effective, encoders, layer_norm_hidden


def encode_prompt(clip: TextEncoder, text: str, *, context: Any = None) -> tuple[list[CondEntry], dict]:
    """CLIPTextEncode: ``text`` -> a one-entry CONDITIONING and an info dict (``warnings``,
    ``missing_embeddings``, ``embeddings``, ``token_count``, ``token_counts``, ``chunks``, ``layer``)."""
    effective, encoders, layer_norm_hidden = encoder_settings(clip)
    outputs, tokenized = [], []
    for tokenizer, model, pad, key in encoders:
        tokens = tokenize_weighted(tokenizer, text, embeddings_dir=clip.embeddings_dir, embedding_key=key,
                                   embedding_dim=_embedding_dim(model), pad_token=pad, context=context)
        tokenized.append(tokens)
        outputs.append(encode_tokens(model, tokens, layer=effective, layer_norm_hidden=layer_norm_hidden))

    if len(outputs) == 1:
        cond, pooled = outputs[0]
    else:
        (l_cond, _), (g_cond, g_pooled) = outputs
        cut = min(l_cond.shape[1], g_cond.shape[1])
        cond, pooled = torch.cat([l_cond[:, :cut], g_cond[:, :cut]], dim=-1), g_pooled

    def unique(items: list[str]) -> list[str]:
        return list(dict.fromkeys(items))

    info = {
        "warnings": unique([w for t in tokenized for w in t.warnings]),
        "missing_embeddings": unique([n for t in tokenized for n in t.missing_embeddings]),
        "embeddings": unique([n for t in tokenized for n in t.embeddings]),
        "token_count": tokenized[0].token_count,
        "token_counts": [t.token_count for t in tokenized],
        "chunks": cond.shape[1] // MAX_LENGTH,
        "layer": "last" if effective is None else effective,
    }
    return [CondEntry(cond=cond, pooled_output=pooled)], info
