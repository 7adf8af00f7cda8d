"""Errors of the artifact store and codecs.

Two families, because the runner maps them to different exit codes:

* :class:`ArtifactError` (and its subclasses :class:`ArtifactNotFound`, :class:`ArtifactExistsError`): the store
  could not do what was asked (network, permissions, a missing or already written object). Infrastructure:
  trying the task again may help.
* :class:`BadArtifact`: an object was read but its content is corrupt or not what it claims to be. Bad input:
  trying again reads the same bytes.

Messages name the object's URI; they never contain credentials.
"""

from __future__ import annotations


class ArtifactError(Exception):
    """The artifact store failed (infrastructure: retryable)."""

    def __init__(self, message: str, *, uri: str | None = None) -> None:
        super().__init__(message)
        self.uri = uri


class ArtifactNotFound(ArtifactError, LookupError):
    """No object at that key / URI."""


class ArtifactExistsError(ArtifactError):
    """An object already exists at that key and ``overwrite`` was not asked for."""


class BadArtifact(ValueError):
    """An object's content is corrupt, truncated or of the wrong kind (bad input: not retryable)."""

    def __init__(self, message: str, *, uri: str | None = None) -> None:
        super().__init__(message)
        self.uri = uri
