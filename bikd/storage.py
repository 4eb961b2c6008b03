"""One thin layer over fsspec for everything bikd reads or writes.

A :class:`Storage` is a root URL (``/tmp/run``, ``file:///tmp/run``, ``s3://bucket/run``) on any fsspec
filesystem; every path handed to it is relative to that root. Writes are atomic: a reader sees the old
object or the new one, never a prefix. On local disks that is a temp file plus ``os.replace``; on object
stores a single PUT (or a completed multipart upload) is already atomic, so the object is written in one go.

S3 endpoints and credentials come from the usual AWS environment variables (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ...) or from ``storage_options`` (e.g. ``{"endpoint_url": "http://127.0.0.1:5000"}``).

Timeouts and retries. Every filesystem bikd opens goes through :func:`filesystem`, which bounds how long a
request may wait, so an endpoint that accepts connections and never answers fails the call instead of
hanging the job. The limits, read from the environment of the process that opens the filesystem (so a
job config needs no new keys; Ray workers read their own environment):

* ``BIKD_STORAGE_CONNECT_TIMEOUT`` -- seconds to open a connection (default 10);
* ``BIKD_STORAGE_READ_TIMEOUT`` -- seconds to wait for each read from the socket (default 60);
* ``BIKD_STORAGE_ATTEMPTS`` -- attempts per request, the first included (default 3; S3 falls back to
  ``AWS_MAX_ATTEMPTS`` when only that is set).

On S3 they become botocore's ``config_kwargs`` (``connect_timeout``, ``read_timeout``, ``retries``:
``total_max_attempts`` in ``standard`` mode, or ``AWS_RETRY_MODE``); s3fs's own retry loop, which re-runs
every request botocore already retried (5 x 5 attempts by default), is turned off. Two holes in aiohttp's
timeouts are closed as well: the ``Expect: 100-continue`` header is dropped from PUTs (aiohttp waits for the
"100 Continue" with no timeout) and sockets get ``TCP_USER_TIMEOUT`` = the read timeout on Linux (aiohttp's
read timeout starts only after a body is sent, so a peer that stops reading would stall a large upload).
On HTTP(S) the limits become aiohttp's ``ClientTimeout(sock_connect=..., sock_read=...)`` in
``client_kwargs``. Other protocols are opened as given. A value in ``storage_options`` always wins, e.g.
``{"config_kwargs": {"read_timeout": 300}}`` for S3. A request that runs out of time or cannot connect
raises :class:`StorageError` naming the URL, the operation, the seconds waited and the limits in force.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import socket
import time
import uuid
from typing import Any, Iterator

import fsspec
from fsspec.implementations.local import LocalFileSystem

DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_READ_TIMEOUT = 60.0
DEFAULT_ATTEMPTS = 3
_S3 = ("s3", "s3a")
_HTTP = ("http", "https")


class StorageError(OSError):
    """A storage operation failed; the message names the URL."""


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


# ---- opening filesystems -----------------------------------------------------------------------------
def _env_number(name: str, default, cast=float):
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = cast(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r}: expected a number{'' if cast is float else ' of attempts'}") from None
    if value <= 0:
        raise ValueError(f"{name}={raw!r}: must be > 0")
    return value


def storage_limits() -> tuple[float, float, int]:
    """``(connect timeout s, read timeout s, attempts)`` from the BIKD_STORAGE_* variables or the defaults."""
    attempts = _env_number("BIKD_STORAGE_ATTEMPTS", None, int) or _env_number("AWS_MAX_ATTEMPTS", DEFAULT_ATTEMPTS, int)
    return (_env_number("BIKD_STORAGE_CONNECT_TIMEOUT", DEFAULT_CONNECT_TIMEOUT),
            _env_number("BIKD_STORAGE_READ_TIMEOUT", DEFAULT_READ_TIMEOUT), attempts)


def _s3_endpoint_from_env() -> str | None:
    if os.environ.get("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "").lower() == "true":
        return None
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


class StallBoundSocket:
    """aiohttp socket factory setting TCP_USER_TIMEOUT (Linux): the kernel drops a connection whose sent data
    stays unacknowledged that long. aiohttp's read timeout only starts once a request body is sent, so a
    peer that accepted and stopped reading (zero window) would otherwise stall a large PUT forever.
    A class, not a closure, so that it pickles and its repr (part of fsspec's cache key) is stable."""

    def __init__(self, seconds: float):
        self.ms = max(1, int(seconds * 1000))

    def __call__(self, addr_info) -> socket.socket:
        family, type_, proto, _, _ = addr_info
        sock = socket.socket(family=family, type=type_, proto=proto)
        if hasattr(socket, "TCP_USER_TIMEOUT") and family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, self.ms)
        return sock

    def __repr__(self) -> str:
        return f"StallBoundSocket({self.ms} ms)"


def with_limits(protocol: str | None, storage_options: dict[str, Any] | None) -> dict[str, Any]:
    """``storage_options`` with bikd's timeouts and attempts filled in where the caller set none."""
    opts = dict(storage_options or {})
    connect, read, attempts = storage_limits()
    if protocol in _S3:
        config = dict(opts.get("config_kwargs") or {})
        config.setdefault("connect_timeout", connect)
        config.setdefault("read_timeout", read)
        config.setdefault("retries", {"total_max_attempts": attempts, "mode": os.environ.get("AWS_RETRY_MODE", "standard")})
        connector = dict(config.get("connector_args") or {})
        connector.setdefault("socket_factory", StallBoundSocket(config["read_timeout"] or read))
        config["connector_args"] = connector
        opts["config_kwargs"] = config
        # fsspec caches instances by their options, and botocore reads the endpoint from the environment
        # behind that key's back: name it, so a changed endpoint gets a new instance, not the old one's.
        if not opts.get("endpoint_url") and not (opts.get("client_kwargs") or {}).get("endpoint_url"):
            if endpoint := _s3_endpoint_from_env():
                opts["endpoint_url"] = endpoint
    elif protocol in _HTTP:
        import aiohttp

        client = dict(opts.get("client_kwargs") or {})
        # total=None: a large download may take long as long as bytes keep coming (aiohttp's default is 300 s)
        client.setdefault("timeout", aiohttp.ClientTimeout(total=None, sock_connect=connect, sock_read=read))
        opts["client_kwargs"] = client
    return opts


def _make_bounded_s3():
    """S3FileSystem with its own retry loop off: botocore already retries every request (with backoff,
    connection errors and 5xx included), and the two loops together multiply the attempts. A subclass rather
    than an attribute set on an instance, because pickling (Ray, pyarrow) rebuilds the filesystem from its
    class and constructor arguments."""
    from s3fs import S3FileSystem

    async def set_session(self, refresh=False, kwargs={}):  # noqa: B006 - s3fs's signature
        client = await S3FileSystem.set_session(self, refresh, kwargs)
        if not getattr(client, "_bikd_no_expect", False):
            client.meta.events.register("before-send.s3", _drop_expect_100)
            client._bikd_no_expect = True
        return client

    return type("BoundedS3FileSystem", (S3FileSystem,), {"retries": 1, "set_session": set_session, "__module__": __name__})


def _drop_expect_100(request, **_):
    # botocore asks for "100 Continue" before a PUT body, and aiohttp waits for it with no timeout at all
    # (its read timeout starts once the body is sent): an endpoint that never answers hangs every write.
    if "Expect" in request.headers:
        del request.headers["Expect"]


def _lazy(name: str):
    """Classes built on first use, so that importing bikd.storage imports neither s3fs nor pyarrow."""
    cls = globals().get(name)
    if cls is None:
        cls = globals()[name] = _LAZY[name]()
    return cls


def __getattr__(name: str):  # unpickling looks a lazy class up by name in a process that has not built it
    if name in _LAZY:
        return _lazy(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def filesystem(url: str, storage_options: dict[str, Any] | None = None, **fs_kwargs) -> tuple[fsspec.AbstractFileSystem, str]:
    """``(fs, path)`` for ``url``, with the limits of :func:`with_limits`; ``fs_kwargs`` (e.g.
    ``skip_instance_cache=True``) go to the filesystem's constructor as well."""
    protocol = fsspec.core.split_protocol(url)[0]
    if "::" in url:  # chained URL: the options belong to its outermost layer, leave them as given
        return fsspec.core.url_to_fs(url, **(storage_options or {}), **fs_kwargs)
    opts = with_limits(protocol, storage_options)
    if protocol in _S3:
        cls = _lazy("BoundedS3FileSystem")
        fs = cls(**{**cls._get_kwargs_from_urls(url), **opts, **fs_kwargs})
        return fs, fs._strip_protocol(url)
    return fsspec.core.url_to_fs(url, **opts, **fs_kwargs)


# ---- errors ------------------------------------------------------------------------------------------
def _transport_kind(e: BaseException) -> str | None:
    """What went wrong on the wire, or None for errors that are not about reaching the endpoint."""
    timeouts: tuple = (TimeoutError,)
    connects: tuple = (ConnectionError,)
    with contextlib.suppress(ImportError):
        import botocore.exceptions as be

        timeouts += (be.ReadTimeoutError, be.ConnectTimeoutError)
        connects += (be.ConnectionError, be.HTTPClientError)
    with contextlib.suppress(ImportError):
        import aiohttp

        timeouts += (aiohttp.ServerTimeoutError,)
        connects += (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError)
    if isinstance(e, timeouts):
        return "no answer from the endpoint"
    if isinstance(e, connects):
        return "the connection to the endpoint failed"
    return None


def _limits_text(fs) -> str:
    config = getattr(fs, "config_kwargs", None)
    if isinstance(config, dict) and hasattr(fs, "read_timeout"):  # s3fs
        retries = config.get("retries") or {}
        attempts = retries.get("total_max_attempts") or (retries["max_attempts"] + 1 if "max_attempts" in retries else None)
        return (f"connect timeout {config.get('connect_timeout', fs.connect_timeout):g} s, read timeout "
                f"{config.get('read_timeout', fs.read_timeout):g} s, attempts {attempts or 'botocore default'}")
    timeout = (getattr(fs, "client_kwargs", None) or {}).get("timeout")
    if timeout is not None and hasattr(timeout, "sock_read"):  # aiohttp
        return f"connect timeout {timeout.sock_connect} s, read timeout {timeout.sock_read} s, total {timeout.total} s"
    return "the filesystem's own limits"


@contextlib.contextmanager
def guard(fs, url: str, op: str):
    """Re-raise a timeout or connection failure inside the block as StorageError naming ``url``, ``op``,
    the seconds waited and the limits in force; other errors pass unchanged."""
    start = time.monotonic()
    try:
        yield
    except StorageError:
        raise
    except Exception as e:  # noqa: BLE001 - only transport failures are rewritten, see _transport_kind
        kind = _transport_kind(e)
        if kind is None and isinstance(e, FileNotFoundError) and e.__cause__ is not None:
            # fsspec's HTTP info reports any failure as a missing file; a stalled endpoint is not one
            e, kind = e.__cause__, _transport_kind(e.__cause__)
        if kind is None:
            raise
        waited = time.monotonic() - start
        raise StorageError(
            f"{op} {url}: {kind} after {waited:.1f} s ({_limits_text(fs)}): {type(e).__name__}: {e}. If the endpoint "
            "is only slow, raise BIKD_STORAGE_READ_TIMEOUT, BIKD_STORAGE_CONNECT_TIMEOUT or BIKD_STORAGE_ATTEMPTS, "
            "or set the timeouts in storage_options") from e


class GuardedFile:
    """A file object whose reads, writes and close (an upload, for object stores) raise StorageError
    naming the URL when the endpoint stalls; everything else is the wrapped file's."""

    def __init__(self, f, fs, url: str):
        self._f, self._fs, self._url = f, fs, url

    def __getattr__(self, name):
        if "_f" not in self.__dict__:  # half-built (copy, unpickling): no recursion through self._f
            raise AttributeError(name)
        return getattr(self._f, name)

    def __iter__(self):
        return self

    def __next__(self):
        if line := self.readline():
            return line
        raise StopIteration

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _file_method(name: str, op: str):
    def call(self, *args):
        with guard(self._fs, self._url, op):
            return getattr(self._f, name)(*args)

    call.__name__ = name
    return call


for _name, _op in [("read", "reading"), ("readinto", "reading"), ("readline", "reading"), ("readlines", "reading"),
                   ("write", "writing"), ("flush", "writing"), ("close", "closing")]:
    setattr(GuardedFile, _name, _file_method(_name, _op))


def _guarded_open(fs, path: str, url: str, mode: str, **kwargs):
    with guard(fs, url, "opening"):
        f = fs.open(path, mode, **kwargs)
    return f if _is_local(fs) else GuardedFile(f, fs, url)


def _exists(fs, path: str) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    if set(protocols) & set(_HTTP):
        import aiohttp

        # without strict, fsspec's HTTP exists answers False to every aiohttp error, timeouts included
        try:
            return fs.exists(path, strict=True)
        except (FileNotFoundError, aiohttp.ClientResponseError):
            return False
    return fs.exists(path)


# ---- Storage -----------------------------------------------------------------------------------------
class Storage:
    """A directory-like root on any fsspec filesystem."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None):
        if not url:
            raise ValueError("storage URL is empty")
        self.url = url.rstrip("/") or "/"
        self.storage_options = dict(storage_options or {})
        self.fs, self.root = filesystem(self.url, self.storage_options)
        self.root = self.root.rstrip("/") or "/"

    def __repr__(self) -> str:
        return f"Storage({self.url!r})"

    def __reduce__(self):
        # Ray ships Storage objects to actors: rebuild the filesystem there instead of pickling its sockets,
        # with the limits of the actor's environment (only what the caller passed travels).
        return (Storage, (self.url, self.storage_options))

    def _guard(self, rel: str, op: str):
        return guard(self.fs, self.url_of(rel), op)

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
        with self._guard(rel, "checking"):
            return _exists(self.fs, self.path(rel))

    def ls(self, rel: str = "") -> list[str]:
        """Names (not paths) directly under ``rel``, sorted; [] when it does not exist."""
        path = self.path(rel)
        self.fs.invalidate_cache(path)
        try:
            with self._guard(rel, "listing"):
                entries = self.fs.ls(path, detail=False)
        except FileNotFoundError:
            return []
        return sorted(posixpath.basename(e.rstrip("/")) for e in entries if e.rstrip("/") != path)

    # ---- reads -------------------------------------------------------------------------------------
    def open(self, rel: str, mode: str = "rb", **kwargs):
        try:
            return _guarded_open(self.fs, self.path(rel), self.url_of(rel), mode, **kwargs)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{self.url_of(rel)}: no such file") from e

    def read_bytes(self, rel: str) -> bytes:
        try:
            with self._guard(rel, "reading"):
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
        with self._guard(rel, "creating"):
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
            with self._guard(rel, "writing"):
                self.fs.pipe_file(path, data)
        except StorageError:
            raise
        except Exception as e:  # noqa: BLE001 - re-raise with the URL named
            raise StorageError(f"writing {self.url_of(rel)} failed: {e}") from e
        finally:
            self.fs.invalidate_cache(path)

    def write_text(self, rel: str, text: str, *, exclusive: bool = False) -> None:
        self.write_bytes(rel, text.encode("utf-8"), exclusive=exclusive)

    def delete(self, rel: str, recursive: bool = False) -> None:
        path = self.path(rel)
        with self._guard(rel, "deleting"):
            if self.fs.exists(path):
                self.fs.rm(path, recursive=recursive)
        self.fs.invalidate_cache(path)


# ---- single URLs -------------------------------------------------------------------------------------
def open_url(url: str, mode: str = "rb", storage_options: dict[str, Any] | None = None):
    """Open a single file by URL (any fsspec protocol); a missing file names the URL."""
    fs, path = filesystem(url, storage_options)
    try:
        return _guarded_open(fs, path, url, mode)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{url}: no such file") from e
    except IsADirectoryError as e:
        raise IsADirectoryError(f"{url}: is a directory, expected a file") from e


def read_url(url: str, storage_options: dict[str, Any] | None = None) -> bytes:
    """The whole file at ``url``; a missing file names the URL."""
    fs, path = filesystem(url, storage_options)
    try:
        with guard(fs, url, "reading"):
            return fs.cat_file(path)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{url}: no such file") from e


def url_exists(url: str, storage_options: dict[str, Any] | None = None) -> bool:
    fs, path = filesystem(url, storage_options)
    with guard(fs, url, "checking"):
        return _exists(fs, path)


def join_url(url: str, *parts: str) -> str:
    return posixpath.join(url.rstrip("/"), *parts)


# ---- pyarrow (Ray Train) -----------------------------------------------------------------------------
def _make_guarded_handler():
    """pyarrow's fsspec handler, with failures to reach the endpoint raised as StorageError naming the URL,
    and a stalled endpoint never mistaken for a missing file (fsspec's ``isfile`` answers False to any error)."""
    from pyarrow import PythonFile
    from pyarrow.fs import FSSpecHandler

    def method(name: str, op: str):
        def call(self, target, *args):
            path = getattr(target, "base_dir", target)  # a path, or a FileSelector
            with guard(self.fs, self.fs.unstrip_protocol(path), op):
                return getattr(FSSpecHandler, name)(self, target, *args)

        call.__name__ = name
        return call

    def get_file_info(self, paths):
        infos = []
        for path in paths:  # one at a time, so that a failure names its path
            with guard(self.fs, self.fs.unstrip_protocol(path), "checking"):
                infos += FSSpecHandler.get_file_info(self, [path])
        return infos

    def open_file(self, path: str, mode: str):
        url = self.fs.unstrip_protocol(path)
        with guard(self.fs, url, "opening"):
            if mode == "rb" and self.fs.info(path)["type"] != "file":
                raise FileNotFoundError(path)
            f = self.fs.open(path, mode=mode)
        return PythonFile(GuardedFile(f, self.fs, url), mode="r" if mode == "rb" else "w")

    ns = {name: method(name, op) for name, op in [
        ("get_file_info_selector", "listing"), ("create_dir", "creating"), ("delete_dir", "deleting"),
        ("delete_dir_contents", "deleting"), ("delete_file", "deleting"), ("move", "moving"), ("copy_file", "copying")]}
    ns.update(__module__=__name__, get_file_info=get_file_info,
              open_input_stream=lambda self, path: open_file(self, path, "rb"),
              open_input_file=lambda self, path: open_file(self, path, "rb"),
              open_output_stream=lambda self, path, metadata: open_file(self, path, "wb"),
              open_append_stream=lambda self, path, metadata: open_file(self, path, "ab"))
    return type("GuardedFSSpecHandler", (FSSpecHandler,), ns)


_LAZY = {"BoundedS3FileSystem": _make_bounded_s3, "GuardedFSSpecHandler": _make_guarded_handler}


def pyarrow_filesystem(url: str, storage_options: dict[str, Any] | None = None, **fs_kwargs):
    """``(path, pyarrow filesystem)`` for a non-local ``url`` (Ray Train's ``storage_filesystem``): its bounded
    fsspec filesystem behind a handler whose failures to reach the endpoint raise StorageError naming the URL."""
    from pyarrow.fs import PyFileSystem

    fs, path = filesystem(url, storage_options, **fs_kwargs)
    return path.rstrip("/"), PyFileSystem(_lazy("GuardedFSSpecHandler")(fs))
