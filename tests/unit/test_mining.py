"""bikd.mining: candidates (co-mentions, KG proposals, the bound), thresholds, and a round committed to a store."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from bikd.kg.store import KGStore
from bikd.kge.models import ModelConfig, build_model
from bikd.lm.pairs import CO_MENTION, KG_PROPOSAL, PairCandidate, Passage
from bikd.mining.candidates import (CandidateConfig, bound_recall, check_on_text, description_index, generate,
                                    kg_proposals, Proposals)
from bikd.mining.round import (MiningConfig, check_id_maps, check_relations, decide, dedupe, known_triples,
                               run_round, summary)
from bikd.mining.thresholds import ThresholdConfig, calibrate, precision_threshold, top_k_per_relation
from bikd.storage import Storage

ENTITIES = ["paris", "france", "berlin", "germany", "rome", "italy"]
RELATIONS = ["capital_of", "located_in"]
GOLD = {
    "train": [("paris", "capital_of", "france"), ("berlin", "capital_of", "germany"), ("paris", "located_in", "france")],
    "valid": [("rome", "capital_of", "italy")],
    "test": [("berlin", "located_in", "germany")],
}
E = {e: i for i, e in enumerate(ENTITIES)}


def pair(text: str, h: str, t: str, doc: str, source: str = CO_MENTION, relation: int = -1) -> PairCandidate:
    hs, ts = text.index(h.title()), text.index(t.title())
    return PairCandidate(doc, text, E[h], E[t], (hs, hs + len(h)), (ts, ts + len(t)), source, relation)


PAIRS = [
    pair("Rome is the capital of Italy.", "rome", "italy", "doc:1"),
    pair("Italy's capital, Rome, is old.", "rome", "italy", "doc:2"),
    pair("Berlin lies in Germany.", "berlin", "germany", "doc:3"),
    pair("Paris and Rome are twinned.", "paris", "rome", "doc:4"),
]
DESCRIPTIONS = [Passage(f"desc:{e}", f"{e.title()} -- a place", E[e], len(e)) for e in ENTITIES]


def make_store(root, gold=GOLD) -> KGStore:
    return KGStore.create(Storage(str(root)), entities=ENTITIES, relations=RELATIONS, gold=gold)


def fixed_scorer(candidates):
    """p(capital_of) 0.9 for Rome->Italy, p(located_in) 0.8 for Berlin->Germany, mostly "no relation" else."""
    out = np.tile([0.1, 0.1, 0.8], (len(candidates), 1))
    for i, c in enumerate(candidates):
        if (c.h, c.t) == (E["rome"], E["italy"]):
            out[i] = [0.9 - 0.01 * c.text.startswith("Italy"), 0.05, 0.05 + 0.01 * c.text.startswith("Italy")]
        elif (c.h, c.t) == (E["berlin"], E["germany"]):
            out[i] = [0.1, 0.8, 0.1]
    return out


def kge(seed=0):
    torch.manual_seed(seed)
    return build_model(ModelConfig(name="distmult", dim=8), len(ENTITIES), len(RELATIONS))


# ---- thresholds ---------------------------------------------------------------------------------------
def test_precision_threshold_keeps_ties_together_and_can_refuse_all():
    scores = np.array([0.9, 0.8, 0.8, 0.7, 0.1])
    positive = np.array([True, True, False, False, False])
    assert precision_threshold(scores, positive, 1.0) == 0.9  # 0.8 would take a tied negative along
    assert precision_threshold(scores, positive, 0.6) == 0.8  # 2 of 3
    assert precision_threshold(scores, positive, 0.5) == 0.7  # 2 of 4
    assert precision_threshold(scores, np.zeros(5, bool), 0.5) == np.inf
    assert precision_threshold(np.array([]), np.array([], bool), 0.5) == np.inf


def test_calibrate_per_relation_with_pooled_fallback_and_top_k():
    relations = np.array([0, 0, 0, 1, 1, 2])
    conf = np.array([0.9, 0.6, 0.3, 0.95, 0.5, 0.4])
    positive = np.array([True, False, True, False, False, False])
    t = calibrate(relations, conf, positive, 4, ThresholdConfig(target_precision=0.5))
    pooled = precision_threshold(conf, positive, 0.5)
    assert t[0] == 0.3 and t[1] == t[2] == t[3] == pooled == 0.9  # relations 1-3 have no valid positive
    assert top_k_per_relation(relations, conf, 2).tolist() == [True, True, False, True, True, True]
    with pytest.raises(ValueError, match="target_precision"):
        ThresholdConfig(target_precision=0)


# ---- candidates ---------------------------------------------------------------------------------------
def test_kg_proposals_skip_known_and_self_and_are_deterministic():
    known = np.array([[E["paris"], 0, E["france"]], [E["berlin"], 0, E["germany"]]])
    cfg = CandidateConfig(top_k=3, relations="all")
    model = kge()
    got = kg_proposals(model.score_t, known, np.arange(6), 6, 2, cfg)
    triples = {tuple(t) for t in got.triples.tolist()}
    assert len(got.triples) == 6 * 2 * 3 and not triples & {tuple(k) for k in known.tolist()}
    assert all(h != t for h, _, t in triples)
    assert np.all(np.diff(got.scores) <= 0)
    again = kg_proposals(model.score_t, known, np.arange(6), 6, 2, CandidateConfig(top_k=3, relations="all", query_batch=5))
    assert np.array_equal(again.triples, got.triples)
    seen = kg_proposals(model.score_t, known, np.arange(6), 6, 2, CandidateConfig(top_k=3))  # relations h heads
    assert sorted({(h, r) for h, r, _ in seen.triples.tolist()}) == [(E["paris"], 0), (E["berlin"], 0)]


def test_proposals_checked_on_a_passage_else_on_descriptions():
    props = Proposals(np.array([[E["italy"], 1, E["rome"]], [E["paris"], 1, E["germany"]], [E["paris"], 0, E["italy"]]]),
                      np.array([0.5, 0.4, 0.3]))
    descriptions = description_index(DESCRIPTIONS[:4])  # rome and italy have none
    cands, scores, counts = check_on_text(props, PAIRS, descriptions)
    assert counts == {"kg_on_passage": 1, "kg_on_descriptions": 1, "kg_no_text": 1} and scores == [0.5, 0.4]
    on_passage, on_desc = cands
    assert (on_passage.doc_id, on_passage.h, on_passage.t, on_passage.relation, on_passage.source) == (
        "doc:1", E["italy"], E["rome"], 1, KG_PROPOSAL)
    assert on_passage.text[slice(*on_passage.h_span)] == "Italy" and on_passage.text[slice(*on_passage.t_span)] == "Rome"
    assert on_desc.doc_id == "desc:paris+desc:germany"
    assert on_desc.text[slice(*on_desc.h_span)] == "Paris" and on_desc.text[slice(*on_desc.t_span)] == "Germany"


def test_bound_is_deterministic_and_its_recall_is_measured():
    known = np.array([[E["paris"], 0, E["france"]]])
    cfg = CandidateConfig(max_candidates=3, kg_share=0.5, top_k=2, relations="all", max_passages_per_pair=1)
    model = kge()
    bounded = generate(PAIRS, DESCRIPTIONS, known, model.score_t, 6, 2, cfg)
    unbounded = generate(PAIRS, DESCRIPTIONS, known, model.score_t, 6, 2, cfg, bounded=False)
    assert len(bounded.candidates) == 3 and bounded.counts["kg_candidates"] == 2
    # the co-mention pair mentioned in 2 passages goes first, at most 1 passage per pair
    assert (bounded.candidates[0].h, bounded.candidates[0].t) == (E["rome"], E["italy"])
    # 3 co-mention pairs + 2 proposals per (h, r), each on a passage or the descriptions (the known tail is skipped)
    assert len(unbounded.candidates) == 3 + 6 * 2 * 2
    assert (E["paris"], 0, E["france"]) not in {(c.h, c.relation, c.t) for c in unbounded.candidates}
    assert generate(PAIRS, DESCRIPTIONS, known, model.score_t, 6, 2, cfg).candidates == bounded.candidates
    assert bound_recall(unbounded.candidates, bounded.candidates, [(E["rome"], 0, E["italy"])]) == 1.0
    assert bound_recall(unbounded.candidates, bounded.candidates, [(E["paris"], 0, E["rome"])]) == 0.0
    assert np.isnan(bound_recall(unbounded.candidates, bounded.candidates, [(E["rome"], 0, E["rome"])]))


def test_candidates_do_not_depend_on_valid_or_test(tmp_path):
    full = make_store(tmp_path / "full").read()
    empty = make_store(tmp_path / "empty", {**GOLD, "valid": [], "test": []}).read()
    assert np.array_equal(known_triples(full), known_triples(empty))
    cfg = CandidateConfig(top_k=2, relations="all", max_candidates=10)
    a = generate(PAIRS, DESCRIPTIONS, known_triples(full), kge().score_t, 6, 2, cfg)
    b = generate(PAIRS, DESCRIPTIONS, known_triples(empty), kge().score_t, 6, 2, cfg)
    assert a.candidates == b.candidates and a.counts == b.counts and len(a.candidates) == 10


# ---- decisions and the round --------------------------------------------------------------------------
def test_decide_and_dedupe():
    cands = PAIRS[:3] + [pair("Rome is the capital of Italy.", "rome", "italy", "doc:1", KG_PROPOSAL, 1)]
    probs = fixed_scorer(cands)
    relations, conf = decide(cands, probs, 2)
    assert relations.tolist() == [0, 0, 1, 1] and conf.tolist() == pytest.approx([0.9, 0.89, 0.8, 0.05])
    with pytest.raises(ValueError, match="expected \\(4, 3\\)"):
        decide(cands, probs[:, :2], 2)
    with pytest.raises(ValueError, match="relation id 5"):
        decide([pair("Rome is the capital of Italy.", "rome", "italy", "d", KG_PROPOSAL, 5)], probs[:1], 2)
    kept, num_known, num_dup = dedupe(cands, relations, conf, np.ones(4, bool), {(E["berlin"], 1, E["germany"])})
    assert kept == [0, 3] and (num_known, num_dup) == (1, 1)  # doc:1 (0.9) beats doc:2 (0.89)


def test_round_commits_one_version_with_provenance_and_rolls_back(tmp_path):
    store = make_store(tmp_path / "kg")
    cfg = MiningConfig(thresholds=ThresholdConfig(target_precision=0.7))
    res = run_round(store, store.read(), PAIRS, fixed_scorer, cfg, lm_snapshot_id="lm-1", kg_snapshot_id="kg-1")
    # rome capital_of italy is the valid positive: capital_of's threshold is 0.89 (taking Paris->Rome at 0.1
    # too would make it 2/3), so both copies pass and de-duplicate to doc:1; Berlin->Germany (located_in has
    # no valid positive) takes the pooled threshold, also 0.89
    assert res.thresholds.tolist() == [0.89, 0.89]
    assert res.created and res.version == 1 and res.counts["new"] == 1 and res.counts["dropped_duplicate"] == 1
    (m,) = store.read().mined
    assert m.triple == ("rome", "capital_of", "italy")
    p = m.provenance
    assert (p.source, p.round, p.snapshot_id, p.kg_snapshot_id, p.document, p.span) == (
        CO_MENTION, 1, "lm-1", "kg-1", "doc:1", (0, 28))
    assert p.confidence == pytest.approx(0.9) and p.evidence == "Rome is the capital of Italy"
    assert store.versions()[1].meta["round_key"]["lm_snapshot_id"] == "lm-1"
    assert res.per_source == {CO_MENTION: 1} and res.per_relation == {"capital_of": 1}
    # the soft label of reverse distillation: p(r | ...) over the 2 relations, "no relation" left out
    assert res.targets.shape == (1, 2) and res.targets[0] == pytest.approx([0.9 / 0.95, 0.05 / 0.95])
    assert summary(res).splitlines() == ["candidates 4: accepted 2, already known 0, duplicates 1, new 1",
                                         "per source: co-mention 1", "per relation: capital_of 1",
                                         "thresholds: 2 of 2 relations can accept (the rest reach the target "
                                         "precision on valid at no threshold)"]

    again = run_round(store, store.read(), PAIRS, fixed_scorer, cfg, lm_snapshot_id="lm-1", kg_snapshot_id="kg-1")
    assert not again.created and again.counts["dropped_known"] == 2 and store.head == 1  # nothing mined twice
    top = run_round(store, store.read(), PAIRS, fixed_scorer, MiningConfig(thresholds=ThresholdConfig(mode="top_k", top_k=1)),
                    lm_snapshot_id="lm-2", kg_snapshot_id="kg-1")
    assert top.version == 2 and [x.triple for x in top.mined] == [("berlin", "located_in", "germany")]
    assert top.mined[0].provenance.round == 2
    assert store.rollback(0) == 3 and store.read().mined == () and len(store.read(2).mined) == 2
    dry = run_round(store, store.read(), PAIRS, fixed_scorer, cfg, lm_snapshot_id="lm-1", kg_snapshot_id="kg-1", dry_run=True)
    assert dry.counts["new"] == 1 and dry.version is None and store.head == 3


def test_interrupted_round_commits_exactly_once(tmp_path, monkeypatch):
    store = make_store(tmp_path / "kg")
    storage = store.storage
    real_write = storage.write_bytes

    def crash_on_manifest(rel, data, **kw):
        if rel.startswith("manifests/"):
            raise RuntimeError("killed before the manifest")
        return real_write(rel, data, **kw)

    monkeypatch.setattr(storage, "write_bytes", crash_on_manifest)
    with pytest.raises(RuntimeError, match="killed"):
        run_round(store, store.read(), PAIRS, fixed_scorer, MiningConfig(), lm_snapshot_id="lm", kg_snapshot_id="kg")
    monkeypatch.undo()
    assert storage.exists("versions/000001/mined.jsonl") and KGStore(storage).head == 0
    fresh = KGStore(storage)
    for _ in range(2):
        run_round(fresh, fresh.read(), PAIRS, fixed_scorer, MiningConfig(), lm_snapshot_id="lm", kg_snapshot_id="kg")
    assert [v.kind for v in KGStore(storage).versions()] == ["gold", "mined"]


def test_mismatched_snapshot_and_relations_are_refused(tmp_path):
    version = make_store(tmp_path / "kg").read()
    check_id_maps(ENTITIES, RELATIONS, "kg-ok", version, "file://x")
    with pytest.raises(ValueError, match="KG snapshot kg-9 does not match KG store version 0.*id 1 \\('rome' vs 'france'\\)"):
        check_id_maps(["paris", "rome"], RELATIONS, "kg-9", version, "file://x")
    with pytest.raises(ValueError, match="lacks: 'born_in'"):
        check_relations(["capital_of", "born_in"], version)
    with pytest.raises(ValueError, match="id order"):
        check_relations(RELATIONS[::-1], version)
    store = make_store(tmp_path / "kg2")
    store.commit([])
    with pytest.raises(ValueError, match="read KG store version 0, but HEAD .* is now 1"):
        run_round(store, store.read(0), PAIRS, fixed_scorer, MiningConfig(), lm_snapshot_id="l", kg_snapshot_id="k")


def test_no_round_commits_below_min_confidence(tmp_path):
    store = make_store(tmp_path / "kg")
    uniform = lambda cands: np.full((len(cands), len(RELATIONS) + 1), 1 / 3)  # an untrained extractor  # noqa: E731
    for thresholds in (ThresholdConfig(mode="top_k", top_k=5), ThresholdConfig(target_precision=0.1)):
        res = run_round(store, store.read(), PAIRS, uniform, MiningConfig(thresholds=thresholds, min_confidence=0.5),
                        lm_snapshot_id="l", kg_snapshot_id="k")
        assert res.version is None and store.head == 0 and res.counts["new"] == 0
        assert res.counts["dropped_below_min_confidence"] > 0
        assert "below min_confidence (never committed)" in summary(res)
    with pytest.raises(ValueError, match="mining.min_confidence"):
        MiningConfig(min_confidence=0.0)


def test_empty_round_commits_nothing(tmp_path):
    store = make_store(tmp_path / "kg")
    res = run_round(store, store.read(), [], fixed_scorer, MiningConfig(), lm_snapshot_id="l", kg_snapshot_id="k")
    assert res.counts["candidates"] == 0 and res.version is None and store.head == 0


@pytest.mark.slow
def test_mining_imports_no_ray():
    code = "import sys, bikd.mining.round, bikd.mining.candidates; assert 'ray' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_candidates_from_kg_files_do_not_depend_on_valid_or_test_files(tmp_path):
    """The issue's test, on files: the KG folder as loaded; the same folder with valid.txt and test.txt swapped
    and holding another triple; and a store whose valid and test splits are empty (the loader refuses empty
    files) give the same candidates (text linking, co-mentions, KG proposals, the bound)."""
    from bikd.kg.datasets import DataConfig, load_from_config, text_from_config
    from bikd.lm import corpus
    from bikd.lm.linking import EntityLinker

    def folder(name: str, valid, test) -> DataConfig:
        d = tmp_path / name
        d.mkdir()
        for split, triples in (("train", GOLD["train"]), ("valid", valid), ("test", test)):
            (d / f"{split}.txt").write_text("".join("\t".join(t) + "\n" for t in triples))
        (d / "entity2text.txt").write_text("".join(f"{e}\t{e.title()} -- a place near {'Rome' if e != 'rome' else 'Paris'} "
                                                   f"and Germany\n" for e in ENTITIES))
        return DataConfig(path=str(d))

    def candidates(data: DataConfig, no_eval: bool = False):
        kg = load_from_config(data)
        gold = {s: [] if no_eval and s != "train" else kg.label_triples(s) for s in GOLD}
        version = make_store(tmp_path / f"store-{data.name}-{no_eval}", gold).read()
        text = text_from_config(data)
        e2i = {e: i for i, e in enumerate(version.entities)}
        passages = corpus.description_passages(text, e2i)
        pairs, _ = corpus.pair_candidates(passages, EntityLinker.from_kg_text(text, e2i))
        model = build_model(ModelConfig(name="distmult", dim=8), len(version.entities), len(version.relations))
        with torch.no_grad():
            gen = torch.Generator().manual_seed(0)
            model.entity.copy_(torch.randn(model.entity.shape, generator=gen))
            model.relation.copy_(torch.randn(model.relation.shape, generator=gen))
        got = generate(pairs, passages, known_triples(version), model.score_t, len(version.entities),
                       len(version.relations), CandidateConfig(top_k=2, max_candidates=12))
        labels = [(c.doc_id, c.text, version.entities[c.h], version.entities[c.t], c.h_span, c.t_span, c.source,
                   version.relations[c.relation] if c.relation >= 0 else None) for c in got.candidates]
        return labels, got.counts

    full = candidates(folder("full", GOLD["valid"], GOLD["test"]))
    other = [("italy", "located_in", "rome")]
    swapped = candidates(folder("swapped", GOLD["test"] + other, GOLD["valid"] + other))
    emptied = candidates(folder("emptied", GOLD["valid"], GOLD["test"]), no_eval=True)
    assert len(full[0]) == 12 and {c[6] for c in full[0]} == {CO_MENTION, KG_PROPOSAL}
    assert full == swapped == emptied
