"""Where a LoadImage / LoadImageMask input image may come from, and a sentence for every value that is refused.

An input image is given in one of three forms:

* a file name inside the input folder (``cat.png``, ``shots/cat.png``, ComfyUI's ``cat.png [input]``);
* a ``file://`` URI of a file inside the input folder (``file:///data/input/shots/cat.png``);
* an ``s3://`` URI of an object in the input store (``s3://bucket/inputs/cat.png``), when one is configured.

The same rules run twice: where Airflow validates a run's params (the trigger form and the REST API, through
the JSON-schema format :data:`INPUT_IMAGE_FORMAT`, see :mod:`airflow_comfy.factory.param_formats`), and in the
runner before the first node runs, which never trusts what reached it. Every refusal is a sentence that names
the value ("'../secret.png' leaves the input folder"), never a regular expression.

Pure Python: no Airflow, no torch, no store access (nothing is read here).
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

#: The image types the runner reads from an input (lower-case file name extensions).
IMAGE_TYPES = ("png", "jpg", "jpeg", "webp")
#: The JSON-schema ``format`` of an image param; the provider registers a checker for it with ``jsonschema``.
INPUT_IMAGE_FORMAT = "comfy-input-image"

#: ComfyUI's folder annotations of a LoadImage name; only the input folder is readable here.
_ANNOTATIONS = (" [input]", " [output]", " [temp]")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


class InputImageError(ValueError):
    """An input image value that the runner will not read; the message is a sentence naming the value."""


@dataclass(frozen=True)
class InputRoots:
    """Where input images may be: ``folder``, the input folder's absolute path (``file://`` URIs must name a
    file inside it), and ``store``, the input store's ``s3://bucket/prefix`` (empty: none)."""

    folder: str
    store: str = ""

    @property
    def store_prefix(self) -> str:
        """The input store URI with exactly one trailing ``/`` (empty when there is no store)."""
        return self.store.rstrip("/") + "/" if self.store else ""


@dataclass(frozen=True)
class InputImage:
    """An accepted input image: ``name``, a ``/``-separated path inside the input folder, or ``uri``, an object
    of the input store. Exactly one is set."""

    name: str | None = None
    uri: str | None = None


def locate_input_image(value: object, roots: InputRoots) -> InputImage:
    """Where ``value`` points, or :class:`InputImageError` saying why it is refused."""
    if not isinstance(value, str) or not value.strip():
        raise InputImageError(f"{value!r} is not an input image: give a file name in the input folder or a URI")
    scheme = _SCHEME.match(value)
    if scheme is None:
        image = InputImage(name=_folder_name(value))
    elif scheme.group(1).lower() == "file":
        image = InputImage(name=_file_uri_name(value, roots))
    elif scheme.group(1).lower() == "s3":
        image = InputImage(uri=_store_uri(value, roots))
    else:
        raise InputImageError(f"{value!r} is not an input image the runner can read: {_accepted(roots)}")
    _check_type(value, image.name or image.uri or "")
    return image


def input_image_problem(value: object, roots: InputRoots) -> str | None:
    """The sentence :func:`locate_input_image` would raise, or ``None`` when ``value`` is accepted."""
    try:
        locate_input_image(value, roots)
    except InputImageError as exc:
        return str(exc)
    return None


def folder_name_problem(value: str) -> str | None:
    """Why a plain file name (no URI) would not name an image the runner reads inside the input folder, or
    ``None``: what the workflow validator says of a LoadImage name, before any folder or store is known."""
    if _SCHEME.match(value):
        return None
    try:
        _check_type(value, _folder_name(value))
    except InputImageError as exc:
        return str(exc)
    return None


def _folder_name(value: str) -> str:
    name = value
    for suffix in _ANNOTATIONS:
        if name.endswith(suffix):
            if suffix != " [input]":
                raise InputImageError(f"{value!r} is not in the input folder: only input images can be loaded")
            name = name[: -len(suffix)]
    if "\x00" in name:
        raise InputImageError(f"{value!r} contains a NUL byte")
    parts = name.replace("\\", "/").split("/")
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        raise InputImageError(f"{value!r} is an absolute path: give a name inside the input folder "
                              "(or a file:// URI of a file in it)")
    if ".." in parts:
        raise InputImageError(f"{value!r} leaves the input folder")
    return "/".join(part for part in parts if part not in ("", "."))


def _file_uri_name(value: str, roots: InputRoots) -> str:
    parts = urlsplit(value)
    if parts.netloc not in ("", "localhost"):
        raise InputImageError(f"{value!r} names another host: a file:// URI must be file:///absolute/path")
    if parts.query or parts.fragment:
        raise InputImageError(f"{value!r} must not have a query or fragment")
    path = unquote(parts.path)
    if "\x00" in path:
        raise InputImageError(f"{value!r} contains a NUL byte")
    folder = posixpath.normpath(roots.folder)
    if not path.startswith("/"):
        raise InputImageError(f"{value!r} must hold an absolute path (file:///...)")
    if ".." in path.split("/"):
        raise InputImageError(f"{value!r} leaves the input folder")
    normalized = posixpath.normpath(path)
    if posixpath.commonpath((folder, normalized)) != folder or normalized == folder:
        raise InputImageError(f"{value!r} is not in the input folder (file://{folder}/)")
    return posixpath.relpath(normalized, folder)


def _store_uri(value: str, roots: InputRoots) -> str:
    if not roots.store:
        raise InputImageError(f"{value!r} names an object store, but no input store is configured "
                              "([comfy] input_store): give a file name in the input folder")
    prefix = roots.store_prefix
    if not value.startswith(prefix):
        raise InputImageError(f"{value!r} is not in the input store ({prefix})")
    parts = urlsplit(value)
    if parts.query or parts.fragment:
        raise InputImageError(f"{value!r} must not have a query or fragment")
    rest = value[len(prefix):].split("/")
    if ".." in rest or "." in rest:
        raise InputImageError(f"{value!r} leaves the input store ({prefix})")
    if "" in rest or "\\" in value or "\x00" in value:
        raise InputImageError(f"{value!r} is not an object key in the input store ({prefix})")
    return value


def _check_type(value: str, where: str) -> None:
    extension = posixpath.splitext(where.rsplit("/", 1)[-1])[1].lower().lstrip(".")
    if extension not in IMAGE_TYPES:
        raise InputImageError(f"{value!r} is not an image type the runner reads ({', '.join(IMAGE_TYPES)})")


def _accepted(roots: InputRoots) -> str:
    store = f" or an s3:// URI in the input store ({roots.store_prefix})" if roots.store else ""
    return f"give a file name in the input folder, a file:// URI inside it{store}"
