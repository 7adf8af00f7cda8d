"""What the runner checks before it imports torch or loads a model, so that what would fail late fails first,
in one sentence that names the thing.

1. :func:`committed_manifest`: has this group already committed under this run key? With the same spec and
   params (a retry after the work finished, a rerun) its manifest is the answer: nothing is computed again.
   With another spec or other params the run key is taken: :class:`RunKeyCollision` (exit 2; retrying cannot
   help).
2. :func:`check_writable`: a small probe object is written to the try's folder and removed; a local store also
   needs :data:`MIN_FREE_BYTES` free. A read-only, forbidden or missing location is
   :class:`~airflow_comfy.artifacts.errors.StoreRefused` (exit 2); a full or stalled one is retryable (exit 1).
3. :func:`read_upstream`: the upstream manifests are read and parsed, and the values this group will read
   from them exist. A missing manifest or value is :class:`UpstreamMissing` (exit 2: the upstream group has to
   run again, this task's retry would find the same).

No torch, no Airflow: this runs in the first second of a task.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from airflow_comfy.artifacts import layout
from airflow_comfy.artifacts.errors import ArtifactError, ArtifactNotFound, StoreRefused
from airflow_comfy.artifacts.garbage import GroupState, group_state, read_manifest
from airflow_comfy.artifacts.manifest import GroupManifest
from airflow_comfy.artifacts.store import ArtifactStore, LocalStore
from airflow_comfy.workflow.groupspec import GroupSpec

log = logging.getLogger("airflow_comfy.runner")

MIN_FREE_BYTES = 16 * 2**20
"""A local store with less free space fails the preflight (retryable: space may be freed)."""
PROBE = b"airflow-comfy write probe\n"


class RunKeyCollision(ValueError):
    """The run key already holds this group, committed by another spec or with other params (exit 2)."""


class UpstreamMissing(ValueError):
    """An upstream manifest, or a value it names, is not in the store (exit 2: the upstream group must run
    again)."""


class StoreFull(ArtifactError):
    """A local store without the room a group needs (retryable)."""


def bound_params(spec: GroupSpec, params: Mapping[str, Any]) -> dict[str, Any]:
    """The run's values of the params ``spec`` binds (the only ones that change what this group computes)."""
    return {name: params[name] for name in sorted(spec.params) if name in params}


def spec_digest(spec: GroupSpec, given: str | None) -> str:
    return given or hashlib.sha256(spec.to_bytes()).hexdigest()


def committed_manifest(store: ArtifactStore, spec: GroupSpec, run_key: str, spec_sha256: str,
                       params: Mapping[str, Any]) -> tuple[GroupManifest | None, GroupState]:
    """The manifest of a try that already committed this group with this spec and these params (None if no
    try did), and the group's state (for cleaning). :class:`RunKeyCollision` if one committed it with
    another spec or other params. A committed manifest whose objects are gone is passed over (logged)."""
    state = group_state(store, run_key, spec.group)
    wanted = bound_params(spec, params)
    for number in state.committed():
        manifest = read_manifest(store, layout.manifest_key(run_key, spec.group, number))
        difference = _difference(manifest, spec, spec_sha256, wanted)
        if difference:
            raise RunKeyCollision(
                f"run key {run_key!r} is taken: group {spec.group!r} was committed there by try {number} "
                f"{difference} ({manifest.manifest_uri}); start a new run (another run id) instead of reusing it")
        missing = [uri for uri in _object_uris(manifest) if not _exists(store, uri)]
        if missing:
            log.warning("group %s: try %d committed, but %s is gone: computing again", spec.group, number,
                        missing[0])
            continue
        return manifest, state
    return None, state


def _difference(manifest: GroupManifest, spec: GroupSpec, spec_sha256: str, params: dict[str, Any]) -> str:
    """How ``manifest``'s origin differs from this task's ("" when it does not)."""
    if manifest.spec_sha256 and manifest.spec_sha256 != spec_sha256:
        return (f"from another group spec (sha256 {manifest.spec_sha256[:12]}..., this task's is "
                f"{spec_sha256[:12]}...)")
    if not manifest.spec_sha256 and manifest.workflow_sha256 != spec.workflow_sha256:
        return "from another version of the workflow"
    if manifest.spec_sha256 and manifest.params != params:
        changed = sorted(name for name in set(manifest.params) | set(params)
                         if manifest.params.get(name) != params.get(name))
        there = ", ".join(f"{name}={json.dumps(manifest.params.get(name))}" for name in changed)
        here = ", ".join(f"{name}={json.dumps(params.get(name))}" for name in changed)
        return f"with other params ({there} there; {here} here)"
    return ""


def _object_uris(manifest: GroupManifest) -> list[str]:
    return [record.uri for record in manifest.outputs] + [image.uri for image in manifest.images]


def _exists(store: ArtifactStore, uri: str) -> bool:
    try:
        return store.exists(store.key_of(uri))
    except ValueError:
        return False


def check_writable(store: ArtifactStore, run_key: str, group: str, try_number: int) -> None:
    """Write and remove a probe object in the try's folder; a local store must have room too."""
    key = layout.probe_key(run_key, group, try_number)
    try:
        store.put_bytes(key, PROBE, content_type="text/plain", overwrite=True)
        store.delete(key)
    except StoreRefused as exc:
        raise StoreRefused(f"the artifact store {store.root_uri} cannot be written ({exc})", uri=exc.uri) from None
    except ArtifactError as exc:
        raise type(exc)(f"the artifact store {store.root_uri} cannot be written now ({exc})", uri=exc.uri) from None
    if isinstance(store, LocalStore):
        free = shutil.disk_usage(_existing(store.root)).free
        if free < MIN_FREE_BYTES:
            raise StoreFull(f"the artifact store {store.root_uri} has only {free / 2**20:.1f} MiB free (a group "
                            f"needs at least {MIN_FREE_BYTES // 2**20} MiB): free some space or move "
                            "[comfy] artifact_store", uri=store.root_uri)


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def read_upstream(store: ArtifactStore, spec: GroupSpec, uris: list[str]) -> list[GroupManifest]:
    """The upstream manifests (``--inputs``), each checked to be readable, and the values this group reads
    from them to exist. A manifest outside ``store`` is a wiring mistake: ``ValueError``."""
    manifests = []
    for uri in uris:
        try:
            key = store.key_of(uri)
        except ValueError as exc:
            raise UpstreamMissing(f"--inputs {uri} is not in the artifact store {store.root_uri}: {exc}") from exc
        try:
            manifests.append(read_manifest(store, key))
        except ArtifactNotFound:
            raise UpstreamMissing(f"the upstream manifest {uri} does not exist (removed?): run the upstream "
                                  "group again") from None
    _check_values(store, spec, manifests)
    return manifests


def _check_values(store: ArtifactStore, spec: GroupSpec, manifests: list[GroupManifest]) -> None:
    wanted = {(value.node, value.output) for value in spec.boundary_inputs}
    for manifest in manifests:
        for record in manifest.outputs:
            if (record.node, record.output) in wanted and not _exists(store, record.uri):
                raise UpstreamMissing(
                    f"{record.uri} (output {record.output} of node {record.node}, listed by group "
                    f"{manifest.group!r}'s manifest {manifest.manifest_uri}) does not exist (removed?): run "
                    f"group {manifest.group!r} again")
