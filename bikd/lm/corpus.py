"""Text corpora as :class:`~bikd.lm.pairs.Passage` s, linked entity pairs in them, and distant-supervision labels.

Readers (each returns ``list[Passage]`` with stable ``doc_id`` s):

- :func:`description_passages`: FB15k-237's ``entity2text.txt`` descriptions, read as ``"<name> -- <description>"``
  with the described entity as the passage's subject (its name is a mention at the start);
- :func:`squad_passages`: the paragraphs of the SQuAD **fine-tune** articles only;
- :func:`read_corpus`: the user's plain-text or JSONL file;
- :func:`fewrel_candidates`: FewRel sentences whose two annotated entities are both in the KG (optional;
  through ``entity2wikidata.json``), as candidates with the annotators' spans.

:func:`pair_candidates` turns passages into co-mention :class:`~bikd.lm.pairs.PairCandidate` s (it reads text
and the linker only, never a KG split); :func:`distant_labels` labels them from the triples it is given (pass
the **train** split to train, valid to calibrate).
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from bikd.kg.text import KGText
from bikd.kg.triples import KGDataError, decode_line, strip_bom
from bikd.lm import squad
from bikd.lm.pairs import CO_MENTION, PairCandidate, Passage
from bikd.storage import open_url

__all__ = ["description_passages", "squad_passages", "read_corpus", "fewrel_candidates", "pair_candidates",
           "distant_labels", "SKIP_KEYS"]

#: keys of the counts :func:`pair_candidates` returns
SKIP_KEYS = ("passages", "candidates", "passages_no_entity", "passages_one_entity", "pairs_cut")


# ---- readers ------------------------------------------------------------------------------------------

def description_passages(text: KGText, entity_to_id: Mapping[str, int]) -> list[Passage]:
    """One passage per entity of ``entity_to_id`` that has a description: ``"<name> -- <description>"``,
    ``subject`` = the entity's id, ``subject_end = len(name)``, ``doc_id = "desc:<label>"``; in id order.
    Entities with a name only say nothing about other entities and are left out."""
    out = []
    for label, entity in sorted(entity_to_id.items(), key=lambda kv: kv[1]):
        et = text.entities.get(label)
        if et is None or not et.name or not et.description:
            continue
        out.append(Passage(f"desc:{label}", f"{et.name} -- {et.description}", int(entity), len(et.name)))
    return out


def squad_passages(path: str, articles: str = "finetune", *, eval_fraction: float = 0.2, seed: int = 0,
                   holdout: bool = False) -> list[Passage]:
    """The distinct paragraphs (contexts) of SQuAD's fine-tune articles, ``doc_id = "squad:<title>#<k>"``
    (k: the paragraph's index in its article).

    The split is :func:`bikd.lm.squad.split_by_article` with the same arguments as the LM's QA task
    (``TaskConfig.squad_eval_fraction`` = ``eval_fraction``, ``TaskConfig.seed`` = ``seed``, defaults 0.2 and 0),
    so the articles the LM is *evaluated* on are never read here: mined facts from them would leak into the
    KG the LM later trains against. ``holdout=True`` mirrors ``TaskConfig.squad_holdout``: the fine-tune
    articles are split again with ``seed + 1`` and only the part the LM trains on is returned.
    ``articles``: only ``"finetune"`` (named, so that a call site says which side it reads)."""
    if articles != "finetune":
        raise ValueError(f"articles must be 'finetune' (the evaluation articles are never mining text), got {articles!r}")
    finetune, _ = squad.split_by_article(squad.load_squad(path), eval_fraction, seed)
    if holdout:
        finetune, _ = squad.split_by_article(finetune, eval_fraction, seed + 1)
    out = []
    for art in finetune:
        contexts = list(dict.fromkeys(ex.context for ex in art.examples))
        out.extend(Passage(f"squad:{art.title}#{k}", c) for k, c in enumerate(contexts) if c.strip())
    return out


def _lines(url: str, storage_options: Mapping[str, Any] | None):
    """``(lineno, text)`` of every line, UTF-8 checked, BOM and line end stripped."""
    with open_url(url, "rb", dict(storage_options or {})) as f:
        for lineno, raw in enumerate(f, start=1):
            yield lineno, strip_bom(decode_line(url, lineno, raw).rstrip("\r\n"))[0]


def read_corpus(url: str, *, format: str = "auto", paragraphs: bool = False,
                storage_options: Mapping[str, Any] | None = None) -> list[Passage]:
    """The user's corpus (any URL :func:`bikd.storage.open_url` reads), UTF-8.

    - **JSONL** (``format="jsonl"``, or ``"auto"`` and a name ending in ``.jsonl``/``.json``): one object per
      non-blank line, ``{"text": str, "id": optional str | int}``; ``doc_id = "<file name>:<id>"``, else
      ``"<file name>:<line>"``. A line that is not a JSON object with a string ``"text"``, or repeats an id,
      is a :class:`~bikd.kg.triples.KGDataError` naming ``file:line``.
    - **plain text** (otherwise): one passage per non-blank line (``doc_id = "<file name>:<line>"``, the text
      stripped), the layout of most extracted corpora (a paragraph per line); with ``paragraphs=True`` a
      passage is a run of non-blank lines instead (joined with a space; blank lines separate passages, the
      doc_id names its first line).

    Whitespace-only texts are skipped; a corpus with no passage at all is a KGDataError."""
    if format not in ("auto", "jsonl", "text"):
        raise ValueError(f"format must be 'auto', 'jsonl' or 'text', got {format!r}")
    name = posixpath.basename(url.rstrip("/")) or url
    jsonl = format == "jsonl" or (format == "auto" and name.lower().endswith((".jsonl", ".json")))
    out: list[Passage] = []
    if jsonl:
        seen: dict[str, int] = {}
        for lineno, line in _lines(url, storage_options):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise KGDataError(url, lineno, f"not valid JSON: {e.msg} at column {e.colno}", line[:200]) from None
            if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                raise KGDataError(url, lineno, 'expected an object with a string "text"', line[:200])
            key = str(rec["id"]) if rec.get("id") is not None else str(lineno)
            if key in seen:
                raise KGDataError(url, lineno, f"id {key!r} already used on line {seen[key]}", line[:200])
            seen[key] = lineno
            if rec["text"].strip():
                out.append(Passage(f"{name}:{key}", rec["text"]))
    else:
        block: list[str] = []
        first = 0
        for lineno, line in [*_lines(url, storage_options), (-1, "")]:
            if not paragraphs:
                if line.strip():
                    out.append(Passage(f"{name}:{lineno}", line.strip()))
                continue
            if line.strip():
                first = first or lineno
                block.append(line.strip())
            elif block:
                out.append(Passage(f"{name}:{first}", " ".join(block)))
                block, first = [], 0
    if not out:
        raise KGDataError(url, None, "holds no passages (every line is blank)" if not jsonl else
                          'holds no passages (no line with a non-blank "text")')
    return out


def fewrel_candidates(path: str, text: KGText, entity_to_id: Mapping[str, int]) -> list[PairCandidate]:
    """FewRel 1.0 (``{relation: [{"tokens", "h": [name, wikidata_id, [[positions]]], "t": ...}]}``) instances
    whose head and tail Wikidata ids both map to KG entities (``text.wikidata``: mid -> Wikidata id), as
    co-mention candidates on the sentence (tokens joined by spaces) with the annotated spans (first
    occurrence), ``doc_id = "fewrel:<relation>#<index>"``. The FewRel relation is *not* used: labels come
    from the KG split, as for every candidate. About 240 of FewRel's validation instances qualify."""
    with open_url(path, "rb") as f:
        try:
            data = json.loads(f.read().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise KGDataError(path, getattr(e, "lineno", None), f"not valid UTF-8 JSON: {e}") from None
    if not isinstance(data, dict):
        raise KGDataError(path, None, "expected a JSON object mapping relation -> instances")
    by_qid = {w.wikidata_id: entity_to_id[mid] for mid, w in text.wikidata.items() if mid in entity_to_id}
    out = []
    for rel, instances in data.items():
        for k, inst in enumerate(instances):
            try:
                tokens, (_, h_qid, h_pos), (_, t_qid, t_pos) = inst["tokens"], inst["h"], inst["t"]
                h_first, t_first = h_pos[0], t_pos[0]
            except (KeyError, TypeError, ValueError, IndexError):
                raise KGDataError(path, None, f"{rel}[{k}]: expected tokens, h and t as FewRel writes them",
                                  str(inst)[:200]) from None
            if h_qid not in by_qid or t_qid not in by_qid or by_qid[h_qid] == by_qid[t_qid]:
                continue
            starts, pos = [], 0
            for tok in tokens:
                starts.append(pos)
                pos += len(tok) + 1
            span = lambda ps: (starts[min(ps)], starts[max(ps)] + len(tokens[max(ps)]))  # noqa: E731
            out.append(PairCandidate(f"fewrel:{rel}#{k}", " ".join(tokens), by_qid[h_qid], by_qid[t_qid],
                                     span(h_first), span(t_first), CO_MENTION))
    return out


# ---- candidates and labels ----------------------------------------------------------------------------

def _mentions(link: Callable[[str], Sequence], text: str) -> list[tuple[int, int, int]]:
    return [(m.start_char, m.end_char, int(m.entity)) if hasattr(m, "start_char") else (int(m[0]), int(m[1]), int(m[2]))
            for m in link(text)]


def pair_candidates(passages: Sequence[Passage], linker, *, max_pairs_per_passage: int | None = None
                    ) -> tuple[list[PairCandidate], dict[str, int]]:
    """Every ordered pair ``(h, t)`` of distinct entities linked in one passage, as co-mention candidates.

    ``linker``: an :class:`~bikd.lm.linking.EntityLinker` or a ``LinkFn``. A passage's subject counts as a
    mention at ``(0, subject_end)`` (a link overlapping the name is dropped: the name *is* the subject); each
    entity is represented by its first mention. With ``max_pairs_per_passage``, the pairs kept are those with
    the subject first, then the closest in characters (the ones a sentence most likely relates), ties in
    text order. Reads text and links only: no KG split, so candidates cannot depend on valid or test.

    Returns the candidates (passage order, then pair order) and counts: ``passages``, ``candidates``,
    ``passages_no_entity``, ``passages_one_entity`` (skipped), ``pairs_cut`` (dropped by the bound)."""
    if max_pairs_per_passage is not None and max_pairs_per_passage < 1:
        raise ValueError(f"max_pairs_per_passage must be >= 1 or None, got {max_pairs_per_passage}")
    link = linker.link if hasattr(linker, "link") else linker
    counts = dict.fromkeys(SKIP_KEYS, 0)
    out: list[PairCandidate] = []
    for p in passages:
        counts["passages"] += 1
        first: dict[int, tuple[int, int]] = {}
        if p.subject is not None and p.subject_end > 0:
            first[int(p.subject)] = (0, p.subject_end)
        for s, e, ent in sorted(_mentions(link, p.text)):
            if p.subject is not None and s < p.subject_end:
                continue
            first.setdefault(ent, (s, e))
        if len(first) < 2:
            counts["passages_no_entity" if not first else "passages_one_entity"] += 1
            continue
        ents = list(first)
        pairs = [(h, t) for h in ents for t in ents if h != t]
        if max_pairs_per_passage is not None and len(pairs) > max_pairs_per_passage:
            def rank(ht: tuple[int, int]) -> tuple[int, int]:
                (hs, he), (ts, te) = first[ht[0]], first[ht[1]]
                return int(p.subject not in ht), max(hs, ts) - min(he, te)
            keep = set(sorted(pairs, key=rank)[:max_pairs_per_passage])  # sorted is stable: text order on ties
            counts["pairs_cut"] += len(pairs) - len(keep)
            pairs = [ht for ht in pairs if ht in keep]
        out.extend(PairCandidate(p.doc_id, p.text, h, t, first[h], first[t], CO_MENTION) for h, t in pairs)
    counts["candidates"] = len(out)
    return out, counts


def distant_labels(candidates: Sequence[PairCandidate], triples: Tensor, num_relations: int) -> Tensor:
    """Distant supervision: ``labels[i, r] = 1`` iff ``(h_i, r, t_i)`` is in ``triples (n, 3)`` (ids
    ``h, r, t``), and ``labels[i, R] = 1`` ("no relation") iff no r holds -> ``(len(candidates), R + 1)``
    float32, multi-hot. Pass the **train** split to train the extractor and valid to calibrate it; the
    direction matters (``h -> t``). ValueError for a relation id outside ``0..R-1``."""
    if num_relations < 1:
        raise ValueError(f"num_relations must be >= 1, got {num_relations}")
    triples = torch.as_tensor(triples)
    if triples.ndim != 2 or triples.shape[1] != 3:
        raise ValueError(f"triples must be (n, 3) ids (h, r, t), got shape {tuple(triples.shape)}")
    if len(triples) and (int(triples[:, 1].min()) < 0 or int(triples[:, 1].max()) >= num_relations):
        bad = triples[(triples[:, 1] < 0) | (triples[:, 1] >= num_relations)][0].tolist()
        raise ValueError(f"triple {bad} has a relation outside 0..{num_relations - 1}: the KG has {num_relations} relations")
    labels = torch.zeros(len(candidates), num_relations + 1)
    if not len(candidates):
        return labels
    h = torch.tensor([c.h for c in candidates], dtype=torch.long)
    t = torch.tensor([c.t for c in candidates], dtype=torch.long)
    triples = triples.long()
    # one sorted key h * M + t per triple: a pair's relations are a contiguous run found by binary search
    m = int(max(int(h.max()), int(t.max()), int(triples[:, [0, 2]].max()) if len(triples) else 0)) + 1
    order = torch.argsort(triples[:, 0] * m + triples[:, 2])
    keys, rels = (triples[order, 0] * m + triples[order, 2]), triples[order, 1]
    query = h * m + t
    lo = torch.searchsorted(keys, query, side="left")
    num = torch.searchsorted(keys, query, side="right") - lo
    row = torch.repeat_interleave(torch.arange(len(candidates)), num)
    offset = torch.arange(len(row)) - torch.repeat_interleave(num.cumsum(0) - num, num)
    labels[row, rels[torch.repeat_interleave(lo, num) + offset]] = 1.0
    labels[num == 0, num_relations] = 1.0
    return labels
