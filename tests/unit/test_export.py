"""Embedding export: the files round-trip (local and S3), read with plain numpy, and fail clearly."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch

from bikd.kge.export import ExportError, export_embeddings, load_embeddings
from bikd.kge.models import ModelConfig, build_model
from bikd.storage import Storage

ENTITIES = ["/m/0a", "/m/0b", "Barack Obama", "e:4"]
RELATIONS = ["/people/person/nationality", "born_in", "r3"]


def tables(name: str, dim: int = 5):
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=name, dim=dim), len(ENTITIES), len(RELATIONS))
    return model.entity.detach(), model.relation.detach()


@pytest.mark.parametrize("name, factors", [("transe", (1, 1)), ("distmult", (1, 1)), ("complex", (2, 2)), ("rotate", (2, 1))])
def test_round_trip_local(tmp_path, name, factors):
    entity, relation = tables(name)
    cfg = ModelConfig(name=name, dim=5)
    written = export_embeddings(Storage(str(tmp_path)), entity, relation, ENTITIES, RELATIONS, cfg, prefix="export",
                                extra={"dataset": "toy"})
    e, r, el, rl, meta = load_embeddings(Storage(str(tmp_path / "export")))
    assert e.dtype == np.float32 and e.shape == (4, 5 * factors[0]) and r.shape == (3, 5 * factors[1])
    np.testing.assert_array_equal(e, entity.numpy())
    np.testing.assert_array_equal(r, relation.numpy())
    assert el == ENTITIES and rl == RELATIONS
    assert meta == written and meta["model"] == name and meta["dim"] == 5 and meta["extra"] == {"dataset": "toy"}
    assert meta["num_entities"] == 4 and meta["num_relations"] == 3
    if name in ("complex", "rotate"):
        assert "[real parts | imaginary parts]" in meta["layout"]["entity"]
    if name == "rotate":
        assert "phases" in meta["layout"]["relation"]
    # the same export through a prefix on the parent storage
    assert load_embeddings(Storage(str(tmp_path)), prefix="export")[4] == meta


def test_round_trip_s3(s3_url):
    entity, relation = tables("complex")
    storage = Storage(f"{s3_url}/run")
    export_embeddings(storage, entity, relation, ENTITIES, RELATIONS, ModelConfig(name="complex", dim=5), prefix="export")
    assert storage.ls("export") == ["entities.tsv", "entity_embedding.npy", "model.json", "relation_embedding.npy", "relations.tsv"]
    e, r, el, rl, meta = load_embeddings(storage.child("export"))
    np.testing.assert_array_equal(e, entity.numpy())
    np.testing.assert_array_equal(r, relation.numpy())
    assert (el, rl, meta["model"]) == (ENTITIES, RELATIONS, "complex")


def test_plain_numpy_reads_the_files_and_labels_line_up_with_rows(tmp_path):
    """What a DGL-KE or PyKEEN user does: numpy.load the matrices, dict the TSVs, index rows by label."""
    entity, relation = tables("transe")
    export_embeddings(Storage(str(tmp_path)), entity, relation, ENTITIES, RELATIONS, ModelConfig(name="transe", dim=5))
    e = np.load(tmp_path / "entity_embedding.npy")
    r = np.load(tmp_path / "relation_embedding.npy")
    assert e.dtype == np.float32 and r.dtype == np.float32
    entity_to_id = {label: int(i) for i, label in (line.split("\t") for line in (tmp_path / "entities.tsv").read_text().splitlines())}
    relation_to_id = {label: int(i) for i, label in (line.split("\t") for line in (tmp_path / "relations.tsv").read_text().splitlines())}
    assert entity_to_id == {label: i for i, label in enumerate(ENTITIES)}  # the map PyKEEN's TriplesFactory takes
    assert relation_to_id == {label: i for i, label in enumerate(RELATIONS)}
    np.testing.assert_array_equal(e[entity_to_id["Barack Obama"]], entity[2].numpy())
    np.testing.assert_array_equal(r[relation_to_id["born_in"]], relation[1].numpy())
    meta = json.loads((tmp_path / "model.json").read_text())
    assert meta["entity_shape"] == list(e.shape) and meta["score"] == "-||h + r - t||_2"


def test_export_rejects_tables_that_do_not_fit_before_writing(tmp_path):
    entity, relation = tables("transe")
    cfg = ModelConfig(name="transe", dim=5)
    with pytest.raises(ValueError, match=r"entity table has shape \(4, 5\), but 3 entity labels"):
        export_embeddings(Storage(str(tmp_path)), entity, relation, ENTITIES[:3], RELATIONS, cfg)
    with pytest.raises(ValueError, match=r"relation table has shape \(3, 5\).*need \(3, 10\)"):
        export_embeddings(Storage(str(tmp_path)), torch.zeros(4, 10), relation, ENTITIES, RELATIONS, ModelConfig(name="complex", dim=5))
    with pytest.raises(ValueError, match="without tabs"):
        export_embeddings(Storage(str(tmp_path)), entity, relation, ["a", "b\tc", "d", "e"], RELATIONS, cfg)
    assert list(tmp_path.iterdir()) == []


def test_shape_mismatch_names_the_file(tmp_path):
    entity, relation = tables("transe")
    storage = Storage(str(tmp_path))
    export_embeddings(storage, entity, relation, ENTITIES, RELATIONS, ModelConfig(name="transe", dim=5))
    good = (tmp_path / "entities.tsv").read_text()
    (tmp_path / "entities.tsv").write_text("".join(good.splitlines(keepends=True)[:3]))
    with pytest.raises(ValueError, match=r"entity_embedding\.npy: 4 rows, but .*entities\.tsv has 3 labels"):
        load_embeddings(storage)
    (tmp_path / "entities.tsv").write_text(good.replace("1\t", "7\t"))
    with pytest.raises(ExportError, match=r"entities\.tsv:2: expected '1<TAB>label'"):
        load_embeddings(storage)
    (tmp_path / "entities.tsv").write_text(good)
    buf = io.BytesIO()
    np.save(buf, np.zeros((3, 6), dtype=np.float32))
    (tmp_path / "relation_embedding.npy").write_bytes(buf.getvalue())
    with pytest.raises(ExportError, match=r"relation_embedding\.npy: shape \[3, 6\] .* says \[3, 5\]"):
        load_embeddings(storage)
    np.save(tmp_path / "relation_embedding.npy", relation.numpy() + 1)  # right shape, other contents
    with pytest.raises(ExportError, match=r"relation_embedding\.npy: contents differ from the checksum"):
        load_embeddings(storage)


def test_model_json_is_written_last(tmp_path, monkeypatch):
    entity, relation = tables("rotate")
    storage = Storage(str(tmp_path))
    cfg = ModelConfig(name="rotate", dim=5)
    export_embeddings(storage, entity, relation, ENTITIES, RELATIONS, cfg)  # a complete earlier export
    written = []
    real_write = Storage.write_bytes

    def failing_write(self, rel, data, **kw):
        written.append(rel)
        if rel.endswith("model.json"):
            raise OSError("disk full")
        return real_write(self, rel, data, **kw)

    monkeypatch.setattr(Storage, "write_bytes", failing_write)
    with pytest.raises(OSError, match="disk full"):
        export_embeddings(storage, entity * 2, relation, ENTITIES, RELATIONS, cfg)
    assert written[-1] == "model.json" and len(written) == 5
    assert not (tmp_path / "model.json").exists()  # the old one went first: the half-written export is not complete
    with pytest.raises(ExportError, match=r"model\.json: not found; .* holds no export or an incomplete one"):
        load_embeddings(storage)


def test_load_of_an_empty_folder_is_clear(tmp_path):
    with pytest.raises(ValueError, match="holds no export"):
        load_embeddings(Storage(str(tmp_path / "nothing")))
