"""A tiny end-to-end mining round on a local Ray: candidates from text and a KG model, scored by a pool of
2 scorer actors, thresholded on valid, committed as one KG store version."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from bikd.kg.store import KGStore
from bikd.kge.models import ModelConfig, build_model
from bikd.lm.pairs import CO_MENTION, KG_PROPOSAL, PairCandidate, Passage
from bikd.mining.candidates import CandidateConfig, generate
from bikd.mining.round import MiningConfig, known_triples, run_round
from bikd.mining.thresholds import ThresholdConfig
from bikd.ray.mining import ActorScorer, ScoringConfig
from bikd.storage import Storage

ENTITIES = ["paris", "france", "berlin", "germany", "rome", "italy"]
RELATIONS = ["capital_of", "located_in"]
E = {e: i for i, e in enumerate(ENTITIES)}
GOLD = {"train": [("paris", "capital_of", "france"), ("berlin", "capital_of", "germany")],
        "valid": [("rome", "capital_of", "italy")], "test": [("berlin", "located_in", "germany")]}
TEXTS = ["Rome is the capital of Italy.", "Berlin lies in Germany.", "Paris is in France, Rome in Italy."]


def linked_pairs() -> list[PairCandidate]:
    out = []
    for i, text in enumerate(TEXTS):
        found = [(text.index(e.title()), e) for e in ENTITIES if e.title() in text]
        for hs, h in found:
            for ts, t in found:
                if h != t:
                    out.append(PairCandidate(f"doc:{i}", text, E[h], E[t], (hs, hs + len(h)), (ts, ts + len(t))))
    return out


def keyword_scorer(candidates):
    """p(capital_of) high when "capital" is in the text, p(located_in) when "lies in"; "no relation" else."""
    out = np.tile(np.float32([0.05, 0.05, 0.9]), (len(candidates), 1))
    for i, c in enumerate(candidates):
        if "capital" in c.text and (c.h, c.t) == (E["rome"], E["italy"]):
            out[i] = [0.9, 0.05, 0.05]
        elif "lies in" in c.text and c.h < c.t:
            out[i] = [0.1, 0.85, 0.05]
    return out


def make_keyword_scorer():
    return keyword_scorer


def failing_factory():
    raise FileNotFoundError("no extractor at s3://nowhere")


# the Ray workers cannot import this test module by name: send its functions by value
import ray.cloudpickle  # noqa: E402

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.mark.slow
def test_round_on_two_scorer_actors(ray_local, tmp_path):
    store = KGStore.create(Storage(str(tmp_path / "kg")), entities=ENTITIES, relations=RELATIONS, gold=GOLD)
    version = store.read()
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="distmult", dim=8), len(ENTITIES), len(RELATIONS))
    descriptions = [Passage(f"desc:{e}", f"{e.title()} -- a place", E[e], len(e)) for e in ENTITIES]
    cands = generate(linked_pairs(), descriptions, known_triples(version), model.score_t, len(ENTITIES),
                     len(RELATIONS), CandidateConfig(max_candidates=40, top_k=2, relations="all"))
    assert {c.source for c in cands.candidates} == {CO_MENTION, KG_PROPOSAL} and len(cands.candidates) == 40

    with ActorScorer(make_keyword_scorer, ScoringConfig(num_actors=2, batch_size=7, num_cpus=0.5)) as scorer:
        assert len(set(scorer.pids())) == 2
        probs = scorer(cands.candidates)
        assert np.array_equal(probs, keyword_scorer(cands.candidates))  # in order, across 6 batches on 2 actors
        res = run_round(store, version, cands.candidates, scorer, MiningConfig(thresholds=ThresholdConfig(target_precision=0.5)),
                        lm_snapshot_id="lm-test", kg_snapshot_id="kg-test", counts=cands.counts)
    assert res.created and store.head == 1
    mined = {m.triple: m.provenance for m in store.read().mined}
    assert ("rome", "capital_of", "italy") in mined  # the valid triple, found in text: the threshold keeps it
    assert all(t not in {tuple(x) for x in GOLD["train"]} for t in mined)
    p = mined["rome", "capital_of", "italy"]
    assert p.document.startswith("doc:") and p.kg_snapshot_id == "kg-test" and p.snapshot_id == "lm-test"
    assert p.evidence == TEXTS[int(p.document[4:])][slice(*p.span)]


def test_a_factory_that_fails_fails_with_its_own_error(ray_local):
    with pytest.raises(Exception, match="no extractor at s3://nowhere"):
        ActorScorer(failing_factory, ScoringConfig(num_actors=1, num_cpus=0.5))
    with pytest.raises(ValueError, match="num_actors"):
        ScoringConfig(num_actors=0)
