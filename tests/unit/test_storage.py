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


def test_open_and_iter_lines(storage):
    storage.write_text("lines.txt", "a\nb\n")
    assert list(storage.iter_lines("lines.txt")) == [b"a\n", b"b\n"]
    with storage.open("lines.txt") as f:
        assert f.read() == b"a\nb\n"


def test_single_urls(storage):
    from bikd.storage import open_url, read_url, url_exists

    storage.write_text("u.txt", "payload")
    url = storage.url_of("u.txt")
    assert read_url(url, storage.storage_options) == b"payload"
    with open_url(url, "rb", storage.storage_options) as f:
        assert f.read() == b"payload"
    assert url_exists(url, storage.storage_options) and not url_exists(storage.url_of("none.txt"), storage.storage_options)
    with pytest.raises(FileNotFoundError, match="none.txt"):
        read_url(storage.url_of("none.txt"))


def test_s3_filesystem_is_bounded_and_pickles(s3_url):
    """Storage's S3 filesystem carries bikd's limits, also after pickling (Ray ships it to workers)."""
    import pickle

    fs = Storage(s3_url).fs
    assert fs.retries == 1  # botocore retries; s3fs's own loop would multiply its attempts
    assert fs.config_kwargs["retries"]["total_max_attempts"] >= 1 and fs.config_kwargs["read_timeout"] > 0
    again = pickle.loads(pickle.dumps(fs))
    assert type(again) is type(fs) and again.retries == 1 and again.config_kwargs == fs.config_kwargs


def test_pyarrow_filesystem_roundtrip(s3_url):
    """What Ray Train does with ray_storage's filesystem: write, list, stat, read, also after pickling."""
    import pickle

    from pyarrow.fs import FileSelector, FileType

    from bikd.storage import pyarrow_filesystem

    path, fs = pyarrow_filesystem(f"{s3_url}/runs/", skip_instance_cache=True, use_listings_cache=False)
    assert path == f"{s3_url[5:]}/runs"
    with fs.open_output_stream(f"{path}/exp/ckpt/state.pkl") as f:
        f.write(b"state")
    fs = pickle.loads(pickle.dumps(fs))
    assert fs.get_file_info(f"{path}/exp/ckpt/state.pkl").type == FileType.File
    assert fs.get_file_info(f"{path}/exp/nothing").type == FileType.NotFound
    assert [i.base_name for i in fs.get_file_info(FileSelector(f"{path}/exp/ckpt"))] == ["state.pkl"]
    with fs.open_input_stream(f"{path}/exp/ckpt/state.pkl") as f:
        assert f.read() == b"state"
    with pytest.raises(FileNotFoundError):
        fs.open_input_stream(f"{path}/exp/nothing")
