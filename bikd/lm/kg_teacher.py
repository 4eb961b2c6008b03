"""The KG side as the LM sees it: a read-only, versioned snapshot of trained KG embeddings (the teacher).

A :class:`KGTable` holds ``entity (N, d_e)`` and ``relation (R, d_r)`` tables plus the name of the
interaction that scores them (TransE, DistMult, ComplEx, RotatE from :mod:`bikd.kge.interactions`). The LM
fuses the entity rows into its hidden states and distils the interaction's relation distribution; it never
trains them. So the tensors are detached copies with ``requires_grad=False`` and the table is *not* a
parameter or buffer of any module: it stays out of ``state_dict``, optimisers, DDP/ZeRO broadcasts, and a
newer snapshot (from a KG export or a Ray ``Snapshot``) can replace it between two steps.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from bikd.kge.interactions import INTERACTIONS, Interaction
from bikd.storage import Storage

__all__ = ["KGTable"]


def _as_table(x: Tensor | np.ndarray, what: str) -> Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, Tensor) else x)
    if t.ndim != 2 or not t.is_floating_point():
        raise ValueError(f"{what} table must be a 2-d float tensor, got shape {tuple(t.shape)} {t.dtype}")
    # a private copy: the trainer that produced the rows may keep updating its own tensor in place
    return t.detach().to(torch.float32).clone().requires_grad_(False)


@dataclass(kw_only=True, frozen=True, eq=False)
class KGTable:
    """One snapshot of the KG embeddings; build it with :meth:`from_arrays`, :meth:`from_export` or
    :meth:`with_tables` (which validate), not by hand.

    ``version``: the snapshot's version (e.g. the Ray ``Snapshot.version`` or the KG store version), recorded
    by the modules that use it. ``interaction``: a key of ``INTERACTIONS``; ``interaction_kwargs`` its
    constructor arguments (TransE's ``p``). ``entity_labels``/``relation_labels``: optional, row i = id i.
    """

    version: int
    entity: Tensor
    relation: Tensor
    interaction: str
    interaction_kwargs: Mapping[str, Any] = field(default_factory=dict)
    entity_labels: tuple[str, ...] | None = None
    relation_labels: tuple[str, ...] | None = None

    def __post_init__(self):
        if self.interaction not in INTERACTIONS:
            raise ValueError(f"interaction must be one of {sorted(INTERACTIONS)}, got {self.interaction!r}")
        if not isinstance(self.version, int) or self.version < 0:
            raise ValueError(f"version must be an int >= 0, got {self.version!r}")
        fn = self.scorer  # unknown kwargs fail here
        d_e, d_r = self.entity.shape[1], self.relation.shape[1]
        if d_e % fn.entity_factor or d_e // fn.entity_factor * fn.relation_factor != d_r:
            raise ValueError(f"{self.interaction}: entity dim {d_e} and relation dim {d_r} do not fit its layout "
                             f"(entity = {fn.entity_factor} * dim, relation = {fn.relation_factor} * dim reals)")
        for what, labels, n in (("entity", self.entity_labels, self.num_entities),
                                ("relation", self.relation_labels, self.num_relations)):
            if labels is not None and len(labels) != n:
                raise ValueError(f"{len(labels)} {what} labels for a table of {n} rows")

    # ---- construction -------------------------------------------------------------------------------
    @classmethod
    def from_arrays(cls, entity: Tensor | np.ndarray, relation: Tensor | np.ndarray, *, interaction: str,
                    version: int = 0, interaction_kwargs: Mapping[str, Any] | None = None,
                    entity_labels: Sequence[str] | None = None,
                    relation_labels: Sequence[str] | None = None) -> KGTable:
        """``entity (N, d_e)``, ``relation (R, d_r)`` (tensors or arrays, copied to float32)."""
        return cls(version=version, entity=_as_table(entity, "entity"), relation=_as_table(relation, "relation"),
                   interaction=interaction, interaction_kwargs=dict(interaction_kwargs or {}),
                   entity_labels=None if entity_labels is None else tuple(entity_labels),
                   relation_labels=None if relation_labels is None else tuple(relation_labels))

    @classmethod
    def from_export(cls, storage: Storage, prefix: str = "", *, version: int | None = None) -> KGTable:
        """Read a :func:`bikd.kge.export.export_embeddings` folder (checksums checked by ``load_embeddings``).
        ``version`` defaults to ``meta["extra"]["version"]`` when the exporter recorded one, else 0."""
        from bikd.kge.export import load_embeddings

        return cls.from_loaded(*load_embeddings(storage, prefix), version=version)

    @classmethod
    def from_loaded(cls, entity: np.ndarray, relation: np.ndarray, entity_labels: Sequence[str],
                    relation_labels: Sequence[str], meta: dict, *, version: int | None = None) -> KGTable:
        """:meth:`from_export` of what :func:`bikd.kge.export.load_embeddings` returned (a caller that also
        needs ``meta`` reads the export once)."""
        model = meta.get("model")
        kwargs = {"p": int(meta.get("config", {}).get("p", 2))} if model == "transe" else {}
        if version is None:
            version = int(meta.get("extra", {}).get("version", 0))
        return cls.from_arrays(entity, relation, interaction=model, version=version, interaction_kwargs=kwargs,
                               entity_labels=entity_labels, relation_labels=relation_labels)

    def with_tables(self, *, version: int, entity: Tensor | np.ndarray, relation: Tensor | np.ndarray) -> KGTable:
        """A newer snapshot of the same model (e.g. from a Ray ``Snapshot(version, entity, relation)``); the
        labels are kept when the row counts are unchanged and dropped otherwise."""
        entity, relation = _as_table(entity, "entity"), _as_table(relation, "relation")
        return dataclasses.replace(
            self, version=version, entity=entity, relation=relation,
            entity_labels=self.entity_labels if len(entity) == self.num_entities else None,
            relation_labels=self.relation_labels if len(relation) == self.num_relations else None)

    def to(self, device: torch.device | str) -> KGTable:
        """The same snapshot on ``device`` (self when already there)."""
        device = torch.device(device)
        if self.entity.device == device and self.relation.device == device:
            return self
        return dataclasses.replace(self, entity=self.entity.to(device), relation=self.relation.to(device))

    # ---- properties ---------------------------------------------------------------------------------
    @property
    def num_entities(self) -> int:
        return self.entity.shape[0]

    @property
    def num_relations(self) -> int:
        return self.relation.shape[0]

    @property
    def entity_dim(self) -> int:
        return self.entity.shape[1]

    @property
    def scorer(self) -> Interaction:
        return INTERACTIONS[self.interaction](**self.interaction_kwargs)

    # ---- the teacher --------------------------------------------------------------------------------
    def check_ids(self, ids: Tensor, what: str = "entity ids") -> None:
        """ValueError unless every id is in ``[0, num_entities)``; names the offending value."""
        if ids.numel() == 0:
            return
        lo, hi = torch.aminmax(ids)
        lo, hi = int(lo), int(hi)
        if lo < 0 or hi >= self.num_entities:
            bad = lo if lo < 0 else hi
            raise ValueError(f"{what} hold {bad}, but the entity table (version {self.version}) has "
                             f"{self.num_entities} rows (valid ids 0..{self.num_entities - 1})")

    @torch.no_grad()
    def relation_scores(self, h_ids: Tensor, t_ids: Tensor) -> Tensor:
        """``score(h, r, t)`` for every relation r: ``h_ids (P,)``, ``t_ids (P,)`` -> ``(P, R)``.

        Uses the interaction's own ``score`` with broadcasting (``h (P, 1, d_e)``, ``r (1, R, d_r)``,
        ``t (P, 1, d_e)``), so every model is scored by the formula it was trained with. No gradient: the
        KG is the teacher here.
        """
        if h_ids.shape != t_ids.shape or h_ids.ndim != 1:
            raise ValueError(f"h_ids and t_ids must be 1-d of equal length, got {tuple(h_ids.shape)} and "
                             f"{tuple(t_ids.shape)}")
        self.check_ids(h_ids, "head ids")
        self.check_ids(t_ids, "tail ids")
        dev = self.entity.device
        h = self.entity[h_ids.to(dev)][:, None, :]
        t = self.entity[t_ids.to(dev)][:, None, :]
        return self.scorer.score(h, self.relation[None, :, :], t)

    def __repr__(self) -> str:
        return (f"KGTable(version={self.version}, interaction={self.interaction!r}, entity={tuple(self.entity.shape)}, "
                f"relation={tuple(self.relation.shape)})")
