"""Corpus readers, co-mention pair candidates and distant-supervision labels (bikd.lm.corpus)."""

from __future__ import annotations

import json

import pytest
import torch

from bikd.kg.text import EntityText, KGText
from bikd.kg.triples import KGDataError
from bikd.lm.corpus import (description_passages, distant_labels, fewrel_candidates, pair_candidates, read_corpus,
                             squad_passages)
from bikd.lm.linking import EntityLinker
from bikd.lm.pairs import CO_MENTION, PairCandidate, Passage

# a hand-made KG: 0 Paris, 1 France, 2 Berlin, 3 Germany, 4 Europe; relations 0 capital_of, 1 located_in
NAMES = {0: "Paris", 1: "France", 2: "Berlin", 3: "Germany", 4: "Europe"}
TRAIN = torch.tensor([[0, 0, 1], [0, 1, 1], [2, 0, 3], [1, 1, 4]])


@pytest.fixture(scope="module")
def linker():
    return EntityLinker.build({i: [n] for i, n in NAMES.items()})


def test_description_passages_subject_is_the_name():
    text = KGText({"/m/p": EntityText("Paris", "capital of France."), "/m/f": EntityText("France"),
                   "/m/x": EntityText("Nowhere", "not in the id map")}, {}, {})
    ps = description_passages(text, {"/m/f": 1, "/m/p": 0})
    assert ps == [Passage("desc:/m/p", "Paris -- capital of France.", 0, 5)]  # France has no description
    assert ps[0].text[: ps[0].subject_end] == "Paris"


def test_pair_candidates_subject_first_mentions_and_skips(linker):
    ps = [Passage("desc:p", "Paris -- the capital of France, in Europe; France borders Germany.", 0, 5),
          Passage("one", "Only Berlin here."), Passage("none", "Nothing linked."),
          Passage("desc:b", "Berlin -- Berlin is in Germany.", 2, 6)]
    cands, counts = pair_candidates(ps, linker)
    assert counts == {"passages": 4, "candidates": 12 + 2, "passages_no_entity": 1, "passages_one_entity": 1,
                      "pairs_cut": 0}
    first = [c for c in cands if c.doc_id == "desc:p"]
    assert {(c.h, c.t) for c in first} == {(h, t) for h in (0, 1, 3, 4) for t in (0, 1, 3, 4) if h != t}
    by_entity = {c.h: c.h_span for c in first}
    assert by_entity[0] == (0, 5) and ps[0].text[slice(*by_entity[1])] == "France"
    assert by_entity[1][0] < ps[0].text.index("Europe")  # the first mention of France, not the second
    # the name's own link is the subject: "Berlin" inside the description is a later mention of the same entity
    assert {(c.h, c.t, c.h_span) for c in cands if c.doc_id == "desc:b" and c.h == 2} == {(2, 3, (0, 6))}
    assert all(c.source == CO_MENTION and c.relation == -1 for c in cands)


def test_pair_candidates_bound_keeps_subject_pairs_then_closest(linker):
    p = Passage("desc:p", "Paris -- France, Germany and Berlin are far from Europe.", 0, 5)
    cands, counts = pair_candidates([p], linker, max_pairs_per_passage=8)
    assert len(cands) == 8 and counts["pairs_cut"] == 20 - 8
    assert all(0 in (c.h, c.t) for c in cands)  # the 8 pairs with the subject come first
    cands, _ = pair_candidates([p], linker, max_pairs_per_passage=10)
    rest = [c for c in cands if 0 not in (c.h, c.t)]
    assert {(c.h, c.t) for c in rest} == {(1, 3), (3, 1)}  # France/Germany: the closest of the others
    with pytest.raises(ValueError, match="max_pairs_per_passage"):
        pair_candidates([p], linker, max_pairs_per_passage=0)


def test_distant_labels_multi_hot_directed_no_relation():
    text = "Paris France Berlin Germany Europe"
    span = {i: (text.index(n), text.index(n) + len(n)) for i, n in NAMES.items()}
    pair = lambda h, t: PairCandidate("d", text, h, t, span[h], span[t])  # noqa: E731
    labels = distant_labels([pair(0, 1), pair(1, 0), pair(2, 3), pair(1, 4), pair(2, 4)], TRAIN, 2)
    assert labels.tolist() == [[1, 1, 0], [0, 0, 1], [1, 0, 0], [0, 1, 0], [0, 0, 1]]
    assert distant_labels([], TRAIN, 2).shape == (0, 3)
    with pytest.raises(ValueError, match="relation outside 0..1"):
        distant_labels([pair(0, 1)], torch.tensor([[0, 2, 1]]), 2)


# ---- the user's corpus --------------------------------------------------------------------------------

def test_read_corpus_text_lines_and_paragraphs(tmp_path):
    path = tmp_path / "news.txt"
    path.write_bytes("\ufeffParis is in France.\r\n\r\n  Berlin is in Germany.\nIt is big.\n\n\n".encode())
    assert read_corpus(str(path)) == [Passage("news.txt:1", "Paris is in France."),
                                      Passage("news.txt:3", "Berlin is in Germany."), Passage("news.txt:4", "It is big.")]
    assert read_corpus(str(path), paragraphs=True) == [Passage("news.txt:1", "Paris is in France."),
                                                       Passage("news.txt:3", "Berlin is in Germany. It is big.")]


def test_read_corpus_jsonl_ids_and_errors(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"id": "a", "text": "Paris is in France."}) + "\n\n"
                    + json.dumps({"text": "Berlin."}) + "\n" + json.dumps({"id": 7, "text": "  "}) + "\n")
    assert read_corpus(str(path)) == [Passage("c.jsonl:a", "Paris is in France."), Passage("c.jsonl:3", "Berlin.")]
    path.write_text('{"text": "ok"}\n{"text": "broken"\n')
    with pytest.raises(KGDataError, match=r"c\.jsonl:2: not valid JSON"):
        read_corpus(str(path))
    path.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(KGDataError, match=r'c\.jsonl:2: expected an object with a string "text"'):
        read_corpus(str(path))
    path.write_text('{"id": 1, "text": "a"}\n{"id": "1", "text": "b"}\n')
    with pytest.raises(KGDataError, match=r"c\.jsonl:2: id '1' already used on line 1"):
        read_corpus(str(path))


def test_read_corpus_empty_is_an_error(tmp_path):
    for name, body in (("e.txt", "\n  \n"), ("e.jsonl", '{"text": " "}\n'), ("z.txt", "")):
        (tmp_path / name).write_text(body)
        with pytest.raises(KGDataError, match=f"{name}: holds no passages"):
            read_corpus(str(tmp_path / name))
    with pytest.raises(ValueError, match="format"):
        read_corpus(str(tmp_path / "e.txt"), format="csv")


# ---- real data ------------------------------------------------------------------------------------------

@pytest.mark.data
def test_squad_passages_never_read_the_evaluation_articles(data_file):
    from bikd.lm import squad

    path = str(data_file("squad-v1.1", "dev-v1.1.json"))
    finetune, evaluation = squad.split_by_article(squad.load_squad(path), 0.2, 0)  # TaskConfig's defaults
    ps = squad_passages(path)
    titles = {p.doc_id.split(":", 1)[1].rsplit("#", 1)[0] for p in ps}
    assert titles == {a.title for a in finetune}
    eval_contexts = {ex.context for a in evaluation for ex in a.examples}
    assert not eval_contexts & {p.text for p in ps}
    assert len(ps) == sum(len({ex.context for ex in a.examples}) for a in finetune)
    held = squad_passages(path, holdout=True)  # TaskConfig.squad_holdout: the LM's own held-out part left out too
    assert {p.text for p in held} < {p.text for p in ps}
    with pytest.raises(ValueError, match="finetune"):
        squad_passages(path, articles="eval")


@pytest.mark.slow
@pytest.mark.data
def test_distant_labels_on_real_fb15k237_descriptions(fb15k237_dir):
    from bikd.kg.datasets import load_dataset, load_text
    from bikd.lm.train import build_linker

    kg, text = load_dataset("fb15k237", path=str(fb15k237_dir)), load_text("fb15k237", path=str(fb15k237_dir))
    ps = description_passages(text, kg.entities.to_id)
    assert len(ps) > 14_000 and ps[0].text.startswith(text.entities[ps[0].doc_id[5:]].name + " -- ")
    ps = ps[:1500]
    cands, counts = pair_candidates(ps, build_linker(kg, text))
    labels = distant_labels(cands, kg.train, kg.num_relations)
    assert counts["candidates"] == len(cands) > 10_000
    positive = labels[:, -1] == 0
    assert 0.05 < positive.float().mean() < 0.5  # measured: 15.8% over all descriptions
    # every label is a train triple and every train triple of a candidate pair is a label
    train = set(map(tuple, kg.train.tolist()))
    for i in torch.randperm(len(cands), generator=torch.Generator().manual_seed(0))[:2000].tolist():
        c = cands[i]
        assert {r for r in range(kg.num_relations) if (c.h, r, c.t) in train} == set(labels[i, :-1].nonzero().flatten().tolist())
    # Denton, Texas: "... the county seat of Denton County"
    rel = kg.relations.to_id
    ent = kg.entities.to_id
    denton = {(c.h, c.t): i for i, c in enumerate(cands) if c.doc_id == "desc:/m/010016"}
    county = next(c.h for c in cands if c.doc_id == "desc:/m/010016" and c.text[slice(*c.h_span)] == "Denton County")
    assert labels[denton[(county, ent["/m/010016"])], rel["/location/us_county/county_seat"]] == 1
    # a pair related only in valid or test gets "no relation": the labels read the split they are given
    heldout = {(h, t) for h, _, t in torch.cat([kg.split("valid"), kg.split("test")]).tolist()}
    heldout -= {(h, t) for h, _, t in train}
    only_heldout = [i for i, c in enumerate(cands) if (c.h, c.t) in heldout]
    assert only_heldout and all(labels[i, -1] == 1 for i in only_heldout)


@pytest.mark.data
def test_fewrel_candidates_map_wikidata_ids_to_kg_entities(data_file, fb15k237_dir):
    from bikd.kg.datasets import load_text
    from bikd.kg.triples import IdMap

    text = load_text("fb15k237", path=str(fb15k237_dir))
    ids = IdMap.from_labels(sorted(text.entities)).to_id
    cands = fewrel_candidates(str(data_file("fewrel", "val_wiki.json")), text, ids)
    assert 150 < len(cands) < 400  # the data README: about 240 instances have both entities in FB15k-237
    label_of = {i: label for label, i in ids.items()}
    # the annotated spans name the mapped entities (mostly by an alias; "American" -> United States is not one)
    named = [bool(set(c.text[slice(*span)].lower().split()) & set(" ".join(text.aliases(label_of[e])).lower().split()))
             for c in cands for span, e in ((c.h_span, c.h), (c.t_span, c.t))]
    assert sum(named) > 0.8 * len(named)
    assert len({c.doc_id for c in cands}) == len(cands)
