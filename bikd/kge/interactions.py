"""Stateless KGE interaction functions on embedding tensors (not indices).

The sharded trainers gather rows from remote shards and score them here, so nothing in this module knows
about embedding tables. Every model is written as a *query* against *candidates*: ``score(h, r, t)``
equals ``sim(tail_query(h, r), t)`` and ``sim(head_query(r, t), h)`` with ``sim`` one of

- ``"dot"``: ``q . c``                                   (DistMult, ComplEx)
- ``"l2"``:  ``-||q - c||_2``                            (TransE-L2, RotatE)
- ``"l1"``:  ``-||q - c||_1``                            (TransE-L1)

so that scoring a chunk of positives against a shared block of candidates is one batched matrix product
(DGL-KE's trick), with ``||q - c||^2 = ||q||^2 - 2 q.c + ||c||^2`` for L2. L1 has no such expansion and
goes through ``torch.cdist``.

Layout conventions (d = the model dimension):

- ComplEx and RotatE store d complex numbers as 2d reals ``[real parts | imaginary parts]`` (halves, as
  DGL-KE), which makes a complex inner product ``Re(<q, conj(c)>)`` a plain real dot product of the rows.
- RotatE relations are d *phases* theta (radians, as in the RotatE paper and DGL-KE): the rotation is
  ``exp(i theta)``, unit modulus by construction, so no projection is needed after an optimiser step.
"""

from __future__ import annotations

import math
from typing import Callable, ClassVar, Literal

import torch
from torch import Tensor

Similarity = Literal["dot", "l1", "l2"]

#: floor under squared distances before the sqrt: the expansion can round a zero distance to a tiny
#: negative, and sqrt's gradient at exactly 0 is infinite (times a zero gives NaN)
_SQ_EPS = 1e-12


def pairwise(similarity: Similarity, q: Tensor, c: Tensor) -> Tensor:
    """Similarity of every query to every candidate: ``(*C, B, d)``, ``(*C, K, d)`` -> ``(*C, B, K)``.

    Leading dims broadcast (a candidate block of leading size 1 is shared by all chunks); 2-D inputs give
    ``(B, K)``.
    """
    if similarity == "l1":
        q, c = _common_batch(q, c)
        return -torch.cdist(q, c, p=1.0)
    q3, c3 = _common_batch(q, c)
    lead = q3.shape[:-2]
    q3, c3 = q3.reshape(-1, *q3.shape[-2:]), c3.reshape(-1, *c3.shape[-2:])
    if similarity == "dot":
        out = torch.bmm(q3, c3.transpose(1, 2))
    elif similarity == "l2":
        out = _L2Scores.apply(q3, c3)
    else:
        raise ValueError(f"unknown similarity {similarity!r}")
    return out.reshape(*lead, *out.shape[-2:])


class _L2Scores(torch.autograd.Function):
    """``-||q - c||_2`` for ``q (n, B, d)``, ``c (n, K, d)`` -> ``(n, B, K)``, with a hand-written backward.

    Forward is one GEMM ``||c||^2 - 2 q.c`` (baddbmm) and in-place ``+ ||q||^2``, clamp, sqrt, negate on its
    output. Backward, with ``m = g / s`` (s the scores, so ``d s / d sq = 1 / (2 s)``):
    ``dq = q * rowsum(m) - m @ c`` and ``dc = c * colsum(m) - m^T @ q``, two more GEMMs with the rank-one
    terms as their bias. Autograd through the expansion instead keeps five (n, B, K) temporaries and makes
    about ten passes over them; this makes three (the division and the two sums). Where the squared
    distance was clamped (a candidate equal to its query, to rounding) the gradient is 0, as autograd's
    ``clamp_min`` gives.
    """

    @staticmethod
    def forward(ctx, q: Tensor, c: Tensor) -> Tensor:
        out = torch.baddbmm((c * c).sum(-1)[:, None, :], q, c.transpose(1, 2), alpha=-2.0)
        out.add_((q * q).sum(-1, keepdim=True))
        clamped = out.numel() > 0 and bool(out.min() < _SQ_EPS)
        out.clamp_min_(_SQ_EPS).sqrt_().neg_()
        ctx.clamped = clamped
        ctx.save_for_backward(q, c, out)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
        q, c, out = ctx.saved_tensors
        m = grad / out
        if ctx.clamped:
            floor = -torch.tensor(_SQ_EPS, dtype=out.dtype).sqrt()
            m.masked_fill_(out >= floor, 0.0)
        dq = dc = None
        if ctx.needs_input_grad[0]:
            dq = torch.baddbmm(q * m.sum(-1, keepdim=True), m, c, alpha=-1.0)
        if ctx.needs_input_grad[1]:
            dc = torch.baddbmm(c * m.sum(-2)[..., None], m.transpose(1, 2), q, alpha=-1.0)
        return dq, dc


def rowwise(similarity: Similarity, q: Tensor, x: Tensor) -> Tensor:
    """Similarity of each query to its own candidate: ``(*batch, d)``, ``(*batch, d)`` -> ``(*batch)``."""
    if similarity == "dot":
        return (q * x).sum(-1)
    if similarity == "l2":
        return _RowL2Scores.apply(q, x)
    if similarity == "l1":
        return -(q - x).norm(p=1, dim=-1)
    raise ValueError(f"unknown similarity {similarity!r}")


class _RowL2Scores(torch.autograd.Function):
    """``-||q - x||_2`` over the last dim, with the backward written out: ``dq = -dx = -g (q - x) / ||q - x||``
    (0 where the distance is 0, as autograd's norm gives), one scaling pass of the saved difference
    instead of the norm backward's division, mask and product over the full rows."""

    @staticmethod
    def forward(ctx, q: Tensor, x: Tensor) -> Tensor:
        diff = q - x
        dist = torch.linalg.vector_norm(diff, dim=-1)
        ctx.save_for_backward(diff, dist)
        return dist.neg()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor]:
        diff, dist = ctx.saved_tensors
        coef = torch.where(dist > 0, grad / dist, 0.0).neg_().unsqueeze(-1)
        dq = diff * coef
        return dq, dq.neg()


def _common_batch(q: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
    lead = torch.broadcast_shapes(q.shape[:-2], c.shape[:-2])
    return q.expand(*lead, *q.shape[-2:]), c.expand(*lead, *c.shape[-2:])


def _side_sign(corrupt_head: Tensor, like: Tensor) -> Tensor:
    """``corrupt_head (N,)`` bool -> ``(N, 1, 1)`` of -1 (head) / +1 (tail) in ``like``'s dtype."""
    return (1 - 2 * corrupt_head.to(like.dtype))[:, None, None]


def _halves(x: Tensor) -> tuple[Tensor, Tensor]:
    re, im = x.chunk(2, dim=-1)
    return re, im


def _uniform_(x: Tensor, bound: float) -> Tensor:
    return torch.nn.init.uniform_(x, -bound, bound)


class Interaction:
    """Base class. Subclasses define ``score`` directly from the model's formula (the reference the tests
    hold against PyKEEN) and ``tail_query``/``head_query`` + ``similarity`` (the fast path), kept separate
    so that each checks the other.

    ``entity_factor``/``relation_factor``: reals per model dimension in an entity/relation row.
    """

    name: ClassVar[str]
    similarity: ClassVar[Similarity]
    entity_factor: ClassVar[int] = 1
    relation_factor: ClassVar[int] = 1

    def score(self, h: Tensor, r: Tensor, t: Tensor) -> Tensor:
        """Broadcastable ``(*batch, d_e)``, ``(*batch, d_r)``, ``(*batch, d_e)`` -> ``(*batch)``."""
        raise NotImplementedError

    def tail_query(self, h: Tensor, r: Tensor) -> Tensor:
        """``(*batch, d_e)``, ``(*batch, d_r)`` -> ``(*batch, d_e)`` q with ``score(h, r, t) = sim(q, t)``."""
        raise NotImplementedError

    def head_query(self, r: Tensor, t: Tensor) -> Tensor:
        """``(*batch, d_r)``, ``(*batch, d_e)`` -> ``(*batch, d_e)`` q with ``score(h, r, t) = sim(q, h)``."""
        raise NotImplementedError

    def score_tails(self, h: Tensor, r: Tensor, t_cand: Tensor) -> Tensor:
        """A chunk of positives ``h (C, B, d_e)``, ``r (C, B, d_r)`` against a block of candidate tails
        ``t_cand (C, K, d_e)`` shared by the chunk -> ``(C, B, K)``; ``[c, b, k] = score(h[c, b], r[c, b],
        t_cand[c, k])``. Leading dims broadcast as in :func:`pairwise`."""
        return pairwise(self.similarity, self.tail_query(h, r), t_cand)

    def score_heads(self, h_cand: Tensor, r: Tensor, t: Tensor) -> Tensor:
        """``h_cand (C, K, d_e)``, ``r (C, B, d_r)``, ``t (C, B, d_e)`` -> ``(C, B, K)``; ``[c, b, k] =
        score(h_cand[c, k], r[c, b], t[c, b])``."""
        return pairwise(self.similarity, self.head_query(r, t), h_cand)

    def side_query(self, e: Tensor, r: Tensor, corrupt_head: Tensor) -> Tensor:
        """Each chunk's query for the side it corrupts: ``e (N, C, d_e)`` the entity it keeps, ``r (N, C,
        d_r)``, ``corrupt_head (N,)`` bool -> ``(N, C, d_e)``, chunk n being ``head_query(r[n], e[n])``
        (e = the tails) where ``corrupt_head[n]``, else ``tail_query(e[n], r[n])`` (e = the heads).

        Generic form: one query call per side-uniform batch, else per chunk. The models override it with
        one expression for both sides, as every head query here is a tail query with the relation
        inverted (TransE: -r, DistMult: r, ComplEx: conj(r), RotatE: -theta).
        """
        sides = corrupt_head.tolist()
        if all(sides):
            return self.head_query(r, e)
        if not any(sides):
            return self.tail_query(e, r)
        es, rs = e.unbind(0), r.unbind(0)
        return torch.stack([self.head_query(rs[n], es[n]) if head else self.tail_query(es[n], rs[n])
                            for n, head in enumerate(sides)])

    def init_entity_(self, x: Tensor, scale: float | None = None) -> Tensor:
        """Default: uniform in +-sqrt(3 / width), the Xavier bound of a square layer, so that a row has
        expected squared norm 1 whatever the dimension; ``scale`` overrides the bound."""
        return _uniform_(x, scale if scale is not None else math.sqrt(3.0 / x.shape[-1]))

    def init_relation_(self, x: Tensor, scale: float | None = None) -> Tensor:
        return self.init_entity_(x, scale)

    def constrain_entity_(self, x: Tensor) -> None:
        """In place on a (shard of the) entity table after each optimiser step; default none."""

    def constrain_relation_(self, x: Tensor) -> None:
        """In place on a (shard of the) relation table after each optimiser step; default none."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class TransEInteraction(Interaction):
    """TransE (Bordes et al., 2013): ``f(h, r, t) = -||h + r - t||_p``, p in {1, 2}.

    Shapes: h, r, t ``(*batch, d)`` real. Queries: tail ``h + r``, head ``t - r`` (since
    ``||h + r - t|| = ||h - (t - r)||``). With ``normalize`` (default) entities are projected back onto
    the unit sphere after each step (Bordes et al.); init is theirs: uniform in +-6/sqrt(d), relations then
    normalised. Without it (DGL-KE, RotatE's TransE) entity norms are free and the margin can be large.
    """

    name = "transe"

    def __init__(self, p: int = 2, normalize: bool = True):
        if p not in (1, 2):
            raise ValueError(f"TransE norm p must be 1 or 2, got {p}")
        self.p, self.normalize = p, normalize

    @property
    def similarity(self) -> Similarity:  # type: ignore[override]
        return "l1" if self.p == 1 else "l2"

    def score(self, h: Tensor, r: Tensor, t: Tensor) -> Tensor:
        return -(h + r - t).norm(p=self.p, dim=-1)

    def tail_query(self, h: Tensor, r: Tensor) -> Tensor:
        return h + r

    def head_query(self, r: Tensor, t: Tensor) -> Tensor:
        return t - r

    def side_query(self, e: Tensor, r: Tensor, corrupt_head: Tensor) -> Tensor:
        return torch.addcmul(e, _side_sign(corrupt_head, r), r)  # e + r (tail) or e - r (head)

    def init_entity_(self, x: Tensor, scale: float | None = None) -> Tensor:
        return _uniform_(x, scale if scale is not None else 6.0 / math.sqrt(x.shape[-1]))

    def init_relation_(self, x: Tensor, scale: float | None = None) -> Tensor:
        self.init_entity_(x, scale)
        with torch.no_grad():
            return x.div_(x.norm(dim=-1, keepdim=True).clamp_min(1e-12))

    def constrain_entity_(self, x: Tensor) -> None:
        if self.normalize:
            with torch.no_grad():
                x.div_(x.norm(dim=-1, keepdim=True).clamp_min(1e-12))

    def __repr__(self) -> str:
        return f"TransEInteraction(p={self.p}{'' if self.normalize else ', normalize=False'})"


class DistMultInteraction(Interaction):
    """DistMult (Yang et al., 2015): ``f(h, r, t) = sum_i h_i r_i t_i``.

    Shapes: h, r, t ``(*batch, d)`` real. Queries: tail ``h * r``, head ``r * t`` (dot similarity).
    No constraint (nor for ComplEx): regularisation of the bilinear models, if wanted, belongs in the loss.
    """

    name = "distmult"
    similarity = "dot"

    def score(self, h: Tensor, r: Tensor, t: Tensor) -> Tensor:
        return (h * r * t).sum(-1)

    def tail_query(self, h: Tensor, r: Tensor) -> Tensor:
        return h * r

    def head_query(self, r: Tensor, t: Tensor) -> Tensor:
        return r * t

    def side_query(self, e: Tensor, r: Tensor, corrupt_head: Tensor) -> Tensor:
        return e * r  # symmetric: the same query for both sides


class ComplExInteraction(Interaction):
    """ComplEx (Trouillon et al., 2016): ``f(h, r, t) = Re(sum_i h_i r_i conj(t_i))`` over complex d-vectors.

    Shapes: h, r, t ``(*batch, 2d)`` real, ``[Re | Im]`` halves. Expanded:
    ``<Re h, Re r, Re t> + <Im h, Re r, Im t> + <Re h, Im r, Im t> - <Im h, Im r, Re t>``.
    Queries (dot similarity on the 2d reals): tail ``h * r``; head ``conj(r) * t``, because
    ``Re(h r conj(t)) = Re(h conj(conj(r) t))`` and ``Re(a conj(b))`` is the real dot product of the rows.
    """

    name = "complex"
    similarity = "dot"
    entity_factor = 2
    relation_factor = 2

    def score(self, h: Tensor, r: Tensor, t: Tensor) -> Tensor:
        (h_re, h_im), (r_re, r_im), (t_re, t_im) = _halves(h), _halves(r), _halves(t)
        return (h_re * r_re * t_re + h_im * r_re * t_im + h_re * r_im * t_im - h_im * r_im * t_re).sum(-1)

    def tail_query(self, h: Tensor, r: Tensor) -> Tensor:
        (h_re, h_im), (r_re, r_im) = _halves(h), _halves(r)
        return torch.cat([h_re * r_re - h_im * r_im, h_re * r_im + h_im * r_re], dim=-1)

    def head_query(self, r: Tensor, t: Tensor) -> Tensor:
        (r_re, r_im), (t_re, t_im) = _halves(r), _halves(t)
        return torch.cat([r_re * t_re + r_im * t_im, r_re * t_im - r_im * t_re], dim=-1)

    def side_query(self, e: Tensor, r: Tensor, corrupt_head: Tensor) -> Tensor:
        r_re, r_im = _halves(r)  # head: tail_query(t, conj(r)), the imaginary half negated
        return self.tail_query(e, torch.cat([r_re, r_im * _side_sign(corrupt_head, r)], dim=-1))


class RotatEInteraction(Interaction):
    """RotatE (Sun et al., 2019) with PyKEEN's L2 form: ``f(h, r, t) = -||h * exp(i theta_r) - t||_2``,
    the Euclidean norm of the complex difference vector.

    Shapes: h, t ``(*batch, 2d)`` real, ``[Re | Im]`` halves; r ``(*batch, d)`` phases theta. Queries (L2
    similarity): tail ``h * exp(i theta)``; head ``t * exp(-i theta)``, since a rotation preserves the norm.
    (The paper and DGL-KE sum the per-coordinate moduli instead, an L1-type norm that has no GEMM form.)
    Phases are initialised uniform in [-pi, pi] and wrapped back into [-pi, pi) after each step, which
    changes no score but keeps cos/sin accurate in float32.
    """

    name = "rotate"
    similarity = "l2"
    entity_factor = 2
    relation_factor = 1

    @staticmethod
    def _rotate(x: Tensor, phase: Tensor) -> Tensor:
        re, im = _halves(x)
        cos, sin = phase.cos(), phase.sin()
        return torch.cat([re * cos - im * sin, re * sin + im * cos], dim=-1)

    def score(self, h: Tensor, r: Tensor, t: Tensor) -> Tensor:
        return -(self._rotate(h, r) - t).norm(dim=-1)

    def tail_query(self, h: Tensor, r: Tensor) -> Tensor:
        return self._rotate(h, r)

    def head_query(self, r: Tensor, t: Tensor) -> Tensor:
        return self._rotate(t, -r)

    def side_query(self, e: Tensor, r: Tensor, corrupt_head: Tensor) -> Tensor:
        return self._rotate(e, r * _side_sign(corrupt_head, r))  # head: rotate the tail back by -theta

    def init_relation_(self, x: Tensor, scale: float | None = None) -> Tensor:
        return _uniform_(x, math.pi)

    def constrain_relation_(self, x: Tensor) -> None:
        with torch.no_grad():
            x.add_(math.pi).remainder_(2 * math.pi).sub_(math.pi)


def row_constraint(interaction: Interaction, kind: str) -> Callable[[Tensor], None] | None:
    """The in-place constraint on updated ``kind`` ("entity" or "relation") rows, or None when the
    interaction has none (the base class's no-op), so that callers can skip touching the rows at all."""
    name = {"entity": "constrain_entity_", "relation": "constrain_relation_"}[kind]
    if getattr(type(interaction), name) is getattr(Interaction, name):
        return None
    if kind == "entity" and getattr(interaction, "normalize", True) is False:  # TransE with free norms
        return None
    return getattr(interaction, name)


INTERACTIONS: dict[str, type[Interaction]] = {
    cls.name: cls for cls in (TransEInteraction, DistMultInteraction, ComplExInteraction, RotatEInteraction)
}
