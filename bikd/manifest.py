"""Data files first, manifest last: how every bikd writer makes a multi-file artefact appear all at once.

A reader looks at the manifest only, so an artefact exists iff its manifest does: a writer that dies after
some data files leaves nothing visible, and the next writer of the same name overwrites those files. The
manifest records the sha256 of every data file and readers check it, so a torn, truncated or overwritten
file fails loudly, naming itself. Used by the KG store (its versions), KG-embedding exports, ShardedKGE
checkpoints, fused-LM exports and relation-extractor exports.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

from bikd.storage import Storage

__all__ = ["sha256_hex", "write_manifested", "read_listed", "check_listed"]


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_manifested(storage: Storage, files: Mapping[str, bytes], manifest: str, body: bytes, *,
                     exclusive: bool = False) -> None:
    """Write ``files`` (path -> bytes, relative to ``storage``), then ``body`` as ``manifest``.

    An existing manifest is deleted before anything else is written (a rewrite is invisible until its own
    manifest lands); ``exclusive``: the manifest is a new name that must not exist (FileExistsError when
    another writer got there first), as the KG store's version numbers are. ``body`` is serialised by the
    caller before the call, so a manifest that cannot be written fails before any file is."""
    if not exclusive:
        storage.delete(manifest)
    for path, data in files.items():
        storage.write_bytes(path, data)
    storage.write_bytes(manifest, body, exclusive=exclusive)


def read_listed(storage: Storage, path: str, expected_sha256: str | None, *, listed_in: str,
                error: type[Exception] = OSError) -> bytes:
    """The bytes of ``path``, which the manifest ``listed_in`` (its URL or name, for the message) lists with
    ``expected_sha256``; ``error`` naming the file when it is missing or its contents differ."""
    try:
        data = storage.read_bytes(path)
    except FileNotFoundError as e:
        raise error(f"{storage.url_of(path)}: missing, although {listed_in} lists it") from e
    return check_listed(data, expected_sha256, storage.url_of(path), listed_in=listed_in, error=error)


def check_listed(data: bytes, expected_sha256: str | None, url: str, *, listed_in: str,
                 error: type[Exception] = OSError) -> bytes:
    """``data`` (read from ``url``) when its sha256 is the one ``listed_in`` records, else ``error``."""
    if expected_sha256 is None or sha256_hex(data) != expected_sha256:
        raise error(f"{url}: contents differ from the checksum (sha256) in {listed_in} (the file is corrupted, "
                    f"or was overwritten by another writer)")
    return data
