"""Graph partitioning: ownership invariants for every method, METIS locality against the random baseline
(real graphs and a planted-cluster graph), balance, determinism, bad configs, checkpoint round trip."""

from __future__ import annotations

import io
import time

import pytest
import torch

from bikd.kg.datasets import load_dataset
from bikd.kge.partition import Partitioning, PartitionConfig, partition

METHODS = ("metis", "relation", "random")


@pytest.fixture(scope="module")
def kgs():
    return {name: load_dataset(name) for name in ("kinships", "umls")}


def run(kg, num_parts, method="metis", seed=0):
    return partition(kg.train, kg.num_entities, kg.num_relations, PartitionConfig(num_parts=num_parts, method=method, seed=seed))


def clusters(num_clusters=4, size=50, per_cluster=600, num_bridges=3, num_absent=0, seed=0):
    """Dense random clusters joined in a ring by ``num_bridges`` triples per neighbouring pair: the
    planted partition cuts exactly the bridges."""
    gen = torch.Generator().manual_seed(seed)
    parts = []
    for c in range(num_clusters):
        h, t = torch.randint(size, (2, per_cluster), generator=gen) + c * size
        parts.append(torch.stack([h, torch.randint(5, (per_cluster,), generator=gen), t], 1))
    for c in range(num_clusters):
        nxt = (c + 1) % num_clusters
        h = torch.randint(size, (num_bridges,), generator=gen) + c * size
        t = torch.randint(size, (num_bridges,), generator=gen) + nxt * size
        parts.append(torch.stack([h, torch.full((num_bridges,), 5), t], 1))
    return torch.cat(parts), num_clusters * size + num_absent, 6


def check_invariants(p: Partitioning, triples: torch.Tensor, num_entities: int, num_relations: int):
    n = len(triples)
    assert p.entity_part.shape == (num_entities,) and p.triple_part.shape == (n,)
    assert p.entity_part.dtype == p.triple_part.dtype == torch.int64
    # every triple in exactly one part
    got = torch.cat([p.triples_of(q) for q in range(p.num_parts)])
    assert torch.equal(torch.sort(got).values, torch.arange(n))
    # every entity has exactly one owner; shards are contiguous and indexable by local_index
    owned = torch.cat([p.entities_of(q) for q in range(p.num_parts)])
    assert torch.equal(torch.sort(owned).values, torch.arange(num_entities))
    local = p.local_index()
    for q in range(p.num_parts):
        ents = p.entities_of(q)
        assert torch.equal(local[ents], torch.arange(len(ents)))  # a bijection onto 0..len-1
        assert torch.equal(ents, torch.sort(ents).values)
    h, r, t = triples.unbind(1)
    if p.method == "relation":
        assert p.relation_part is not None and p.relation_part.shape == (num_relations,)
        assert torch.equal(p.triple_part, p.relation_part[r])
    else:
        assert p.relation_part is None
        assert torch.equal(p.triple_part, p.entity_part[h])
        s = p.stats()
        assert s["cross_partition_rows_per_triple"] == pytest.approx(s["edge_cut"])
    s = p.stats()
    assert sum(s["num_triples_per_part"]) == n and sum(s["num_entities_per_part"]) == num_entities


# ---- invariants --------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("num_parts", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("name", ["kinships", "umls"])
def test_ownership_invariants(kgs, name, method, num_parts):
    kg = kgs[name]
    p = run(kg, num_parts, method)
    check_invariants(p, kg.train, kg.num_entities, kg.num_relations)
    if num_parts == 1:
        assert p.stats()["edge_cut"] == 0.0 and p.stats()["triple_balance"] == 1.0


@pytest.mark.parametrize("method", METHODS)
def test_absent_and_isolated_entities_are_owned_and_balanced(method):
    triples, num_entities, num_relations = clusters(num_absent=37)
    triples = torch.cat([triples, torch.tensor([[200, 0, 200], [200, 1, 200]])])  # 200: self loops only
    p = partition(triples, num_entities, num_relations, PartitionConfig(num_parts=4, method=method))
    check_invariants(p, triples, num_entities, num_relations)
    counts = p.stats()["num_entities_per_part"]
    if method == "metis":
        assert max(counts) - min(counts) <= 0.05 * num_entities / 4, counts
    if method == "relation":  # owners follow the triples, so only the leftovers can even out the counts
        heaviest = max(range(4), key=counts.__getitem__)
        assert heaviest not in p.entity_part[201:].tolist()


@pytest.mark.parametrize("method", METHODS)
def test_fewer_connected_entities_than_parts(method):
    triples = torch.tensor([[0, 0, 1], [1, 0, 2]])
    p = partition(triples, 10, 1, PartitionConfig(num_parts=4, method=method))
    check_invariants(p, triples, 10, 1)
    if method == "metis":
        assert p.stats()["num_entities_per_part"] in ([3, 3, 2, 2], [2, 3, 3, 2], [3, 2, 2, 3], [2, 2, 3, 3], [3, 2, 3, 2], [2, 3, 2, 3])


@pytest.mark.parametrize("method", METHODS)
def test_no_triples(method):
    p = partition(torch.empty(0, 3, dtype=torch.long), 6, 2, PartitionConfig(num_parts=3, method=method))
    assert p.stats()["num_entities_per_part"] == [2, 2, 2] or method == "random"
    assert p.stats()["edge_cut"] == 0.0 and len(p.triples_of(0)) == 0


# ---- locality: METIS vs the random baseline --------------------------------------------------------

def test_metis_cuts_only_the_bridges_of_planted_clusters():
    triples, num_entities, num_relations = clusters(num_bridges=3)
    metis = partition(triples, num_entities, num_relations, PartitionConfig(num_parts=4))
    rand = partition(triples, num_entities, num_relations, PartitionConfig(num_parts=4, method="random"))
    num_bridges = 4 * 3
    h, t = triples[:, 0], triples[:, 2]
    assert int((metis.entity_part[h] != metis.entity_part[t]).sum()) == num_bridges
    for c in range(4):  # each cluster is one part
        assert len(torch.unique(metis.entity_part[c * 50 : (c + 1) * 50])) == 1
    assert metis.stats()["edge_cut"] == pytest.approx(num_bridges / len(triples))  # ~0.5%
    assert rand.stats()["edge_cut"] > 0.65  # ~1 - 1/4
    assert metis.stats()["entity_balance"] == 1.0


@pytest.mark.parametrize(
    "name, num_parts, max_ratio, max_triple_balance",
    # kinships connects 96% of all entity pairs, so no partition can cut much less than random
    # (measured 0.481 vs 0.500 at P=2, 0.730 vs 0.755 at P=4); umls is sparser (0.333 vs 0.501, 0.555 vs 0.752)
    [("kinships", 2, 0.99, 1.05), ("kinships", 4, 0.99, 1.1), ("umls", 2, 0.75, 1.1), ("umls", 4, 0.8, 1.15)],
)
def test_metis_beats_random_on_real_graphs(kgs, name, num_parts, max_ratio, max_triple_balance):
    kg = kgs[name]
    metis, rand = run(kg, num_parts).stats(), run(kg, num_parts, "random").stats()
    print(name, num_parts, {k: metis[k] for k in ("edge_cut", "triple_balance", "entity_balance")}, rand["edge_cut"])
    assert metis["edge_cut"] < max_ratio * rand["edge_cut"]
    assert metis["edge_cut"] < max_ratio * (1 - 1 / num_parts)  # and below the random expectation
    assert metis["triple_balance"] < max_triple_balance
    assert metis["entity_balance"] < 2.0  # vertices weigh their head count, so entities balance less


# ---- relation mode -----------------------------------------------------------------------------------

def test_relation_greedy_is_lpt():
    sizes = [10, 7, 5, 3, 2]  # relation r has sizes[r] triples
    r = torch.cat([torch.full((k,), rel) for rel, k in enumerate(sizes)])
    triples = torch.stack([torch.arange(len(r)) % 4, r, (torch.arange(len(r)) + 1) % 4], 1)
    p = partition(triples, 4, 6, PartitionConfig(num_parts=2, method="relation"))
    # 10->0, 7->1, 5->1 (7<10), 3->0 (10<12), 2->1 (12<13); the empty relation 5 -> 0 (13<14)
    assert p.relation_part.tolist() == [0, 1, 1, 0, 1, 0]
    assert p.stats()["num_triples_per_part"] == [13, 14]


def test_relation_owner_is_majority_part_ties_to_lowest():
    # relation 0 -> part 0 (3 triples), relation 1 -> part 1 (2 triples)
    triples = torch.tensor([[0, 0, 1], [0, 0, 2], [3, 0, 1], [1, 1, 2], [2, 1, 3]])
    p = partition(triples, 5, 2, PartitionConfig(num_parts=2, method="relation"))
    assert p.relation_part.tolist() == [0, 1]
    # entity 0: 2x part 0; 1: 2x part 0, 1x part 1; 2: 1x part 0, 2x part 1; 3: 1 and 1 -> 0; 4: absent
    assert p.entity_part[:4].tolist() == [0, 0, 1, 0]
    check_invariants(p, triples, 5, 2)


@pytest.mark.parametrize("name, num_parts", [("kinships", 2), ("kinships", 4), ("umls", 2), ("umls", 4)])
def test_relation_mode_balances_triples(kgs, name, num_parts):
    s = run(kgs[name], num_parts, "relation").stats()
    assert s["triple_balance"] < 1.05  # measured <= 1.017
    assert s["cross_partition_rows_per_triple"] >= s["edge_cut"]


# ---- determinism, config, checkpoints ----------------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
def test_deterministic_for_a_seed(kgs, method):
    kg = kgs["umls"]
    a, b = run(kg, 4, method, seed=3), run(kg, 4, method, seed=3)
    assert torch.equal(a.entity_part, b.entity_part) and torch.equal(a.triple_part, b.triple_part)
    if method == "random":
        assert not torch.equal(a.entity_part, run(kg, 4, method, seed=4).entity_part)


@pytest.mark.parametrize(
    "kwargs", [{"num_parts": 0}, {"num_parts": -2}, {"num_parts": 2.0}, {"num_parts": True}, {"num_parts": 2, "method": "hash"},
               {"num_parts": 2, "seed": -1}, {"num_parts": 2, "seed": 1.5}],
)
def test_bad_config(kwargs):
    with pytest.raises(ValueError):
        PartitionConfig(**kwargs)


def test_bad_inputs():
    cfg = PartitionConfig(num_parts=2)
    with pytest.raises(ValueError, match="exceeds num_entities"):
        partition(torch.tensor([[0, 0, 0]]), 1, 1, cfg)
    with pytest.raises(ValueError, match="shape"):
        partition(torch.zeros(4, 2, dtype=torch.long), 5, 1, cfg)
    with pytest.raises(ValueError, match="outside"):
        partition(torch.tensor([[0, 0, 5]]), 5, 1, cfg)
    with pytest.raises(ValueError, match="outside"):
        partition(torch.tensor([[0, 1, 2]]), 5, 1, cfg)
    p = partition(torch.tensor([[0, 0, 1]]), 3, 1, cfg)
    with pytest.raises(IndexError):
        p.triples_of(2)


@pytest.mark.parametrize("method", METHODS)
def test_state_dict_round_trip(kgs, method):
    p = run(kgs["umls"], 3, method)
    buf = io.BytesIO()
    torch.save(p.state_dict(), buf)
    buf.seek(0)
    for state in (torch.load(buf), {k: v.tolist() if isinstance(v, torch.Tensor) else v for k, v in p.state_dict().items()}):
        q = Partitioning.from_state_dict(state)
        assert (q.num_parts, q.method) == (p.num_parts, p.method)
        assert torch.equal(q.entity_part, p.entity_part) and torch.equal(q.triple_part, p.triple_part)
        assert (q.relation_part is None) == (p.relation_part is None)
        if p.relation_part is not None:
            assert torch.equal(q.relation_part, p.relation_part)
        assert q.stats() == p.stats()
    bad = dict(p.state_dict(), entity_part=p.entity_part + 3)
    with pytest.raises(ValueError, match="outside"):
        Partitioning.from_state_dict(bad)
    with pytest.raises(ValueError, match="entries"):
        Partitioning.from_state_dict(dict(p.state_dict(), triple_part=p.triple_part[1:]))


# ---- FB15k-237 -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fb15k237(fb15k237_dir):
    return load_dataset("fb15k237", path=str(fb15k237_dir))


@pytest.mark.slow
@pytest.mark.data
@pytest.mark.parametrize("num_parts", [2, 4])
def test_fb15k237_metis_beats_random(fb15k237, num_parts):
    kg = fb15k237
    start = time.perf_counter()
    metis = run(kg, num_parts)
    seconds = time.perf_counter() - start
    m, rand = metis.stats(), run(kg, num_parts, "random").stats()
    print(f"fb15k237 P={num_parts}: metis cut {m['edge_cut']:.3f} triple_bal {m['triple_balance']:.3f} "
          f"entity_bal {m['entity_balance']:.3f} in {seconds:.2f}s; random cut {rand['edge_cut']:.3f}")
    check_invariants(metis, kg.train, kg.num_entities, kg.num_relations)
    # measured: 0.135 vs 0.496 at P=2, 0.251 vs 0.745 at P=4, ~0.3 s each
    assert m["edge_cut"] < 0.4 * rand["edge_cut"]
    assert m["triple_balance"] < 1.1
    assert seconds < 20
