"""KG data layer: loaders on real files (embedded and FB15k-237), URLs, text, and the bad-input catalogue."""

from __future__ import annotations

import pytest
import torch

from bikd.kg import datasets
from bikd.kg.datasets import load_dataset, load_text
from bikd.kg.text import load_entity_text, load_wikidata
from bikd.kg.triples import IdMap, KGDataError, build_splits, read_triples
from bikd.storage import Storage


def write(path, data: bytes | str):
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return str(path)


# ---- real data -------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "name, sizes, num_entities, num_relations",
    [("nations", (1592, 199, 201), 14, 55), ("kinships", (8544, 1068, 1074), 104, 25), ("umls", (5216, 652, 661), 135, 46)],
)
def test_embedded_datasets_match_pykeen_counts(name, sizes, num_entities, num_relations):
    kg = load_dataset(name)
    assert (len(kg.train), len(kg.valid), len(kg.test)) == sizes
    assert (kg.num_entities, kg.num_relations) == (num_entities, num_relations)
    assert kg.train.dtype == torch.long and kg.train.shape[1] == 3
    all_triples = kg.all_triples()
    assert int(all_triples[:, [0, 2]].max()) == kg.num_entities - 1
    assert int(all_triples[:, 1].max()) == kg.num_relations - 1


@pytest.mark.data
def test_fb15k237_counts_and_crlf(fb15k237_dir):
    full = load_dataset("fb15k237", path=str(fb15k237_dir), id_map_from="all")
    assert (len(full.train), len(full.valid), len(full.test)) == (272115, 17535, 20466)
    assert (full.num_entities, full.num_relations) == (14541, 237)
    assert not any(label.endswith("\r") for label in full.entities.labels)  # CRLF stripped
    # PyKEEN's convention: ids from train, unseen valid/test entities dropped and reported
    kg = load_dataset("fb15k237", path=str(fb15k237_dir))
    assert kg.num_entities == 14505
    assert (len(kg.valid), kg.reports["valid"].num_dropped_unknown) == (17526, 9)
    assert (len(kg.test), kg.reports["test"].num_dropped_unknown) == (20438, 28)
    assert kg.reports["test"].dropped_examples[0].startswith(f"{fb15k237_dir}/test.txt:")


@pytest.mark.data
def test_fb15k237_env_var(fb15k237_dir, monkeypatch):
    monkeypatch.setenv("BIKD_FB15K237_DIR", str(fb15k237_dir))
    assert load_dataset("fb15k237").num_relations == 237
    monkeypatch.delenv("BIKD_FB15K237_DIR")
    monkeypatch.delenv("BIKD_DATA_DIR", raising=False)
    monkeypatch.setattr(datasets, "SHARED_DATA", fb15k237_dir.parent)  # a checkout's ../shared/data
    assert load_dataset("fb15k237").num_relations == 237
    monkeypatch.setattr(datasets, "SHARED_DATA", fb15k237_dir / "nowhere")
    with pytest.raises(ValueError, match="BIKD_FB15K237_DIR"):
        load_dataset("fb15k237")


@pytest.mark.data
def test_fb15k237_text_and_wikidata(fb15k237_dir):
    text = load_text("fb15k237", path=str(fb15k237_dir))
    assert len(text.relations) == 237
    assert text.entities["/m/0c94fn"].name == "Gary Rydstrom"
    assert text.entities["/m/0c94fn"].description.startswith("Gary Roger Rydstrom is an American sound designer")
    assert len(text.wikidata) == 14515
    assert text.wikidata["/m/010016"].wikidata_id == "Q128306"
    assert text.aliases("/m/010016") == ("Denton", "Denton, Texas")
    kg = load_dataset("fb15k237", path=str(fb15k237_dir), id_map_from="all")
    assert all(e in text.entities for e in kg.entities.labels)  # every entity has a name and description


def test_tolerates_crlf_blank_lines_and_comments(tmp_path):
    raw = read_triples(write(tmp_path / "t.tsv", b"# header comment\r\na\tr\tb\r\n\r\n  \nb\tr\tc\r\n# end\n"))
    assert raw.triples == (("a", "r", "b"), ("b", "r", "c"))
    assert raw.lines == (2, 5)


def test_duplicates_counted_and_removed(tmp_path):
    raw = read_triples(write(tmp_path / "t.tsv", "a\tr\tb\na\tr\tb\nb\tr\tc\na\tr\tb\n"))
    assert raw.triples == (("a", "r", "b"), ("b", "r", "c")) and raw.num_duplicates == 2


def test_loads_from_file_url_and_s3(tmp_path, s3_url):
    for split in ("train", "valid", "test"):
        write(tmp_path / f"{split}.txt", "a\tr\tb\nb\tr\tc\n")
    assert load_dataset(f"file://{tmp_path}").num_entities == 3
    s3 = Storage(s3_url + "/kg")
    for split in ("train", "valid", "test"):
        s3.write_text(f"{split}.txt", "x\tp\ty\ny\tq\tz\n")
    kg = load_dataset(s3_url + "/kg")
    assert kg.entities.labels == ("x", "y", "z") and kg.relations.labels == ("p", "q")


def test_splits_share_one_id_map(tmp_path):
    paths = {s: write(tmp_path / f"{s}.txt", c) for s, c in
             {"train": "b\tr\tc\na\tr\tb\n", "valid": "a\tr\tc\n", "test": "c\tr\ta\n"}.items()}
    kg = build_splits("tiny", {s: read_triples(p) for s, p in paths.items()})
    assert kg.entities.labels == ("a", "b", "c")  # sorted, as PyKEEN
    assert kg.valid.tolist() == [[0, 0, 2]] and kg.test.tolist() == [[2, 0, 0]]
    assert kg.label_triples("train") == [("b", "r", "c"), ("a", "r", "b")]
    again = IdMap.from_state_dict(kg.entities.state_dict())
    assert again == kg.entities and again.to_id == kg.entities.to_id


# ---- the bad-input catalogue -------------------------------------------------------------------------

BAD_TRIPLE_FILES = [
    # (case, file bytes, line, fragments of the message)
    ("two columns", b"a\tr\tb\na\tr\n", 2, ["expected 3 tab-separated columns", "found 2", "'a\\tr'"]),
    ("four columns", b"a\tr\tb\tx\n", 1, ["found 4"]),
    ("space separated", b"# c\na r b\n", 2, ["expected 3 tab-separated columns", "found 1", "'a r b'"]),
    ("empty head", b"a\tr\tb\n\tr\tb\n", 2, ["empty head column"]),
    ("empty tail", b"a\tr\t \n", 1, ["empty tail column"]),
    ("latin-1 bytes", b"a\tr\tb\ncaf\xe9\tr\tb\n", 2, ["not valid UTF-8 at byte 3", "caf"]),
    ("empty file", b"", None, ["holds no triples"]),
    ("only comments", b"# nothing\n\n   \n", None, ["holds no triples"]),
]


@pytest.mark.parametrize("case, data, line, fragments", BAD_TRIPLE_FILES, ids=[c[0] for c in BAD_TRIPLE_FILES])
def test_bad_triple_file_names_file_line_and_text(tmp_path, case, data, line, fragments):
    path = write(tmp_path / "bad.tsv", data)
    with pytest.raises(KGDataError) as info:
        read_triples(path)
    message = str(info.value)
    assert message.startswith(f"{path}:{line}:" if line else f"{path}:")
    assert info.value.line == line
    for fragment in fragments:
        assert fragment in message


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.tsv"):
        read_triples(str(tmp_path / "nope.tsv"))
    with pytest.raises(FileNotFoundError, match="train.txt"):
        load_dataset(str(tmp_path))


def _splits(tmp_path, valid: str):
    paths = {"train": write(tmp_path / "train.txt", "a\tr\tb\nb\tr\tc\n"),
             "valid": write(tmp_path / "valid.txt", valid), "test": write(tmp_path / "test.txt", "a\tr\tc\n")}
    return {s: read_triples(p) for s, p in paths.items()}


def test_unknown_entity_dropped_and_reported(tmp_path):
    kg = build_splits("t", _splits(tmp_path, "a\tr\tc\nz\tr\ta\na\tq\tb\n"))
    assert kg.valid.tolist() == [[0, 0, 2]]
    rep = kg.reports["valid"]
    assert rep.num_dropped_unknown == 2
    assert rep.dropped_examples[0] == f"{tmp_path}/valid.txt:2: z\tr\ta"
    assert "dropped 2 with unknown ids" in kg.summary()


def test_unknown_entity_policy_error(tmp_path):
    with pytest.raises(KGDataError, match=r"valid.txt:3: 'q' not in the training id map"):
        build_splits("t", _splits(tmp_path, "a\tr\tc\n\na\tq\tb\n"), unknown="error")
    with pytest.raises(ValueError, match="'drop' or 'error'"):
        build_splits("t", _splits(tmp_path, "a\tr\tc\n"), unknown="ignore")  # type: ignore[arg-type]


def test_missing_split_named(tmp_path):
    raw = _splits(tmp_path, "a\tr\tc\n")
    del raw["test"]
    with pytest.raises(ValueError, match=r"lacks split\(s\) \['test'\]"):
        build_splits("t", raw)


@pytest.mark.parametrize(
    "data, fragments",
    [(b"/m/1\tName -- text\nno tab here\n", ["bad.txt:2", "expected 'id<TAB>text'"]),
     (b"/m/1\tA\n/m/1\tB\n", ["bad.txt:2", "appears twice"]),
     (b"/m/1\t\xff\xfe\n", ["bad.txt:1", "not valid UTF-8"]),
     (b"\n\n", ["bad.txt", "holds no entries"])],
)
def test_bad_text_files(tmp_path, data, fragments):
    path = write(tmp_path / "bad.txt", data)
    with pytest.raises(KGDataError) as info:
        load_entity_text(path)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_entity_text_without_description(tmp_path):
    text = load_entity_text(write(tmp_path / "e.txt", "/m/1\tOnly A Name\n/m/2\tX -- a -- b\n"))
    assert text["/m/1"].name == "Only A Name" and text["/m/1"].description == ""
    assert text["/m/2"].description == "a -- b"


@pytest.mark.parametrize("data, fragment", [(b"{not json", "line 1"), (b"[1, 2]", "expected a JSON object"),
                                            (b'{"/m/1": {"label": "x"}}', "lacks 'wikidata_id'")])
def test_bad_wikidata_json(tmp_path, data, fragment):
    path = write(tmp_path / "w.json", data)
    with pytest.raises(KGDataError, match=fragment) as info:
        load_wikidata(path)
    assert path in str(info.value)
