"""Triple classification over verbalised triples (KG-BERT style): is ``(h, r, t)`` true?

A triple becomes ``[CLS] name(h) [SEP] text(r) [SEP] name(t) [SEP]`` with token types 0 / 1 / 0 (KG-BERT's
three-segment layout; its special tokens are the tokenizer's own [CLS]/[SEP] ids, not the text "[SEP]").
Names come from :class:`bikd.kg.text.KGText`; a KG without text files (UMLS, Nations, Kinships from
PyKEEN) gets them from its labels (``amino_acid_peptide_or_protein`` -> ``amino acid peptide or
protein``). Negatives corrupt the head or the tail with an entity such that the result is no known true
triple of any split. It needs no corpus, so the embedded default (UMLS) runs it.
"""

from __future__ import annotations

import dataclasses
import random
import re
from dataclasses import dataclass
from typing import Literal, Sequence

import torch

from bikd.kg.text import KGText
from bikd.kg.triples import KGSplits
from bikd.lm.linking import LinkFn, align_mentions, fill_mentions, spans_tensor
from bikd.lm.squad import TokenFeatures


@dataclass(kw_only=True, frozen=True)
class TripleClsConfig:
    #: corrupted triples per positive
    num_negatives: int = 1
    #: tokens per sequence, [CLS] and the three [SEP] included; longer triples lose tokens from their
    #: longest part first (KG-BERT's _truncate_seq_triple)
    max_length: int = 64
    seed: int = 0
    #: which side a negative replaces; "both" picks head or tail with probability 1/2 each
    corrupt: Literal["head", "tail", "both"] = "both"
    #: tag the head's and tail's name tokens with their own entity ids in ``token_entity``
    mark_entities: bool = True
    #: random draws per negative before drawing among the remaining entities explicitly (dense KGs)
    max_tries: int = 50

    def __post_init__(self):
        if self.num_negatives < 0:
            raise ValueError(f"num_negatives must be >= 0, got {self.num_negatives}")
        if self.max_length < 7:
            raise ValueError(f"max_length must be >= 7 ([CLS] + 3 parts + 3 [SEP]), got {self.max_length}")
        if self.corrupt not in ("head", "tail", "both"):
            raise ValueError(f"corrupt must be 'head', 'tail' or 'both', got {self.corrupt!r}")
        if self.max_tries < 1:
            raise ValueError(f"max_tries must be >= 1, got {self.max_tries}")


def label_to_text(label: str) -> str:
    """A KG label as words: ``amino_acid_peptide_or_protein`` -> ``amino acid peptide or protein``,
    ``/music/artist/origin`` -> ``music artist origin``."""
    return " ".join(re.sub(r"[_/.]+", " ", label).split()) or label


@dataclass(frozen=True)
class TripleVerbaliser:
    """Entity names and relation texts indexed by the KG's entity / relation ids."""

    entity_names: tuple[str, ...]
    relation_texts: tuple[str, ...]

    @classmethod
    def from_kg(cls, kg: KGSplits, text: KGText | None = None) -> "TripleVerbaliser":
        """Names from ``text`` (text file name, then Wikidata label) where it knows the entity, else from
        the label; relation texts from ``text.relations``, else from the label."""
        ents, rels = text.entities if text else {}, text.relations if text else {}
        wiki = text.wikidata if text else {}
        names = tuple(text.name(e) if (e in ents or e in wiki) else label_to_text(e) for e in kg.entities.labels)
        texts = tuple(rels.get(r) or label_to_text(r) for r in kg.relations.labels)
        return cls(names, texts)

    def verbalise(self, h: int, r: int, t: int) -> str:
        """The triple as one readable string (for logs and mined-triple evidence)."""
        return f"{self.entity_names[h]} [SEP] {self.relation_texts[r]} [SEP] {self.entity_names[t]}"


def _replace(h: int, r: int, t: int, side: str, e: int) -> tuple[int, int, int]:
    return (e, r, t) if side == "head" else (h, r, e)


def corrupt(
    positives: torch.Tensor, known: torch.Tensor, num_entities: int, cfg: TripleClsConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Positives [n, 3] -> (triples [n * (1 + k), 3], labels [n * (1 + k)]) with k = cfg.num_negatives:
    each positive (label 1) followed by its k negatives (label 0). A negative replaces the head or tail
    with a uniformly drawn entity (among the ones left if rejection keeps failing; the other side if
    none is left and cfg.corrupt is "both"), rejecting the original, any triple of ``known`` [m, 3] (pass all
    splits) and repeats among the same positive's negatives. Deterministic in cfg.seed."""
    if positives.ndim != 2 or positives.shape[1] != 3:
        raise ValueError(f"positives must be [n, 3], got {tuple(positives.shape)}")
    num_rel = int(torch.cat([positives[:, 1], known[:, 1], torch.zeros(1, dtype=torch.long)]).max()) + 1

    def key(h: int, r: int, t: int) -> int:
        return (h * num_rel + r) * num_entities + t

    true = {key(h, r, t) for h, r, t in known.tolist()} | {key(h, r, t) for h, r, t in positives.tolist()}
    rng = random.Random(cfg.seed)
    rows, labels = [], []
    for h, r, t in positives.tolist():
        rows.append((h, r, t))
        labels.append(1)
        taken: set[int] = set()
        for _ in range(cfg.num_negatives):
            side = cfg.corrupt if cfg.corrupt != "both" else ("head" if rng.random() < 0.5 else "tail")
            other = "tail" if side == "head" else "head"
            sides = (side,) if cfg.corrupt != "both" else (side, other)
            cand = None
            for _ in range(cfg.max_tries):  # cheap path: rejection sampling
                c = _replace(h, r, t, side, rng.randrange(num_entities))
                if key(*c) not in true and key(*c) not in taken:
                    cand = c
                    break
            for sd in sides if cand is None else ():  # dense KGs (UMLS): draw among what is left
                left = [_replace(h, r, t, sd, e) for e in range(num_entities)]
                left = [c for c in left if key(*c) not in true and key(*c) not in taken]
                if left:
                    cand = rng.choice(left)
                    break
            if cand is None:
                raise ValueError(f"({h}, {r}, {t}) has no corruption of its {' or '.join(sides)} that is not a true triple")
            k = key(*cand)
            taken.add(k)
            rows.append(cand)
            labels.append(0)
    return torch.tensor(rows, dtype=torch.long).reshape(-1, 3), torch.tensor(labels, dtype=torch.long)


def _fit(lengths: list[int], budget: int) -> list[int]:
    """KG-BERT's truncation: drop one token at a time from the currently longest part."""
    lengths = list(lengths)
    while sum(lengths) > budget:
        lengths[lengths.index(max(lengths))] -= 1
    return lengths


def build_features(
    triples: torch.Tensor,
    labels: torch.Tensor,
    verbaliser: TripleVerbaliser,
    tokenizer,
    cfg: TripleClsConfig,
    link: LinkFn | None = None,
) -> TokenFeatures:
    """Encode triples [N, 3] with labels [N] as ``[CLS] h [SEP] r [SEP] t [SEP]`` (types 0/1/0), padded to
    the longest row. ``tensors``: input_ids, attention_mask, token_type_ids, token_entity [N, S], labels
    [N], triples [N, 3]. ``token_entity`` holds the head/tail ids on their name tokens (cfg.mark_entities),
    then ``link``'s mentions in each part's text on tokens not yet tagged. Each distinct name and
    relation text is tokenised (and linked) once."""
    if triples.ndim != 2 or triples.shape[1] != 3 or labels.shape != (triples.shape[0],):
        raise ValueError(f"need triples [N, 3] and labels [N], got {tuple(triples.shape)} and {tuple(labels.shape)}")
    if tokenizer.cls_token_id is None or tokenizer.sep_token_id is None or not getattr(tokenizer, "is_fast", False):
        raise ValueError("need a fast tokenizer with [CLS] and [SEP] tokens (BERT-style)")
    ents = sorted(set(triples[:, 0].tolist()) | set(triples[:, 2].tolist()))
    rels = sorted(set(triples[:, 1].tolist()))
    texts = {("e", e): verbaliser.entity_names[e] for e in ents} | {("r", r): verbaliser.relation_texts[r] for r in rels}
    keys = list(texts)
    enc = tokenizer([texts[k] for k in keys], add_special_tokens=False, return_offsets_mapping=True)
    pieces = {k: (ids, off) for k, ids, off in zip(keys, enc["input_ids"], enc["offset_mapping"])}
    linked = {k: list(link(texts[k])) for k in keys} if link is not None else {}
    cls_id, sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id
    rows, types, token_entity, spans = [], [], [], []
    for h, r, t in triples.tolist():
        parts = [("e", h), ("r", r), ("e", t)]
        lens = _fit([len(pieces[p][0]) for p in parts], cfg.max_length - 4)
        ids, typ, starts = [cls_id], [0], []
        for (p, n, seg) in zip(parts, lens, (0, 1, 0)):
            starts.append(len(ids))
            ids += pieces[p][0][:n] + [sep_id]
            typ += [seg] * (n + 1)
        row_ent = [-1] * len(ids)
        found = []
        if cfg.mark_entities:
            found += [(starts[0], starts[0] + lens[0], h), (starts[2], starts[2] + lens[2], t)]
        if link is not None:
            for p, n, s0 in zip(parts, lens, starts):
                found += [(s + s0, e + s0, ent) for s, e, ent in align_mentions(linked[p], pieces[p][1], range(n))]
        spans.append(fill_mentions(row_ent, [sp for sp in found if sp[1] > sp[0]]))
        rows.append(ids)
        types.append(typ)
        token_entity.append(row_ent)
    width = max(map(len, rows), default=0)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def padded(seqs: Sequence[list[int]], value: int) -> torch.Tensor:
        return torch.tensor([s + [value] * (width - len(s)) for s in seqs], dtype=torch.long).reshape(len(seqs), width)

    tensors = {
        "input_ids": padded(rows, pad),
        "attention_mask": padded([[1] * len(s) for s in rows], 0),
        "token_type_ids": padded(types, 0),
        "token_entity": padded(token_entity, -1),
        "labels": labels.long().clone(),
        "triples": triples.long().clone(),
    }
    return TokenFeatures(tensors=tensors, mention_spans=spans_tensor(spans))


def triple_cls_features(
    kg: KGSplits, split: str, verbaliser: TripleVerbaliser, tokenizer, cfg: TripleClsConfig, link: LinkFn | None = None
) -> TokenFeatures:
    """One split's positives plus negatives filtered against all splits, encoded. The seed is offset per
    split so that train, valid and test draw different negatives."""
    offset = {"train": 0, "valid": 1, "test": 2}[split]
    split_cfg = dataclasses.replace(cfg, seed=cfg.seed * 3 + offset)
    triples, labels = corrupt(kg.split(split), kg.all_triples(), kg.num_entities, split_cfg)
    return build_features(triples, labels, verbaliser, tokenizer, cfg, link)


def accuracy(predictions: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction correct; ``predictions`` are class ids [N] or logits [N, C] (argmax)."""
    if predictions.ndim == 2:
        predictions = predictions.argmax(dim=1)
    elif predictions.is_floating_point():
        raise ValueError("predictions must be class ids [N] or logits [N, C]; got a float vector [N]")
    if predictions.shape != labels.shape or labels.numel() == 0:
        raise ValueError(f"predictions {tuple(predictions.shape)} and labels {tuple(labels.shape)} must be [N] with N > 0")
    return float((predictions == labels).float().mean())
