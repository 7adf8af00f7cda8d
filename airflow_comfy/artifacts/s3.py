"""S3 (and S3-compatible: MinIO, Ceph RGW, R2, GCS interop ...) artifact store. boto3 is imported lazily.

Credentials come from boto3's standard chain (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/
``AWS_SESSION_TOKEN``, ``AWS_PROFILE`` and the config files, IRSA / pod identity, instance roles), or, on the
Airflow side, from the ``credentials`` a task read from its Airflow connection for this store alone. They are
refused in URIs and never appear in ``repr``, URIs, logs or exception messages (messages are built from the
error code and text, with any credential value scrubbed, and are raised ``from None``).

The endpoint comes from the ``endpoint_url`` option, else ``AWS_ENDPOINT_URL_S3``, else ``AWS_ENDPOINT_URL``,
else AWS. A custom endpoint gets path-style addressing and checksums only where required (what MinIO and
most S3-compatible stores expect).

PUT is atomic in S3. No-clobber writes check the key first and then send ``If-None-Match: *`` (a conditional
write: a concurrent writer of the same key loses with :class:`ArtifactExistsError`); against a store that does
not implement conditional writes the check alone remains.

Every operation runs under :class:`~airflow_comfy.artifacts.limits.StoreLimits`: boto3's own retries are off
(one HTTP attempt per call, with the connect and read timeouts), and the operation (a check and a PUT, or a
whole paginated listing, is one) is retried here on timeouts, cut connections, HTTP 5xx and throttling, within
its total deadline. Refusals that no retry changes (AccessDenied, NoSuchBucket, bad credentials) raise
:class:`~airflow_comfy.artifacts.errors.StoreRefused`.
"""

from __future__ import annotations

import os
import re
from typing import Any
from urllib.parse import urlsplit

from airflow_comfy.artifacts.errors import ArtifactError, ArtifactExistsError, ArtifactNotFound, StoreRefused
from airflow_comfy.artifacts.keys import validate_key, validate_prefix
from airflow_comfy.artifacts.limits import StoreLimits, Transient, bounded
from airflow_comfy.artifacts.store import ArtifactStore, Data, guess_content_type, join_chunks, redact_uri

_BUCKET = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{1,254}$")
_MISSING = {"404", "NoSuchKey", "NotFound"}
_EXISTS = {"412", "PreconditionFailed", "ConditionalRequestConflict"}
_UNSUPPORTED = {"501", "NotImplemented"}
_REFUSED = {"AccessDenied", "AllAccessDisabled", "InvalidAccessKeyId", "SignatureDoesNotMatch", "NoSuchBucket",
            "InvalidBucketName", "AccountProblem", "403"}
_TRANSIENT = {"RequestTimeout", "SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded",
              "InternalError", "ServiceUnavailable", "RequestTimeTooSkewed", "BadDigest", "IncompleteBody"}


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/some/key`` -> ``("bucket", "some/key")`` (the key part may be empty or end with ``/``)."""
    parts = urlsplit(uri)
    if parts.scheme.lower() != "s3":
        raise ValueError(f"not an s3:// URI: {redact_uri(uri)}")
    if "@" in parts.netloc:
        raise ValueError(
            f"credentials must not be put in an S3 URI ({redact_uri(uri)}): use the standard AWS environment "
            "variables, config files or a pod/instance role"
        )
    if parts.query or parts.fragment:
        raise ValueError(f"S3 URI {uri} must not have a query or fragment")
    if not _BUCKET.match(parts.netloc):
        raise ValueError(f"S3 URI {uri} has no valid bucket name (expected s3://bucket/prefix)")
    return parts.netloc, parts.path.lstrip("/")


def default_endpoint_url() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


class S3Store(ArtifactStore):
    """Objects under ``s3://<bucket>/<prefix>/``."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region_name: str | None = None,
        client: Any = None,
        credentials: dict[str, str] | None = None,
        limits: StoreLimits | None = None,
    ) -> None:
        """``credentials``: ``aws_access_key_id``, ``aws_secret_access_key`` and optionally
        ``aws_session_token`` for this store only; None: boto3's default chain (environment, config, role).
        ``limits``: timeouts, deadline and attempts of each operation (default: :meth:`StoreLimits.from_env`)."""
        if not _BUCKET.match(bucket or ""):
            raise ValueError(f"invalid S3 bucket name {bucket!r}")
        prefix = prefix.strip("/")
        self.bucket = bucket
        self.prefix = validate_key(prefix) if prefix else ""
        self.endpoint_url = endpoint_url or default_endpoint_url()
        self.region_name = region_name
        self._session: Any = None
        self._client = client
        self._credentials = dict(credentials) if credentials else None
        self._conditional_writes = True
        self.limits = limits or StoreLimits.from_env()

    @classmethod
    def from_uri(cls, uri: str, **options: Any) -> S3Store:
        bucket, prefix = parse_s3_uri(uri)
        return cls(bucket, prefix, **options)

    # -- naming --

    @property
    def root_uri(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    def object_key(self, key: str) -> str:
        validate_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{self.object_key(key)}"

    def key_of(self, uri: str) -> str:
        bucket, object_key = parse_s3_uri(uri)
        head = f"{self.prefix}/" if self.prefix else ""
        if bucket != self.bucket or not object_key.startswith(head):
            raise ValueError(f"{uri} is not in the artifact store {self.root_uri}")
        return validate_key(object_key[len(head):])

    def __repr__(self) -> str:
        endpoint = f", endpoint_url={redact_uri(self.endpoint_url)!r}" if self.endpoint_url else ""
        return f"S3Store({self.root_uri!r}{endpoint})"

    # -- boto3 --

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = self._make_client()
        return self._client

    def _make_client(self) -> Any:
        try:
            import boto3
            from botocore.config import Config
        except ImportError as err:  # pragma: no cover - depends on the installation
            raise ArtifactError("an s3:// artifact store needs boto3: pip install 'airflow-comfy[runner]'") from err
        # one HTTP attempt per call: the retries, and their deadline, are ours (artifacts.limits)
        options: dict[str, Any] = {"retries": {"total_max_attempts": 1, "mode": "standard"},
                                   "connect_timeout": self.limits.connect_timeout,
                                   "read_timeout": self.limits.read_timeout}
        if self.endpoint_url:
            options["s3"] = {"addressing_style": "path"}
            if "request_checksum_calculation" in Config.OPTION_DEFAULTS:  # botocore >= 1.36
                options.update(request_checksum_calculation="when_required",
                               response_checksum_validation="when_required")
        self._session = boto3.session.Session(**(self._credentials or {}))
        return self._session.client("s3", endpoint_url=self.endpoint_url, region_name=self.region_name,
                                    config=Config(**options))

    def _secrets(self) -> list[str]:
        values = [os.environ.get(name) for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")]
        try:
            credentials = self._session.get_credentials() if self._session is not None else None
            frozen = credentials.get_frozen_credentials() if credentials is not None else None
        except Exception:  # resolving credentials may itself fail: scrub what we have
            frozen = None
        if frozen is not None:
            values += [frozen.access_key, frozen.secret_key, frozen.token]
        return [value for value in values if value and len(value) >= 4]

    def _describe(self, err: Exception) -> str:
        """What went wrong, from a boto3/botocore failure, with no credential in it."""
        response = getattr(err, "response", None) or {}
        error = response.get("Error", {})
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if error:
            detail = f"{error.get('Code', '?')}" + (f" (HTTP {status})" if status else "")
            if error.get("Message"):
                detail += f": {error['Message']}"
        else:
            detail = f"{type(err).__name__}: {err}"
        if self.endpoint_url:
            detail = detail.replace(self.endpoint_url, redact_uri(self.endpoint_url))
        for secret in self._secrets():
            detail = detail.replace(secret, "***")
        if self.endpoint_url:
            detail += f" [endpoint {redact_uri(self.endpoint_url)}]"
        return detail

    def _failure(self, action: str, uri: str, err: Exception) -> Exception:
        """The exception for a boto3/botocore failure: :class:`Transient` (retried within the operation's
        deadline), :class:`StoreRefused` (no retry can help) or a plain :class:`ArtifactError`."""
        detail = self._describe(err)
        if _is_transient(err):
            return Transient(detail)
        kind = StoreRefused if self._code(err) in _REFUSED else ArtifactError
        return kind(f"cannot {action} {uri}: {detail}", uri=uri)

    @staticmethod
    def _code(err: Exception) -> str:
        return str((getattr(err, "response", None) or {}).get("Error", {}).get("Code", ""))

    def _bounded(self, action: str, uri: str, call: Any) -> Any:
        """``call()`` as one operation: boto3 failures translated (:meth:`_failure`), retried and bounded."""
        def attempt() -> Any:
            try:
                return call()
            except (ArtifactError, Transient):
                raise
            except Exception as err:
                raise self._failure(action, uri, err) from None

        return bounded(attempt, self.limits, action, uri)

    # -- operations --

    def put_bytes(self, key: str, data: Data, *, content_type: str | None = None, overwrite: bool = False) -> str:
        uri, body = self.uri(key), join_chunks(data)
        request = {"Bucket": self.bucket, "Key": self.object_key(key), "Body": body,
                   "ContentType": content_type or guess_content_type(key)}

        def write() -> str:
            if not overwrite and self._head(key):
                raise ArtifactExistsError(f"{uri} already exists (artifacts are never overwritten)", uri=uri)
            self._put(request, conditional=not overwrite and self._conditional_writes, uri=uri)
            return uri

        return self._bounded("write", uri, write)

    def _put(self, request: dict[str, Any], *, conditional: bool, uri: str) -> None:
        from botocore.exceptions import ClientError, ParamValidationError

        try:
            self.client.put_object(**request, **({"IfNoneMatch": "*"} if conditional else {}))
        except ClientError as err:
            code = self._code(err)
            if conditional and code in _EXISTS:
                raise ArtifactExistsError(f"{uri} already exists (written concurrently)", uri=uri) from None
            if not (conditional and code in _UNSUPPORTED):
                raise
            self._conditional_writes = False  # the store ignores conditional writes: the check above remains
            self.client.put_object(**request)
        except ParamValidationError:
            if not conditional:
                raise
            self._conditional_writes = False  # botocore too old to know IfNoneMatch
            self.client.put_object(**request)

    def get_bytes(self, key: str) -> bytes:
        uri = self.uri(key)
        return self._bounded("read", uri, lambda: self._get(key, uri))

    def _get(self, key: str, uri: str) -> bytes:
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self.object_key(key))
            data = response["Body"].read()
        except Exception as err:
            if self._code(err) in _MISSING:
                raise ArtifactNotFound(f"no artifact at {uri}", uri=uri) from None
            raise
        expected = response.get("ContentLength")
        if expected is not None and expected != len(data):
            raise Transient(f"got {len(data)} of {expected} bytes")
        return data

    def _head(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self.object_key(key))
        except Exception as err:
            if self._code(err) in _MISSING:
                return False
            raise
        return True

    def exists(self, key: str) -> bool:
        return self._bounded("check", self.uri(key), lambda: self._head(key))

    def list(self, prefix: str = "") -> list[str]:
        validate_prefix(prefix)
        head = f"{self.prefix}/" if self.prefix else ""

        def listing() -> list[str]:
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=head + prefix)
            return sorted(item["Key"][len(head):] for page in pages for item in page.get("Contents", []))

        return self._bounded("list", f"{self.root_uri}/{prefix}", listing)

    def copy(self, source: str, target: str, *, overwrite: bool = False) -> str:
        uri, source_uri = self.uri(target), self.uri(source)

        def copy() -> str:
            if not overwrite and self._head(target):
                raise ArtifactExistsError(f"{uri} already exists (artifacts are never overwritten)", uri=uri)
            try:
                self.client.copy_object(Bucket=self.bucket, Key=self.object_key(target),
                                        CopySource={"Bucket": self.bucket, "Key": self.object_key(source)})
            except Exception as err:
                if self._code(err) in _MISSING:
                    raise ArtifactNotFound(f"no artifact at {source_uri}", uri=source_uri) from None
                raise
            return uri

        return self._bounded("write", uri, copy)

    def presigned_url(self, key: str, *, expires_in: int) -> str:
        """A URL that lets whoever holds it GET the object at ``key`` for ``expires_in`` seconds, without
        credentials (signed locally with this store's credentials: no request is made). Its host is this store's
        endpoint, so the endpoint must be one the browser can reach."""
        return self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": self.object_key(key)}, ExpiresIn=int(expires_in))

    def delete(self, key: str) -> None:
        self._bounded("delete", self.uri(key),
                      lambda: self.client.delete_object(Bucket=self.bucket, Key=self.object_key(key)))


def _is_transient(err: Exception) -> bool:
    """A failure that may pass: a timeout, a cut or refused connection, a short read, HTTP 5xx or throttling."""
    from botocore.exceptions import ConnectionError as BotoConnectionError
    from botocore.exceptions import HTTPClientError, IncompleteReadError
    from urllib3.exceptions import HTTPError as Urllib3Error

    if isinstance(err, (BotoConnectionError, HTTPClientError, IncompleteReadError, Urllib3Error, OSError)):
        return True
    response = getattr(err, "response", None) or {}
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
    code = str(response.get("Error", {}).get("Code", ""))
    return code in _TRANSIENT or status >= 500 or status in (408, 429)
