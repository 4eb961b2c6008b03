"""bikd.manifest: data files first, manifest last, checksums checked on read."""

from __future__ import annotations

import json

import pytest

from bikd.manifest import read_listed, sha256_hex, write_manifested
from bikd.storage import Storage


class DiesOnWrite(Storage):
    """A writer that dies when it reaches ``path`` (a crash mid-artefact)."""

    def __init__(self, url: str, path: str):
        super().__init__(url)
        self.dies_at = path

    def write_bytes(self, rel, data, **kw):
        if rel == self.dies_at:
            raise OSError("killed")
        return super().write_bytes(rel, data, **kw)


def manifest_for(files: dict[str, bytes]) -> bytes:
    return json.dumps({"sha256": {k: sha256_hex(v) for k, v in files.items()}}).encode()


def test_a_rewrite_that_dies_leaves_no_manifest_and_a_reader_sees_why(tmp_path):
    storage = Storage(str(tmp_path))
    first = {"a.bin": b"one", "b.bin": b"two"}
    write_manifested(storage, first, "manifest.json", manifest_for(first))
    assert read_listed(storage, "b.bin", sha256_hex(b"two"), listed_in="manifest.json") == b"two"

    second = {"a.bin": b"ONE", "b.bin": b"TWO"}
    with pytest.raises(OSError, match="killed"):
        write_manifested(DiesOnWrite(str(tmp_path), "b.bin"), second, "manifest.json", manifest_for(second))
    assert not storage.exists("manifest.json")  # the old manifest went first: a.bin is already the new one
    with pytest.raises(ValueError, match=r"a\.bin: contents differ from the checksum \(sha256\) in manifest.json"):
        read_listed(storage, "a.bin", sha256_hex(b"one"), listed_in="manifest.json", error=ValueError)
    with pytest.raises(ValueError, match=r"c\.bin: missing, although manifest.json lists it"):
        read_listed(storage, "c.bin", "0" * 64, listed_in="manifest.json", error=ValueError)


def test_exclusive_manifest_refuses_a_second_writer(tmp_path):
    storage = Storage(str(tmp_path))
    write_manifested(storage, {"v1/x": b"1"}, "manifests/1.json", b"{}", exclusive=True)
    with pytest.raises(FileExistsError):
        write_manifested(storage, {"v1/x": b"2"}, "manifests/1.json", b"{}", exclusive=True)
