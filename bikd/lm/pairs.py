"""Entity-mention pairs in passages: what the relation extractor reads and the miner scores.

The contract between the text side (:mod:`bikd.lm.corpus`, the extractor) and the mining side
(:mod:`bikd.mining`): a corpus becomes :class:`Passage` s, linking turns a passage into
:class:`PairCandidate` s, and a :data:`PairScorer` maps candidates to ``p(r | h, t, passage)`` over the KG's
``R`` relations plus a last "no relation" column.

Spans are always explicit character spans into ``text``: a description is read as "<name> -- <description>",
so its implicit subject (the described entity) is a real mention, the name at the start.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

#: ``PairCandidate.source`` values
CO_MENTION = "co-mention"  # both entities linked in one passage
KG_PROPOSAL = "kg-proposal"  # a KG model's top-k tail for (h, r), checked on a passage (or the descriptions)


@dataclass(frozen=True)
class Passage:
    """One unit of text. ``doc_id`` is stable and names the corpus: ``"desc:/m/02mjmr"``,
    ``"squad:Super_Bowl_50#3"``, ``"file.jsonl:17"``. ``subject``: the entity the passage describes (the
    name is at ``text[:subject_end]``), or None."""

    doc_id: str
    text: str
    subject: int | None = None
    subject_end: int = 0


@dataclass(frozen=True)
class PairCandidate:
    """An ordered pair of linked mentions in one passage: is some relation ``h -r-> t`` stated there?

    ``h_span``/``t_span``: ``(start_char, end_char_exclusive)`` of the mentions in ``text``. ``relation``: the
    relation a KG proposal asks about (-1 for a co-mention pair, whose relation the extractor chooses)."""

    doc_id: str
    text: str
    h: int
    t: int
    h_span: tuple[int, int]
    t_span: tuple[int, int]
    source: str = CO_MENTION
    relation: int = -1

    def __post_init__(self):
        for name, (s, e) in (("h_span", self.h_span), ("t_span", self.t_span)):
            if not 0 <= s < e <= len(self.text):
                raise ValueError(f"{self.doc_id}: {name} ({s}, {e}) is not a span of a {len(self.text)}-char text")


#: ``scorer(candidates) -> (n, R + 1) float32`` probabilities, rows summing to 1, the last column "no relation"
PairScorer = Callable[[Sequence[PairCandidate]], np.ndarray]
