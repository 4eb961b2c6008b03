"""Storage round-trips on local disk and on a real S3 endpoint (moto server via s3fs)."""

import pytest

from bikd.storage import Storage


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path):
    if request.param == "local":
        return Storage(str(tmp_path / "root"))
    return Storage(request.getfixturevalue("s3_url") + "/root")


def test_write_read_ls(storage):
    storage.write_text("a/b.txt", "hello")
    storage.write_bytes("a/c.bin", b"\x00\x01")
    assert storage.read_text("a/b.txt") == "hello"
    assert storage.read_bytes("a/c.bin") == b"\x00\x01"
    assert storage.ls("a") == ["b.txt", "c.bin"]
    assert storage.exists("a/b.txt") and not storage.exists("a/zzz")
    assert storage.ls("nothing-here") == []


def test_overwrite_is_whole(storage):
    storage.write_text("x", "first version, long")
    storage.write_text("x", "second")
    assert storage.read_text("x") == "second"
    if storage.url.startswith("/"):
        assert [n for n in storage.ls("") if ".tmp-" in n] == []


def test_exclusive_write_refuses_existing(storage):
    storage.write_text("m.json", "{}", exclusive=True)
    with pytest.raises(FileExistsError, match="m.json"):
        storage.write_text("m.json", "{}", exclusive=True)


def test_missing_file_names_url(storage):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        storage.read_text("nope.txt")


def test_child_and_escape(storage):
    child = storage.child("sub")
    child.write_text("f", "1")
    assert storage.read_text("sub/f") == "1"
    with pytest.raises(ValueError, match="escapes"):
        storage.path("../outside")


def test_pickle_roundtrip(storage):
    import pickle

    storage.write_text("p", "v")
    again = pickle.loads(pickle.dumps(storage))
    assert again.read_text("p") == "v"
