"""`ObjectStore` on S3 or any S3-compatible server (MinIO, Ceph RGW), through boto3.

How the contract of `mask_store.objects` holds here:

- `put` is one PutObject: S3 makes an object visible only once its whole body arrived (and botocore
  sends a CRC32 checksum the server verifies), so a writer that dies mid-upload leaves nothing.
- `tag` is the ETag. For a single-part PutObject it is the MD5 of the content, so it names one
  exact content; a put of byte-identical data keeps the tag (the task index carries an increasing
  generation, so its publications always differ).
- `put_if` is a conditional PutObject (`If-None-Match: *` to create, `If-Match: <etag>` to
  replace): the server decides, so of two writers holding the same tag exactly one wins, on any
  number of machines. It is sent once, never retried: a retry of a write that did land would come
  back 412 and report a lost race that was in fact won. A network error there raises
  `StoreUnavailable` (outcome unknown: re-read the key).

Credentials, region and endpoint come from boto3's standard chain (`AWS_ACCESS_KEY_ID`,
`AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_PROFILE`, `AWS_REGION`, `AWS_ENDPOINT_URL`, the
files under ~/.aws); this module reads no environment of its own. Every failure to reach or use the
bucket is `StoreUnavailable` with the setting to fix; timeouts and retries are bounded, so a poll
against a dead endpoint fails in seconds instead of hanging.
"""

from __future__ import annotations

from urllib.parse import urlparse

import boto3
import botocore.exceptions
from botocore.config import Config

from mask_store.objects import ObjectConflict, ObjectStore, StoreUnavailable, check_key

CREDENTIAL_SETTINGS = "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)"


def parse_s3_url(url: str, named_by: str = "PIGGYBACK_STORE") -> tuple[str, str]:
    """`s3://bucket/some/prefix` -> ("bucket", "some/prefix/"); the prefix is "" or ends in "/".
    `named_by`: where the URL came from (a setting, a command-line option), for the messages."""
    parsed = urlparse(url)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise StoreUnavailable(f"{named_by} {url!r} is not an s3://bucket/prefix URL")
    prefix = parsed.path.strip("/")
    return parsed.netloc, f"{prefix}/" if prefix else ""


def _check_key(key: str) -> str:
    check_key(key)
    return key


def _is_hidden(key: str) -> bool:
    """The backend's own names (and anything dotted), hidden from `list` as in the directory store."""
    return any(part.startswith(".") for part in key.split("/"))


class S3Objects(ObjectStore):
    """Objects under `s3://bucket/prefix`. Checks at construction that the bucket is reachable.

    `named_by` is where the URL came from (the server's PIGGYBACK_STORE, the training CLI's --out): the
    messages say what to fix there."""

    def __init__(
        self,
        url: str,
        *,
        named_by: str = "PIGGYBACK_STORE",
        connect_timeout: float = 2.0,
        read_timeout: float = 10.0,
        max_attempts: int = 3,
    ):
        self.named_by = named_by
        self.bucket, self.prefix = parse_s3_url(url, named_by)
        self.url = f"s3://{self.bucket}/{self.prefix}"
        session = boto3.session.Session()
        config = Config(
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            retries={"mode": "standard", "total_max_attempts": max_attempts},
            max_pool_connections=32,
        )
        try:
            client = session.client("s3", config=config)
            if not (urlparse(client.meta.endpoint_url).hostname or "").endswith(".amazonaws.com"):
                # MinIO, Ceph and test servers name buckets in the path, not in a DNS name
                config = config.merge(Config(s3={"addressing_style": "path"}))
                client = session.client("s3", config=config)
            self._client = client
            # conditional writes are sent exactly once (see the module docstring)
            once = config.merge(Config(retries={"mode": "standard", "total_max_attempts": 1}))
            self._cas_client = session.client("s3", config=once)
        except botocore.exceptions.BotoCoreError as exc:  # e.g. a malformed AWS_ENDPOINT_URL
            raise StoreUnavailable(f"cannot set up the S3 client for {self.url}: {exc}") from exc
        self.endpoint = client.meta.endpoint_url
        self._call("HeadBucket", None, self._client.head_bucket, Bucket=self.bucket)

    # -- error mapping: every failure names what to fix --------------------------------------------

    def _unavailable(self, exc: Exception, operation: str, key: str | None) -> StoreUnavailable:
        where = f"{operation} {self.url}{key or ''} at {self.endpoint}"
        if isinstance(exc, botocore.exceptions.NoCredentialsError):
            return StoreUnavailable(f"{where}: no AWS credentials found; set {CREDENTIAL_SETTINGS}")
        if isinstance(exc, botocore.exceptions.BotoCoreError):  # connection refused, timeout, broken read
            return StoreUnavailable(f"{where}: cannot reach the S3 endpoint ({exc}); check AWS_ENDPOINT_URL")
        assert isinstance(exc, botocore.exceptions.ClientError)
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        detail = f"{code or status}: {error.get('Message') or 'no message'}"
        if code in ("NoSuchBucket",) or (operation == "HeadBucket" and status == 404):
            return StoreUnavailable(
                f"{where}: bucket {self.bucket!r} does not exist; create it or fix the bucket in {self.named_by}"
            )
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken"):
            return StoreUnavailable(f"{where}: the credentials were refused ({detail}); fix {CREDENTIAL_SETTINGS}")
        if status == 403:
            return StoreUnavailable(
                f"{where}: access denied ({detail}); fix {CREDENTIAL_SETTINGS} or grant the key access to the bucket"
            )
        if status == 301 or code in ("PermanentRedirect", "AuthorizationHeaderMalformed"):
            return StoreUnavailable(f"{where}: the bucket is in another region ({detail}); set AWS_REGION")
        return StoreUnavailable(f"{where}: {detail}")

    def _call(self, operation: str, key: str | None, method, **kwargs):
        try:
            return method(**kwargs)
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
            raise self._unavailable(exc, operation, key) from exc

    @staticmethod
    def _missing(exc: botocore.exceptions.ClientError) -> bool:
        error = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        code = error.get("Code")
        return code in ("NoSuchKey", "404", "NotFound") or (status == 404 and code != "NoSuchBucket")

    # -- the contract -------------------------------------------------------------------------------

    def get_tagged(self, key: str) -> tuple[bytes, str] | None:
        name = self.prefix + _check_key(key)
        try:
            response = self._client.get_object(Bucket=self.bucket, Key=name)
            return response["Body"].read(), response["ETag"]
        except botocore.exceptions.ClientError as exc:
            if self._missing(exc):
                return None
            raise self._unavailable(exc, "GetObject", key) from exc
        except botocore.exceptions.BotoCoreError as exc:  # includes a body cut off mid-read
            raise self._unavailable(exc, "GetObject", key) from exc

    def _head(self, key: str) -> dict | None:
        """The object's metadata (one HeadObject), or None when it does not exist."""
        name = self.prefix + _check_key(key)
        try:
            return self._client.head_object(Bucket=self.bucket, Key=name)
        except botocore.exceptions.ClientError as exc:
            if self._missing(exc):
                return None
            raise self._unavailable(exc, "HeadObject", key) from exc
        except botocore.exceptions.BotoCoreError as exc:
            raise self._unavailable(exc, "HeadObject", key) from exc

    def tag(self, key: str) -> str | None:
        head = self._head(key)
        return None if head is None else head["ETag"]

    def modified(self, key: str) -> float | None:
        head = self._head(key)
        return None if head is None else head["LastModified"].timestamp()

    def put(self, key: str, data: bytes) -> None:
        name = self.prefix + _check_key(key)
        self._call("PutObject", key, self._client.put_object, Bucket=self.bucket, Key=name, Body=data)

    def put_if(self, key: str, data: bytes, expected: str | None) -> str:
        name = self.prefix + _check_key(key)
        condition = {"IfNoneMatch": "*"} if expected is None else {"IfMatch": expected}
        try:
            response = self._cas_client.put_object(Bucket=self.bucket, Key=name, Body=data, **condition)
        except botocore.exceptions.ClientError as exc:
            code = exc.response.get("Error", {}).get("Code")
            # 412: the tag differs; 409: a concurrent conditional write is in flight; 404: If-Match on a gone key
            if code in ("PreconditionFailed", "ConditionalRequestConflict") or (
                expected is not None and self._missing(exc)
            ):
                raise ObjectConflict(f"{key} changed meanwhile (expected tag {expected}; {code})") from exc
            raise self._unavailable(exc, "PutObject (conditional)", key) from exc
        except botocore.exceptions.BotoCoreError as exc:
            raise self._unavailable(exc, "PutObject (conditional; outcome unknown, re-read the key)", key) from exc
        return response["ETag"]

    def delete(self, key: str) -> None:
        name = self.prefix + _check_key(key)
        self._call("DeleteObject", key, self._client.delete_object, Bucket=self.bucket, Key=name)

    def list(self, prefix: str = "") -> list[str]:
        keys = []
        paginator = self._client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix + prefix):
                for item in page.get("Contents", []):
                    key = item["Key"][len(self.prefix) :]
                    if key and not _is_hidden(key):
                        keys.append(key)
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
            raise self._unavailable(exc, "ListObjectsV2", prefix) from exc
        return sorted(keys)
