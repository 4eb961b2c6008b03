"""Relation extractor on the fused LM: ``p(r | h, t, passage)`` over the KG's R relations plus "no relation".

A :class:`RelationExtractor` reads one candidate (:class:`~bikd.lm.pairs.PairCandidate`) per row: the passage,
cut to a window that holds both mentions (:func:`encode_pairs`), goes through the encoder; the mention
representations ``m_h``, ``m_t`` (mean of their tokens' last hidden states, as in :mod:`bikd.lm.kd`) feed a
pair head on ``[m_h; m_t; m_h * m_t]``. **No entity markers**: the text is the original text, and which
mentions are h and t is said by where the head pools (the order by the concatenation), so the tokenizer
and vocabulary stay the encoder's own and an export loads with plain ``AutoModel``.

Two variants, chosen by ``ExtractorConfig.fusion``:

- fusion **off**: the plain encoder; the KG is only the source of the labels (and of soft targets with
  ``teacher_weight``). Its predictions are evidence from the text alone.
- fusion **on**: a :class:`~bikd.lm.fusion.FusedEncoder` adds the KG entity rows of h and t at their
  mentions; it needs a :class:`~bikd.lm.kg_teacher.KGTable` (``set_kg_table``) before any forward, and can
  relearn KG completion from the rows, so its gain over the text must be shown against fusion off.

Training and temperature calibration are in :mod:`bikd.lm.extractor_train`; saving and loading in
:mod:`bikd.lm.extractor_io` (both re-exported here).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from bikd.lm.fusion import FusedEncoder, FusionConfig
from bikd.lm.kd import mention_representations
from bikd.lm.kg_teacher import KGTable
from bikd.lm.pairs import PairCandidate, PairScorer

__all__ = ["ExtractorConfig", "RelationExtractor", "build_extractor", "encode_pairs", "predict", "make_scorer",
           "train_extractor", "calibrate_temperature", "save_extractor", "load_extractor", "snapshot_id"]


@dataclass(kw_only=True, frozen=True)
class ExtractorConfig:
    """``fusion``: KG entity rows fused at the h/t mentions (``fusion_layers``, None: the middle layer, gate
    starting at ``fusion_gate_init``). ``max_length``: tokens per row, specials included. ``batch_size``,
    ``epochs``, ``lr`` (encoder), ``head_lr`` (pair head and fusion sites; None: ``lr``), ``weight_decay``,
    ``grad_clip`` (max global norm, 0 = off), ``head_dropout``. ``teacher_weight``: weight of the KD term
    ``T^2 KL(softmax(KG scores / T) || softmax(student relation logits / T))`` (``T = teacher_temperature``,
    over the R relation columns, "no relation" excluded; 0 = off). ``max_train_pairs``: a seeded sample of
    the training candidates (None: all). ``no_relation_ratio``: "no relation" pairs drawn per epoch per
    pair with a relation (None: all). ``seed``: head initialisation, sampling, shuffling and dropout."""

    fusion: bool = False
    fusion_layers: tuple[int, ...] | None = None
    fusion_gate_init: float = 0.0
    max_length: int = 128
    batch_size: int = 16
    epochs: int = 1
    lr: float = 5e-5
    head_lr: float | None = 1e-3
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    head_dropout: float = 0.1
    teacher_weight: float = 0.0
    teacher_temperature: float = 2.0
    max_train_pairs: int | None = None
    no_relation_ratio: float | None = 1.0
    seed: int = 0

    def __post_init__(self):
        if self.max_length < 8:
            raise ValueError(f"extractor.max_length must be >= 8, got {self.max_length}")
        for key in ("batch_size", "epochs"):
            if getattr(self, key) < 1:
                raise ValueError(f"extractor.{key} must be >= 1, got {getattr(self, key)}")
        if not self.lr > 0 or (self.head_lr is not None and not self.head_lr > 0):
            raise ValueError(f"extractor.lr and extractor.head_lr must be > 0, got {self.lr} and {self.head_lr}")
        for key in ("weight_decay", "grad_clip", "teacher_weight"):
            if not getattr(self, key) >= 0:
                raise ValueError(f"extractor.{key} must be >= 0, got {getattr(self, key)}")
        if not 0.0 <= self.head_dropout < 1.0:
            raise ValueError(f"extractor.head_dropout must be in [0, 1), got {self.head_dropout}")
        if not self.teacher_temperature > 0:
            raise ValueError(f"extractor.teacher_temperature must be > 0, got {self.teacher_temperature}")
        if self.max_train_pairs is not None and self.max_train_pairs < 1:
            raise ValueError(f"extractor.max_train_pairs must be >= 1 or null, got {self.max_train_pairs}")
        if self.no_relation_ratio is not None and not self.no_relation_ratio >= 0:
            raise ValueError(f"extractor.no_relation_ratio must be >= 0 or null, got {self.no_relation_ratio}")
        if self.fusion_layers is not None and (not self.fusion_layers or min(self.fusion_layers) < 0):
            raise ValueError(f"extractor.fusion_layers must be layer indices >= 0 or null, got {self.fusion_layers}")


class RelationExtractor(nn.Module):
    """Encoder (plain, or fused when ``fusion``) + pair head -> ``(P, R + 1)`` logits, last column "no relation".
    The head: ``Linear(3H -> H)``, GELU, ``Linear(H -> R + 1)``, dropout ``head_dropout`` before each Linear.

    ``state_dict``: the encoder, the fusion sites (fusion on), the head and the ``temperature`` buffer (set
    by calibration, applied by :func:`predict`, not by ``forward``). The KG table is external, as for
    :class:`~bikd.lm.model.FusedLM`: a fusion-on model needs ``set_kg_table`` before a forward; a fusion-off
    model accepts a table and never reads it.
    """

    def __init__(self, encoder: nn.Module, num_relations: int, *, fusion: bool = False,
                 fusion_cfg: FusionConfig | None = None, table: KGTable | None = None, entity_dim: int | None = None,
                 head_dropout: float = 0.1, max_length: int = 128):
        super().__init__()
        positions = getattr(encoder.config, "max_position_embeddings", None)
        if positions is not None and max_length > positions:
            raise ValueError(f"extractor.max_length {max_length} exceeds the encoder's {positions} positions")
        self.max_length = int(max_length)  # of encode_pairs' rows, the default of predict
        if num_relations < 1:
            raise ValueError(f"num_relations must be >= 1, got {num_relations}")
        self.num_relations, self.fusion = int(num_relations), bool(fusion)
        if table is not None and table.num_relations != num_relations:
            raise ValueError(f"KG table (version {table.version}) has {table.num_relations} relations, the extractor "
                             f"predicts {num_relations}")
        hidden = encoder.config.hidden_size
        if self.fusion:
            num_layers = len(encoder.encoder.layer)
            fusion_cfg = fusion_cfg or FusionConfig(layers=(num_layers // 2,))
            if entity_dim is not None and fusion_cfg.entity_dim is None:
                fusion_cfg = dataclasses.replace(fusion_cfg, entity_dim=entity_dim)
            self.body: nn.Module = FusedEncoder(encoder, fusion_cfg, table)
        else:
            self.body = encoder
        self._table = table  # only read with fusion on; kept so that a fusion-off model reports what it was given
        self.head = nn.Sequential(nn.Dropout(head_dropout), nn.Linear(3 * hidden, hidden), nn.GELU(),
                                  nn.Dropout(head_dropout), nn.Linear(hidden, num_relations + 1))
        self.register_buffer("temperature", torch.ones(()))

    @property
    def encoder(self) -> nn.Module:
        """The HF encoder (what ``save_pretrained`` writes)."""
        return self.body.encoder if self.fusion else self.body

    @property
    def fusion_cfg(self) -> FusionConfig | None:
        return self.body.cfg if self.fusion else None

    @property
    def entity_dim(self) -> int | None:
        return self.body.entity_dim if self.fusion else None

    @property
    def table(self) -> KGTable | None:
        return self.body.table if self.fusion else self._table

    def set_kg_table(self, table: KGTable) -> None:
        """Use ``table`` (checked: relation count; with fusion, entity dim and count) from the next forward on."""
        if table.num_relations != self.num_relations:
            raise ValueError(f"KG table (version {table.version}) has {table.num_relations} relations, the extractor "
                             f"predicts {self.num_relations}")
        if self.fusion:
            self.body.set_entity_table(table)
        self._table = table

    def head_parameters(self) -> list[nn.Parameter]:
        """The pair head and the fusion sites (trained from scratch, with their own learning rate)."""
        return [*self.head.parameters(), *(self.body.fusion_parameters() if self.fusion else [])]

    def forward(self, batch: Mapping[str, Tensor]) -> Tensor:
        """``logits (P, R + 1) = head([m_h; m_t; m_h * m_t])`` with ``m_h = mention_representations(hidden,
        mention_spans[0::2])``, ``m_t`` likewise from ``mention_spans[1::2]``; ``hidden (B, S, H)`` is the
        encoder's last hidden state of ``input_ids (B, S)``, fused at ``token_entity (B, S)`` when ``fusion``.
        ``mention_spans (2P, 4)``: rows ``(b, start, end_exclusive, entity)``, h then t of each pair.
        :func:`encode_pairs` gives one row per pair (B = P); without fusion, :func:`batch_logits` lets the
        pairs of one passage share its row (``share_rows``): the text is the same, so is the encoding."""
        kwargs = dict(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                      token_type_ids=batch.get("token_type_ids"))
        if self.fusion:
            if self.body.table is None:
                raise ValueError("this extractor fuses KG entity rows (fusion on): set a KGTable with set_kg_table "
                                 "before training or predicting")
            hidden = self.body(**kwargs, token_entity=batch["token_entity"]).last_hidden_state
        else:
            hidden = self.body(**kwargs).last_hidden_state
        spans = batch["mention_spans"]
        if spans.ndim != 2 or spans.shape[1] != 4 or len(spans) % 2:
            raise ValueError(f"mention_spans must be (2P, 4), h then t of each pair, got {tuple(spans.shape)}")
        mentions = mention_representations(hidden, spans)
        m_h, m_t = mentions[0::2], mentions[1::2]
        return self.head(torch.cat([m_h, m_t, m_h * m_t], dim=-1))


def build_extractor(cfg: ExtractorConfig, num_relations: int, *, encoder_cfg=None, table: KGTable | None = None):
    """``(RelationExtractor, tokenizer)`` on the encoder of ``encoder_cfg`` (an :class:`~bikd.lm.encoder.EncoderConfig`;
    None: MiniLM; ``name_or_path="tiny"`` for tests). The head is initialised from ``cfg.seed``. With
    ``cfg.fusion``, ``table`` (or a later ``set_kg_table``) gives the entity rows; the entity dim is taken from it."""
    from bikd.lm.encoder import EncoderConfig, load_encoder

    encoder, tokenizer = load_encoder(encoder_cfg or EncoderConfig())
    if cfg.fusion and table is None:
        raise ValueError("extractor.fusion is on: pass the KG table (its entity dim sizes the fusion sites)")
    fusion_cfg = None
    if cfg.fusion:
        layers = cfg.fusion_layers or (len(encoder.encoder.layer) // 2,)
        fusion_cfg = FusionConfig(layers=tuple(layers), gate_init=cfg.fusion_gate_init)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = RelationExtractor(encoder, num_relations, fusion=cfg.fusion, fusion_cfg=fusion_cfg, table=table,
                                  head_dropout=cfg.head_dropout, max_length=cfg.max_length)
    return model.eval(), tokenizer


# ---- encoding -----------------------------------------------------------------------------------------

def _token_span(offsets: list[tuple[int, int]], span: tuple[int, int], where: str) -> tuple[int, int]:
    s, e = span
    hit = [k for k, (a, b) in enumerate(offsets) if b > a and a < e and b > s]
    if not hit:
        raise ValueError(f"{where}: the mention {span} covers no token")
    return hit[0], hit[-1] + 1


def _window(n: int, spans: list[tuple[int, int]], width: int) -> list[int]:
    """Token indices (sorted) of at most ``width`` of ``n`` tokens that keep every span: one window around
    both when they fit in it, else two windows of ``width // 2`` around each."""
    if n <= width:
        return list(range(n))
    lo, hi = min(s for s, _ in spans), max(e for _, e in spans)
    if hi - lo <= width:
        start = min(max(0, (lo + hi - width) // 2), n - width)
        return list(range(start, start + width))
    keep: set[int] = set()
    for (s, e), w in zip(spans, (width // 2, width - width // 2)):
        e = min(e, s + w)  # a mention longer than its window keeps its first tokens
        start = min(max(0, (s + e - w) // 2), n - w)
        keep.update(range(start, start + w))
    return sorted(keep)


def encode_pairs(tokenizer, candidates: Sequence[PairCandidate], max_length: int, *,
                 share_rows: bool = False) -> dict[str, Tensor]:
    """Candidates -> a batch dict: ``input_ids``, ``attention_mask``, ``token_type_ids``, ``token_entity``
    ``(B, S)`` (S = the longest row, <= ``max_length``; h's tokens hold h's id, t's t's, others -1) and
    ``mention_spans (2P, 4)`` (h then t per pair, token spans in its row). A passage longer than
    ``max_length - 2`` tokens is cut to a window around both mentions (two windows joined when they are
    further apart than that), so both always stay inside. Each distinct text is tokenized once.

    One row per pair (B = P) by default. ``share_rows``: pairs of a text that fits whole share one row with
    no linked tokens (``token_entity`` all -1), for a model without fusion, whose encoding of a text does
    not depend on the pair."""
    if max_length < 8:
        raise ValueError(f"max_length must be >= 8, got {max_length}")
    width = max_length - 2
    cache: dict[str, tuple[list[int], list[tuple[int, int]]]] = {}
    shared: dict[str, int] = {}
    rows: list[list[int]] = []
    ents: list[list[int]] = []
    spans: list[tuple[int, int, int, int]] = []
    for c in candidates:
        if c.text not in cache:
            enc = tokenizer(c.text, add_special_tokens=False, return_offsets_mapping=True, truncation=False)
            cache[c.text] = (enc["input_ids"], [tuple(o) for o in enc["offset_mapping"]])
        ids, offsets = cache[c.text]
        token_spans = [_token_span(offsets, sp, c.doc_id) for sp in (c.h_span, c.t_span)]
        if share_rows and len(ids) <= width:
            if c.text not in shared:
                shared[c.text] = len(rows)
                rows.append([tokenizer.cls_token_id, *ids, tokenizer.sep_token_id])
                ents.append([-1] * (len(ids) + 2))
            spans.extend((shared[c.text], s + 1, e + 1, ent) for (s, e), ent in zip(token_spans, (c.h, c.t)))
            continue
        keep = _window(len(ids), token_spans, width)
        where = {k: i + 1 for i, k in enumerate(keep)}  # +1: [CLS]
        row_ents = [-1] * (len(keep) + 2)
        for (s, e), ent in zip(token_spans, (c.h, c.t)):
            inside = [where[k] for k in range(s, e) if k in where]
            spans.append((len(rows), inside[0], inside[-1] + 1, ent))
            for k in inside:
                if row_ents[k] < 0:  # overlapping h and t (not a real pair) keep h's id
                    row_ents[k] = ent
        rows.append([tokenizer.cls_token_id, *(ids[k] for k in keep), tokenizer.sep_token_id])
        ents.append(row_ents)
    seq = max((len(r) for r in rows), default=2)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([r + [pad] * (seq - len(r)) for r in rows], dtype=torch.long).reshape(len(rows), seq)
    mask = torch.tensor([[1] * len(r) + [0] * (seq - len(r)) for r in rows], dtype=torch.long).reshape(len(rows), seq)
    token_entity = torch.tensor([e + [-1] * (seq - len(e)) for e in ents], dtype=torch.long).reshape(len(rows), seq)
    return {"input_ids": input_ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(input_ids),
            "token_entity": token_entity, "mention_spans": torch.tensor(spans, dtype=torch.long).reshape(-1, 4)}


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _chunks(candidates: Sequence[PairCandidate], batch_size: int, by_text: bool) -> list[list[int]]:
    """Candidate indices in batches, shortest texts first (little padding): ``batch_size`` pairs, or with
    ``by_text`` ``batch_size`` distinct texts (rows) and all their pairs."""
    order = sorted(range(len(candidates)), key=lambda i: (len(candidates[i].text), candidates[i].text))
    if not by_text:
        return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    out: list[list[int]] = []
    texts: set[str] = set()
    for i in order:
        text = candidates[i].text
        if not out or (text not in texts and len(texts) == batch_size):
            out.append([])
            texts = set()
        texts.add(text)
        out[-1].append(i)
    return out


def batch_logits(model: RelationExtractor, tokenizer, candidates: Sequence[PairCandidate], batch_size: int,
                 max_length: int = 128) -> Tensor:
    """Raw logits ``(n, R + 1)`` (float32, CPU, no temperature) in candidate order, in eval mode and without
    gradients. Rows are batched by text length (little padding); a model without fusion encodes each
    passage that fits in ``max_length`` once for all its pairs (``batch_size`` passages per batch), one
    with fusion each pair (its h and t rows are fused), ``batch_size`` pairs per batch."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    out = torch.zeros(len(candidates), model.num_relations + 1)
    was_training, device = model.training, _device(model)
    model.eval()
    try:
        with torch.inference_mode():
            for idx in _chunks(candidates, batch_size, by_text=not model.fusion):
                batch = encode_pairs(tokenizer, [candidates[k] for k in idx], max_length, share_rows=not model.fusion)
                out[idx] = model({k: v.to(device) for k, v in batch.items()}).float().cpu()
    finally:
        model.train(was_training)
    return out


def predict(model: RelationExtractor, tokenizer, candidates: Sequence[PairCandidate], batch_size: int = 64, *,
            max_length: int | None = None) -> np.ndarray:
    """``p(r | h, t, passage) = softmax(logits / temperature)`` -> ``(n, R + 1)`` float32 rows summing to 1,
    the last column "no relation". ``batch_size``: passages per batch without fusion, pairs with it
    (:func:`batch_logits`). ``max_length``: None: the model's own (``ExtractorConfig.max_length``)."""
    length = max_length or model.max_length
    logits = batch_logits(model, tokenizer, candidates, batch_size, length)
    probs = torch.softmax(logits / model.temperature.float().cpu(), dim=-1)
    return probs.numpy().astype(np.float32, copy=False)


def make_scorer(model: RelationExtractor, tokenizer, batch_size: int = 64) -> PairScorer:
    """:func:`predict` with the model and tokenizer bound: a :data:`~bikd.lm.pairs.PairScorer`."""
    return functools.partial(predict, model, tokenizer, batch_size=batch_size)


# ---- re-exports (lazy: those modules import this one) ----------------------------------------------

def train_extractor(model, tokenizer, candidates, labels, cfg, *, teacher=None) -> dict:
    """See :func:`bikd.lm.extractor_train.train_extractor`."""
    from bikd.lm.extractor_train import train_extractor as fn
    return fn(model, tokenizer, candidates, labels, cfg, teacher=teacher)


def calibrate_temperature(model, tokenizer, candidates, labels, **kwargs) -> float:
    """See :func:`bikd.lm.extractor_train.calibrate_temperature`."""
    from bikd.lm.extractor_train import calibrate_temperature as fn
    return fn(model, tokenizer, candidates, labels, **kwargs)


def save_extractor(model, tokenizer, target, **kwargs) -> dict:
    """See :func:`bikd.lm.extractor_io.save_extractor`."""
    from bikd.lm.extractor_io import save_extractor as fn
    return fn(model, tokenizer, target, **kwargs)


def load_extractor(source, **kwargs):
    """See :func:`bikd.lm.extractor_io.load_extractor`."""
    from bikd.lm.extractor_io import load_extractor as fn
    return fn(source, **kwargs)


def snapshot_id(model: RelationExtractor) -> str:
    """See :func:`bikd.lm.extractor_io.snapshot_id`."""
    from bikd.lm.extractor_io import snapshot_id as fn
    return fn(model)
