"""Pick the object-store backend from a location: `s3://bucket/prefix` or a directory path.

The S3 backend (and boto3) is imported only when an `s3://` location is opened, so a directory store
runs without the optional `s3` extra installed.
"""

from __future__ import annotations

from pathlib import Path

from mask_store.objects import LocalObjects, ObjectStore, StoreUnavailable


def is_s3_location(location: str | Path) -> bool:
    """True for an `s3://` URL (a Path is always a directory)."""
    return isinstance(location, str) and location.startswith("s3://")


def open_objects(location: str | Path | ObjectStore, named_by: str = "PIGGYBACK_STORE") -> ObjectStore:
    """The backend for `location` (an open store passes through); an S3 bucket is checked here, at start-up.
    `named_by`: where the location came from (a setting, a command-line option), for the messages."""
    if isinstance(location, ObjectStore):
        return location
    if not is_s3_location(location):
        return LocalObjects(location)
    try:
        from mask_store.s3_objects import S3Objects
    except ImportError as exc:
        raise StoreUnavailable(
            f"{named_by} {location} needs the S3 backend: pip install 'piggyback-serve[s3]' ({exc})"
        ) from exc
    return S3Objects(str(location), named_by=named_by)
