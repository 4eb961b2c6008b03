"""What the extractor-training job and the mining job read alike: the passages, the linker, the linked pairs.

Both jobs must link text the same way (an extractor trained on one linker's pairs and run on another's sees
other mentions), so both build them here from a :class:`~bikd.kg.store.KGVersion` and the KG's text. Only
the version's *train* split sets the linker's degree prior: valid and test never shape what is mined.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from bikd.kg.store import KGVersion
from bikd.kg.text import KGText
from bikd.lm import corpus
from bikd.lm.linking import EntityLinker
from bikd.lm.pairs import PairCandidate, Passage
from bikd.lm.train import linker_for

__all__ = ["LinkedText", "link_text", "version_linker", "split_tensor", "CalibrationSplit", "calibration_split"]


def split_tensor(version: KGVersion, split: str) -> Tensor:
    """``(n, 3)`` long ids (positions in the version's label tuples) of gold split ``split``."""
    return torch.from_numpy(version.gold_array(split))


def version_linker(version: KGVersion, text: KGText) -> EntityLinker:
    """The linker both jobs use (:func:`bikd.lm.train.linker_for`): the version's labels, its train split's
    degrees as the prior for ambiguous aliases."""
    return linker_for(version.entities, split_tensor(version, "train"), text)


@dataclass(frozen=True)
class LinkedText:
    passages: list[Passage]
    #: co-mention pairs in ``passages`` (:func:`bikd.lm.corpus.pair_candidates`)
    pairs: list[PairCandidate]
    #: passages, candidates and what was skipped (``corpus.SKIP_KEYS``), plus passages per source
    counts: dict[str, int]


def link_text(version: KGVersion, text: KGText, files: Sequence[str] = (), *, descriptions: bool = True,
              max_pairs_per_passage: int | None = 20) -> LinkedText:
    """The entity descriptions in ``text`` (when ``descriptions``) and every plain-text or JSONL corpus in
    ``files``, linked; ValueError when there is no passage at all."""
    entity_to_id = {e: i for i, e in enumerate(version.entities)}
    passages = corpus.description_passages(text, entity_to_id) if descriptions else []
    sources = Counter({"passages_descriptions": len(passages)})
    for url in files:
        read = corpus.read_corpus(url)
        sources["passages_corpus_files"] += len(read)
        passages += read
    if not passages:
        raise ValueError("the corpus is empty: no descriptions (the KG has no entity2text.txt, or descriptions=false) "
                         "and no passage in the corpus files")
    pairs, skips = corpus.pair_candidates(passages, version_linker(version, text),
                                          max_pairs_per_passage=max_pairs_per_passage)
    return LinkedText(passages, pairs, {**skips, **sources})


@dataclass(frozen=True)
class CalibrationSplit:
    train_pairs: list[PairCandidate]
    #: ``(len(train_pairs), R + 1)`` labels from the train split (column R: no relation)
    train_labels: Tensor
    calib_pairs: list[PairCandidate]
    #: ``(len(calib_pairs), R + 1)`` labels from the valid split
    calib_labels: Tensor
    counts: dict[str, int]


def calibration_split(pairs: Sequence[PairCandidate], train: Tensor, valid: Tensor, num_relations: int,
                      num_calib: int, seed: int = 0) -> CalibrationSplit:
    """Distant-supervision labels from ``train`` for every pair; a seeded sample of ``num_calib`` of the pairs
    train relates to nothing (at most half of them: the rest teach "no relation") is held out and labelled
    from ``valid`` (held-out gold: the temperature is fitted on relations the extractor never saw as labels);
    the other pairs train."""
    R = num_relations
    labels = corpus.distant_labels(pairs, train, R)
    unrelated = torch.nonzero(labels[:, R] > 0).flatten().tolist()
    held = set(random.Random(seed).sample(unrelated, min(num_calib, len(unrelated) // 2)))
    calib = [pairs[i] for i in sorted(held)]
    train_idx = [i for i in range(len(pairs)) if i not in held]
    calib_labels = corpus.distant_labels(calib, valid, R)
    counts = {"pairs": len(pairs), "train_pairs": len(train_idx),
              "train_related": int((labels[train_idx, :R].sum(1) > 0).sum()),
              "calib_pairs": len(calib), "calib_valid_related": int((calib_labels[:, :R].sum(1) > 0).sum())}
    return CalibrationSplit([pairs[i] for i in train_idx], labels[train_idx], calib, calib_labels, counts)
