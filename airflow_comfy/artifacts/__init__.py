"""Artifact stores, the key layout and group manifests. Imports neither Airflow nor torch (boto3 only when an
``s3://`` store is used)."""

from airflow_comfy.artifacts.errors import ArtifactError, ArtifactExistsError, ArtifactNotFound, BadArtifact
from airflow_comfy.artifacts.keys import key_for, validate_key
from airflow_comfy.artifacts.manifest import GroupManifest, ImageRecord, OutputRecord, Timings
from airflow_comfy.artifacts.store import ArtifactStore, LocalStore, open_store, read_uri, split_uri

__all__ = [
    "ArtifactError", "ArtifactExistsError", "ArtifactNotFound", "ArtifactStore", "BadArtifact", "GroupManifest",
    "ImageRecord", "LocalStore", "OutputRecord", "Timings", "key_for", "open_store", "read_uri", "split_uri",
    "validate_key",
]
