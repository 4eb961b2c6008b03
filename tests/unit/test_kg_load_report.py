"""What loading a KG drops, strips or merges: byte-order marks, whitespace around labels, duplicate
triples, unknown ids; each is counted on RawTriples/SplitReport, in load_counts() and in summary()."""

from __future__ import annotations

import json

import pytest

from bikd.kg.datasets import load_dataset, load_text
from bikd.kg.text import load_entity_text, load_relation_text, load_wikidata
from bikd.kg.triples import LOAD_COUNTS, KGDataError, SplitReport, read_triples

BOM = "\ufeff"


def write(path, data: bytes | str):
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return str(path)


def kg_dir(tmp_path, train: str, valid: str = "a\tr\tb\n", test: str = "b\tr\tc\n"):
    for split, text in (("train", train), ("valid", valid), ("test", test)):
        write(tmp_path / f"{split}.txt", text)
    return str(tmp_path)


# ---- byte-order marks ---------------------------------------------------------------------------------

def test_bom_is_not_part_of_the_first_entity(tmp_path):
    kg = load_dataset(kg_dir(tmp_path, BOM + "a\tr\tb\nb\tr\tc\n"))
    assert kg.entities.labels == ("a", "b", "c") and kg.num_entities == 3
    assert kg.reports["train"].bom_stripped == 1 and kg.reports["valid"].bom_stripped == 0
    assert kg.valid.tolist() == [[0, 0, 1]]  # valid's plain 'a' is train's first entity, nothing dropped
    assert kg.load_counts()["train.bom_stripped"] == 1
    assert "train 2 (stripped a UTF-8 BOM)" in kg.summary()


def test_bom_before_a_comment_and_in_joined_files(tmp_path):
    raw = read_triples(write(tmp_path / "t.tsv", f"{BOM}# header\na\tr\tb\n{BOM}b\tr\tc\n"))  # cat of two files
    assert raw.triples == (("a", "r", "b"), ("b", "r", "c")) and raw.lines == (2, 3)
    assert raw.bom_stripped == 2


def test_bom_line_errors_keep_file_line_and_text(tmp_path):
    path = write(tmp_path / "t.tsv", BOM + "a\tr\n")
    with pytest.raises(KGDataError) as info:
        read_triples(path)
    assert str(info.value) == f"{path}:1: expected 3 tab-separated columns (head, relation, tail), found 2 (got 'a\\tr')"


def test_utf16_file_is_named_as_such(tmp_path):
    path = write(tmp_path / "t.tsv", "a\tr\tb\n".encode("utf-16"))
    with pytest.raises(KGDataError, match=r"t.tsv:1: not valid UTF-8 at byte 0: the file starts with a UTF-16 byte-order mark"):
        read_triples(path)


def test_text_files_with_bom(tmp_path):
    write(tmp_path / "entity2text.txt", BOM + "/m/1\tOne -- the first\n/m/2\tTwo\n")
    write(tmp_path / "relation2text.txt", BOM + "/r/1\trelated to\n")
    write(tmp_path / "entity2wikidata.json", BOM + json.dumps({"/m/1": {"wikidata_id": "Q1", "label": "One"}}))
    assert set(load_entity_text(str(tmp_path / "entity2text.txt"))) == {"/m/1", "/m/2"}
    assert load_relation_text(str(tmp_path / "relation2text.txt")) == {"/r/1": "related to"}
    assert load_wikidata(str(tmp_path / "entity2wikidata.json"))["/m/1"].wikidata_id == "Q1"
    text = load_text(str(tmp_path))
    assert text.name("/m/1") == "One" and text.relations["/r/1"] == "related to"


# ---- whitespace around labels --------------------------------------------------------------------------

def test_whitespace_variants_merged_and_counted(tmp_path):
    path = write(tmp_path / "t.tsv", "a\tr\tb\n a\tr\tc\nb \tr \ta \n x\tr\ty\nx \tr\ty\n")
    raw = read_triples(path)
    assert {x for h, _, t in raw.triples for x in (h, t)} == {"a", "b", "c", "x", "y"}
    assert {r for _, r, _ in raw.triples} == {"r"}
    assert raw.num_whitespace_stripped == 6  # ' a', 'b ', 'r ', 'a ', ' x', 'x '
    # ' a' and 'a ' onto 'a', 'b ' onto 'b', 'r ' onto 'r', ' x' and 'x ' onto each other (no plain 'x')
    assert raw.num_labels_merged == 6
    assert raw.num_duplicates == 1  # ' x r y' and 'x  r y' are one triple once stripped
    assert raw.merged_examples[0] == f"{path}:2: ' a' merged into 'a'"


def test_lone_padded_label_is_stripped_not_merged(tmp_path):
    raw = read_triples(write(tmp_path / "t.tsv", "a\tr\t b\nr \tr\tc\n"))
    # ' b' has no other spelling; entity 'r ' and relation 'r' live in different id maps
    assert (raw.num_whitespace_stripped, raw.num_labels_merged, raw.merged_examples) == (2, 0, ())


def test_crlf_is_not_counted_as_whitespace(tmp_path):
    raw = read_triples(write(tmp_path / "t.tsv", b"a\tr\tb\r\nb\tr\tc\r\n"))
    assert raw.triples[-1] == ("b", "r", "c")
    assert (raw.num_whitespace_stripped, raw.num_labels_merged, raw.bom_stripped) == (0, 0, 0)


def test_whitespace_merges_end_to_end(tmp_path):
    kg = load_dataset(kg_dir(tmp_path, "a\tr\tb\n a\tr\tc\nb\tr\ta \n", valid=" a\tr\tb\n"))
    assert kg.entities.labels == ("a", "b", "c")
    rep = kg.reports["train"]
    assert (rep.num_whitespace_stripped, rep.num_labels_merged) == (2, 2)
    assert rep.merged_examples[1].endswith(":3: 'a ' merged into 'a'")
    counts = kg.load_counts()
    assert (counts["train.num_labels_merged"], counts["valid.num_whitespace_stripped"], counts["valid.num_labels_merged"]) == (2, 1, 0)
    assert ("train 3 (stripped surrounding whitespace from 2 columns; "
            "merged 2 labels differing only by surrounding whitespace)") in kg.summary()
    assert "valid 1 (stripped surrounding whitespace from 1 column)" in kg.summary()


# ---- duplicates, unknown ids, load_counts, summary ----------------------------------------------------------

def test_duplicates_in_counts_and_summary(tmp_path):
    kg = load_dataset(kg_dir(tmp_path, "a\tr\tb\na\tr\tb\nb\tr\tc\na\tr\tb\n", test="b\tr\tc\nb\tr\tc\n"))
    counts = kg.load_counts()
    assert (counts["train.num_duplicates"], counts["valid.num_duplicates"], counts["test.num_duplicates"]) == (2, 0, 1)
    assert "train 2 (dropped 2 duplicate triples); valid 1; test 1 (dropped 1 duplicate triple)" in kg.summary()


def test_load_counts_keys_are_stable_and_zero_on_clean_data(tmp_path):
    kg = load_dataset(kg_dir(tmp_path, "a\tr\tb\nb\tr\tc\n"))
    counts = kg.load_counts()
    per_split = ["num_triples", "bom_stripped", "num_whitespace_stripped", "num_labels_merged", "num_duplicates",
                 "num_dropped_unknown"]
    assert set(counts) == {"num_entities", "num_relations"} | {f"{s}.{k}" for s in ("train", "valid", "test") for k in per_split}
    assert {k for k, _ in LOAD_COUNTS} == set(per_split) - {"num_triples"}
    assert all(type(v) is int for v in counts.values())
    assert (counts["num_entities"], counts["train.num_triples"], counts["valid.num_triples"]) == (3, 2, 1)
    assert sum(v for k, v in counts.items() if not k.endswith("num_triples") and "." in k) == 0
    assert json.loads(json.dumps(counts)) == counts  # what the jobs write into metrics.json
    assert kg.summary() == f"{tmp_path}: 3 entities, 1 relations; train 2; valid 1; test 1"


def test_every_count_of_a_messy_kg(tmp_path):
    kg = load_dataset(kg_dir(tmp_path, BOM + "a\tr\tb\n a\tr\tb\nb\tr\tc\n", valid="a\tr\tb\nz\tr\ta\na\tq\tb\n"))
    counts = kg.load_counts()
    assert {k: v for k, v in counts.items() if v and not k.endswith("num_triples")} == {
        "num_entities": 3, "num_relations": 1, "train.bom_stripped": 1, "train.num_whitespace_stripped": 1,
        "train.num_labels_merged": 1, "train.num_duplicates": 1, "valid.num_dropped_unknown": 2}
    assert ("train 2 (stripped a UTF-8 BOM; stripped surrounding whitespace from 1 column; merged 1 label differing "
            "only by surrounding whitespace; dropped 1 duplicate triple); valid 1 (dropped 2 with unknown ids); test 1") in kg.summary()


def test_summary_unchanged_for_clean_embedded_data():
    kg = load_dataset("umls")
    assert kg.summary() == "umls: 135 entities, 46 relations; train 5216; valid 652; test 661"
    assert not any(v for k, v in kg.load_counts().items() if "." in k and not k.endswith("num_triples"))


def test_split_report_positional_construction_still_works():
    rep = SplitReport("u", 3, 1, 0, ("x",))
    assert (rep.num_triples, rep.bom_stripped, rep.num_whitespace_stripped, rep.num_labels_merged) == (3, 0, 0, 0)
