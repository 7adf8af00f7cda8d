"""Artifact keys: validation and construction.

A key is a relative, ``/``-separated path inside a store: no leading ``/``, no empty, ``.`` or ``..`` segments,
no backslashes, printable characters only, at most 1024 bytes (S3's limit). :func:`validate_key` enforces this
for every key a store touches, so a key can never escape the store's root.

:func:`key_for` builds a key from free-form parts (dag ids, run ids, node ids, file names): each part becomes
one segment that keeps ``[A-Za-z0-9._-]`` and replaces anything else with ``_``. Because that replacement is
not one-to-one (``a:b`` and ``a_b`` would meet), a part that had to change gets a short hash of its original
text appended (``manual__2026-11-25T12:00:00+00:00`` -> ``manual__2026-11-25T12_00_00_00_00_<8 hex>``): still
readable, deterministic, and distinct parts stay distinct.
"""

from __future__ import annotations

import hashlib
import re

MAX_KEY_BYTES = 1024
MAX_PART_CHARS = 120
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
_HASH_CHARS = 8


def _key_problem(key: str, *, allow_trailing_slash: bool) -> str | None:
    if not key.isprintable():
        return "contains a non-printable character"
    if "\\" in key:
        return "contains a backslash"
    if key.startswith("/"):
        return "is absolute (starts with '/')"
    if len(key.encode("utf-8")) > MAX_KEY_BYTES:
        return f"is longer than {MAX_KEY_BYTES} bytes"
    body = key[:-1] if allow_trailing_slash and key.endswith("/") else key
    for segment in body.split("/"):
        if segment == "":
            return "has an empty segment ('//' or a trailing '/')"
        if segment in (".", ".."):
            return f"has a {segment!r} segment"
    return None


def validate_key(key: str) -> str:
    """Return ``key`` unchanged if it is a valid artifact key, else raise ``ValueError``."""
    if not isinstance(key, str) or not key:
        raise ValueError(f"artifact key must be a non-empty string, got {key!r}")
    problem = _key_problem(key, allow_trailing_slash=False)
    if problem:
        raise ValueError(f"invalid artifact key {key!r}: it {problem}")
    return key


def validate_prefix(prefix: str) -> str:
    """Like :func:`validate_key` for a listing prefix: ``""`` (everything) and a trailing ``/`` are allowed."""
    if not isinstance(prefix, str):
        raise ValueError(f"artifact key prefix must be a string, got {prefix!r}")
    if prefix == "":
        return prefix
    problem = _key_problem(prefix, allow_trailing_slash=True)
    if problem:
        raise ValueError(f"invalid artifact key prefix {prefix!r}: it {problem}")
    return prefix


def sanitize_part(part: str | int) -> str:
    """One key segment from free-form text (see the module docstring); deterministic."""
    text = str(part)
    if text == "":
        raise ValueError("an artifact key part must not be empty")
    cleaned = _UNSAFE.sub("_", text)
    if cleaned.startswith("."):  # no hidden files, no '.' / '..' segments
        cleaned = "_" + cleaned[1:]
    if cleaned == text and len(cleaned) <= MAX_PART_CHARS:
        return cleaned
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:_HASH_CHARS]
    return f"{cleaned[:MAX_PART_CHARS - _HASH_CHARS - 1]}_{digest}"


def key_for(*parts: str | int) -> str:
    """A valid key made of ``parts``, one sanitized segment each: ``key_for("runs", "my dag")`` ->
    ``"runs/my_dag_<hash>"``. A part containing ``/`` stays one segment (the ``/`` becomes ``_``)."""
    if not parts:
        raise ValueError("key_for needs at least one part")
    return validate_key("/".join(sanitize_part(part) for part in parts))


_SUFFIX = re.compile(r"^\.[A-Za-z0-9]{1,16}$")


def sanitize_filename(name: str) -> str:
    """Like :func:`sanitize_part`, but a hash suffix goes before the file's extension:
    ``"my image.png"`` -> ``"my_image_<hash>.png"``."""
    stem, dot, suffix = name.rpartition(".")
    if not dot or not stem or not _SUFFIX.match("." + suffix):
        return sanitize_part(name)
    return f"{sanitize_part(stem)}.{suffix}"
