"""Filtered rank evaluation: equality with PyKEEN's RankBasedEvaluator and with a naive dense reference."""

from __future__ import annotations

import pytest
import torch

from bikd.eval import EvalConfig, FilterIndex, evaluate
from bikd.kg.datasets import load_dataset
from bikd.kge.models import TransE


def naive_ranks(score_fn, triples, known, side):
    """Dense reference: mask every other known answer with NaN, then PyKEEN's rank formulas."""
    known_set = set(map(tuple, known.tolist()))
    out = []
    for h, r, t in triples.tolist():
        true = t if side == "tail" else h
        s = score_fn(torch.tensor([h]), torch.tensor([r]), torch.tensor([t]))[0].double().clone()
        for e in range(len(s)):
            if e != true and ((h, r, e) if side == "tail" else (e, r, t)) in known_set:
                s[e] = float("nan")
        opt = 1 + (s > s[true]).sum()
        pes = (s >= s[true]).sum()
        out.append(0.5 * float(opt + pes))
    return torch.tensor(out, dtype=torch.float64)


class QuantisedDistMult(torch.nn.Module):
    """A model without ranking_scores_*, with scores rounded so that ties are common."""

    def __init__(self, num_entities, num_relations, dim=4, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.num_entities = num_entities
        self.e = torch.randn(num_entities, dim, generator=g)
        self.r = torch.randn(num_relations, dim, generator=g)

    def score_t(self, h, r):
        return ((self.e[h] * self.r[r]) @ self.e.t()).round()

    def score_h(self, r, t):
        return ((self.e[t] * self.r[r]) @ self.e.t()).round()


@pytest.fixture(scope="module")
def nations():
    return load_dataset("nations")


@pytest.mark.parametrize("p", [1, 2])
def test_matches_pykeen_rank_based_evaluator(nations, p):
    from pykeen.evaluation import RankBasedEvaluator
    from pykeen.models import TransE as PyKEENTransE
    from pykeen.triples import TriplesFactory

    kg = nations
    tf = TriplesFactory(kg.train, entity_to_id=dict(kg.entities.to_id), relation_to_id=dict(kg.relations.to_id))
    theirs_model = PyKEENTransE(triples_factory=tf, embedding_dim=16, scoring_fct_norm=p, random_seed=3)
    ours_model = TransE(kg.num_entities, kg.num_relations, 16, p=p)
    with torch.no_grad():
        ours_model.entity.copy_(theirs_model.entity_representations[0](indices=None))
        ours_model.relation.copy_(theirs_model.relation_representations[0](indices=None))
    theirs = RankBasedEvaluator().evaluate(theirs_model, kg.test, additional_filter_triples=[kg.train, kg.valid],
                                           batch_size=32, use_tqdm=False)
    ours = evaluate(ours_model, kg.test, [kg.train, kg.valid], kg.num_relations, EvalConfig(batch_size=7)).metrics()
    for side in ("head", "tail", "both"):
        for mine, pk in [("mrr", "inverse_harmonic_mean_rank"), ("hits_at_1", "hits_at_1"), ("hits_at_3", "hits_at_3"),
                         ("hits_at_10", "hits_at_10"), ("mean_rank", "arithmetic_mean_rank")]:
            assert ours[f"{side}.{mine}"] == pytest.approx(float(theirs.get_metric(f"{side}.realistic.{pk}")), abs=1e-4), (side, mine)


def test_ties_and_filter_match_dense_reference(nations):
    kg = nations
    model = QuantisedDistMult(kg.num_entities, kg.num_relations)
    known = kg.all_triples()
    res = evaluate(model, kg.test, [known], kg.num_relations, EvalConfig(batch_size=16))
    for side, fn in [("tail", lambda h, r, t: model.score_t(h, r)), ("head", lambda h, r, t: model.score_h(r, t))]:
        expected = naive_ranks(fn, kg.test, known, side)
        assert torch.equal(res.ranks[side].realistic, expected), side
    # ties really happen here, so realistic differs from optimistic
    assert not torch.equal(res.ranks["tail"].optimistic, res.ranks["tail"].pessimistic)


def test_unfiltered_is_worse_and_filter_of_test_alone_applies(nations):
    kg = nations
    torch.manual_seed(0)
    model = TransE(kg.num_entities, kg.num_relations, 8)
    filtered = evaluate(model, kg.test, [kg.train, kg.valid], kg.num_relations)
    test_only = evaluate(model, kg.test, [], kg.num_relations)
    assert (filtered.ranks["tail"].realistic <= test_only.ranks["tail"].realistic).all()
    assert filtered.mrr > test_only.mrr


def test_compiled_counting_equals_eager(nations):
    kg = nations
    model = QuantisedDistMult(kg.num_entities, kg.num_relations)
    eager = evaluate(model, kg.test, [kg.train, kg.valid], kg.num_relations, EvalConfig(compile="never"))
    fused = evaluate(model, kg.test, [kg.train, kg.valid], kg.num_relations, EvalConfig(compile="always"))
    for side in ("head", "tail"):
        assert torch.equal(eager.ranks[side].realistic, fused.ranks[side].realistic)


def test_ranking_scores_order_like_scores():
    torch.manual_seed(0)
    model = TransE(50, 3, 8, p=2)
    h, r = torch.tensor([1, 2, 3]), torch.tensor([0, 1, 2])
    exact, fast = model.score_t(h, r), model.ranking_scores_t(h, r)
    assert torch.equal(exact.argsort(dim=1), fast.argsort(dim=1))
    t = torch.tensor([4, 5, 6])
    assert torch.equal(model.score_h(r, t).argsort(dim=1), model.ranking_scores_h(r, t).argsort(dim=1))
    brute = -(model.entity[:, None, :] + model.relation[r][None] - model.entity[t][None]).norm(dim=-1).t()
    assert torch.allclose(model.score_h(r, t), brute, atol=1e-5)


def test_filter_index_gathers_exactly_the_known_answers():
    triples = torch.tensor([[0, 0, 1], [0, 0, 2], [0, 1, 3], [2, 0, 1], [0, 0, 1]])
    index = FilterIndex(triples, num_entities=4, num_relations=2, side="tail")
    rows, ents = index.gather(torch.tensor([0 * 2 + 0, 1 * 2 + 0, 2 * 2 + 0, 0 * 2 + 1]))
    got = sorted(zip(rows.tolist(), ents.tolist()))
    assert got == [(0, 1), (0, 2), (2, 1), (3, 3)]


def test_bad_eval_config():
    with pytest.raises(ValueError, match="batch_size"):
        EvalConfig(batch_size=0)
    with pytest.raises(ValueError, match="sides"):
        EvalConfig(sides=("left",))
    with pytest.raises(ValueError, match="compile"):
        EvalConfig(compile="yes")
