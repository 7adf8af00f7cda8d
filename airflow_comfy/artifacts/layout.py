"""Where things live in an artifact store: every key the runner and the Airflow side use is made here.

::

    runs/<dag_id>/<run_id>/<group>/try-<n>/<node>/<output>.<ext>   a boundary value written by try n
    runs/<dag_id>/<run_id>/<group>/try-<n>/<node>/saved/<sub>/<f>   an image of try n, staged until it commits
    runs/<dag_id>/<run_id>/<group>/try-<n>/snapshot.json            the snapshot of try n, staged likewise
    runs/<dag_id>/<run_id>/<group>/try-<n>/published.json           the images try n is publishing (before it does)
    runs/<dag_id>/<run_id>/<group>/try-<n>/write-probe              the runner's preflight write (removed at once)
    runs/<dag_id>/<run_id>/<group>/try-<n>/manifest.json            try n's manifest, written last by try n
    runs/<dag_id>/<run_id>/<group>/try-<n>/failure.json             why try n's pod failed (written by the worker)
    runs/<dag_id>/<run_id>/<group>/manifest.json                    the group's final manifest (if published)
    runs/<dag_id>/<run_id>/outputs/<subfolder>/<filename>           SaveImage's files
    runs/<dag_id>/<run_id>/outputs/snapshot.<group>.json            what made them (workflow, params, version)
    specs/sha256/<hex>.json                                         a group spec, named by its content's sha256

Per-try keys mean a retry (or a cleared and re-run task) writes beside, never over, what an earlier try wrote;
a try's manifest (written last) commits it. Images and snapshots get their final names under ``outputs/`` only
when their try commits (:mod:`airflow_comfy.runner.commit`); what a try that never committed left behind is
removed by the try that commits (:mod:`airflow_comfy.artifacts.garbage`).

Every part is sanitized by :func:`~airflow_comfy.artifacts.keys.sanitize_part` (Airflow run ids such as
``manual__2026-11-25T12:00:00+00:00`` contain ``:`` and ``+``). A group whose name would be ``outputs``
gets a hash suffix so it cannot meet the images folder.

``run_key`` is ``"<dag_id>/<run_id>"``, one string, as the runner receives it (``--run-key``).
"""

from __future__ import annotations

import hashlib
import re

from airflow_comfy.artifacts.keys import sanitize_filename, sanitize_part, validate_key

RUNS = "runs"
SPECS = "specs/sha256"
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
OUTPUTS = "outputs"
MANIFEST = "manifest.json"
FAILURE = "failure.json"
PUBLISHED = "published.json"
STAGED_SNAPSHOT = "snapshot.json"
PROBE = "write-probe"
SAVED = "saved"
_TRY = re.compile(r"^try-(\d+)$")
SCALAR_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN")
_EXTENSION = re.compile(r"^[A-Za-z0-9]{1,16}$")


def split_run_key(run_key: str) -> tuple[str, str]:
    """``"<dag_id>/<run_id>"`` -> ``(dag_id, run_id)`` (the run id may itself contain ``/``)."""
    dag_id, slash, run_id = str(run_key).partition("/")
    if not slash or not dag_id or not run_id:
        raise ValueError(f"run key must be '<dag_id>/<run_id>', got {run_key!r}")
    return dag_id, run_id


def try_segment(try_number: int | str) -> str:
    try:
        number = int(try_number)
    except (TypeError, ValueError):
        raise ValueError(f"try number must be an integer, got {try_number!r}") from None
    if number < 0:
        raise ValueError(f"try number must not be negative, got {number}")
    return f"try-{number}"


def group_segment(group: str) -> str:
    segment = sanitize_part(group)
    if segment == OUTPUTS:
        segment = f"{segment}_{hashlib.sha256(group.encode('utf-8')).hexdigest()[:8]}"
    return segment


def run_prefix(run_key: str) -> str:
    """``runs/<dag_id>/<run_id>``: everything one DAG run wrote."""
    dag_id, run_id = split_run_key(run_key)
    return validate_key(f"{RUNS}/{sanitize_part(dag_id)}/{sanitize_part(run_id)}")


def group_prefix(run_key: str, group: str) -> str:
    """``runs/<dag_id>/<run_id>/<group>``."""
    return f"{run_prefix(run_key)}/{group_segment(group)}"


def try_prefix(run_key: str, group: str, try_number: int | str) -> str:
    """``runs/<dag_id>/<run_id>/<group>/try-<n>``: what try ``n`` of the group's task wrote."""
    return f"{group_prefix(run_key, group)}/{try_segment(try_number)}"


def output_key(run_key: str, group: str, try_number: int | str, node: str, output: int | str, ext: str) -> str:
    """``runs/<dag_id>/<run_id>/<group>/try-<n>/<node>/<output>.<ext>``: one persisted node output."""
    if not _EXTENSION.match(ext):
        raise ValueError(f"invalid file extension {ext!r}")
    leaf = f"{sanitize_part(output)}.{ext}"
    return validate_key(f"{try_prefix(run_key, group, try_number)}/{sanitize_part(node)}/{leaf}")


def try_manifest_key(run_key: str, group: str, try_number: int | str) -> str:
    """``runs/<dag_id>/<run_id>/<group>/try-<n>/manifest.json``."""
    return f"{try_prefix(run_key, group, try_number)}/{MANIFEST}"


def try_failure_key(run_key: str, group: str, try_number: int | str) -> str:
    """``runs/<dag_id>/<run_id>/<group>/try-<n>/failure.json``: how try ``n``'s pod(s) failed, written by the
    worker (the pod operator) when the try ends in failure; later tries of the group read it."""
    return f"{try_prefix(run_key, group, try_number)}/{FAILURE}"


def manifest_key(run_key: str, group: str, try_number: int | str | None = None) -> str:
    """``runs/<dag_id>/<run_id>/<group>/manifest.json``: the group's final manifest; with ``try_number``,
    that try's manifest (same as :func:`try_manifest_key`)."""
    if try_number is not None:
        return try_manifest_key(run_key, group, try_number)
    return f"{group_prefix(run_key, group)}/{MANIFEST}"


def try_number_of(segment: str) -> int | None:
    """``"try-3"`` -> 3; None for any other segment."""
    match = _TRY.match(segment)
    return int(match.group(1)) if match else None


def published_key(run_key: str, group: str, try_number: int | str) -> str:
    """``runs/<dag_id>/<run_id>/<group>/try-<n>/published.json``: the output names (and sha256s) try ``n`` is
    about to publish, written before it does, so that a later try can tell its own leftovers from others'."""
    return f"{try_prefix(run_key, group, try_number)}/{PUBLISHED}"


def probe_key(run_key: str, group: str, try_number: int | str) -> str:
    """``runs/<dag_id>/<run_id>/<group>/try-<n>/write-probe``: the runner's preflight write."""
    return f"{try_prefix(run_key, group, try_number)}/{PROBE}"


def staged_snapshot_key(run_key: str, group: str, try_number: int | str) -> str:
    """``runs/<dag_id>/<run_id>/<group>/try-<n>/snapshot.json``: try ``n``'s snapshot until it commits."""
    return f"{try_prefix(run_key, group, try_number)}/{STAGED_SNAPSHOT}"


def staged_image_key(run_key: str, group: str, try_number: int | str, node: str, *path: str) -> str:
    """``runs/<dag_id>/<run_id>/<group>/try-<n>/<node>/saved/<subfolder>/<filename>``: an image of try ``n``
    until the try commits (then it is copied to :func:`image_key` of the same path)."""
    parts = _output_parts(path)
    if not parts:
        raise ValueError(f"invalid output file name {'/'.join(map(str, path))!r}")
    return validate_key("/".join([try_prefix(run_key, group, try_number), sanitize_part(node), SAVED, *parts]))


def _output_parts(path: tuple[str, ...]) -> list[str]:
    return [sanitize_filename(part) for item in path for part in str(item).split("/") if part]


def outputs_prefix(run_key: str, subfolder: str = "") -> str:
    """``runs/<dag_id>/<run_id>/outputs/[<subfolder>/]``: the run's saved images (ends with ``/``, ready for
    ``store.list``)."""
    return "/".join([run_prefix(run_key), OUTPUTS, *_output_parts((subfolder,))]) + "/"


def image_key(run_key: str, *path: str) -> str:
    """``runs/<dag_id>/<run_id>/outputs/<path>``: ``image_key(rk, "x.png")``, ``image_key(rk, "portraits/x.png")``
    or ``image_key(rk, subfolder, filename)`` (an empty subfolder is left out). Each part is sanitized
    (extensions kept), so nothing escapes the outputs folder."""
    parts = _output_parts(path)
    if not parts:
        raise ValueError(f"invalid output file name {'/'.join(map(str, path))!r}")
    return validate_key("/".join([run_prefix(run_key), OUTPUTS, *parts]))


def snapshot_key(run_key: str, group: str) -> str:
    """``runs/<dag_id>/<run_id>/outputs/snapshot.<group>.json``: beside the images, the exact workflow, params
    and package version that made them (published with them when the group's try commits)."""
    return validate_key(f"{run_prefix(run_key)}/{OUTPUTS}/snapshot.{sanitize_part(group)}.json")


def extension_for(type_name: str) -> str:
    """File extension of a persisted value of ComfyUI type ``type_name``: ``json`` for INT / FLOAT / STRING /
    BOOLEAN, ``safetensors`` for tensors (see ``runner.codecs``, which refuses types that never cross)."""
    return "json" if type_name in SCALAR_TYPES else "safetensors"


def spec_key(sha256: str) -> str:
    """``specs/sha256/<hex>.json``: the group spec whose bytes hash to ``sha256`` (written once, shared by every
    run of the same workflow version)."""
    if not _SHA256_HEX.match(sha256 or ""):
        raise ValueError(f"a spec's sha256 must be 64 lowercase hex digits, got {sha256!r}")
    return f"{SPECS}/{sha256}.json"
