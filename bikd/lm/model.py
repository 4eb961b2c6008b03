"""The knowledge-fused LM with its task head and the KD heads: one ``forward(batch)`` -> losses and logits.

Batch contract (all LongTensors; the linker/data side builds it):

- ``input_ids``, ``attention_mask``, ``token_type_ids`` ``(B, S)``;
- ``token_entity (B, S)``: entity id (row of the KG entity table) or -1 for unlinked tokens;
- ``mention_spans (M, 4)``: rows ``(batch_index, token_start, token_end_exclusive, entity_id)``;
- labels: ``start_positions``/``end_positions (B,)`` (task ``"qa"``) or ``labels (B,)`` (``"triple_cls"``);
  absent labels give ``task_loss = 0`` (inference).

Total loss: ``task_loss + kd.entity_weight * kd_entity_loss + kd.relation_weight * kd_relation_loss``, each
returned separately (0-dim tensors, 0 when not applicable) so that they are logged separately.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bikd.lm.encoder import EncoderConfig, load_encoder
from bikd.lm.fusion import FusedEncoder, FusionConfig
from bikd.lm.kd import (KDConfig, check_spans, entity_alignment_loss, mention_pairs, mention_representations,
                        relation_distillation_loss, sample_candidates, span_tokens)
from bikd.lm.kg_teacher import KGTable

__all__ = ["LMConfig", "FusedLM", "build_fused_lm"]


@dataclass(kw_only=True, frozen=True)
class LMConfig:
    """``task``: ``"qa"`` (extractive, start/end logits) or ``"triple_cls"`` (sequence classification into
    ``num_labels`` classes from the pooled [CLS]). ``num_relations``: outputs of the KD pair classifier
    (None: from the KG table given at construction)."""

    task: Literal["qa", "triple_cls"] = "qa"
    num_labels: int = 2
    classifier_dropout: float = 0.1
    num_relations: int | None = None
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    kd: KDConfig = field(default_factory=KDConfig)

    def __post_init__(self):
        if self.task not in ("qa", "triple_cls"):
            raise ValueError(f"lm.task must be 'qa' or 'triple_cls', got {self.task!r}")
        if self.num_labels < 2:
            raise ValueError(f"lm.num_labels must be >= 2, got {self.num_labels}")
        if not 0.0 <= self.classifier_dropout < 1.0:
            raise ValueError(f"lm.classifier_dropout must be in [0, 1), got {self.classifier_dropout}")
        if self.num_relations is not None and self.num_relations < 1:
            raise ValueError(f"lm.num_relations must be >= 1, got {self.num_relations}")


class FusedLM(nn.Module):
    """``FusedEncoder`` + task head + KD heads (``entity_proj``: Linear(H -> d_e) for entity alignment,
    ``pair_classifier``: Linear(3H -> R) on ``[m_h; m_t; m_h * m_t]`` for relation distillation).

    The KG table is external (see :mod:`bikd.lm.fusion`): ``state_dict`` holds the encoder, W/g of the
    fusion sites and the heads; ``set_kg_table`` swaps the snapshot between steps.

    Every training step's autograd graph holds the same parameters in the same order on every rank. A batch
    skips the fusion sites when it links no token, ``entity_proj`` when it has no mention and
    ``pair_classifier`` when it has no mention pair; under data parallelism a rank whose batch skips one
    would then reduce a different set of gradients than the others (ZeRO packs gradients into buckets in
    the order they become ready: a gloo "size mismatch" crash, or silently mixed-up sums). So with grad
    enabled, ``forward`` first runs these modules on empty inputs with weight 0 (the *anchor*, which adds
    exactly 0.0 to ``loss``): they always get a gradient, and since these ops are the oldest of the graph,
    autograd (newest node first) finishes their gradients last, in the same order on every rank, whatever
    the batch used. Under ZeRO-3 :meth:`conditional_parameters` must stay whole on every rank (a parameter
    all-gather issued by one rank only would deadlock): see bikd.ray.lm_train.
    """

    def __init__(self, cfg: LMConfig, encoder: nn.Module, table: KGTable | None = None):
        super().__init__()
        self.cfg = cfg
        self.fused = FusedEncoder(encoder, cfg.fusion, table)
        hidden = encoder.config.hidden_size
        num_relations = cfg.num_relations if cfg.num_relations is not None else (
            table.num_relations if table is not None else None)
        if num_relations is None:
            raise ValueError("lm.num_relations is unset and no KG table was given to infer it from")
        self.num_relations = num_relations
        if table is not None:
            self._check_relations(table)
        self.dropout = nn.Dropout(cfg.classifier_dropout)
        self.head = nn.Linear(hidden, 2 if cfg.task == "qa" else cfg.num_labels)
        self.entity_proj = nn.Linear(hidden, self.fused.entity_dim)
        self.pair_classifier = nn.Linear(3 * hidden, num_relations)
        # candidates, pairs and alignment masks are drawn from this (CPU) generator, for reproducible runs
        self.generator = torch.Generator().manual_seed(cfg.kd.seed)

    # ---- the KG snapshot ----------------------------------------------------------------------------
    @property
    def table(self) -> KGTable | None:
        return self.fused.table

    @property
    def table_version(self) -> int | None:
        return self.fused.table_version

    def _check_relations(self, table: KGTable) -> None:
        if table.num_relations != self.num_relations:
            raise ValueError(f"KG table (version {table.version}) has {table.num_relations} relations, but the "
                             f"pair classifier predicts {self.num_relations}")

    def set_kg_table(self, table: KGTable) -> None:
        """Swap in a newer snapshot (checked: entity dim, entity count, relation count)."""
        self._check_relations(table)
        self.fused.set_entity_table(table)

    # ---- one graph on every rank (see the class docstring) -------------------------------------------
    def conditional_parameters(self) -> list[nn.Parameter]:
        """The parameters of the modules a batch may skip: ``entity_proj``, ``pair_classifier``, the fusion sites."""
        modules = [self.entity_proj, self.pair_classifier, *self.fused.fusions.values()]
        return [p for m in modules for p in m.parameters()]

    def _anchor(self) -> Tensor:
        """0.0, computed from every conditional module run on empty inputs."""
        p = self.entity_proj.weight  # under ZeRO-3 possibly a partition, but device and dtype hold
        H, d_e = self.entity_proj.in_features, self.fused.entity_dim
        empty = lambda *shape: torch.zeros(*shape, device=p.device, dtype=p.dtype)  # noqa: E731
        terms = [self.entity_proj(empty(0, H)).sum(), self.pair_classifier(empty(0, 3 * H)).sum()]
        for site in self.fused.fusions.values():
            terms.append(site(empty(1, 1, H), torch.zeros(0, dtype=torch.long, device=p.device), empty(0, d_e)).sum())
        return torch.stack(terms).sum() * 0.0

    # ---- forward ------------------------------------------------------------------------------------
    def _mask_alignments(self, token_entity: Tensor, spans: Tensor) -> Tensor:
        """ERNIE's dEA masking: unlink the tokens of a random subset of mentions (fusion off there)."""
        drop = torch.rand(len(spans), generator=self.generator) < self.cfg.kd.alignment_mask_prob
        if not bool(drop.any()):
            return token_entity
        dropped = spans[drop.to(spans.device)]
        _, tokens = span_tokens(dropped, token_entity.shape[1])
        return token_entity.reshape(-1).index_fill(0, tokens, -1).view_as(token_entity)

    def forward(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        # before the real forward, so that its ops are the oldest of the graph; no backward, nothing to line up
        anchor = self._anchor() if torch.is_grad_enabled() else None
        input_ids = batch["input_ids"]
        B, S = input_ids.shape
        token_entity = batch.get("token_entity")
        spans = batch.get("mention_spans")
        if spans is not None:
            check_spans(spans, B, S)
        kd = self.cfg.kd
        has_mentions = spans is not None and len(spans) > 0
        # masking only serves entity alignment (it keeps the answer from being fused into the mention)
        if (self.training and has_mentions and token_entity is not None and kd.entity_weight > 0
                and kd.alignment_mask_prob > 0):
            token_entity = self._mask_alignments(token_entity, spans)
        out = self.fused(input_ids, attention_mask=batch.get("attention_mask"),
                         token_type_ids=batch.get("token_type_ids"), token_entity=token_entity)
        hidden = out.last_hidden_state
        zero = hidden.new_zeros(())
        result: dict[str, Tensor] = {}

        task_loss = zero
        if self.cfg.task == "qa":
            start_logits, end_logits = self.head(hidden).unbind(-1)  # (B, S) each
            result.update(start_logits=start_logits, end_logits=end_logits)
            if batch.get("start_positions") is not None and batch.get("end_positions") is not None:
                # as BertForQuestionAnswering: positions outside the sequence are ignored
                ignored = start_logits.shape[1]
                start = batch["start_positions"].clamp(0, ignored)
                end = batch["end_positions"].clamp(0, ignored)
                task_loss = (F.cross_entropy(start_logits, start, ignore_index=ignored)
                             + F.cross_entropy(end_logits, end, ignore_index=ignored)) / 2
        else:
            pooled = out.pooler_output if getattr(out, "pooler_output", None) is not None else hidden[:, 0]
            logits = self.head(self.dropout(pooled))
            result["logits"] = logits
            if batch.get("labels") is not None:
                task_loss = F.cross_entropy(logits, batch["labels"])

        ent_loss = rel_loss = zero
        if has_mentions and (kd.entity_weight > 0 or kd.relation_weight > 0):
            table = self.fused.table
            if table is None:
                raise ValueError("the batch has mention_spans but no KG table is set (set_kg_table)")
            ents = spans[:, 3]
            table.check_ids(ents, "mention_spans entity ids")
            mentions = mention_representations(hidden, spans)
            if kd.entity_weight > 0:
                candidates, _ = sample_candidates(ents.cpu(), table.num_entities, kd.num_sampled_candidates,
                                                  self.generator)
                ent_loss = entity_alignment_loss(mentions, ents.to(hidden.device), candidates.to(hidden.device),
                                                 table.entity, self.entity_proj)
            if kd.relation_weight > 0:
                pairs = mention_pairs(spans, kd.max_pairs_per_sequence, self.generator).to(hidden.device)
                if len(pairs):
                    m_h, m_t = mentions[pairs[:, 0]], mentions[pairs[:, 1]]
                    student = self.pair_classifier(torch.cat([m_h, m_t, m_h * m_t], dim=-1))
                    ents_dev = ents.to(hidden.device)
                    teacher = table.relation_scores(ents_dev[pairs[:, 0]], ents_dev[pairs[:, 1]]).to(hidden.device)
                    rel_loss = relation_distillation_loss(student, teacher, kd.temperature)
                    result["pair_logits"] = student
        loss = task_loss + kd.entity_weight * ent_loss + kd.relation_weight * rel_loss
        result.update(
            loss=loss if anchor is None else loss + anchor,
            task_loss=task_loss, kd_entity_loss=ent_loss, kd_relation_loss=rel_loss,
            last_hidden_state=hidden,
        )
        return result


def build_fused_lm(cfg: LMConfig, table: KGTable | None = None):
    """``(FusedLM, tokenizer)`` with the encoder of ``cfg.encoder`` (offline; MiniLM by default)."""
    encoder, tokenizer = load_encoder(cfg.encoder)
    return FusedLM(cfg, encoder, table), tokenizer
