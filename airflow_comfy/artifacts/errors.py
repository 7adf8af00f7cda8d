"""Errors of the artifact store and codecs.

Two families, because the runner maps them to different exit codes:

* :class:`ArtifactError` (and its subclasses :class:`ArtifactNotFound`, :class:`ArtifactExistsError`,
  :class:`StoreUnavailable`): the store could not do what was asked (network, a stalled or full store, a missing
  or already written object). Infrastructure: trying the task again may help.
* :class:`StoreRefused` (an :class:`ArtifactError` too): the store said no in a way that no retry changes (a
  read-only or missing folder, permission denied, no such bucket). The runner exits with code 2.
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


class StoreUnavailable(ArtifactError):
    """The store did not answer in time, or kept failing in ways that may pass (timeouts, cut connections, HTTP
    5xx, throttling): the operation gave up after its attempts or its deadline. Retryable."""


class StoreRefused(ArtifactError):
    """The store refused the operation for good: permission denied, a read-only or missing folder, no such
    bucket. Retrying the task cannot help (the runner exits with code 2); the configuration must change."""
