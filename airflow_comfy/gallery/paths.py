"""Paths in gallery requests, confined: a request names an object by DAG, run and a path inside that run's
folder, and nothing it says can reach outside the folder (or the store, or the input folder for uploads).

Two checks, both needed. :func:`run_object_key` refuses, as bad input, any path that is not a plain relative
path (``..``, ``.``, empty segments, a leading ``/``, backslashes, control characters: after the HTTP layer has
percent-decoded it, so ``%2e%2e`` is ``..`` here). :func:`confined_file` then resolves symbolic links of a
file:// store and refuses a file whose real path leaves the run's folder. Pure Python: no Airflow.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from airflow_comfy.artifacts import layout
from airflow_comfy.artifacts.keys import sanitize_filename, validate_key

#: What an uploaded input image may be, by extension: its kind, and what its first bytes must be (the extension
#: alone proves nothing).
IMAGE_KINDS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WebP"}
_MAGIC = {
    "PNG": lambda data: data.startswith(b"\x89PNG\r\n\x1a\n"),
    "JPEG": lambda data: data.startswith(b"\xff\xd8\xff"),
    "WebP": lambda data: data[:4] == b"RIFF" and data[8:12] == b"WEBP",
}
#: Prefix of every uploaded input's file name (so a listing tells them from files put there by hand).
UPLOAD_PREFIX = "upload-"
_HASH_CHARS = 12
_NAME_CHARS = 80
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]")


class BadPath(ValueError):
    """A path in a request that is not a plain relative path (HTTP 400)."""


class OutsideStore(LookupError):
    """A path that resolves outside where it may lead (HTTP 404: nothing there is shown)."""


def check_relative_path(path: str, what: str = "path") -> str:
    """``path`` unchanged if it is a plain relative ``/``-separated path, else :class:`BadPath` saying why."""
    if not path:
        raise BadPath(f"the {what} is empty")
    if not path.isprintable():
        raise BadPath(f"the {what} {path!r} contains a control character")
    if "\\" in path:
        raise BadPath(f"the {what} {path!r} contains a backslash")
    if path.startswith("/") or re.match(r"^[A-Za-z]:", path):
        raise BadPath(f"the {what} {path!r} is absolute; give it relative to the run's folder")
    for segment in path.split("/"):
        if segment in ("", ".", ".."):
            raise BadPath(f"the {what} {path!r} has a {segment or 'empty'!r} segment: it may not leave or "
                          "skip folders")
    return path


def run_object_key(dag_id: str, run_id: str, path: str) -> str:
    """The store key of ``path`` inside the folder of run ``run_id`` of ``dag_id`` (``runs/<dag>/<run>/<path>``)."""
    prefix = layout.run_prefix(f"{dag_id}/{run_id}")
    try:
        return validate_key(f"{prefix}/{check_relative_path(path)}")
    except ValueError as exc:
        if isinstance(exc, BadPath):
            raise
        raise BadPath(str(exc)) from None


def run_relative_path(dag_id: str, run_id: str, key: str) -> str | None:
    """``key`` relative to the run's folder; None if the key is not inside it."""
    prefix = layout.run_prefix(f"{dag_id}/{run_id}") + "/"
    return key[len(prefix):] if key.startswith(prefix) and len(key) > len(prefix) else None


def confined_file(root: Path, key: str, folder_key: str) -> Path:
    """The real path of the file at ``key`` in a file:// store rooted at ``root``, after resolving every symbolic
    link; :class:`OutsideStore` if that leaves the folder at ``folder_key`` (or is not a regular file)."""
    folder = os.path.realpath(root.joinpath(*folder_key.split("/")))
    real = os.path.realpath(root.joinpath(*key.split("/")))
    if os.path.commonpath([folder, real]) != folder or real == folder or not os.path.isfile(real):
        raise OutsideStore(f"no object {key!r} in the run's folder")
    return Path(real)


def upload_name(filename: str, data: bytes) -> str:
    """The input-folder name of an uploaded image: ``upload-<12 hex of its sha256>-<its cleaned name>`` (the
    same bytes always get the same name, so uploading twice is harmless). :class:`BadPath` when the name has
    no image extension or the bytes are not that kind of image."""
    base = os.path.basename(filename.replace("\\", "/")) or "image"
    suffix = Path(base).suffix.lower()
    kind = IMAGE_KINDS.get(suffix)
    if kind is None:
        raise BadPath(f"{base!r} is not a PNG, JPEG or WebP file name ({', '.join(sorted(IMAGE_KINDS))})")
    if not _MAGIC[kind](data):
        raise BadPath(f"{base!r} does not hold a {kind} image (its first bytes say otherwise)")
    stem = _SAFE_NAME.sub("_", Path(base).stem).lstrip("._")[:_NAME_CHARS] or "image"
    digest = hashlib.sha256(data).hexdigest()[:_HASH_CHARS]
    return sanitize_filename(f"{UPLOAD_PREFIX}{digest}-{stem}{suffix}")


def input_target(input_root: Path, name: str) -> Path:
    """Where an upload named ``name`` goes: directly inside ``input_root``, never elsewhere."""
    check_relative_path(name, "file name")
    if "/" in name:
        raise BadPath(f"the file name {name!r} may not name a folder")
    root = Path(os.path.realpath(input_root))
    return root / name
