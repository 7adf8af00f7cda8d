"""Where an uploaded input image goes, and what the user then gives as the ``image`` param.

With ``[comfy] input_store`` set, the upload becomes an object of that store (``s3://bucket/prefix/upload-…``),
written with the store code every task uses (bounded operations, the api-server's store credentials): the
workers and the runner read it from there, wherever they run, so no folder has to be shared with the
api-server. Without one, it becomes a file directly inside ``[comfy] input_path``, which then has to be the
same folder (a shared volume) wherever the runner reads inputs. Either way the name is the bytes' hash
(:func:`~airflow_comfy.gallery.paths.upload_name`), so the same image uploaded twice lands once. Pure Python:
no Airflow, no FastAPI.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from airflow_comfy.artifacts.errors import ArtifactExistsError
from airflow_comfy.artifacts.store import ArtifactStore, LocalStore
from airflow_comfy.gallery.paths import input_target, upload_name

#: ``SavedUpload.where`` of an upload written into the input store.
INPUT_STORE = "input_store"
#: ``SavedUpload.where`` of an upload written into the input folder.
INPUT_PATH = "input_path"


@dataclass(frozen=True)
class SavedUpload:
    """An upload, written: ``name`` (its file name), ``uri`` (the object's or file's URI), ``value`` (what to
    give as the ``image`` param: the ``s3://`` URI in an input store, else the bare name) and ``where``
    (:data:`INPUT_STORE` or :data:`INPUT_PATH`)."""

    name: str
    uri: str
    value: str
    where: str


def save_upload(filename: str, data: bytes, *, store: ArtifactStore | None, input_root: Path) -> SavedUpload:
    """Write an uploaded image into ``store`` (the input store), or into ``input_root`` when there is none.

    :class:`~airflow_comfy.gallery.paths.BadPath` when the file is not an image it claims to be;
    :class:`~airflow_comfy.artifacts.errors.ArtifactError` when the store or folder cannot be written."""
    name = upload_name(filename, data)
    if store is not None:
        uri = _put_once(store, name, data)
        return SavedUpload(name=name, uri=uri, value=uri, where=INPUT_STORE)
    target = input_target(input_root, name)
    uri = _put_once(LocalStore(target.parent), name, data)
    return SavedUpload(name=name, uri=uri, value=name, where=INPUT_PATH)


def _put_once(store: ArtifactStore, name: str, data: bytes) -> str:
    try:
        return store.put_bytes(name, data)
    except ArtifactExistsError:  # the same bytes, uploaded before: the name is their hash
        return store.uri(name)
