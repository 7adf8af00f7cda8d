"""What the tries of a group left in the store, and removing what no committed try needs.

A try commits when its manifest is written (last). Until then everything it wrote is its own: boundary values
and staged images under ``try-<n>/``, and, once it starts publishing, the final-named images listed in its
``published.json``. A try that never committed (killed, timed out, failed) leaves those behind; the try that
commits removes them (:func:`clean_group`), and ``airflow-comfy gc`` removes those of groups that never
committed. Kept always: committed manifests and the objects they name, and ``failure.json`` records.

Pure store operations: no torch, no Airflow.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

from airflow_comfy.artifacts import layout
from airflow_comfy.artifacts.errors import ArtifactError, ArtifactNotFound, BadArtifact
from airflow_comfy.artifacts.manifest import GroupManifest
from airflow_comfy.artifacts.store import ArtifactStore, parse_json

log = logging.getLogger("airflow_comfy.artifacts")


@dataclass
class GroupState:
    """The keys under ``runs/<dag>/<run>/<group>/``, by try."""

    run_key: str
    group: str
    tries: dict[int, list[str]] = field(default_factory=dict)
    other: list[str] = field(default_factory=list)
    """Keys outside any ``try-<n>/`` folder."""

    def committed(self) -> list[int]:
        """Tries with a manifest, lowest first."""
        return sorted(n for n, keys in self.tries.items()
                      if layout.manifest_key(self.run_key, self.group, n) in keys)

    def uncommitted(self) -> list[int]:
        return sorted(n for n in self.tries if n not in self.committed())


def group_state(store: ArtifactStore, run_key: str, group: str) -> GroupState:
    """One listing of the group's folder."""
    prefix = layout.group_prefix(run_key, group) + "/"
    state = GroupState(run_key, group)
    for key in store.list(prefix):
        number = layout.try_number_of(key[len(prefix):].split("/", 1)[0])
        if number is None:
            state.other.append(key)
        else:
            state.tries.setdefault(number, []).append(key)
    return state


def read_manifest(store: ArtifactStore, key: str) -> GroupManifest:
    uri = store.uri(key)
    return GroupManifest.from_dict(store.get_json(key), uri=uri)


def published(store: ArtifactStore, state: GroupState, tries: Iterable[int]) -> dict[str, str]:
    """Output name (relative to the run's ``outputs/``) -> sha256, from the ``published.json`` of ``tries``."""
    names: dict[str, str] = {}
    for number in tries:
        key = layout.published_key(state.run_key, state.group, number)
        if key not in state.tries.get(number, []):
            continue
        try:
            record = parse_json(store.get_bytes(key), store.uri(key))
        except (ArtifactNotFound, BadArtifact):
            continue  # half a record cannot name anything reliably
        images = record.get("images") if isinstance(record, dict) else None
        if isinstance(images, dict):
            names.update({str(name): str(sha) for name, sha in images.items()})
    return names


def sha256_of(store: ArtifactStore, key: str) -> str | None:
    try:
        return hashlib.sha256(store.get_bytes(key)).hexdigest()
    except ArtifactNotFound:
        return None


def own_leftovers(store: ArtifactStore, state: GroupState, tries: Iterable[int]) -> dict[str, str]:
    """The final-named outputs that ``tries`` published without committing and that still hold the bytes they
    published (so no other group wrote them since): name -> sha256."""
    leftovers = {}
    for name, sha in published(store, state, tries).items():
        if sha256_of(store, layout.image_key(state.run_key, name)) == sha:
            leftovers[name] = sha
    return leftovers


def clean_group(store: ArtifactStore, state: GroupState, keep: GroupManifest | None, *,
                dry_run: bool = False) -> list[str]:
    """Remove what the group's uncommitted tries left (their files but ``failure.json``, and their published
    outputs that ``keep`` does not name), ``keep``'s staging leftovers (staged images and snapshot,
    ``published.json``, the write probe) and any temporary file in the group's folder. With ``keep=None``
    (``airflow-comfy gc --unfinished``) every try without a manifest is cleaned. Returns the removed URIs;
    failures are logged, not raised (cleaning is a courtesy, never a reason to fail a task). ``dry_run``: only
    say what would go."""
    removed: list[str] = []
    delete = _listed if dry_run else _delete
    kept_names = {_relative_output(state.run_key, image.uri, store) for image in keep.images} if keep else set()
    uncommitted = state.uncommitted()
    for name in sorted(own_leftovers(store, state, uncommitted)):
        if name not in kept_names:
            delete(store, layout.image_key(state.run_key, name), removed)
    for number in uncommitted:
        for key in state.tries[number]:
            if not key.endswith("/" + layout.FAILURE):
                delete(store, key, removed)
    if keep is not None:
        for key in state.tries.get(keep.try_number, []):
            if _is_staging(state, keep.try_number, key):
                delete(store, key, removed)
    try:
        removed += [f"{store.root_uri}/{path}" for path in store.remove_temp(
            layout.group_prefix(state.run_key, state.group) + "/", dry_run=dry_run)]
    except ArtifactError as exc:
        log.warning("could not remove temporary files: %s", exc)
    return removed


def _is_staging(state: GroupState, number: int, key: str) -> bool:
    head = layout.try_prefix(state.run_key, state.group, number) + "/"
    rest = key[len(head):]
    parts = rest.split("/")
    return (rest in (layout.PUBLISHED, layout.STAGED_SNAPSHOT, layout.PROBE)
            or (len(parts) > 2 and parts[1] == layout.SAVED))


def _relative_output(run_key: str, uri: str, store: ArtifactStore) -> str:
    try:
        return store.key_of(uri)[len(layout.outputs_prefix(run_key)):]
    except ValueError:
        return ""


def _listed(store: ArtifactStore, key: str, removed: list[str]) -> None:
    removed.append(store.uri(key))


def _delete(store: ArtifactStore, key: str, removed: list[str]) -> None:
    try:
        store.delete(key)
    except ArtifactError as exc:
        log.warning("could not remove %s: %s", store.uri(key), exc)
        return
    removed.append(store.uri(key))


# --- airflow-comfy gc -----------------------------------------------------------------------------------------


@dataclass
class Collected:
    removed: list[str] = field(default_factory=list)
    unfinished: list[str] = field(default_factory=list)
    """``<run key> <group>`` of groups with no committed try, left alone (``--unfinished`` cleans them)."""


def collect(store: ArtifactStore, *, run_keys: Iterable[str] = (), unfinished: bool = False,
            temp_older_than: float = 3600.0, dry_run: bool = False) -> Collected:
    """Clean every group of the store's runs (or of ``run_keys``, ``<dag_id>/<run_id>``): what uncommitted tries
    left beside a committed one (:func:`clean_group`); with ``unfinished``, also every try of groups that never
    committed (only for runs that are over: a running try's files would go too); and temporary files not
    modified for ``temp_older_than`` seconds anywhere in the store."""
    result = Collected()
    for run_key, group in _groups(store, list(run_keys)):
        state = group_state(store, run_key, group)
        committed = state.committed()
        if committed:
            keep = read_manifest(store, layout.manifest_key(run_key, group, committed[0]))
            result.removed += clean_group(store, state, keep, dry_run=dry_run)
        elif unfinished:
            result.removed += clean_group(store, state, None, dry_run=dry_run)
        elif any(state.tries.values()):
            result.unfinished.append(f"{run_key} {group}")
    result.removed += [f"{store.root_uri}/{path}"
                       for path in store.remove_temp(older_than=temp_older_than, dry_run=dry_run)]
    result.removed = list(dict.fromkeys(result.removed))  # a dry run lists a temporary file twice
    return result


def _groups(store: ArtifactStore, run_keys: list[str]) -> list[tuple[str, str]]:
    """``(run key, group folder)`` pairs, from the keys under ``runs/`` (folder names are their own sanitized
    form, so they serve as run key parts and group names)."""
    prefixes = [layout.run_prefix(key) + "/" for key in run_keys] or [layout.RUNS + "/"]
    found: set[tuple[str, str]] = set()
    for prefix in prefixes:
        for key in store.list(prefix):
            parts = key.split("/")
            if len(parts) >= 5 and parts[3] != layout.OUTPUTS:
                found.add((f"{parts[1]}/{parts[2]}", parts[3]))
    return sorted(found)
