"""Artifact stores: where groups hand their outputs to each other.

:func:`open_store` picks the implementation from the store URI the runner gets (``--store``):

* ``file:///abs/path`` or a bare path: :class:`LocalStore`, a folder (the embedded default; also any shared
  filesystem such as an NFS or CSI volume mounted into the pods).
* ``s3://bucket/prefix``: :class:`~airflow_comfy.artifacts.s3.S3Store` (boto3, imported only then). Works with
  MinIO and other S3-compatible stores through ``endpoint_url`` or ``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL``;
  credentials come only from the standard AWS chain (environment, config files, instance/pod roles).

Writes are atomic (an object appears whole or not at all) and, unless ``overwrite=True``, refuse to replace an
existing object (:class:`ArtifactExistsError`): a group's manifest, once written, is never replaced.

Every operation is bounded in time (:mod:`airflow_comfy.artifacts.limits`): it answers, or raises
:class:`StoreUnavailable`, within its deadline. A store that refuses for good (read-only or missing folder,
permission denied, no such bucket) raises :class:`StoreRefused`.
"""

from __future__ import annotations

import errno
import json
import mimetypes
import os
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable
from contextlib import suppress
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import quote, unquote, urlsplit

from airflow_comfy.artifacts.errors import (
    ArtifactError,
    ArtifactExistsError,
    ArtifactNotFound,
    BadArtifact,
    StoreRefused,
    StoreUnavailable,
)
from airflow_comfy.artifacts.keys import key_for, validate_key, validate_prefix
from airflow_comfy.artifacts.limits import StoreLimits, bounded

__all__ = [
    "ArtifactError", "ArtifactExistsError", "ArtifactNotFound", "ArtifactStore", "BadArtifact", "Data", "LocalStore",
    "StoreLimits", "StoreRefused", "StoreUnavailable", "key_for", "open_store", "read_uri", "redact_uri",
    "split_uri", "validate_key",
]

Data = bytes | bytearray | memoryview | Iterable[bytes]
"""What ``put_bytes`` takes: the bytes, or an iterable of chunks (streamed to a local file)."""

_CONTENT_TYPES = {".json": "application/json", ".png": "image/png", ".safetensors": "application/octet-stream"}
TMP_PREFIX = ".artifact-tmp-"
"""Local temporary files (invisible to ``list``; keys may not use this prefix)."""


def guess_content_type(key: str) -> str:
    suffix = PurePosixPath(key).suffix.lower()
    return _CONTENT_TYPES.get(suffix) or mimetypes.guess_type(key)[0] or "application/octet-stream"


def iter_chunks(data: Data) -> Iterable[bytes]:
    if isinstance(data, (bytes, bytearray, memoryview)):
        yield bytes(data) if isinstance(data, memoryview) else data
        return
    if isinstance(data, str):
        raise TypeError("put_bytes takes bytes, not str (encode it first)")
    for chunk in data:
        if not isinstance(chunk, (bytes, bytearray, memoryview)):
            raise TypeError(f"put_bytes chunks must be bytes, got {type(chunk).__name__}")
        yield chunk


def join_chunks(data: Data) -> bytes:
    if isinstance(data, bytes):
        return data
    return b"".join(bytes(chunk) for chunk in iter_chunks(data))


def redact_uri(uri: str) -> str:
    """``uri`` with any ``user:password@`` part replaced by ``***@`` (safe to show in messages and logs)."""
    parts = urlsplit(uri) if "://" in uri else None
    if parts is None or "@" not in parts.netloc:
        return uri
    return parts._replace(netloc="***@" + parts.netloc.rsplit("@", 1)[1]).geturl()


class ArtifactStore(ABC):
    """A key -> bytes store with atomic, no-clobber writes. Keys: see :mod:`airflow_comfy.artifacts.keys`.
    Every operation is bounded by ``limits`` (:class:`~airflow_comfy.artifacts.limits.StoreLimits`)."""

    limits: StoreLimits = StoreLimits()

    @property
    @abstractmethod
    def root_uri(self) -> str:
        """The store's own URI (what :func:`open_store` was given, normalized; never with credentials)."""

    @abstractmethod
    def uri(self, key: str) -> str:
        """The full URI of the object at ``key`` (for manifests, XCom, logs; :func:`read_uri` resolves it)."""

    @abstractmethod
    def key_of(self, uri: str) -> str:
        """The key of ``uri`` in this store (inverse of :meth:`uri`); ``ValueError`` if it lies elsewhere."""

    @abstractmethod
    def put_bytes(self, key: str, data: Data, *, content_type: str | None = None, overwrite: bool = False) -> str:
        """Write ``data`` at ``key`` atomically and return the object's URI.

        Raises :class:`ArtifactExistsError` if the key exists and ``overwrite`` is false."""

    @abstractmethod
    def get_bytes(self, key: str) -> bytes:
        """The object's bytes; :class:`ArtifactNotFound` if there is none."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """Keys that start with ``prefix`` (a plain string prefix, as in S3), sorted."""

    @abstractmethod
    def copy(self, source: str, target: str, *, overwrite: bool = False) -> str:
        """Make the object at ``source`` appear whole at ``target`` too (a hard link or a server-side copy: the
        bytes are not sent again) and return the target's URI. :class:`ArtifactExistsError` if ``target``
        exists and ``overwrite`` is false; :class:`ArtifactNotFound` if ``source`` does not exist."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove the object at ``key`` (nothing happens if there is none)."""

    def remove_temp(self, prefix: str = "", *, older_than: float = 0.0, dry_run: bool = False) -> list[str]:
        """Remove the temporary files that writers killed mid-write left under ``prefix`` (those not modified
        for ``older_than`` seconds) and return their paths (``dry_run``: only return them). Stores whose writes
        leave none return ``[]``."""
        return []

    def put_json(self, key: str, value: Any, *, overwrite: bool = False) -> str:
        data = json.dumps(value, indent=2, sort_keys=True).encode("utf-8") + b"\n"
        return self.put_bytes(key, data, content_type="application/json", overwrite=overwrite)

    def get_json(self, key: str) -> Any:
        return parse_json(self.get_bytes(key), self.uri(key))

    def read_uri(self, uri: str) -> bytes:
        """The bytes at a full URI of this store."""
        return self.get_bytes(self.key_of(uri))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.root_uri!r})"


def parse_json(data: bytes, uri: str) -> Any:
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BadArtifact(f"{uri} is not valid JSON: {err}", uri=uri) from None


# --- local folder ---------------------------------------------------------------------------------------------


class LocalStore(ArtifactStore):
    """A folder. Writes go to a temporary file in the target's directory, are flushed to disk, then renamed
    into place (``os.link`` when overwriting is refused, so two writers cannot both win; ``os.replace``
    otherwise)."""

    def __init__(self, root: str | os.PathLike[str], *, limits: StoreLimits | None = None) -> None:
        self.root = Path(os.path.abspath(os.fspath(root)))
        self.limits = limits or StoreLimits.from_env()

    @property
    def root_uri(self) -> str:
        return self.root.as_uri()

    def uri(self, key: str) -> str:
        return f"{self.root_uri.rstrip('/')}/{quote(validate_key(key))}"

    def key_of(self, uri: str) -> str:
        path = Path(file_uri_path(uri))
        try:
            relative = path.relative_to(self.root)
        except ValueError:
            raise ValueError(f"{uri} is not in the artifact store {self.root_uri}") from None
        return validate_key(relative.as_posix())

    def path(self, key: str) -> Path:
        """Where the object of ``key`` lives on disk."""
        validate_key(key)
        if any(segment.startswith(TMP_PREFIX) for segment in key.split("/")):
            raise ValueError(f"invalid artifact key {key!r}: segments may not start with {TMP_PREFIX!r}")
        return self.root.joinpath(*key.split("/"))

    def put_bytes(self, key: str, data: Data, *, content_type: str | None = None, overwrite: bool = False) -> str:
        path, uri = self.path(key), self.uri(key)
        return bounded(lambda: self._put(path, uri, data, overwrite), self.limits, "write", uri)

    def _put(self, path: Path, uri: str, data: Data, overwrite: bool) -> str:
        if not overwrite and path.exists():
            raise ArtifactExistsError(f"{uri} already exists (artifacts are never overwritten)", uri=uri)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=TMP_PREFIX, suffix=".tmp")
        except OSError as err:
            raise os_failure("write", uri, err) from None
        try:
            _write_file(fd, tmp, data)
            _publish(Path(tmp), path, overwrite=overwrite, uri=uri)
        except OSError as err:
            raise os_failure("write", uri, err) from None
        finally:
            with suppress(OSError):
                os.unlink(tmp)
        _fsync_dir(path.parent)
        return uri

    def get_bytes(self, key: str) -> bytes:
        path, uri = self.path(key), self.uri(key)
        return bounded(lambda: self._get(path, uri), self.limits, "read", uri)

    @staticmethod
    def _get(path: Path, uri: str) -> bytes:
        try:
            return path.read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ArtifactNotFound(f"no artifact at {uri}", uri=uri) from None
        except OSError as err:
            raise os_failure("read", uri, err) from None

    def exists(self, key: str) -> bool:
        path = self.path(key)
        return bounded(path.is_file, self.limits, "check", self.uri(key))

    def list(self, prefix: str = "") -> list[str]:
        validate_prefix(prefix)
        return bounded(lambda: self._list(prefix), self.limits, "list", f"{self.root_uri}/{prefix}")

    def _list(self, prefix: str) -> list[str]:
        base = self.root.joinpath(*prefix.split("/")[:-1]) if "/" in prefix else self.root
        keys = []
        for folder, _dirs, files in os.walk(base):
            relative = Path(folder).relative_to(self.root).as_posix()
            for name in files:
                key = name if relative == "." else f"{relative}/{name}"
                if key.startswith(prefix) and not name.startswith(TMP_PREFIX):
                    keys.append(key)
        return sorted(keys)

    def copy(self, source: str, target: str, *, overwrite: bool = False) -> str:
        src, dst, uri = self.path(source), self.path(target), self.uri(target)
        return bounded(lambda: self._copy(src, dst, uri, overwrite, source), self.limits, "write", uri)

    def _copy(self, src: Path, dst: Path, uri: str, overwrite: bool, source: str) -> str:
        if not src.is_file():
            raise ArtifactNotFound(f"no artifact at {self.uri(source)}", uri=self.uri(source))
        try:
            dst.parent.mkdir(parents=True, exist_ok=True)
            if overwrite:
                with suppress(FileNotFoundError):
                    os.unlink(dst)
            os.link(src, dst)  # fails if the target exists: no two writers both "win"
        except FileExistsError:
            raise ArtifactExistsError(f"{uri} already exists (artifacts are never overwritten)", uri=uri) from None
        except OSError as err:
            if err.errno not in _NO_HARD_LINKS:
                raise os_failure("write", uri, err) from None
            return self._put(dst, uri, src.read_bytes(), overwrite)
        _fsync_dir(dst.parent)
        return uri

    def delete(self, key: str) -> None:
        path = self.path(key)
        bounded(lambda: self._delete(path, self.uri(key)), self.limits, "delete", self.uri(key))

    def _delete(self, path: Path, uri: str) -> None:
        try:
            path.unlink()
        except FileNotFoundError:
            return
        except OSError as err:
            raise os_failure("delete", uri, err) from None
        self._prune(path.parent)

    def _prune(self, folder: Path) -> None:
        """Remove ``folder`` and its parents while they are empty (never the store's root)."""
        while folder != self.root and self.root in folder.parents:
            try:
                folder.rmdir()
            except OSError:
                return
            folder = folder.parent

    def remove_temp(self, prefix: str = "", *, older_than: float = 0.0, dry_run: bool = False) -> list[str]:
        validate_prefix(prefix)
        base = self.root.joinpath(*prefix.rstrip("/").split("/")) if prefix else self.root
        return bounded(lambda: self._remove_temp(base, older_than, dry_run), self.limits, "clean", self.root_uri)

    def _remove_temp(self, base: Path, older_than: float, dry_run: bool) -> list[str]:
        removed, now = [], time.time()
        for folder, _dirs, files in os.walk(base):
            for name in files:
                path = Path(folder, name)
                with suppress(OSError):
                    if name.startswith(TMP_PREFIX) and now - path.stat().st_mtime >= older_than:
                        if not dry_run:
                            path.unlink()
                        removed.append(path.relative_to(self.root).as_posix())
                        if not dry_run:
                            self._prune(path.parent)
        return sorted(removed)


_NO_HARD_LINKS = {errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP}
_REFUSED_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOENT, errno.ENOTDIR, errno.EISDIR}


def os_failure(action: str, uri: str, err: OSError) -> ArtifactError:
    """An :class:`ArtifactError` for a failed file operation: :class:`StoreRefused` when no retry can help (a
    read-only, missing or forbidden folder), a plain (retryable) one otherwise (a full disk, an I/O error)."""
    kind = StoreRefused if err.errno in _REFUSED_ERRNOS else ArtifactError
    return kind(f"cannot {action} {uri}: {err.strerror or err}", uri=uri)


def _write_file(fd: int, tmp: str, data: Data) -> None:
    with os.fdopen(fd, "wb") as handle:
        for chunk in iter_chunks(data):
            handle.write(chunk)
        handle.flush()
        os.fsync(handle.fileno())
    os.chmod(tmp, 0o644)


def _publish(tmp: Path, path: Path, *, overwrite: bool, uri: str) -> None:
    """Move the finished temporary file into place, atomically."""
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)  # fails if the target exists: no two writers both "win"
    except FileExistsError:
        raise ArtifactExistsError(f"{uri} already exists (artifacts are never overwritten)", uri=uri) from None
    except OSError:  # a filesystem without hard links: check, then rename
        if path.exists():
            raise ArtifactExistsError(f"{uri} already exists (artifacts are never overwritten)", uri=uri) from None
        os.replace(tmp, path)


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (best effort: not every platform can open a directory)."""
    with suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# --- URIs -----------------------------------------------------------------------------------------------------


def file_uri_path(uri: str) -> str:
    """The absolute local path of a ``file://`` URI (percent-decoded)."""
    parts = urlsplit(uri)
    if parts.scheme != "file":
        raise ValueError(f"not a file:// URI: {redact_uri(uri)}")
    if parts.netloc not in ("", "localhost"):
        raise ValueError(f"file URI {redact_uri(uri)} names a host; use file:///absolute/path (three slashes)")
    if parts.query or parts.fragment:
        raise ValueError(f"file URI {redact_uri(uri)} must not have a query or fragment")
    path = unquote(parts.path)
    if not os.path.isabs(path):
        raise ValueError(f"file URI {redact_uri(uri)} must hold an absolute path")
    return path


def open_store(uri: str | os.PathLike[str], **options: Any) -> ArtifactStore:
    """The store for ``uri``: ``file:///abs/path`` or a bare path -> :class:`LocalStore`; ``s3://bucket/prefix``
    -> :class:`~airflow_comfy.artifacts.s3.S3Store` (``options``: ``endpoint_url``, ``region_name``, ``client``,
    ``credentials``). Both take ``limits`` (default: :meth:`StoreLimits.from_env`)."""
    text = os.fspath(uri)
    if not text:
        raise ValueError("artifact store URI is empty")
    if "://" not in text:
        return _local(text, options)
    scheme = urlsplit(text).scheme.lower()
    if scheme == "file":
        return _local(file_uri_path(text), options)
    if scheme == "s3":
        from airflow_comfy.artifacts.s3 import S3Store

        return S3Store.from_uri(text, **options)
    raise ValueError(
        f"unsupported artifact store URI {redact_uri(text)!r}: use file:///absolute/path or s3://bucket/prefix"
    )


def _local(path: str, options: dict[str, Any]) -> LocalStore:
    limits = options.pop("limits", None)
    unused = sorted(name for name, value in options.items() if value is not None)
    if unused:
        raise TypeError(f"a local artifact store takes no options but limits (got {', '.join(unused)})")
    return LocalStore(path, limits=limits)


def split_uri(uri: str, **options: Any) -> tuple[ArtifactStore, str]:
    """A store and key for a full object URI (``file:///...`` or ``s3://bucket/key``)."""
    scheme = urlsplit(uri).scheme.lower() if "://" in uri else ""
    if scheme == "file":
        path = Path(file_uri_path(uri))
        store = _local(path.anchor, options)
        return store, validate_key(path.relative_to(path.anchor).as_posix())
    if scheme == "s3":
        from airflow_comfy.artifacts.s3 import S3Store, parse_s3_uri

        bucket, key = parse_s3_uri(uri)
        if not key:
            raise ValueError(f"S3 URI {uri} names a bucket but no object")
        return S3Store(bucket, **options), validate_key(key)
    raise ValueError(f"cannot read {redact_uri(uri)!r}: expected a file:// or s3:// URI")


def read_uri(uri: str, **options: Any) -> bytes:
    """The bytes of the object at a full ``file://`` or ``s3://`` URI (e.g. an upstream group's manifest)."""
    store, key = split_uri(uri, **options)
    return store.get_bytes(key)
