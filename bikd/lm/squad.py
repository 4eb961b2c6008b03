"""Extractive QA in SQuAD v1.1 format: loading, a by-article split, doc-stride features, answer decoding
and the official v1.1 EM/F1.

Only the SQuAD v1.1 *dev* set is available here: :func:`split_by_article` splits it by article with a
fixed seed into fine-tune and eval parts, and every reported number must say so (``SquadSplit.describe()``).
Features follow HF's ``run_qa.py`` (prepare_train/validation_features), decoding its
``postprocess_qa_predictions``, the metric the official ``evaluate-v1.1.py``.
Also here, shared by the other LM tasks: :class:`TokenFeatures` (encoded rows -> batch dicts of the fusion
model's contract; linker char spans become token spans with :mod:`bikd.lm.linking`'s helpers).
"""

from __future__ import annotations

import functools
import json
import random
import re
import string
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator, Mapping, Sequence

import numpy as np
import torch

from bikd.kg.triples import KGDataError
from bikd.lm.linking import LinkFn, fill_mentions, mentions_to_tokens, spans_tensor
from bikd.storage import open_url


# ---- shared feature helpers ------------------------------------------------------------------------

@dataclass(kw_only=True, frozen=True)
class TokenFeatures:
    """N encoded rows. ``tensors`` holds ``input_ids``, ``attention_mask``, ``token_type_ids``,
    ``token_entity`` [N, S] (entity id or -1) and per-row labels [N, ...]; ``mention_spans`` [M, 4] is
    (row, token_start, token_end_exclusive, entity_id) over all rows, sorted by row."""

    tensors: Mapping[str, torch.Tensor]
    mention_spans: torch.Tensor

    def __len__(self) -> int:
        return int(self.tensors["input_ids"].shape[0])

    def batch(self, index: Sequence[int] | torch.Tensor) -> dict[str, torch.Tensor]:
        """The rows ``index`` (distinct) as a batch dict; mention_spans' first column becomes the
        position within the batch."""
        idx = torch.as_tensor(index, dtype=torch.long).reshape(-1)
        out = {k: v[idx] for k, v in self.tensors.items()}
        where = torch.full((len(self),), -1, dtype=torch.long)
        where[idx] = torch.arange(len(idx))
        spans = self.mention_spans[where[self.mention_spans[:, 0]] >= 0].clone()
        spans[:, 0] = where[spans[:, 0]]
        out["mention_spans"] = spans[torch.argsort(spans[:, 0], stable=True)]
        return out

    def batches(self, batch_size: int, *, shuffle: bool = False, seed: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        """Consecutive batches of ``batch_size`` rows (the last may be smaller), in order or shuffled."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        order = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed)) if shuffle else torch.arange(len(self))
        for i in range(0, len(self), batch_size):
            yield self.batch(order[i : i + batch_size])


# ---- data ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SquadExample:
    """One question with its paragraph; ``answer_starts`` are the answers' char offsets in ``context``."""

    qid: str
    title: str
    context: str
    question: str
    answers: tuple[str, ...]
    answer_starts: tuple[int, ...]


@dataclass(frozen=True)
class Article:
    title: str
    num_paragraphs: int
    examples: tuple[SquadExample, ...]


def _need(cond: bool, path: str, where: str, problem: str, got: object = None) -> None:
    if not cond:
        raise KGDataError(path, None, f"{where}: {problem}", None if got is None else str(got)[:200])


def _parse_qa(qa, context: str, title: str, path: str, where: str, strict: bool) -> SquadExample:
    _need(isinstance(qa, dict), path, where, "expected an object", qa)
    for key, typ in (("id", str), ("question", str), ("answers", list)):
        _need(isinstance(qa.get(key), typ), path, where, f"{key!r} missing or not a {typ.__name__}", qa)
    _need(bool(qa["answers"]), path, where, "no answers (SQuAD v1.1 has no unanswerable questions)")
    for n, ans in enumerate(qa["answers"]):
        aw = f"{where}.answers[{n}]"
        ok = isinstance(ans, dict) and isinstance(ans.get("text"), str) and type(ans.get("answer_start")) is int
        _need(ok and bool(ans["text"].strip()), path, aw, "expected {'text': non-empty str, 'answer_start': int}", ans)
        s, e = ans["answer_start"], ans["answer_start"] + len(ans["text"])
        _need(0 <= s and e <= len(context), path, aw, f"answer [{s}, {e}) outside the context of {len(context)} chars")
        _need(not strict or context[s:e] == ans["text"], path, aw, f"context[{s}:{e}] is {context[s:e]!r}, not the answer text", ans["text"])
    texts, starts = zip(*((a["text"], a["answer_start"]) for a in qa["answers"]))
    return SquadExample(qa["id"], title, context, qa["question"], texts, starts)


def load_squad(path: str, *, strict: bool = True) -> list[Article]:
    """Read a SQuAD v1.1 JSON file (local path or fsspec URL). Malformed entries raise
    :class:`KGDataError` naming the file and the entry (``data[3].paragraphs[0].qas[2]: ...``). With
    ``strict``, an answer whose text differs from ``context[answer_start:]`` is an error (the official dev
    set has none; HF's run_qa does not check)."""
    try:
        with open_url(path, "rb") as f:
            data = json.loads(f.read().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise KGDataError(path, getattr(e, "lineno", None), f"not valid UTF-8 JSON: {e}") from None
    _need(isinstance(data, dict) and isinstance(data.get("data"), list), path, "top level", "expected {'data': [articles...]}")
    articles, seen = [], set()
    for a, art in enumerate(data["data"]):
        where = f"data[{a}]"
        _need(isinstance(art, dict) and isinstance(art.get("paragraphs"), list), path, where, "expected an article with 'paragraphs'", art)
        examples, title = [], str(art.get("title", f"article-{a}"))
        for p, par in enumerate(art["paragraphs"]):
            pw = f"{where}.paragraphs[{p}]"
            _need(isinstance(par, dict) and isinstance(par.get("context"), str), path, pw, "'context' missing or not a string")
            _need(isinstance(par.get("qas"), list), path, pw, "'qas' missing or not a list")
            for q, qa in enumerate(par["qas"]):
                examples.append(_parse_qa(qa, par["context"], title, path, f"{pw}.qas[{q}]", strict))
                _need(examples[-1].qid not in seen, path, f"{pw}.qas[{q}]", f"question id {examples[-1].qid!r} appears twice")
                seen.add(examples[-1].qid)
        articles.append(Article(title, len(art["paragraphs"]), tuple(examples)))
    _need(bool(articles), path, "data", "holds no articles")
    return articles


def examples_of(articles: Sequence[Article]) -> list[SquadExample]:
    """The questions of ``articles`` in order."""
    return [ex for art in articles for ex in art.examples]


def answers_of(examples: Sequence[SquadExample]) -> dict[str, tuple[str, ...]]:
    """qid -> ground-truth texts, the first argument of :func:`evaluate`."""
    return {ex.qid: ex.answers for ex in examples}


@dataclass(frozen=True)
class SquadSplit:
    """A by-article split of one SQuAD file; unpacks as ``finetune, eval = split``."""

    finetune: tuple[Article, ...]
    eval: tuple[Article, ...]
    eval_fraction: float
    seed: int

    def __iter__(self):
        return iter((self.finetune, self.eval))

    @property
    def num_finetune_questions(self) -> int:
        return sum(len(a.examples) for a in self.finetune)

    @property
    def num_eval_questions(self) -> int:
        return sum(len(a.examples) for a in self.eval)

    def describe(self) -> str:
        """The sentence to print next to every number measured on this split."""
        return (
            f"SQuAD v1.1 dev split by article (seed {self.seed}, eval fraction {self.eval_fraction}): "
            f"fine-tune {len(self.finetune)} articles / {self.num_finetune_questions} questions, "
            f"eval {len(self.eval)} articles / {self.num_eval_questions} questions"
        )


def split_by_article(articles: Sequence[Article], eval_fraction: float, seed: int) -> SquadSplit:
    """Shuffle the articles (ordered by title first, so file order does not matter) with ``seed`` and put
    round(eval_fraction * n) of them, at least 1 and at most n - 1, in the eval part. Whole articles go
    to one side, so no paragraph or topic is shared."""
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    if len(articles) < 2:
        raise ValueError(f"need at least 2 articles to split, got {len(articles)}")
    order = sorted(range(len(articles)), key=lambda i: (articles[i].title, i))
    random.Random(seed).shuffle(order)
    num_eval = min(max(round(eval_fraction * len(articles)), 1), len(articles) - 1)
    eval_idx = set(order[:num_eval])
    finetune = tuple(a for i, a in enumerate(articles) if i not in eval_idx)
    evaluation = tuple(a for i, a in enumerate(articles) if i in eval_idx)
    return SquadSplit(finetune, evaluation, eval_fraction, seed)


# ---- features --------------------------------------------------------------------------------------

@dataclass(kw_only=True, frozen=True)
class SquadFeaturesConfig:
    max_length: int = 384
    #: tokens shared by consecutive windows of a long context (HF's ``stride``)
    doc_stride: int = 128
    #: questions longer than this many tokens are cut (run_squad.py's rule; run_qa.py has none)
    max_query_length: int = 64

    def __post_init__(self):
        if self.max_length < 8 or self.doc_stride < 0 or self.max_query_length < 1:
            raise ValueError(f"need max_length >= 8, doc_stride >= 0, max_query_length >= 1; got {self.max_length}, "
                             f"{self.doc_stride}, {self.max_query_length}")
        # [CLS] q [SEP] c [SEP]: a window must hold more context tokens than it shares with the next one
        if self.doc_stride >= self.max_length - self.max_query_length - 3:
            raise ValueError(f"doc_stride ({self.doc_stride}) must be < max_length - max_query_length - 3 "
                             f"({self.max_length} - {self.max_query_length} - 3)")


@dataclass(kw_only=True, frozen=True)
class QAFeatures(TokenFeatures):
    """Windows of ``example_ids``' contexts. ``tensors`` also holds ``start_positions``/``end_positions`` [N]
    (0 = [CLS] when the first answer is not inside the window) and ``context_offsets`` int32 [N, S, 2]:
    each context token's char span in its context, -1 for question, special and padding tokens."""

    example_ids: tuple[str, ...]
    contexts: Mapping[str, str] = field(repr=False)

    def batch(self, index):
        out = super().batch(index)
        out.pop("context_offsets")  # decoding data, not model input
        return out


def _cut_questions(questions: list[str], tokenizer, max_query_length: int) -> list[str]:  # at a token's end
    enc = tokenizer(questions, add_special_tokens=False, return_offsets_mapping=True)
    return [q if len(off) <= max_query_length else q[: off[max_query_length - 1][1]] for q, off in zip(questions, enc["offset_mapping"])]


def build_features(
    examples: Sequence[SquadExample], tokenizer, cfg: SquadFeaturesConfig, link: LinkFn | None = None
) -> QAFeatures:
    """Tokenise (question, context) pairs into doc-stride windows with a fast tokenizer, as HF's run_qa.py
    does (``truncation='only_second'``, overflowing tokens, offsets, padding to ``max_length``), label the
    first answer's tokens, and mark linked mentions (question and context are linked separately, each
    text once) in ``token_entity``/``mention_spans``."""
    if not examples:
        raise ValueError("no examples to encode")
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("build_features needs a fast tokenizer (offset mappings)")
    if tokenizer.padding_side != "right":
        raise ValueError("build_features expects the question first and right padding (BERT-style)")
    questions = _cut_questions([ex.question.lstrip() for ex in examples], tokenizer, cfg.max_query_length)
    enc = tokenizer(
        questions, [ex.context for ex in examples], truncation="only_second", max_length=cfg.max_length, stride=cfg.doc_stride,
        return_overflowing_tokens=True, return_offsets_mapping=True, padding="max_length",
    )
    linked = functools.cache(lambda text: list(link(text))) if link is not None else None  # contexts repeat
    offsets = np.asarray(enc["offset_mapping"], dtype=np.int32).reshape(len(enc["input_ids"]), cfg.max_length, 2)
    starts, ends, token_entity, spans, ids = [], [], [], [], []
    for i, sample in enumerate(enc["overflow_to_sample_mapping"]):
        ex, off, seq = examples[sample], enc["offset_mapping"][i], enc.sequence_ids(i)
        input_ids = enc["input_ids"][i]
        cls_index = input_ids.index(tokenizer.cls_token_id) if tokenizer.cls_token_id in input_ids else 0
        ctx = [k for k, s in enumerate(seq) if s == 1]
        # HF's rule: label the first answer if the window's context covers it entirely, else CLS; the start
        # scan stops at the context's end (HF's runs on into [SEP]/padding when the answer starts at the last token)
        start_char = ex.answer_starts[0]
        end_char = start_char + len(ex.answers[0])
        label = (cls_index, cls_index)
        if ctx and off[ctx[0]][0] <= start_char and off[ctx[-1]][1] >= end_char:
            ts = ctx[0]
            while ts <= ctx[-1] and off[ts][0] <= start_char:
                ts += 1
            te = ctx[-1]
            while off[te][1] >= end_char:
                te -= 1
            label = (ts - 1, te + 1)
        starts.append(label[0])
        ends.append(label[1])
        offsets[i, [k for k, s in enumerate(seq) if s != 1]] = -1
        row, found = [-1] * len(input_ids), []
        if linked is not None:
            found = mentions_to_tokens(linked(questions[sample]), off, seq, 0)
            found += mentions_to_tokens(linked(ex.context), off, seq, 1)
        spans.append(fill_mentions(row, found))
        token_entity.append(row)
        ids.append(ex.qid)
    tensors = {
        "input_ids": torch.tensor(enc["input_ids"], dtype=torch.long),
        "attention_mask": torch.tensor(enc["attention_mask"], dtype=torch.long),
        "token_type_ids": torch.tensor(enc["token_type_ids"], dtype=torch.long),
        "token_entity": torch.tensor(token_entity, dtype=torch.long),
        "start_positions": torch.tensor(starts, dtype=torch.long),
        "end_positions": torch.tensor(ends, dtype=torch.long),
        "context_offsets": torch.from_numpy(offsets),
    }
    return QAFeatures(
        tensors=tensors, mention_spans=spans_tensor(spans), example_ids=tuple(ids),
        contexts={ex.qid: ex.context for ex in examples},
    )


def postprocess(
    features: QAFeatures, start_logits: torch.Tensor, end_logits: torch.Tensor, n_best: int = 20, max_answer_len: int = 30
) -> dict[str, str]:
    """Best answer text per question from per-window logits [N, S] (HF's postprocess_qa_predictions for
    v1.1): over every window of a question, the n_best start and end tokens are paired, spans outside the
    context, reversed or longer than ``max_answer_len`` tokens are skipped, and the highest
    start + end logit wins. A question with no valid span gets ''."""
    offsets = features.tensors["context_offsets"]
    n, s = len(features), offsets.shape[1]
    if start_logits.shape != end_logits.shape or start_logits.ndim != 2 or start_logits.shape[0] != n or start_logits.shape[1] > s:
        raise ValueError(f"logits must both be [{n}, S <= {s}], got {tuple(start_logits.shape)} and {tuple(end_logits.shape)}")
    k = min(n_best, start_logits.shape[1])
    top_s = torch.topk(start_logits.float(), k, dim=1).indices.tolist()
    top_e = torch.topk(end_logits.float(), k, dim=1).indices.tolist()
    sl, el = start_logits.float().tolist(), end_logits.float().tolist()
    best: dict[str, tuple[float, int, int]] = {}
    for f, qid in enumerate(features.example_ids):
        off = offsets[f].tolist()
        for s in top_s[f]:
            if off[s][0] < 0:
                continue
            for e in top_e[f]:
                if off[e][0] < 0 or e < s or e - s + 1 > max_answer_len:
                    continue
                score = sl[f][s] + el[f][e]
                if qid not in best or score > best[qid][0]:
                    best[qid] = (score, off[s][0], off[e][1])
    return {q: features.contexts[q][best[q][1] : best[q][2]] if q in best else "" for q in dict.fromkeys(features.example_ids)}


# ---- official SQuAD v1.1 evaluation (evaluate-v1.1.py) ------------------------------------------------

_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(s: str) -> str:
    """Lower text and remove punctuation, articles and extra whitespace."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCTUATION)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def exact_match(prediction: str, ground_truth: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(ground_truth))


def f1_score(prediction: str, ground_truth: str) -> float:
    pred, gold = normalize_answer(prediction).split(), normalize_answer(ground_truth).split()
    num_same = sum((Counter(pred) & Counter(gold)).values())
    if num_same == 0:
        return 0.0
    precision, recall = num_same / len(pred), num_same / len(gold)
    return 2 * precision * recall / (precision + recall)


def evaluate(dataset_answers: Mapping[str, Sequence[str]], predictions: Mapping[str, str]) -> dict[str, float]:
    """EM and F1 in percent, each the max over a question's ground truths, averaged over every question
    of ``dataset_answers``; an unanswered question scores 0 (as the official script). Also returns
    ``num_questions`` and ``num_unanswered``."""
    if not dataset_answers:
        raise ValueError("no questions to evaluate")
    em = f1 = unanswered = 0
    for qid, truths in dataset_answers.items():
        if qid not in predictions:
            unanswered += 1
            continue
        em += max(exact_match(predictions[qid], t) for t in truths)
        f1 += max(f1_score(predictions[qid], t) for t in truths)
    n = len(dataset_answers)
    return {"exact_match": 100.0 * em / n, "f1": 100.0 * f1 / n, "num_questions": n, "num_unanswered": unanswered}
