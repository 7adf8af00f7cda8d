"""ComfyUI prompt semantics (airflow_comfy.runner.text) on tiny in-memory CLIP models and tokenizers."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import safetensors.torch as safetensors_torch
import torch
import transformers

from airflow_comfy.runner.text import (
    encode_prompt,
    encode_tokens,
    parse_weighted_prompt,
    tokenize_weighted,
)
from airflow_comfy.runner.values import Recipe, TextEncoder

WORDS = ["cat", "dog", "photo", "of", "red", "house"]


def _bytes_to_unicode() -> list[str]:
    """CLIP's byte -> unicode table, printable characters first (the order matters: see
    test_byte_table_is_in_clips_order_so_a_comma_is_token_267)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def _clip_tokenizer(merges: list[tuple[str, str]]):
    chars = _bytes_to_unicode()
    vocab: dict[str, int] = {}
    for token in [*chars, *(c + "</w>" for c in chars), *("".join(m) for m in merges),
                  "<|startoftext|>", "<|endoftext|>"]:
        vocab.setdefault(token, len(vocab))
    return transformers.CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def _word_merges(words: list[str]) -> list[tuple[str, str]]:
    """Merges that make each of ``words`` one token; any other word is one token per letter."""
    merges: list[tuple[str, str]] = []
    for word in words:
        prefix = word[0]
        for ch in word[1:-1]:
            merges.append((prefix, ch))
            prefix += ch
        merges.append((prefix, word[-1] + "</w>"))
    return list(dict.fromkeys(merges))


@pytest.fixture(scope="module")
def tok():
    return _clip_tokenizer(_word_merges(WORDS))


def _ids(tok, *tokens: str) -> list[int]:
    return [tok.convert_tokens_to_ids(t) for t in tokens]


def _config(tok, hidden: int, layers: int, **extra):
    bos, eos = _ids(tok, "<|startoftext|>", "<|endoftext|>")
    return transformers.CLIPTextConfig(
        vocab_size=len(tok.get_vocab()), hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=4, max_position_embeddings=77,
        bos_token_id=bos, eos_token_id=eos, pad_token_id=eos, attn_implementation="eager", **extra)


def _randomize_norms(model):
    for module in model.modules():
        if isinstance(module, torch.nn.LayerNorm):
            torch.nn.init.normal_(module.weight, 1.0, 0.2)
            torch.nn.init.normal_(module.bias, 0.0, 0.2)
    return model


@pytest.fixture(scope="module")
def clip_l(tok):
    torch.manual_seed(0)
    return _randomize_norms(transformers.CLIPTextModel(_config(tok, 32, 2))).eval()


@pytest.fixture(scope="module")
def clip_g(tok):
    torch.manual_seed(1)
    return _randomize_norms(
        transformers.CLIPTextModelWithProjection(_config(tok, 48, 3, projection_dim=40))).eval()


@pytest.fixture
def emb_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "embeddings"
    folder.mkdir()
    return folder


@pytest.fixture
def sd1(tok, clip_l, emb_dir) -> TextEncoder:
    return TextEncoder(tokenizers=[tok], models=[clip_l], family="sd1",
                       recipe=Recipe("CheckpointLoaderSimple", "tiny.safetensors"), embeddings_dir=str(emb_dir))


@pytest.fixture
def sdxl(tok, clip_l, clip_g, emb_dir) -> TextEncoder:
    return TextEncoder(tokenizers=[tok, tok], models=[clip_l, clip_g], family="sdxl",
                       recipe=Recipe("CheckpointLoaderSimple", "tiny-xl.safetensors"), embeddings_dir=str(emb_dir))


def _window(tok, tokens: list[str], pad: int | None = None) -> list[int]:
    bos, eos = _ids(tok, "<|startoftext|>", "<|endoftext|>")
    ids = [bos, *_ids(tok, *tokens), eos]
    return ids + [eos if pad is None else pad] * (77 - len(ids))


def _run(model, *windows: list[int]):
    with torch.no_grad():
        return model(input_ids=torch.tensor(list(windows)), output_hidden_states=True)


# ------------------------------------------------------------------------------------------------- parser

PARSER_CASES = [
    ("a photo of a cat", [("a photo of a cat", 1.0)]),
    ("(a:1.5)", [("a", 1.5)]),
    ("(a)", [("a", 1.1)]),
    ("((a))", [("a", 1.1 * 1.1)]),
    ("(((a)))", [("a", 1.1 * 1.1 * 1.1)]),
    ("((a:1.5))", [("a", 1.5)]),  # an explicit weight replaces the outer levels' 1.1s
    ("((a):1.5)", [("a", 1.5 * 1.1)]),  # ... and inner parentheses still multiply it
    ("x (y:0.5) z", [("x ", 1.0), ("y", 0.5), (" z", 1.0)]),
    ("(a (b:2) c:3)", [("a ", 3.0), ("b", 2.0), (" c", 3.0)]),
    ("(a:b)", [("a:b", 1.1)]),  # not a number: the text keeps ':b', the group gets 1.1
    ("(:2)", [(":2", 1.1)]),  # a colon first is not a weight
    (r"\(a\)", [("(a)", 1.0)]),
    (r"(\(a\):1.2)", [("(a)", 1.2)]),
    ("[a] [b:1.5]", [("[a] [b:1.5]", 1.0)]),  # brackets are not special in ComfyUI
    ("a (b c", [("a ", 1.0), ("(b c", 1.0)]),  # unclosed: the rest is literal, '(' included
    ("a) (b)", [("a) (b)", 1.0)]),  # stray ')': the counter goes negative, later groups are literal
    ("((a)", [("(a", 1.1)]),  # one level closes: the outer '(' ... ')' is a group, the inner '(' literal
    ("", []),
    ("()", []),
    ("(embedding:style:1.2) cat", [("embedding:style", 1.2), (" cat", 1.0)]),
    ("embedding:style, a cat", [("embedding:style, a cat", 1.0)]),
]


@pytest.mark.parametrize(("text", "expected"), PARSER_CASES)
def test_parse_weighted_prompt(text, expected):
    got = parse_weighted_prompt(text)
    assert [s for s, _ in got] == [s for s, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected])


# ------------------------------------------------------------------------------------------------- tokens


def test_window_has_bos_eos_and_eos_padding(tok):
    tokens = tokenize_weighted(tok, "a cat")
    assert len(tokens.chunks) == 1
    assert [t for t, _ in tokens.chunks[0]] == _window(tok, ["a</w>", "cat</w>"])
    assert all(w == 1.0 for _, w in tokens.chunks[0])
    assert tokens.token_count == 2


def test_bigg_pads_with_zero(tok):
    tokens = tokenize_weighted(tok, "a cat", pad_token=0)
    assert [t for t, _ in tokens.chunks[0]] == _window(tok, ["a</w>", "cat</w>"], pad=0)


def test_weights_follow_tokens(tok):
    tokens = tokenize_weighted(tok, "a (red house:1.3) xy")
    ids = _window(tok, ["a</w>", "red</w>", "house</w>", "x", "y</w>"])[:7]
    assert [t for t, _ in tokens.chunks[0][:7]] == ids
    assert [w for _, w in tokens.chunks[0][:7]] == [1.0, 1.0, 1.3, 1.3, 1.0, 1.0, 1.0]


def test_long_group_splits_at_75(tok):
    tokens = tokenize_weighted(tok, "cat " * 80)
    assert len(tokens.chunks) == 2 and all(len(c) == 77 for c in tokens.chunks)
    assert [t for t, _ in tokens.chunks[0]] == _window(tok, ["cat</w>"] * 75)
    assert [t for t, _ in tokens.chunks[1]] == _window(tok, ["cat</w>"] * 5)


def test_short_group_is_not_split_across_windows(tok):
    # 74 tokens, then a 3-token word of its own weight: it would cross the 75 boundary, so the first window
    # is closed (EOS + padding) and the word starts the second one.
    tokens = tokenize_weighted(tok, "cat " * 74 + "(xyz:1.2)")
    assert len(tokens.chunks) == 2
    assert [t for t, _ in tokens.chunks[0]] == _window(tok, ["cat</w>"] * 74)
    assert [t for t, _ in tokens.chunks[1]] == _window(tok, ["x", "y", "z</w>"])
    assert [w for _, w in tokens.chunks[1][1:4]] == [1.2, 1.2, 1.2]


def test_plain_text_is_one_group(tok):
    # ComfyUI tokenizes a whole weighted segment as one group, so a long plain prompt (>= 8 tokens) is split
    # at the boundary even mid-word.
    tokens = tokenize_weighted(tok, "cat " * 74 + "xyz")
    assert [t for t, _ in tokens.chunks[0]] == _window(tok, ["cat</w>"] * 74 + ["x"])
    assert [t for t, _ in tokens.chunks[1]] == _window(tok, ["y", "z</w>"])


# ----------------------------------------------------------------------------------------------- encoding


def test_plain_encoding_matches_the_model(sd1, clip_l, tok):
    cond, info = encode_prompt(sd1, "a cat")
    assert len(cond) == 1 and cond[0].cond.shape == (1, 77, 32) and cond[0].pooled_output.shape == (1, 32)
    out = _run(clip_l, _window(tok, ["a</w>", "cat</w>"]))
    assert torch.equal(cond[0].cond, out.last_hidden_state)
    assert torch.equal(cond[0].pooled_output, out.pooler_output)
    assert info["token_count"] == 2 and info["chunks"] == 1 and info["warnings"] == []


def test_weights_of_one_change_nothing(sd1):
    plain = encode_prompt(sd1, "a red cat")[0][0].cond
    for text in ["(a red cat:1.0)", "(a:1.0) red (cat:1)", "((a red cat:1.0))"]:
        assert torch.equal(encode_prompt(sd1, text)[0][0].cond, plain), text


def test_weight_is_applied_against_the_empty_prompt(sd1, clip_l, tok):
    cond = encode_prompt(sd1, "a (cat:1.5) dog")[0][0].cond
    bos, eos = _ids(tok, "<|startoftext|>", "<|endoftext|>")
    out = _run(clip_l, _window(tok, ["a</w>", "cat</w>", "dog</w>"]), [bos, eos] + [eos] * 75)
    z, z_empty = out.last_hidden_state[0], out.last_hidden_state[1]
    expected = z.clone()
    expected[2] = (z[2] - z_empty[2]) * 1.5 + z_empty[2]
    assert torch.allclose(cond[0], expected, atol=1e-6)
    assert not torch.allclose(cond[0, 2], z[2], atol=1e-3)


def test_long_prompt_concatenates_windows(sd1, clip_l, tok):
    cond, info = encode_prompt(sd1, "cat " * 80)
    assert cond[0].cond.shape == (1, 154, 32) and info["chunks"] == 2 and info["token_count"] == 80
    out = _run(clip_l, _window(tok, ["cat</w>"] * 75), _window(tok, ["cat</w>"] * 5))
    assert torch.allclose(cond[0].cond[0, :77], out.last_hidden_state[0], atol=1e-6)
    assert torch.allclose(cond[0].cond[0, 77:], out.last_hidden_state[1], atol=1e-6)
    assert torch.allclose(cond[0].pooled_output[0], out.pooler_output[0], atol=1e-6)  # the first window's


def test_sd1_layers(sd1, clip_l, tok):
    out = _run(clip_l, _window(tok, ["a</w>", "cat</w>"]))
    final_norm = clip_l.final_layer_norm
    last = encode_prompt(sd1, "a cat")[0][0].cond
    assert torch.equal(last, out.last_hidden_state)
    assert torch.allclose(last, final_norm(out.hidden_states[-1]))  # -1: after the final LayerNorm
    assert not torch.allclose(last, out.hidden_states[-1], atol=1e-3)
    # clip skip 2 on SD 1.x: ComfyUI's SDClipModel keeps layer_norm_hidden_state=True, so the penultimate
    # hidden state also goes through the final LayerNorm
    skip2 = encode_prompt(replace(sd1, layer=-2), "a cat")[0][0].cond
    with torch.no_grad():
        assert torch.allclose(skip2, final_norm(out.hidden_states[-2]), atol=1e-6)
    assert not torch.allclose(skip2, out.hidden_states[-2], atol=1e-3)
    assert not torch.allclose(skip2, last, atol=1e-3)
    # beyond the model's depth ComfyUI falls back to the last layer
    assert torch.equal(encode_prompt(replace(sd1, layer=-24), "a cat")[0][0].cond, last)


def test_encode_tokens_layer_without_norm(clip_l, tok):
    tokens = tokenize_weighted(tok, "a cat")
    cond, _ = encode_tokens(clip_l, tokens, layer=-2, layer_norm_hidden=False)
    assert torch.allclose(cond, _run(clip_l, _window(tok, ["a</w>", "cat</w>"])).hidden_states[-2], atol=1e-6)


# --------------------------------------------------------------------------------------------------- SDXL


def test_sdxl_concatenates_penultimate_states_and_pools_from_bigg(sdxl, clip_l, clip_g, tok):
    cond, info = encode_prompt(sdxl, "a (cat:1.2) photo")
    assert cond[0].cond.shape == (1, 77, 32 + 48) and cond[0].pooled_output.shape == (1, 40)
    words = ["a</w>", "cat</w>", "photo</w>"]
    bos, eos = _ids(tok, "<|startoftext|>", "<|endoftext|>")
    out_l = _run(clip_l, _window(tok, words), [bos, eos] + [eos] * 75)
    out_g = _run(clip_g, _window(tok, words, pad=0), [bos, eos] + [0] * 75)  # bigG pads with 0

    def weighted(hidden):
        z, z_empty = hidden[0].clone(), hidden[1]
        z[2] = (z[2] - z_empty[2]) * 1.2 + z_empty[2]
        return z

    assert torch.allclose(cond[0].cond[0, :, :32], weighted(out_l.hidden_states[-2]), atol=1e-6)
    assert torch.allclose(cond[0].cond[0, :, 32:], weighted(out_g.hidden_states[-2]), atol=1e-6)
    assert torch.allclose(cond[0].pooled_output[0], out_g.text_embeds[0], atol=1e-6)
    assert info["layer"] == -2 and info["token_counts"] == [3, 3]


def test_sdxl_clip_set_last_layer_applies_to_both_without_norm(sdxl, clip_l, clip_g, tok):
    words = ["a</w>", "cat</w>"]
    out_l, out_g = _run(clip_l, _window(tok, words)), _run(clip_g, _window(tok, words, pad=0))
    cond = encode_prompt(replace(sdxl, layer=-3), "a cat")[0][0].cond
    # CLIP-L has 2 layers: -3 is beyond it, so the normal last output; bigG (3 layers): its first layer, raw
    assert torch.allclose(cond[0, :, :32], out_l.last_hidden_state[0], atol=1e-6)
    assert torch.allclose(cond[0, :, 32:], out_g.hidden_states[1][0], atol=1e-6)


# --------------------------------------------------------------------------------------------- embeddings


def _save(path: Path, **tensors):
    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors_torch.save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))


def test_embedding_vectors_take_token_places(sd1, clip_l, tok, emb_dir):
    cat_row = clip_l.get_input_embeddings().weight[_ids(tok, "cat</w>")[0]].detach().clone()
    _save(emb_dir / "catlike.safetensors", emb_params=cat_row[None])
    plain = encode_prompt(sd1, "a cat dog")[0][0].cond
    for text in ["a embedding:catlike dog", "a embedding:catlike.safetensors dog"]:
        cond, info = encode_prompt(sd1, text)
        assert torch.equal(cond[0].cond, plain), text
        assert info["embeddings"] == [text.split()[1].removeprefix("embedding:")]
        assert info["token_count"] == 3


def test_embedding_changes_output_from_its_position(sd1, emb_dir):
    torch.manual_seed(3)
    _save(emb_dir / "sub" / "style.safetensors", emb_params=torch.randn(2, 32))  # found in a subfolder
    plain = encode_prompt(sd1, "a cat")[0][0].cond
    cond, info = encode_prompt(sd1, "a embedding:style cat")
    tokens = tokenize_weighted(sd1.tokenizers[0], "a embedding:style cat", embeddings_dir=sd1.embeddings_dir)
    assert [isinstance(t, torch.Tensor) for t, _ in tokens.chunks[0][:5]] == [False, False, True, True, False]
    assert torch.equal(cond[0].cond[0, :2], plain[0, :2])  # causal: BOS and "a" come before the vectors
    assert not torch.allclose(cond[0].cond[0, 2], plain[0, 2], atol=1e-3)
    assert info["token_count"] == 4 and info["missing_embeddings"] == []


def test_weighted_embedding(tok, emb_dir):
    _save(emb_dir / "style.safetensors", emb_params=torch.ones(2, 32))
    tokens = tokenize_weighted(tok, "(embedding:style:1.3) cat", embeddings_dir=str(emb_dir))
    assert [w for _, w in tokens.chunks[0][:4]] == [1.0, 1.3, 1.3, 1.0]


def test_missing_and_unusable_embeddings_are_dropped_and_reported(sd1, emb_dir, tmp_path):
    plain = encode_prompt(sd1, "a cat")[0][0].cond
    (emb_dir / "old.pt").write_bytes(b"not a safetensors file")
    _save(emb_dir / "narrow.safetensors", emb_params=torch.ones(1, 16))
    _save(tmp_path / "outside.safetensors", emb_params=torch.ones(1, 32))
    for name in ["nope", "old", "narrow", "../outside"]:
        cond, info = encode_prompt(sd1, f"a embedding:{name} cat")
        assert torch.equal(cond[0].cond, plain), name
        assert info["missing_embeddings"] == [name]
        assert any(f"embedding:{name} does not exist" in w for w in info["warnings"])
    assert any("pickle" in w for w in encode_prompt(sd1, "embedding:old")[1]["warnings"])
    assert any("size 16" in w for w in encode_prompt(sd1, "embedding:narrow")[1]["warnings"])


def test_embedding_files_are_recorded_in_the_runs_snapshot(sd1, emb_dir):
    import hashlib
    from types import SimpleNamespace

    _save(emb_dir / "sub" / "style.safetensors", emb_params=torch.ones(2, 32))
    (emb_dir / "old.pt").write_bytes(b"not read unless the run allows pickle files")
    run = SimpleNamespace(model_files={}, allow_pickle=False)
    _, info = encode_prompt(sd1, "a embedding:style embedding:old cat", context=run)
    assert info["embeddings"] == ["style"] and info["missing_embeddings"] == ["old"]
    sha = hashlib.sha256((emb_dir / "sub" / "style.safetensors").read_bytes()).hexdigest()
    assert run.model_files == {"embeddings/sub/style.safetensors": sha}  # unusable files are not recorded


def test_sdxl_embedding_file_gives_each_encoder_its_vectors(sdxl, clip_l, clip_g, tok, emb_dir):
    cat = _ids(tok, "cat</w>")[0]
    _save(emb_dir / "xl.safetensors",
          clip_l=clip_l.get_input_embeddings().weight[cat].detach()[None],
          clip_g=clip_g.get_input_embeddings().weight[cat].detach()[None])
    cond, info = encode_prompt(sdxl, "a embedding:xl")
    assert torch.equal(cond[0].cond, encode_prompt(sdxl, "a cat")[0][0].cond)
    assert info["embeddings"] == ["xl"] and info["warnings"] == []


def test_unknown_family_is_refused(sd1):
    with pytest.raises(ValueError, match="family"):
        encode_prompt(replace(sd1, family="flux"), "a cat")


# ------------------------------------------------------------------------------------------- CLIP's byte table
# (the real CLIP vocabulary's ids: tests/test_tokenizers.py)


def test_byte_table_is_in_clips_order_so_a_comma_is_token_267():
    """Built in plain byte order, "," would become 300 instead of 267 and every conditioning that
    contains a comma would be off. The demo vocabulary uses CLIP's layout (256 byte characters, then the same
    with ``</w>``), so the comma's end-of-word id must be 267 there too."""
    import json

    from airflow_comfy.runner.models.demo import demo_tokenizer_files
    from airflow_comfy.runner.models.tokenizers import bytes_to_unicode

    table = bytes_to_unicode()
    assert list(table.values()).index(table[ord(",")]) == 11
    vocab = json.loads(demo_tokenizer_files()["vocab.json"])
    assert vocab[",</w>"] == 267 and vocab[","] == 11
