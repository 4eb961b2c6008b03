"""One thin layer over fsspec for everything bikd reads or writes.

A :class:`Storage` is a root URL (``/tmp/run``, ``file:///tmp/run``, ``s3://bucket/run``) on any fsspec
filesystem; every path handed to it is relative to that root. Writes are atomic: a reader sees the old
object or the new one, never a prefix. On local disks that is a temp file plus ``os.replace``; on object
stores a single PUT (or a completed multipart upload) is already atomic, so the object is written in one go.

S3 endpoints and credentials come from the usual AWS environment variables (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ...) or from ``storage_options`` (e.g. ``{"endpoint_url": "http://127.0.0.1:5000"}``).
"""

from __future__ import annotations

import os
import posixpath
import uuid
from typing import Any, Iterator

import fsspec
from fsspec.implementations.local import LocalFileSystem


class StorageError(OSError):
    """A storage operation failed; the message names the URL."""


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


class Storage:
    """A directory-like root on any fsspec filesystem."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None):
        if not url:
            raise ValueError("storage URL is empty")
        self.url = url.rstrip("/") or "/"
        self.storage_options = dict(storage_options or {})
        self.fs, self.root = fsspec.core.url_to_fs(self.url, **self.storage_options)
        self.root = self.root.rstrip("/") or "/"

    def __repr__(self) -> str:
        return f"Storage({self.url!r})"

    def __reduce__(self):
        # Ray ships Storage objects to actors: rebuild the filesystem there instead of pickling its sockets.
        return (Storage, (self.url, self.storage_options))

    # ---- paths -------------------------------------------------------------------------------------
    def path(self, rel: str = "") -> str:
        """Filesystem path (no protocol) of ``rel`` under the root."""
        rel = rel.strip("/")
        if ".." in rel.split("/"):
            raise ValueError(f"path {rel!r} escapes the storage root {self.url}")
        return posixpath.join(self.root, rel) if rel else self.root

    def url_of(self, rel: str = "") -> str:
        """Full URL (with protocol) of ``rel``, for messages and for handing to other processes."""
        return self.fs.unstrip_protocol(self.path(rel))

    def child(self, rel: str) -> "Storage":
        """A Storage rooted at ``rel`` under this one, sharing the storage options."""
        return Storage(self.url_of(rel), self.storage_options)

    # ---- queries -----------------------------------------------------------------------------------
    def exists(self, rel: str = "") -> bool:
        self.fs.invalidate_cache(self.path(rel))
        return self.fs.exists(self.path(rel))

    def ls(self, rel: str = "") -> list[str]:
        """Names (not paths) directly under ``rel``, sorted; [] when it does not exist."""
        path = self.path(rel)
        self.fs.invalidate_cache(path)
        try:
            entries = self.fs.ls(path, detail=False)
        except FileNotFoundError:
            return []
        return sorted(posixpath.basename(e.rstrip("/")) for e in entries if e.rstrip("/") != path)

    # ---- reads -------------------------------------------------------------------------------------
    def open(self, rel: str, mode: str = "rb", **kwargs):
        try:
            return self.fs.open(self.path(rel), mode, **kwargs)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{self.url_of(rel)}: no such file") from e

    def read_bytes(self, rel: str) -> bytes:
        try:
            return self.fs.cat_file(self.path(rel))
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{self.url_of(rel)}: no such file") from e

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode("utf-8")

    def iter_lines(self, rel: str) -> Iterator[bytes]:
        with self.open(rel, "rb") as f:
            yield from f

    # ---- writes ------------------------------------------------------------------------------------
    def makedirs(self, rel: str = "") -> None:
        self.fs.makedirs(self.path(rel), exist_ok=True)

    def write_bytes(self, rel: str, data: bytes, *, exclusive: bool = False) -> None:
        """Write ``data`` to ``rel`` atomically.

        With ``exclusive`` the write fails with FileExistsError when ``rel`` exists. On local disks this
        is race-free (``os.link`` refuses an existing target); on object stores it is a check before the
        PUT, which suffices for bikd's single-writer stores.
        """
        path = self.path(rel)
        if _is_local(self.fs):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.tmp-{uuid.uuid4().hex}"
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                if exclusive:
                    try:
                        os.link(tmp, path)
                    except FileExistsError as e:
                        raise FileExistsError(f"{self.url_of(rel)} exists already") from e
                else:
                    os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
            return
        if exclusive and self.exists(rel):
            raise FileExistsError(f"{self.url_of(rel)} exists already")
        try:
            self.fs.pipe_file(path, data)
        except Exception as e:  # noqa: BLE001 - re-raise with the URL named
            raise StorageError(f"writing {self.url_of(rel)} failed: {e}") from e
        self.fs.invalidate_cache(path)

    def write_text(self, rel: str, text: str, *, exclusive: bool = False) -> None:
        self.write_bytes(rel, text.encode("utf-8"), exclusive=exclusive)

    def delete(self, rel: str, recursive: bool = False) -> None:
        path = self.path(rel)
        if self.fs.exists(path):
            self.fs.rm(path, recursive=recursive)
        self.fs.invalidate_cache(path)


def open_url(url: str, mode: str = "rb", storage_options: dict[str, Any] | None = None):
    """Open a single file by URL (any fsspec protocol); a missing file names the URL."""
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    try:
        return fs.open(path, mode)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{url}: no such file") from e
    except IsADirectoryError as e:
        raise IsADirectoryError(f"{url}: is a directory, expected a file") from e


def url_exists(url: str, storage_options: dict[str, Any] | None = None) -> bool:
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    return fs.exists(path)


def join_url(url: str, *parts: str) -> str:
    return posixpath.join(url.rstrip("/"), *parts)
