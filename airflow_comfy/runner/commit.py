"""A group try's outputs, and its commit.

While the nodes run, SaveImage's PNGs are *staged* under the try (``try-<n>/<node>/saved/...``); nothing
appears under the run's ``outputs/`` yet. When every node is done and the boundary values are written, the
try commits:

1. ``published.json`` lists the final names (and sha256s) the try is about to publish;
2. each staged image is copied (a hard link, or an S3 server-side copy) to its final name;
3. the snapshot likewise, to ``outputs/snapshot.<group>.json``;
4. the manifest is written, last, never over another: from then on the group is done;
5. what earlier tries of the group left (their values, staged images, published names this try did not
   publish again, temporary files) and this try's staging copies are removed.

A try killed before step 4 leaves no manifest, and the group's next try computes again. File names follow
ComfyUI's counter (one more than the highest number in the folder) over the names *taken* in the run: the
outputs of other groups, this try's own, and not the names an earlier uncommitted try of this group published
(``published.json`` says which, and the bytes are checked). So try 2 of a killed group writes
``txt2img_00001_.png`` again, over its own leftover, never over what another group committed.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from typing import Any

from airflow_comfy.artifacts import layout
from airflow_comfy.artifacts.errors import ArtifactError, ArtifactExistsError
from airflow_comfy.artifacts.garbage import (
    GroupState,
    clean_group,
    group_state,
    own_leftovers,
    read_manifest,
    sha256_of,
)
from airflow_comfy.artifacts.manifest import GroupManifest
from airflow_comfy.artifacts.store import ArtifactStore
from airflow_comfy.runner.faults import crash_point

log = logging.getLogger("airflow_comfy.runner")


class OutputNameTaken(ArtifactError):
    """Another group wrote an image under the name this try planned, while it ran (retryable: the next try
    counts that name as taken)."""


@dataclass
class StagedImage:
    name: str
    """Path relative to the run's ``outputs/`` (``sub/x_00001_.png``)."""
    key: str
    """Where the try staged it."""
    sha256: str


@dataclass
class TryOutputs:
    """Images and commit of try ``try_number`` of ``group``."""

    store: ArtifactStore
    run_key: str
    group: str
    try_number: int
    staged: list[StagedImage] = field(default_factory=list)
    _state: GroupState | None = None
    _leftovers: dict[str, str] | None = None

    # --- while the nodes run ----------------------------------------------------------------------------

    def leftovers(self) -> dict[str, str]:
        """Final names that uncommitted tries of this group published, still holding their bytes."""
        if self._leftovers is None:
            self._state = self._state or group_state(self.store, self.run_key, self.group)
            self._leftovers = own_leftovers(self.store, self._state, self._state.uncommitted())
        return self._leftovers

    def taken_names(self) -> list[str]:
        """Paths under the run's ``outputs/`` that ComfyUI's counter must count: what is there, but this
        group's own leftovers, and what this try staged."""
        prefix = layout.outputs_prefix(self.run_key)
        mine = self.leftovers()
        present = [key[len(prefix):] for key in self.store.list(prefix)]
        return [name for name in present if name not in mine] + [image.name for image in self.staged]

    def stage(self, node: str, subfolder: str, filename: str, png: bytes) -> tuple[str, str]:
        """Stage an image; returns the URI it will have once the try commits, and its sha256."""
        final = layout.image_key(self.run_key, subfolder, filename)
        key = layout.staged_image_key(self.run_key, self.group, self.try_number, node, subfolder, filename)
        self.store.put_bytes(key, png, content_type="image/png", overwrite=True)
        sha256 = hashlib.sha256(png).hexdigest()
        self.staged.append(StagedImage(final[len(layout.outputs_prefix(self.run_key)):], key, sha256))
        return self.store.uri(final), sha256

    # --- the commit -------------------------------------------------------------------------------------

    def commit(self, manifest: GroupManifest, snapshot: dict[str, Any] | None) -> GroupManifest:
        """Publish, write the manifest (last), clean; returns the manifest that commits the group."""
        crash_point("intermediate")
        self._publish_images()
        crash_point("image")
        if snapshot is not None:
            staged = layout.staged_snapshot_key(self.run_key, self.group, self.try_number)
            self.store.put_json(staged, snapshot, overwrite=True)
            self.store.copy(staged, layout.snapshot_key(self.run_key, self.group), overwrite=True)
        key = layout.manifest_key(self.run_key, self.group, self.try_number)
        manifest.manifest_uri = self.store.uri(key)
        try:
            self.store.put_json(key, manifest.to_dict())
        except ArtifactExistsError:  # an earlier attempt of this write landed, or another runner of this try
            manifest = read_manifest(self.store, key)
            log.warning("group %s: try %d's manifest was already there (an earlier attempt of this write landed, "
                        "or another runner of this try committed): using it", self.group, self.try_number)
        crash_point("manifest")
        clean(self.store, self.run_key, self.group, manifest)
        return manifest

    def _publish_images(self) -> None:
        if not self.staged:
            return
        record = {"images": {image.name: image.sha256 for image in self.staged}}
        self.store.put_json(layout.published_key(self.run_key, self.group, self.try_number), record,
                            overwrite=True)
        for image in self.staged:
            self._publish(image)

    def _publish(self, image: StagedImage) -> None:
        target = layout.image_key(self.run_key, image.name)
        try:
            self.store.copy(image.key, target)
            return
        except ArtifactExistsError:
            pass
        if image.name in self.leftovers() or sha256_of(self.store, target) == image.sha256:
            self.store.copy(image.key, target, overwrite=True)  # our own leftover (or the very same bytes)
            return
        uri = self.store.uri(target)
        raise OutputNameTaken(f"{uri} was written by another group while group {self.group!r} ran; the next try "
                              "counts it and takes the next free name", uri=uri)


def clean(store: ArtifactStore, run_key: str, group: str, manifest: GroupManifest) -> None:
    """Remove what the group's tries left beside the committed ``manifest`` (logged; never fails)."""
    try:
        removed = clean_group(store, group_state(store, run_key, group), manifest)
    except ArtifactError as exc:
        log.warning("group %s: could not look for what earlier tries left: %s", group, exc)
        return
    if removed:
        log.info("group %s: removed %d object(s) that uncommitted tries or staging left: %s", group, len(removed),
                 ", ".join(removed[:5]) + (" ..." if len(removed) > 5 else ""))
