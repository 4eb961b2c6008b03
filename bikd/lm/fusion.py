"""Knowledge fusion: KG entity embeddings added into a BERT-family encoder's hidden states (ERNIE-style).

After each configured encoder layer ``i`` (0-based: the output of ``encoder.layer[i]``, i.e. HF's
``hidden_states[i + 1]``), every token ``(b, s)`` inside a linked mention of entity ``e = token_entity[b, s]``
gets

    h[b, s] <- h[b, s] + g_i * W_i E[e]          (g_i: scalar or per-hidden-unit gate; W_i: Linear(d_e -> H))

and tokens with ``token_entity == -1`` are untouched. ``g_i`` starts at 0, so at step 0 the fused encoder
computes exactly the plain encoder (``h + 0`` is ``h`` bit for bit) and the KG's influence is learned from
there. ``E`` is a :class:`~bikd.lm.kg_teacher.KGTable` snapshot held outside the module's parameters and
buffers: ``set_entity_table`` swaps in a newer one between two steps, with no restart and no change to the
``state_dict`` (which holds W and g only).

Cost: the fusion touches only the L linked positions: one gather of L entity rows per forward (shared by all
fusion layers), one ``(L, d_e) x (d_e, H)`` product and one ``index_add`` per fusion layer, no dense
``(B, S, d_e)`` tensor. It is attached with forward hooks on ``encoder.layer[i]``, so any BERT-family model
(BERT, RoBERTa, MiniLM, ...) works unchanged; transformers checkpoints a layer's ``forward`` (not its
``__call__``), so the hooks also stay outside gradient checkpointing's recomputation.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from bikd.lm.kg_teacher import KGTable

__all__ = ["FusionConfig", "KnowledgeFusion", "FusedEncoder"]


@dataclass(kw_only=True, frozen=True)
class FusionConfig:
    """``layers``: encoder layers (0-based) after which entities are fused. ``entity_dim``: d_e of the entity
    table (None: taken from the table given at construction). ``gate``: ``"vector"`` (one gate per hidden
    unit) or ``"scalar"``; ``gate_init``: its initial value (0 = plain encoder at step 0). ``dropout`` on
    ``W E[e]``. ``check_ids``: validate ``token_entity`` against the table each forward (one host sync)."""

    layers: tuple[int, ...] = (3,)
    entity_dim: int | None = None
    gate: Literal["vector", "scalar"] = "vector"
    gate_init: float = 0.0
    dropout: float = 0.0
    check_ids: bool = True

    def __post_init__(self):
        if not self.layers or len(set(self.layers)) != len(self.layers) or min(self.layers) < 0:
            raise ValueError(f"fusion.layers must be distinct layer indices >= 0, got {self.layers}")
        if self.entity_dim is not None and self.entity_dim < 1:
            raise ValueError(f"fusion.entity_dim must be >= 1, got {self.entity_dim}")
        if self.gate not in ("vector", "scalar"):
            raise ValueError(f"fusion.gate must be 'vector' or 'scalar', got {self.gate!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"fusion.dropout must be in [0, 1), got {self.dropout}")


class KnowledgeFusion(nn.Module):
    """One fusion site: ``h.view(-1, H)[pos] += g * dropout(W rows)``.

    Shapes: ``h (B, S, H)``, ``pos (L,)`` flat token positions ``b * S + s``, ``rows (L, d_e)`` their entity
    rows -> ``(B, S, H)``. Out of place (autograd needs the layer output intact).
    """

    def __init__(self, hidden_size: int, entity_dim: int, *, gate: str = "vector", gate_init: float = 0.0,
                 dropout: float = 0.0):
        super().__init__()
        self.proj = nn.Linear(entity_dim, hidden_size)
        # a scalar gate is shape (1,), not (): DeepSpeed broadcasts every parameter viewed as bytes, which a
        # 0-dim tensor cannot be
        self.gate = nn.Parameter(torch.full((hidden_size,) if gate == "vector" else (1,), float(gate_init)))
        self.dropout = nn.Dropout(dropout)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        gate = state_dict.get(prefix + "gate")
        if gate is not None and gate.dim() == 0:  # saved before the scalar gate became (1,)
            state_dict[prefix + "gate"] = gate.reshape(1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, h: Tensor, pos: Tensor, rows: Tensor) -> Tensor:
        # the KG table is float32; under bf16 training the projection's weights are bf16
        delta = self.gate * self.dropout(self.proj(rows.to(self.proj.weight.dtype)))
        flat = h.reshape(-1, h.shape[-1])
        return flat.index_add(0, pos, delta.to(h.dtype)).view_as(h)


class FusedEncoder(nn.Module):
    """A HF BERT-family encoder with :class:`KnowledgeFusion` after ``cfg.layers``.

    ``forward(input_ids, attention_mask, token_type_ids, token_entity)`` returns the encoder's own output
    (``last_hidden_state (B, S, H)``, ``pooler_output`` when it has a pooler). ``token_entity (B, S)``:
    entity id (row of the table) per token, -1 = unlinked; None = no fusion (the plain encoder).
    """

    def __init__(self, encoder: nn.Module, cfg: FusionConfig = FusionConfig(), table: KGTable | None = None):
        super().__init__()
        layers = getattr(getattr(encoder, "encoder", None), "layer", None)
        if not isinstance(layers, nn.ModuleList):
            raise ValueError(f"{type(encoder).__name__} is not a BERT-family encoder (no .encoder.layer)")
        if max(cfg.layers) >= len(layers):
            raise ValueError(f"fusion.layers {cfg.layers}: the encoder has {len(layers)} layers (0..{len(layers) - 1})")
        entity_dim = cfg.entity_dim if cfg.entity_dim is not None else (table.entity_dim if table is not None else None)
        if entity_dim is None:
            raise ValueError("fusion.entity_dim is unset and no entity table was given to infer it from")
        self.cfg, self.entity_dim = cfg, entity_dim
        self.encoder = encoder
        hidden = encoder.config.hidden_size
        self.fusions = nn.ModuleDict({str(i): KnowledgeFusion(hidden, entity_dim, gate=cfg.gate,
                                                              gate_init=cfg.gate_init, dropout=cfg.dropout)
                                      for i in cfg.layers})
        # plain attributes, not buffers: the snapshot is external and versioned (see the module docstring)
        self._table: KGTable | None = None
        self._max_id_seen = -1
        self._site: tuple[Tensor, Tensor] | None = None  # (pos, rows) of the forward in progress
        self._hooks = [layers[i].register_forward_hook(functools.partial(self._fuse_hook, str(i)))
                       for i in cfg.layers]
        if table is not None:
            self.set_entity_table(table)

    # ---- the snapshot -------------------------------------------------------------------------------
    @property
    def table(self) -> KGTable | None:
        return self._table

    @property
    def table_version(self) -> int | None:
        return None if self._table is None else self._table.version

    def set_entity_table(self, table: KGTable) -> None:
        """Use ``table`` from the next forward on. ValueError when its dim is not ``entity_dim`` or it has
        fewer rows than ids already fed (entity ids must stay valid across versions)."""
        if not isinstance(table, KGTable):
            raise TypeError(f"expected a KGTable, got {type(table).__name__}")
        if table.entity_dim != self.entity_dim:
            raise ValueError(f"entity table (version {table.version}) has dim {table.entity_dim}, but the fusion "
                             f"projects {self.entity_dim}-dim entity rows")
        if table.num_entities <= self._max_id_seen:
            raise ValueError(f"entity table (version {table.version}) has {table.num_entities} entities, but ids up "
                             f"to {self._max_id_seen} were already used; a newer snapshot must keep every entity id")
        device = self.fusions[str(self.cfg.layers[0])].proj.weight.device
        self._table = table.to(device)

    # ---- forward ------------------------------------------------------------------------------------
    def linked_positions(self, token_entity: Tensor) -> tuple[Tensor, Tensor]:
        """``token_entity (B, S)`` -> flat positions ``(L,)`` of linked tokens and their ids ``(L,)``, after
        checking the ids against the table (ValueError naming the id and the table size)."""
        flat = token_entity.reshape(-1)
        if self.cfg.check_ids and flat.numel():
            lo, hi = (int(v) for v in torch.aminmax(flat))
            if lo < -1:
                raise ValueError(f"token_entity holds {lo}; ids are >= 0, or -1 for unlinked tokens")
            n = self._table.num_entities if self._table is not None else 0
            if hi >= n:
                what = f"the entity table (version {self._table.version}) has {n} rows" if self._table is not None \
                    else "no entity table is set (set_entity_table)"
                raise ValueError(f"token_entity holds id {hi}, but {what}")
            self._max_id_seen = max(self._max_id_seen, hi)
        pos = (flat >= 0).nonzero().squeeze(1)
        return pos, flat[pos]

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, token_type_ids: Tensor | None = None,
                token_entity: Tensor | None = None, **kwargs):
        site = None
        if token_entity is not None:
            if token_entity.shape != input_ids.shape:
                raise ValueError(f"token_entity has shape {tuple(token_entity.shape)}, input_ids {tuple(input_ids.shape)}")
            pos, ids = self.linked_positions(token_entity)
            if pos.numel():
                if self._table is None:
                    raise ValueError("token_entity links tokens, but no entity table is set (set_entity_table)")
                if self._table.entity.device != input_ids.device:
                    self._table = self._table.to(input_ids.device)
                site = (pos, self._table.entity[ids])  # one gather, shared by every fusion layer
        self._site = site
        try:
            return self.encoder(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                                **kwargs)
        finally:
            self._site = None  # no tensors of this batch outlive its forward

    def _fuse_hook(self, key: str, module: nn.Module, args, output):
        if self._site is None:
            return None  # called outside our forward, or nothing linked: the plain layer
        pos, rows = self._site
        if isinstance(output, tuple):  # older/other BERT-family layers return (hidden, attentions, ...)
            return (self.fusions[key](output[0], pos, rows), *output[1:])
        return self.fusions[key](output, pos, rows)

    def fusion_parameters(self) -> list[nn.Parameter]:
        """W and g of every fusion site (e.g. for their own learning rate)."""
        return list(self.fusions.parameters())
