"""KGStore on local disk and on a real S3 endpoint (moto server): versions, rollback, atomicity, integrity."""

import math
import subprocess
import sys

import numpy as np
import pytest

from bikd.kg.store import IntegrityError, KGStore, MinedTriple, Provenance
from bikd.storage import Storage

ENTITIES = ["alice", "bob", "carol", "Zoë", "/m/0x\tweird"]
RELATIONS = ["knows", "likes", "/people/person/nationality"]
GOLD = {
    "train": [("alice", "knows", "bob"), ("bob", "likes", "carol")],
    "valid": [("carol", "knows", "Zoë")],
    "test": [("Zoë", "/people/person/nationality", "/m/0x\tweird")],
}
EVIDENCE = "line one\tcol2\nline two \"quoted\" \\ back\r\nZoë → 東京 🚀 \u2028 end\x00"


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path):
    if request.param == "local":
        return Storage(str(tmp_path / "kg"))
    return Storage(request.getfixturevalue("s3_url") + "/kg")


@pytest.fixture
def store(storage):
    return KGStore.create(storage, entities=ENTITIES, relations=RELATIONS, gold=GOLD)


def mined(h, r, t, rnd=1, conf=0.5, evidence=""):
    return MinedTriple(h, r, t, Provenance("lm-miner", rnd, conf, f"snap-{rnd}", evidence))


def test_create_commit_read_roundtrip(storage, store):
    v0 = store.read(0)
    assert v0.version == 0 and v0.entities == tuple(ENTITIES) and v0.relations == tuple(RELATIONS)
    assert v0.gold == {k: tuple(v) for k, v in GOLD.items()} and list(v0.gold) == ["train", "valid", "test"]
    assert v0.mined == ()

    batch = [mined("alice", "likes", "Zoë", conf=0.75, evidence=EVIDENCE), mined("/m/0x\tweird", "knows", "bob", conf=1.0)]
    assert store.commit(batch, message="round 1") == 1
    assert store.head == 1

    again = KGStore(storage).read()  # a fresh instance: nothing comes from in-memory caches
    assert again.version == 1 and again.mined == tuple(batch)
    assert again.mined[0].provenance.evidence == EVIDENCE
    assert again.gold == v0.gold

    ids, conf = again.mined_arrays()
    assert ids.dtype == np.int64 and ids.tolist() == [[0, 1, 3], [4, 0, 1]]
    assert conf.dtype == np.float64 and conf.tolist() == [0.75, 1.0]
    ids2, _ = again.mined_arrays({e: 10 + i for i, e in enumerate(ENTITIES)}, {r: 7 for r in RELATIONS})
    assert ids2.tolist() == [[10, 7, 13], [14, 7, 11]]
    empty_ids, empty_conf = v0.mined_arrays()
    assert empty_ids.shape == (0, 3) and empty_conf.shape == (0,)

    info = KGStore(storage).versions()
    assert [(i.version, i.kind, i.base, i.num_mined_added, i.num_mined) for i in info] == [
        (0, "gold", None, 0, 0), (1, "mined", 0, 2, 2)]
    assert info[1].message == "round 1" and info[1].created.endswith("+00:00")


def test_every_version_readable_after_commits_and_rollback(storage, store):
    r1 = [mined("alice", "likes", "bob", 1, 0.9)]
    r2 = [mined("bob", "knows", "carol", 2, 0.2), mined("carol", "likes", "alice", 2, 0.3)]
    r3 = [mined("Zoë", "knows", "alice", 3, 0.4, evidence="bad round")]
    assert [store.commit(r1), store.commit(r2), store.commit(r3)] == [1, 2, 3]
    assert store.rollback(1, message="round 2 was bad") == 4
    assert store.head == 4
    r5 = [mined("carol", "knows", "bob", 4, 0.6)]
    assert store.commit(r5) == 5

    expected = {0: [], 1: r1, 2: r1 + r2, 3: r1 + r2 + r3, 4: r1, 5: r1 + r5}
    reader = KGStore(storage)
    for v, triples in expected.items():
        got = reader.read(v)
        assert got.version == v and got.mined == tuple(triples), v
        assert got.gold["train"] == tuple(GOLD["train"])
    assert reader.read().mined == tuple(r1 + r5)
    assert store.rollback(0) == 6 and store.read().mined == ()
    assert store.read(3).mined == tuple(r1 + r2 + r3)  # nothing was lost by rolling back

    info = {i.version: i for i in reader.versions()}
    assert sorted(info) == list(range(7))
    assert (info[4].kind, info[4].base, info[4].parent, info[4].message) == ("rollback", 1, 3, "round 2 was bad")
    assert (info[5].kind, info[5].base, info[5].parent) == ("mined", 4, 4)
    assert [info[v].num_mined for v in range(7)] == [0, 1, 3, 4, 1, 2, 0]


@pytest.mark.parametrize(
    "triple, label",
    [(("nobody", "knows", "bob"), "nobody"), (("alice", "hates", "bob"), "hates"), (("alice", "knows", "zoe"), "zoe")],
)
def test_unknown_labels_rejected_before_writing(storage, store, triple, label):
    with pytest.raises(ValueError, match=f"mined triple #1.*{label}"):
        store.commit([mined("alice", "likes", "bob"), mined(*triple)])
    assert store.head == 0
    assert not storage.exists("versions/000001")


@pytest.mark.parametrize("conf", [1.5, -0.01, math.nan, math.inf, True, "0.5"])
def test_bad_confidence_rejected(conf):
    with pytest.raises(ValueError, match="confidence"):
        Provenance("lm-miner", 1, conf, "snap")


def test_bad_provenance_fields_rejected():
    with pytest.raises(ValueError, match="round"):
        Provenance("lm-miner", -1, 0.5, "snap")
    with pytest.raises(ValueError, match="source"):
        Provenance("", 1, 0.5, "snap")
    p = Provenance("lm-miner", np.int64(2), np.float32(0.5), "snap")
    assert type(p.round) is int and type(p.confidence) is float and p.confidence == 0.5


def test_invalid_gold_rejected(storage):
    with pytest.raises(ValueError, match="gold train triple #0.*'mallory'"):
        KGStore.create(storage, entities=ENTITIES, relations=RELATIONS, gold={"train": [("mallory", "knows", "bob")]})
    with pytest.raises(ValueError, match="duplicate entity label 'bob'"):
        KGStore.create(storage, entities=["bob", "bob"], relations=RELATIONS, gold={})
    assert KGStore(storage).versions() == []


def test_crash_before_manifest_is_invisible(storage, store, monkeypatch):
    assert store.commit([mined("alice", "likes", "bob")]) == 1
    before = store.read()
    real_write = storage.write_bytes

    def crash_on_manifest(rel, data, **kw):
        if rel.startswith("manifests/"):
            raise RuntimeError("simulated crash")
        return real_write(rel, data, **kw)

    monkeypatch.setattr(storage, "write_bytes", crash_on_manifest)
    with pytest.raises(RuntimeError, match="simulated crash"):
        store.commit([mined("bob", "knows", "carol", 2, evidence="lost")])
    assert storage.exists("versions/000002/mined.jsonl")  # the data did land; only the manifest is missing
    monkeypatch.undo()

    fresh = KGStore(storage)
    assert store.head == fresh.head == 1
    assert fresh.read() == before and [i.version for i in fresh.versions()] == [0, 1]
    with pytest.raises(KeyError, match="available: \\[0, 1\\]"):
        fresh.read(2)

    kept = [mined("carol", "knows", "alice", 2, 0.8)]
    assert store.commit(kept) == 2
    assert KGStore(storage).read().mined == before.mined + tuple(kept)


def test_crash_during_create_leaves_store_empty(storage, monkeypatch):
    real_write = storage.write_bytes

    def crash_on_manifest(rel, data, **kw):
        if rel.startswith("manifests/"):
            raise RuntimeError("boom")
        return real_write(rel, data, **kw)

    monkeypatch.setattr(storage, "write_bytes", crash_on_manifest)
    with pytest.raises(RuntimeError, match="boom"):
        KGStore.create(storage, entities=ENTITIES, relations=RELATIONS, gold=GOLD)
    monkeypatch.undo()
    assert KGStore(storage).versions() == []
    with pytest.raises(ValueError, match="empty"):
        KGStore(storage).head
    assert KGStore.create(storage, entities=ENTITIES, relations=RELATIONS, gold=GOLD).read().gold["valid"] == tuple(GOLD["valid"])


def test_corrupted_data_file_fails_sha256(storage, store):
    store.commit([mined("alice", "likes", "bob", evidence="original")])
    rel = "versions/000001/mined.jsonl"
    storage.write_bytes(rel, storage.read_bytes(rel).replace(b"original", b"tampered"))
    with pytest.raises(IntegrityError, match="mined.jsonl: contents differ from the checksum"):
        KGStore(storage).read(1)
    assert KGStore(storage).read(0).gold["train"] == tuple(GOLD["train"])  # other files still verify

    storage.write_bytes("versions/000000/gold-test.jsonl", b"")
    with pytest.raises(IntegrityError, match="gold-test.jsonl"):
        KGStore(storage).read(0)


def test_second_create_raises(storage, store):
    with pytest.raises(FileExistsError, match="already holds"):
        KGStore.create(storage, entities=["x"], relations=["y"], gold={"train": [("x", "y", "x")]})
    assert KGStore(storage).read().entities == tuple(ENTITIES)


def test_second_writer_on_same_version_gets_file_exists(storage, store, monkeypatch):
    other = KGStore(storage)
    assert store.commit([mined("alice", "likes", "bob")]) == 1
    monkeypatch.setattr(KGStore, "head", property(lambda self: 0))  # a writer with a stale view of HEAD
    with pytest.raises(FileExistsError, match="000001.json"):
        other.commit([mined("bob", "likes", "alice")])
    monkeypatch.undo()
    # Its data files replaced the winner's before the manifest write failed: the sha256 check says so.
    with pytest.raises(IntegrityError, match="sha256"):
        KGStore(storage).read(1)


def test_unknown_version_and_empty_store(storage, store):
    with pytest.raises(KeyError, match="version 9 .*available: \\[0\\]"):
        store.read(9)
    with pytest.raises(KeyError, match="available"):
        store.rollback(9)
    empty = KGStore(Storage(storage.url_of("elsewhere")))
    with pytest.raises(ValueError, match="empty"):
        empty.commit([])
    with pytest.raises(ValueError, match="empty"):
        empty.read()


def test_import_pulls_no_ray_or_torch():
    code = "import sys, bikd.kg.store; bad = [m for m in ('ray', 'torch') if m in sys.modules]; assert not bad, bad"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_mining_provenance_roundtrip_and_meta(storage, store):
    full = Provenance("co-mention", 3, 0.625, "lm-abc", "Zoë met alice", kg_snapshot_id="kg-123",
                      document="desc:/m/0x\tweird", span=(np.int64(4), 9))
    assert full.span == (4, 9) and full.lm_snapshot_id == "lm-abc"
    batch = [MinedTriple("Zoë", "knows", "alice", full), mined("bob", "likes", "alice")]
    assert store.commit(batch, message="round 3", meta={"round_key": {"round": 3, "base": 0}}) == 1
    back = KGStore(storage)
    assert back.read().mined == tuple(batch)
    assert back.read().mined[1].provenance.span is None and back.read().mined[1].provenance.kg_snapshot_id == ""
    assert back.versions()[1].meta == {"round_key": {"round": 3, "base": 0}} and back.versions()[0].meta == {}
    with pytest.raises(TypeError):
        store.commit([], meta={"x": object()})
    assert store.head == 1


def test_version_written_before_the_new_fields_reads_with_defaults(storage, store):
    import hashlib
    import json

    old_row = {"head": "alice", "relation": "likes", "tail": "bob", "source": "lm-miner", "round": 1,
               "confidence": 0.5, "snapshot_id": "snap", "evidence": "old"}
    data = (json.dumps(old_row) + "\n").encode()
    storage.write_bytes("versions/000001/mined.jsonl", data)
    manifest = {"format": 1, "version": 1, "base": 0, "parent": 0, "kind": "mined", "message": "old",
                "created": "2026-01-01T00:00:00.000+00:00", "counts": {"mined_added": 1, "mined_total": 1},
                "files": {"mined.jsonl": hashlib.sha256(data).hexdigest()}}
    storage.write_bytes("manifests/000001.json", json.dumps(manifest).encode())
    (m,) = KGStore(storage).read(1).mined
    assert m.provenance == Provenance("lm-miner", 1, 0.5, "snap", "old")
    assert (m.provenance.kg_snapshot_id, m.provenance.document, m.provenance.span) == ("", "", None)


@pytest.mark.parametrize("span", [(5, 5), (-1, 3), (1, 2, 3), (True, 4), ("0", 2)])
def test_bad_span_rejected(span):
    with pytest.raises(ValueError, match="span"):
        Provenance("co-mention", 1, 0.5, "snap", span=span)
