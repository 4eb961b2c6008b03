"""Joint negative sampling (alias table, chunk layout, sides) and the resumable BatchIterator."""

import pytest
import torch

from bikd.kge.sampling import (
    BatchIterator,
    NegativeSampler,
    NegativeSamplerConfig,
    build_alias_table,
    chunk_layout,
    degrees_from_triples,
)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(num_negatives=0, chunk_size=4),
        dict(num_negatives=4, chunk_size=0),
        dict(num_negatives=4, chunk_size=4, distribution="zipf"),
        dict(num_negatives=4, chunk_size=4, degree_power=-1.0),
        dict(num_negatives=4, chunk_size=4, degree_power=float("inf")),
        dict(num_negatives=4, chunk_size=4, corrupt="relation"),
    ],
)
def test_config_rejects_invalid_values(kwargs):
    with pytest.raises(ValueError):
        NegativeSamplerConfig(**kwargs)


def test_degrees_from_triples_counts_heads_and_tails():
    triples = torch.tensor([[0, 0, 1], [1, 1, 2], [2, 0, 2]])
    assert degrees_from_triples(triples, 4).tolist() == [1, 2, 3, 0]
    assert degrees_from_triples(torch.zeros(0, 3, dtype=torch.long), 2).tolist() == [0, 0]
    with pytest.raises(ValueError):
        degrees_from_triples(triples, 2)


@pytest.mark.parametrize(
    "weights",
    [
        torch.tensor([3.0, 1.0, 0.0, 6.0, 2.0], dtype=torch.float64),
        torch.tensor([1000.0] + [1.0] * 50, dtype=torch.float64),  # one hub absorbs every deficit
        torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64),
        torch.tensor([0.0, 0.0, 7.0], dtype=torch.float64),
        torch.rand(2000, generator=gen(1), dtype=torch.float64) ** 4,
    ],
)
def test_alias_table_realises_the_distribution_exactly(weights):
    prob, alias = build_alias_table(weights)
    assert ((prob >= 0) & (prob <= 1)).all()
    realised = prob.clone().index_add_(0, alias, 1.0 - prob) / len(weights)
    torch.testing.assert_close(realised, weights / weights.sum(), rtol=0, atol=1e-12)
    # a zero-weight entity is neither kept in its own column nor anyone's alias
    zero = (weights == 0).nonzero().flatten()
    assert (prob[zero] == 0).all() and not torch.isin(alias[prob < 1], zero).any()


def test_alias_table_rejects_bad_weights():
    for bad in (torch.zeros(3), torch.tensor([1.0, -1.0]), torch.tensor([1.0, float("nan")]), torch.zeros(0)):
        with pytest.raises(ValueError):
            build_alias_table(bad)


def test_degree_sampler_matches_smoothed_degrees_empirically():
    degrees = torch.tensor([0, 1, 10, 100, 5])
    cfg = NegativeSamplerConfig(num_negatives=1000, chunk_size=8, distribution="degree", degree_power=0.75)
    sampler = NegativeSampler(cfg, 5, degrees)
    target = degrees.double() ** 0.75 / (degrees.double() ** 0.75).sum()
    torch.testing.assert_close(sampler.probabilities(), target, rtol=0, atol=1e-12)
    draws = sampler.sample(400, gen())  # 400k ids
    assert draws.shape == (400, 1000) and draws.dtype == torch.long
    freq = torch.bincount(draws.flatten(), minlength=5).double() / draws.numel()
    assert freq[0] == 0  # degree 0 is never a negative
    torch.testing.assert_close(freq, target, rtol=0, atol=3e-3)


def test_degree_power_zero_is_uniform_and_degree_needs_degrees():
    cfg = NegativeSamplerConfig(num_negatives=4, chunk_size=2, distribution="degree", degree_power=0.0)
    p = NegativeSampler(cfg, 4, torch.tensor([0, 3, 9, 1])).probabilities()
    torch.testing.assert_close(p, torch.full((4,), 0.25, dtype=torch.float64))
    with pytest.raises(ValueError):
        NegativeSampler(cfg, 4)


def test_uniform_sampler_is_deterministic_per_generator_and_in_range():
    sampler = NegativeSampler(NegativeSamplerConfig(num_negatives=64, chunk_size=16), 37)
    a, b, c = sampler.sample(5, gen(3)), sampler.sample(5, gen(3)), sampler.sample(5, gen(4))
    assert a.shape == (5, 64) and torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= 0 and a.max() < 37
    deg = NegativeSampler(
        NegativeSamplerConfig(num_negatives=64, chunk_size=16, distribution="degree"), 37, torch.arange(37)
    )
    assert torch.equal(deg.sample(5, gen(3)), deg.sample(5, gen(3)))


def test_chunk_layout_pads_the_last_chunk_with_masked_repeats():
    index, mask = chunk_layout(10, 4)
    assert index.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 9, 9]]
    assert mask.tolist() == [[True] * 4, [True] * 4, [True, True, False, False]]
    index, mask = chunk_layout(3, 8)  # a batch smaller than a chunk is one unpadded chunk
    assert index.tolist() == [[0, 1, 2]] and mask.all()
    index, mask = chunk_layout(8, 4)
    assert index.shape == (2, 4) and mask.all()
    # every real position appears exactly once among the unmasked entries
    index, mask = chunk_layout(1001, 64)
    assert torch.equal(index[mask].sort().values, torch.arange(1001))


def test_corrupted_sides():
    both = NegativeSampler(NegativeSamplerConfig(num_negatives=2, chunk_size=2), 10)
    sides = both.corrupt_head(7, gen())
    assert sides.shape == (7,) and abs(int(sides.sum()) - 3.5) == 0.5
    assert (sides[1:] != sides[:-1]).all()  # alternating
    firsts = {bool(both.corrupt_head(1, gen(s))[0]) for s in range(20)}
    assert firsts == {True, False}  # a single chunk still sees both sides over batches
    for side in ("head", "tail"):
        one = NegativeSampler(NegativeSamplerConfig(num_negatives=2, chunk_size=2, corrupt=side), 10)
        assert one.corrupt_head(3, gen()).tolist() == [side == "head"] * 3


def test_sample_batch_shapes_and_determinism():
    sampler = NegativeSampler(NegativeSamplerConfig(num_negatives=6, chunk_size=4), 50)
    nb = sampler.sample_batch(10, gen(7))
    assert nb.index.shape == nb.mask.shape == (3, 4)
    assert nb.negatives.shape == (3, 6) and nb.corrupt_head.shape == (3,)
    again = sampler.sample_batch(10, gen(7))
    assert all(torch.equal(x, y) for x, y in zip(nb, again))


def _epoch(it):
    return [b.tolist() for b in it]


def test_batch_iterator_epoch_is_a_permutation_with_a_partial_last_batch():
    it = BatchIterator(103, 10, gen())
    assert it.num_batches == 11
    first = _epoch(it)
    assert [len(b) for b in first] == [10] * 10 + [3]
    assert sorted(sum(first, [])) == list(range(103))
    assert (it.epoch, it.offset) == (1, 0)
    second = _epoch(it)
    assert sorted(sum(second, [])) == list(range(103)) and second != first


def test_batch_iterator_is_deterministic_given_the_generator():
    assert _epoch(BatchIterator(50, 7, gen(5))) == _epoch(BatchIterator(50, 7, gen(5)))
    assert _epoch(BatchIterator(50, 7, 123)) == _epoch(BatchIterator(50, 7, 123))
    assert _epoch(BatchIterator(50, 7, gen(5))) != _epoch(BatchIterator(50, 7, gen(6)))


def test_batch_iterator_resumes_exactly_mid_epoch():
    n, bs = 103, 10
    reference = BatchIterator(n, bs, gen(11))
    expected = _epoch(reference) + _epoch(reference)

    run = BatchIterator(n, bs, gen(11))
    seen = []
    for i, batch in enumerate(run):
        seen.append(batch.tolist())
        if i == 4:  # half an epoch, then "crash"
            break
    state = run.state_dict()
    assert state == {"num_triples": n, "seed": run.seed, "epoch": 0, "offset": 50}

    resumed = BatchIterator(n, bs, gen(999))  # a different seed: the state must win
    resumed.load_state_dict(state)
    seen += _epoch(resumed)
    assert sorted(sum(seen, [])) == list(range(n))  # no triple skipped or repeated
    seen += _epoch(resumed)
    assert seen == expected


def test_batch_iterator_resume_across_epochs_and_with_another_batch_size():
    reference = BatchIterator(30, 4, 0)
    flat = [i for _ in range(3) for i in sum(_epoch(reference), [])]

    run = BatchIterator(30, 4, 0)
    got = [run.next_batch() for _ in range(10)]  # 8 batches fill epoch 0 (7x4 + 2), then 2 of epoch 1
    assert (run.epoch, run.offset) == (1, 8)
    other = BatchIterator(30, 6, 42)
    other.load_state_dict(run.state_dict())
    got += [other.next_batch() for _ in range(9)]  # rest of epoch 1 (22 = 3x6 + 4), all of epoch 2 (5x6)
    assert torch.cat(got).tolist() == flat


def test_batch_iterator_rejects_foreign_state():
    it = BatchIterator(10, 3, 0)
    with pytest.raises(ValueError):
        BatchIterator(11, 3, 0).load_state_dict(it.state_dict())
    with pytest.raises(ValueError):
        it.load_state_dict(it.state_dict() | {"offset": 10})
