"""Knowledge probe on LAMA T-REx: does the LM, reading a sentence with the object masked, point at the
right KG entity?

Facts are kept when both their subject and object Wikidata ids map to entities of the KG (FB15k-237
through ``entity2wikidata.json``: 853 of the 22,881 facts over 28 relations). The candidates of a
relation are the objects of its kept facts -- LAMA restricts answers to a fixed vocabulary, and the
relation's own object set is the closest KG analogue (a place-of-birth question is answered among
places, not among all 14,541 entities). Precision@1 counts a fact when its object scores strictly
highest among the candidates (a tie is a miss, so a constant scorer gets 0, not luck); relations with
fewer than ``min_candidates`` candidates are trivial and left out of the averages.

Our encoder is not a masked LM, so the default scorer (:class:`MaskedEntityScorer`) encodes the first
evidence sentence with the object replaced by ``[MASK]`` and compares the vector the model's
entity-alignment projection gives at the mask (a callable ``mention_vector(batch) -> [B, d_e]``) with
the candidates' KG embeddings. Any ``score(facts, candidates) -> [F, C]`` callable can replace it.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Literal, Mapping, Sequence

import torch

from bikd.kg.text import KGText
from bikd.kg.triples import IdMap, KGDataError
from bikd.lm.linking import LinkFn, align_mentions, fill_mentions, spans_tensor
from bikd.storage import Storage, join_url

MASK = "[MASK]"


@dataclass(frozen=True)
class ProbeFact:
    """One LAMA fact over KG entity ids; ``sentences[i]`` holds the object as ``[MASK]`` and
    ``subject_surfaces[i]`` the subject's words in it."""

    relation: str
    subject: int
    object: int
    subject_label: str
    object_label: str
    sentences: tuple[str, ...]
    subject_surfaces: tuple[str, ...]
    source: str


class LamaFacts(list):
    """The kept facts (a plain ``list[ProbeFact]``) plus ``num_read_by_relation``: facts in each file."""

    num_read_by_relation: dict[str, int]

    @property
    def num_kept_by_relation(self) -> dict[str, int]:
        return dict(sorted(Counter(f.relation for f in self).items()))


def wikidata_to_entity(text: KGText, entities: IdMap) -> dict[str, int]:
    """Wikidata id -> KG entity id for the KG's entities that ``text.wikidata`` maps; when two entities
    share a Wikidata id (FB15k-237 has one such pair), the smaller entity id wins."""
    out: dict[str, int] = {}
    for label, entry in text.wikidata.items():
        if label in entities and entry.wikidata_id:
            eid = entities.to_id[label]
            out[entry.wikidata_id] = min(eid, out.get(entry.wikidata_id, eid))
    return out


def load_lama_trex(path: str, wikidata_to_entity: Mapping[str, int], storage_options: Mapping | None = None) -> LamaFacts:
    """Every ``P*.jsonl`` under ``path``, keeping the facts whose subject and object both map to an
    entity. A line that is not JSON or lacks a field raises :class:`KGDataError` with ``file:line``."""
    store = Storage(path, dict(storage_options or {}))
    names = [n for n in store.ls() if n.startswith("P") and n.endswith(".jsonl")]
    if not names:
        raise FileNotFoundError(f"{path}: no LAMA T-REx P*.jsonl files")
    facts, read = LamaFacts(), {}
    for name in names:
        url, num_read = join_url(path, name), 0
        for lineno, raw in enumerate(store.iter_lines(name), start=1):
            line = raw.decode("utf-8", "replace").strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise KGDataError(url, lineno, f"not valid JSON: {e.msg}", line[:200]) from None
            num_read += 1
            fact = _parse(rec, url, lineno, line, wikidata_to_entity)
            if fact is not None:
                facts.append(fact)
        read[name.removesuffix(".jsonl")] = num_read
    facts.num_read_by_relation = read
    return facts


def _parse(rec, url: str, lineno: int, line: str, to_entity: Mapping[str, int]) -> ProbeFact | None:
    def need(cond: bool, problem: str) -> None:
        if not cond:
            raise KGDataError(url, lineno, problem, line[:200])

    need(isinstance(rec, dict), "expected a JSON object")
    for key in ("sub_uri", "obj_uri", "predicate_id", "sub_label", "obj_label"):
        need(isinstance(rec.get(key), str) and bool(rec[key]), f"field {key!r} missing or not a non-empty string")
    ev = rec.get("evidences")
    need(isinstance(ev, list) and bool(ev), "field 'evidences' missing or empty")
    for e in ev:
        need(isinstance(e, dict) and isinstance(e.get("masked_sentence"), str), "an evidence lacks 'masked_sentence'")
        need(MASK in e["masked_sentence"], f"an evidence sentence has no {MASK}")
    if rec["sub_uri"] not in to_entity or rec["obj_uri"] not in to_entity:
        return None
    return ProbeFact(
        relation=rec["predicate_id"], subject=to_entity[rec["sub_uri"]], object=to_entity[rec["obj_uri"]],
        subject_label=rec["sub_label"], object_label=rec["obj_label"],
        sentences=tuple(e["masked_sentence"] for e in ev),
        subject_surfaces=tuple(str(e.get("sub_surface") or rec["sub_label"]) for e in ev),
        source=f"{url}:{lineno}",
    )


def candidates_by_relation(facts: Sequence[ProbeFact]) -> dict[str, torch.Tensor]:
    """Relation -> sorted distinct object entity ids [C] of its facts."""
    objs: dict[str, set[int]] = {}
    for f in facts:
        objs.setdefault(f.relation, set()).add(f.object)
    return {r: torch.tensor(sorted(o), dtype=torch.long) for r, o in sorted(objs.items())}


def precision_at_1(scores: torch.Tensor, gold: torch.Tensor) -> float:
    """Fraction of rows of ``scores`` [F, C] whose ``gold`` column [F] scores strictly above every other."""
    if scores.ndim != 2 or gold.shape != (scores.shape[0],) or scores.shape[0] == 0:
        raise ValueError(f"need scores [F, C] with F > 0 and gold [F], got {tuple(scores.shape)} and {tuple(gold.shape)}")
    gold_score = scores.gather(1, gold.view(-1, 1))
    num_above_or_tied = (scores >= gold_score).sum(dim=1)  # the gold column itself counts once
    return float((num_above_or_tied == 1).float().mean())


#: ``score(facts, candidates [C]) -> [len(facts), C]``; facts all share one relation
Scorer = Callable[[Sequence[ProbeFact], torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class ProbeResult:
    """Micro P@1 over scored facts, macro P@1 over scored relations, and per relation
    ``(num_facts, num_candidates, p_at_1)`` (p_at_1 None when skipped for too few candidates)."""

    p_at_1: float
    macro_p_at_1: float
    num_facts: int
    num_relations: int
    num_skipped_facts: int
    per_relation: Mapping[str, tuple[int, int, float | None]]


def evaluate_probe(facts: Sequence[ProbeFact], score: Scorer, *, batch_size: int = 64, min_candidates: int = 2) -> ProbeResult:
    """P@1 of ``score`` relation by relation, in batches of ``batch_size`` facts."""
    if not facts:
        raise ValueError("no probe facts")
    per: dict[str, tuple[int, int, float | None]] = {}
    hits = num = skipped = 0
    for rel, cands in candidates_by_relation(facts).items():
        rel_facts = [f for f in facts if f.relation == rel]
        if len(cands) < min_candidates:
            per[rel] = (len(rel_facts), len(cands), None)
            skipped += len(rel_facts)
            continue
        col = {int(c): i for i, c in enumerate(cands)}
        rel_hits = 0
        for i in range(0, len(rel_facts), batch_size):
            chunk = rel_facts[i : i + batch_size]
            s = score(chunk, cands)
            if tuple(s.shape) != (len(chunk), len(cands)):
                raise ValueError(f"score returned {tuple(s.shape)} for {len(chunk)} facts and {len(cands)} candidates")
            gold = torch.tensor([col[f.object] for f in chunk])
            rel_hits += round(precision_at_1(s.detach().float().cpu(), gold) * len(chunk))
        per[rel] = (len(rel_facts), len(cands), rel_hits / len(rel_facts))
        hits, num = hits + rel_hits, num + len(rel_facts)
    scored = [p for _, _, p in per.values() if p is not None]
    if not scored:
        raise ValueError(f"no relation has >= {min_candidates} candidates")
    return ProbeResult(
        p_at_1=hits / num, macro_p_at_1=sum(scored) / len(scored), num_facts=num, num_relations=len(scored),
        num_skipped_facts=skipped, per_relation=per,
    )


class MaskedEntityScorer:
    """Default LM scorer: the first evidence sentence, encoded around its ``[MASK]``, is turned into a
    vector by ``mention_vector(batch) -> [B, d_e]`` and compared with ``entity_embeddings[candidates]``
    [C, d_e] (cosine or dot). The batch follows the fusion model's contract (input_ids, attention_mask,
    token_type_ids, token_entity [B, S], mention_spans [M, 4]) plus ``mask_positions`` [B]; the subject's
    surface words are tagged with the subject's entity id (``mark_subject``), then ``link``'s mentions."""

    def __init__(
        self,
        tokenizer,
        mention_vector: Callable[[dict[str, torch.Tensor]], torch.Tensor],
        entity_embeddings: torch.Tensor,
        *,
        max_length: int = 128,
        mark_subject: bool = True,
        link: LinkFn | None = None,
        similarity: Literal["cosine", "dot"] = "cosine",
    ):
        if max_length < 3:
            raise ValueError(f"max_length must be >= 3, got {max_length}")
        if similarity not in ("cosine", "dot"):
            raise ValueError(f"similarity must be 'cosine' or 'dot', got {similarity!r}")
        if tokenizer.mask_token_id is None or tokenizer.cls_token_id is None or not getattr(tokenizer, "is_fast", False):
            raise ValueError("need a fast tokenizer with [CLS], [SEP] and [MASK] tokens (BERT-style)")
        self.tokenizer, self.mention_vector, self.entity_embeddings = tokenizer, mention_vector, entity_embeddings
        self.max_length, self.mark_subject, self.link, self.similarity = max_length, mark_subject, link, similarity

    def encode(self, facts: Sequence[ProbeFact]) -> dict[str, torch.Tensor]:
        """The batch for ``facts``: [CLS] + a window of at most max_length - 2 tokens around the mask +
        [SEP], padded to the longest row."""
        tok = self.tokenizer
        texts = [f.sentences[0].replace(MASK, tok.mask_token, 1) for f in facts]
        enc = tok(texts, add_special_tokens=False, return_offsets_mapping=True)
        rows, ents, spans, masks = [], [], [], []
        width = self.max_length - 2
        for f, text, ids, off in zip(facts, texts, enc["input_ids"], enc["offset_mapping"]):
            m = ids.index(tok.mask_token_id)
            a = min(max(m - width // 2, 0), max(len(ids) - width, 0))
            window = range(a, min(a + width, len(ids)))
            found = []
            if self.mark_subject:
                surface, start = f.subject_surfaces[0], text.find(f.subject_surfaces[0])
                while surface and start >= 0:
                    found.append((start, start + len(surface), f.subject))
                    start = text.find(surface, start + len(surface))
            if self.link is not None:
                found += list(self.link(text))
            row = [tok.cls_token_id] + ids[a : window.stop] + [tok.sep_token_id]
            row_ent = [-1] * len(row)
            spans.append(fill_mentions(row_ent, [(s - a + 1, e - a + 1, x) for s, e, x in align_mentions(found, off, window)]))
            rows.append(row)
            ents.append(row_ent)
            masks.append(m - a + 1)
        n = max(map(len, rows))
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        return {
            "input_ids": torch.tensor([r + [pad] * (n - len(r)) for r in rows], dtype=torch.long),
            "attention_mask": torch.tensor([[1] * len(r) + [0] * (n - len(r)) for r in rows], dtype=torch.long),
            "token_type_ids": torch.zeros(len(rows), n, dtype=torch.long),
            "token_entity": torch.tensor([r + [-1] * (n - len(r)) for r in ents], dtype=torch.long),
            "mention_spans": spans_tensor(spans),
            "mask_positions": torch.tensor(masks, dtype=torch.long),
        }

    @torch.no_grad()
    def __call__(self, facts: Sequence[ProbeFact], candidates: torch.Tensor) -> torch.Tensor:
        vec = self.mention_vector(self.encode(facts)).float()
        emb = self.entity_embeddings[candidates.to(self.entity_embeddings.device)].float().to(vec.device)
        if self.similarity == "cosine":
            vec, emb = torch.nn.functional.normalize(vec, dim=-1), torch.nn.functional.normalize(emb, dim=-1)
        return vec @ emb.T


# ---- a cloze probe written from the KG itself ----------------------------------------------------------

def cloze_facts(triples: torch.Tensor, entity_names: Sequence[str], relation_texts: Sequence[str], relation_labels: Sequence[str],
                *, limit: int | None = None, seed: int = 0) -> list[ProbeFact]:
    """Held-out triples ``(n, 3)`` as cloze facts "<head name> <relation text> [MASK]." (a KG with no probe
    corpus of its own: the embedded default). ``limit``: a seeded sample of that many triples."""
    if limit is not None and len(triples) > limit:
        triples = triples[torch.randperm(len(triples), generator=torch.Generator().manual_seed(seed))[:limit]]
    facts = []
    for h, r, t in triples.tolist():
        sentence = f"{entity_names[h]} {relation_texts[r]} {MASK}."
        facts.append(ProbeFact(relation=relation_labels[r], subject=h, object=t, subject_label=entity_names[h],
                               object_label=entity_names[t], sentences=(sentence,), subject_surfaces=(entity_names[h],),
                               source="kg"))
    return facts


def fused_lm_probe(model, tokenizer, facts: Sequence[ProbeFact], *, kg: bool = True, max_length: int = 64) -> ProbeResult:
    """P@1 of a FusedLM (bikd.lm.model) on ``facts``: its entity-alignment projection at the mask against the
    candidates' rows of its KG table. ``kg=False`` withholds the table from the encoder (the subject is not
    fused): what the LM's own weights point at."""
    table = model.table
    if table is None:
        raise ValueError("the probe compares against the KG table: the model has none")

    def mention_vector(batch):
        hidden = model.fused(batch["input_ids"], attention_mask=batch["attention_mask"], token_type_ids=batch["token_type_ids"],
                             token_entity=batch["token_entity"] if kg else None).last_hidden_state
        return model.entity_proj(hidden[torch.arange(len(hidden)), batch["mask_positions"]])

    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            return evaluate_probe(facts, MaskedEntityScorer(tokenizer, mention_vector, table.entity, max_length=max_length))
    finally:
        model.train(was)
