"""Interaction functions: equality with PyKEEN's interactions, and the batched (GEMM) forms against the
plain broadcast score and a Python-loop reference."""

from __future__ import annotations

import cmath
import math

import pytest
import torch

from bikd.kge.interactions import INTERACTIONS, Interaction, pairwise


def _real(x):
    return x


def _complex_halves(x):
    d = x.shape[-1] // 2
    return torch.complex(x[..., :d], x[..., d:])


def _phases(x):
    return torch.polar(torch.ones_like(x), x)


def _pykeen(name, **kwargs):
    from pykeen.nn import modules

    return lambda: getattr(modules, name)(**kwargs)


# name -> [(our constructor kwargs, PyKEEN interaction factory, entity converter, relation converter)]
PYKEEN_REFERENCES = {
    "transe": [({"p": 1}, _pykeen("TransEInteraction", p=1), _real, _real),
               ({"p": 2}, _pykeen("TransEInteraction", p=2), _real, _real)],
    "distmult": [({}, _pykeen("DistMultInteraction"), _real, _real)],
    "complex": [({}, _pykeen("ComplExInteraction"), _complex_halves, _complex_halves)],
    "rotate": [({}, _pykeen("RotatEInteraction"), _complex_halves, _phases)],
}
CASES = [(name, kwargs) for name, refs in PYKEEN_REFERENCES.items() for kwargs, *_ in refs]
CASE_IDS = [name + "".join(f"-{k}{v}" for k, v in kwargs.items()) for name, kwargs in CASES]


def make(name: str, kwargs: dict) -> Interaction:
    return INTERACTIONS[name](**kwargs)


def embeddings(interaction: Interaction, shapes, dim=8, dtype=torch.float32, seed=0):
    """Random h, r, t with the given batch shapes, widths per the interaction's layout."""
    g = torch.Generator().manual_seed(seed)
    widths = (interaction.entity_factor * dim, interaction.relation_factor * dim, interaction.entity_factor * dim)
    out = [torch.randn(*shape, width, generator=g, dtype=dtype) for shape, width in zip(shapes, widths)]
    if interaction.relation_factor == 1 and interaction.entity_factor == 2:  # phases: spread over the circle
        out[1] = out[1] * math.pi
    return out


def test_every_registered_interaction_has_a_pykeen_equality_test():
    assert set(INTERACTIONS) == set(PYKEEN_REFERENCES)
    assert {kw["p"] for kw, *_ in PYKEEN_REFERENCES["transe"]} == {1, 2}
    for name, cls in INTERACTIONS.items():
        assert cls.name == name


@pytest.mark.parametrize("name", sorted(PYKEEN_REFERENCES))
def test_score_equals_pykeen(name):
    for kwargs, factory, to_entity, to_relation in PYKEEN_REFERENCES[name]:
        ours, theirs = make(name, kwargs), factory()
        # a flat batch and a broadcast one, as the sLCWA loop uses
        for shapes in [((7,), (7,), (7,)), ((4, 1), (4, 1), (1, 6))]:
            h, r, t = embeddings(ours, shapes, dim=16)
            expected = theirs(to_entity(h), to_relation(r), to_entity(t))
            got = ours.score(h, r, t)
            assert got.shape == expected.shape == torch.broadcast_shapes(*shapes)
            assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5), (kwargs, (got - expected).abs().max())


@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
@pytest.mark.parametrize("name,kwargs", CASES, ids=CASE_IDS)
def test_score_tails_and_heads_equal_broadcast_score(name, kwargs, dtype, atol):
    inter = make(name, kwargs)
    num_chunks, num_pos, num_cand = 3, 5, 7
    h, r, t = embeddings(inter, [(num_chunks, num_pos)] * 3, dtype=dtype)
    cand, *_ = embeddings(inter, [(num_chunks, num_cand)] * 3, dtype=dtype, seed=1)

    tails = inter.score_tails(h, r, cand)
    assert tails.shape == (num_chunks, num_pos, num_cand)
    expected = inter.score(h[:, :, None], r[:, :, None], cand[:, None, :])
    assert torch.allclose(tails, expected, atol=atol, rtol=1e-6)

    heads = inter.score_heads(cand, r, t)
    assert heads.shape == (num_chunks, num_pos, num_cand)
    expected = inter.score(cand[:, None, :], r[:, :, None], t[:, :, None])
    assert torch.allclose(heads, expected, atol=atol, rtol=1e-6)


@pytest.mark.parametrize("name,kwargs", CASES, ids=CASE_IDS)
def test_candidate_block_shared_across_chunks(name, kwargs):
    inter = make(name, kwargs)
    h, r, t = embeddings(inter, [(3, 4)] * 3, dtype=torch.float64)
    cand, *_ = embeddings(inter, [(1, 6)] * 3, dtype=torch.float64, seed=2)
    assert torch.allclose(inter.score_tails(h, r, cand), inter.score_tails(h, r, cand.expand(3, -1, -1).contiguous()))
    assert torch.allclose(inter.score_heads(cand, r, t), inter.score(cand[:, None], r[:, :, None], t[:, :, None]))


def _loop_complex(x):
    d = len(x) // 2
    return [complex(x[i], x[d + i]) for i in range(d)]


LOOP_REFERENCES = {
    # Python-number formulas, independent of the tensor layout code
    "complex": lambda h, r, t: sum(a * b * c.conjugate() for a, b, c in zip(_loop_complex(h), _loop_complex(r), _loop_complex(t))).real,
    "rotate": lambda h, r, t: -math.sqrt(sum(abs(a * cmath.exp(1j * th) - c) ** 2
                                             for a, th, c in zip(_loop_complex(h), r, _loop_complex(t)))),
}


@pytest.mark.parametrize("name", sorted(LOOP_REFERENCES))
def test_score_tails_and_heads_equal_python_loop(name):
    inter, ref = make(name, {}), LOOP_REFERENCES[name]
    h, r, t = embeddings(inter, [(2, 3)] * 3, dim=4, dtype=torch.float64)
    cand, *_ = embeddings(inter, [(2, 5)] * 3, dim=4, dtype=torch.float64, seed=3)
    tails, heads = inter.score_tails(h, r, cand), inter.score_heads(cand, r, t)
    for c in range(2):
        for b in range(3):
            for k in range(5):
                hl, rl, tl, kl = h[c, b].tolist(), r[c, b].tolist(), t[c, b].tolist(), cand[c, k].tolist()
                assert tails[c, b, k].item() == pytest.approx(ref(hl, rl, kl), abs=1e-10)
                assert heads[c, b, k].item() == pytest.approx(ref(kl, rl, tl), abs=1e-10)


@pytest.mark.parametrize("name,kwargs", CASES, ids=CASE_IDS)
def test_batched_gradients_match_broadcast_and_stay_finite(name, kwargs):
    inter = make(name, kwargs)
    h, r, t = (x.requires_grad_() for x in embeddings(inter, [(2, 3)] * 3, dtype=torch.float64))
    cand = embeddings(inter, [(2, 4)] * 3, dtype=torch.float64, seed=4)[0].requires_grad_()
    weights = torch.randn(2, 3, 4, dtype=torch.float64)
    fast = torch.autograd.grad((inter.score_tails(h, r, cand) * weights).sum(), [h, r, cand])
    slow = torch.autograd.grad((inter.score(h[:, :, None], r[:, :, None], cand[:, None]) * weights).sum(), [h, r, cand])
    for a, b in zip(fast, slow):
        assert torch.allclose(a, b, atol=1e-8)
    # a candidate that coincides with the query: distance 0, where sqrt's derivative is infinite
    with torch.no_grad():
        cand[0, 0] = inter.tail_query(h[0, 0], r[0, 0])
    grads = torch.autograd.grad(inter.score_tails(h, r, cand).sum(), [h, r, cand])
    assert all(torch.isfinite(g).all() for g in grads)


def test_pairwise_two_dimensional_and_unknown_similarity():
    q, c = torch.randn(3, 5, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    assert torch.allclose(pairwise("dot", q, c), q @ c.t())
    assert torch.allclose(pairwise("l2", q, c), -torch.cdist(q, c))
    assert torch.allclose(pairwise("l1", q, c), -(q[:, None] - c[None]).abs().sum(-1))
    with pytest.raises(ValueError, match="similarity"):
        pairwise("cosine", q, c)  # type: ignore[arg-type]


def test_transe_rejects_other_norms():
    with pytest.raises(ValueError, match="p must be 1 or 2"):
        INTERACTIONS["transe"](p=3)


def test_rotate_phase_wrap_changes_no_score():
    inter = make("rotate", {})
    h, r, t = embeddings(inter, [(6,)] * 3, dtype=torch.float64)
    r = r * 5  # well outside [-pi, pi)
    before = inter.score(h, r, t)
    wrapped = r.clone()
    inter.constrain_relation_(wrapped)
    assert (wrapped >= -math.pi).all() and (wrapped < math.pi).all()
    assert torch.allclose(inter.score(h, wrapped, t), before, atol=1e-10)
