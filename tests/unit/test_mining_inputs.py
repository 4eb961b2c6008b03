"""bikd.mining.inputs: the passages, linker and calibration split shared by extractor training and mining."""

from __future__ import annotations

import json

import pytest
import torch

from bikd.kg.store import KGVersion
from bikd.kg.text import EntityText, KGText
from bikd.lm.pairs import PairCandidate
from bikd.mining.inputs import calibration_split, link_text, split_tensor, version_linker

ENTITIES = ("/m/element", "/m/planet", "/m/sun", "/m/venus")
RELATIONS = ("orbits", "related_to")
TEXT = KGText(entities={"/m/element": EntityText("Mercury", "a chemical element, a metal"),
                        "/m/planet": EntityText("Mercury", "the planet closest to the Sun"),
                        "/m/sun": EntityText("Sun", "the star at the centre of the solar system"),
                        "/m/venus": EntityText("Venus", "the second planet from the Sun")},
              relations={}, wikidata={})


def version(valid=()) -> KGVersion:
    train = (("/m/planet", "orbits", "/m/sun"), ("/m/planet", "related_to", "/m/venus"),
             ("/m/venus", "orbits", "/m/sun"))
    return KGVersion(0, ENTITIES, RELATIONS, {"train": train, "valid": tuple(valid), "test": ()}, ())


def test_ambiguous_names_follow_train_degree_and_valid_changes_nothing():
    # "Mercury" names two entities: the one with more *train* triples wins; a valid split that would favour
    # the other (held-out gold) must not change a single link
    text = "Mercury orbits the Sun faster than Venus does."
    plain = version_linker(version(), TEXT).link(text)
    swayed = version_linker(version(valid=[("/m/element", "related_to", "/m/sun"), ("/m/element", "related_to",
                                    "/m/venus"), ("/m/venus", "related_to", "/m/element")]), TEXT).link(text)
    assert [(m.surface, ENTITIES[m.entity]) for m in plain] == [("Mercury", "/m/planet"), ("Sun", "/m/sun"),
                                                                ("Venus", "/m/venus")]
    assert plain == swayed


def test_labels_are_linked_as_words_when_the_kg_has_no_text():
    v = KGVersion(0, ("amino_acid", "cell"), ("part_of",), {"train": (("amino_acid", "part_of", "cell"),)}, ())
    mentions = version_linker(v, KGText({}, {}, {})).link("Each amino acid is part of a cell.")
    assert [(m.surface, m.entity) for m in mentions] == [("amino acid", 0), ("cell", 1)]


def test_link_text_counts_sources_and_refuses_an_empty_corpus(tmp_path):
    notes = tmp_path / "notes.jsonl"
    notes.write_text("\n".join(json.dumps({"id": i, "text": t}) for i, t in
                               enumerate(["Venus orbits the Sun.", "No entity here."])))
    linked = link_text(version(), TEXT, [str(notes)])
    assert linked.counts["passages_descriptions"] == 4 and linked.counts["passages_corpus_files"] == 2
    assert linked.counts["passages_no_entity"] == 1
    assert any(p.doc_id.endswith(":1") or "notes" in p.doc_id for p in linked.pairs)
    with pytest.raises(ValueError, match="the corpus is empty"):
        link_text(version(), TEXT, [], descriptions=False)


def pair(i: int, h: int, t: int) -> PairCandidate:
    return PairCandidate(f"d{i}", "x y", h, t, (0, 1), (2, 3))


def test_calibration_split_holds_out_train_unrelated_pairs_labelled_from_valid():
    train = torch.tensor([[0, 0, 1]])
    valid = torch.tensor([[2, 1, 3], [4, 0, 5]])
    pairs = [pair(0, 0, 1)] + [pair(i, h, t) for i, (h, t) in enumerate([(2, 3), (4, 5), (6, 7), (8, 9), (1, 0)], 1)]
    split = calibration_split(pairs, train, valid, num_relations=2, num_calib=10, seed=0)
    # 5 pairs unrelated in train: at most half (2) held out, so "no relation" is still taught
    assert split.counts == {"pairs": 6, "train_pairs": 4, "train_related": 1, "calib_pairs": 2,
                            "calib_valid_related": split.counts["calib_valid_related"]}
    assert pairs[0] in split.train_pairs  # a train-related pair always trains
    assert {p.doc_id for p in split.train_pairs} | {p.doc_id for p in split.calib_pairs} == {p.doc_id for p in pairs}
    for p, row in zip(split.calib_pairs, split.calib_labels):
        related = {(2, 3): 1, (4, 5): 0}.get((p.h, p.t))
        assert row.tolist() == ([0.0, 1.0, 0.0] if related == 1 else [1.0, 0.0, 0.0] if related == 0 else [0, 0, 1])
    assert split.train_labels[split.train_pairs.index(pairs[0])].tolist() == [1.0, 0.0, 0.0]
    again = calibration_split(pairs, train, valid, num_relations=2, num_calib=10, seed=0)
    assert [p.doc_id for p in again.calib_pairs] == [p.doc_id for p in split.calib_pairs]


def test_split_tensor_uses_the_versions_label_positions():
    assert split_tensor(version(), "train").tolist() == [[1, 0, 2], [1, 1, 3], [3, 0, 2]]
    assert split_tensor(version(), "test").shape == (0, 3)
