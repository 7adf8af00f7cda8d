"""Group specs in the artifact store: content-addressed, so that no spec ever rides on a command line.

A GroupSpec holds the group's nodes and, for output groups, the whole workflow for the PNG metadata: a UI
workflow of a few MB is common, while Linux refuses a single command-line argument over 128 KiB. So the task
writes the spec's bytes to ``specs/sha256/<hex>.json`` in the artifact store just before the runner starts, and
the runner gets ``--spec <URI> --spec-sha256 <hex>``; it reads the object and checks the hash before it
trusts a byte. The same workflow version always makes the same bytes, so every run and every retry shares
one object, and a second writer finds it already there.
"""

from __future__ import annotations

import hashlib

from airflow_comfy.artifacts.errors import ArtifactError, ArtifactExistsError, ArtifactNotFound
from airflow_comfy.artifacts.layout import spec_key
from airflow_comfy.artifacts.store import ArtifactStore


class SpecMismatch(ArtifactError):
    """The object at a spec's URI does not hash to the sha256 it was named by (a damaged or foreign object)."""


def spec_uri(store: ArtifactStore, sha256: str) -> str:
    return store.uri(spec_key(sha256))


def publish_spec(store: ArtifactStore, data: bytes, sha256: str) -> str:
    """Make sure the store holds ``data`` at its content address and return the URI. An existing object is
    read back and checked; a damaged one (wrong hash) is replaced. Raises :class:`ArtifactError` when the
    store cannot be written (infrastructure: the task is retried)."""
    actual = hashlib.sha256(data).hexdigest()
    if actual != sha256:
        raise ValueError(f"spec bytes hash to {actual}, not to the expected {sha256}")
    key = spec_key(sha256)
    try:
        if hashlib.sha256(store.get_bytes(key)).hexdigest() == sha256:
            return store.uri(key)
        overwrite = True  # damaged: a content address may always be rewritten with its content
    except ArtifactNotFound:
        overwrite = False
    try:
        return store.put_bytes(key, data, content_type="application/json", overwrite=overwrite)
    except ArtifactExistsError:  # another task wrote it meanwhile: the same bytes, by construction
        return store.uri(key)


def read_spec_bytes(store: ArtifactStore, uri: str, sha256: str) -> bytes:
    """The spec's bytes at ``uri`` after checking they hash to ``sha256``."""
    data = store.read_uri(uri)
    actual = hashlib.sha256(data).hexdigest()
    if actual != sha256:
        raise SpecMismatch(
            f"the group spec at {uri} hashes to {actual}, not to --spec-sha256 {sha256}: the object is damaged "
            "or not the one this task was built with; the task's next try writes it again", uri=uri)
    return data
