"""Training the relation extractor by distant supervision, and calibrating its temperature (pure torch).

Loss per batch of P pairs with multi-hot labels ``y (P, R + 1)`` (:func:`bikd.lm.corpus.distant_labels`):

    CE = -1/P * sum_p sum_r (y[p, r] / sum_r' y[p, r']) * log_softmax(logits[p])[r]

(a pair with k relations spreads its target evenly over them), plus, with ``teacher_weight > 0``, the KG
teacher's relation distribution as soft targets over the R relation columns:

    KD = T^2 * KL(softmax(score(h, ., t) / T) || softmax(logits[p, :R] / T))     (bikd.lm.kd)

i.e. it shapes which relation the extractor prefers *given* that one holds; "no relation" is learnt from
the text labels only.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from bikd.lm.extractor import ExtractorConfig, RelationExtractor, _device, batch_logits, encode_pairs
from bikd.lm.kd import relation_distillation_loss
from bikd.lm.kg_teacher import KGTable
from bikd.lm.pairs import PairCandidate

__all__ = ["soft_target_loss", "train_extractor", "calibrate_temperature", "nll"]


def _check(model: RelationExtractor, candidates: Sequence[PairCandidate], labels: Tensor) -> Tensor:
    labels = torch.as_tensor(labels, dtype=torch.float32)
    want = (len(candidates), model.num_relations + 1)
    if tuple(labels.shape) != want:
        raise ValueError(f"labels must be (num_candidates, R + 1) = {want}, got {tuple(labels.shape)}")
    if len(labels) and not bool((labels.sum(1) > 0).all()):
        row = int((labels.sum(1) <= 0).nonzero()[0, 0])
        raise ValueError(f"labels row {row} is all zero: every pair needs a relation or the 'no relation' column")
    return labels


def soft_target_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """``logits (P, C)``, multi-hot ``labels (P, C)`` -> mean over pairs of the cross-entropy against the
    labels normalised to sum 1."""
    target = labels / labels.sum(1, keepdim=True)
    return -(target * F.log_softmax(logits, dim=-1)).sum(1).mean()


def nll(logits: Tensor, labels: Tensor, temperature: float = 1.0) -> float:
    """:func:`soft_target_loss` of ``logits / temperature``: the calibration objective."""
    return float(soft_target_loss(logits / temperature, labels))


def _select(labels: Tensor, cfg: ExtractorConfig, rng: random.Random) -> tuple[list[int], list[int]]:
    """Indices of the pairs with a relation and of the "no relation" ones, after ``max_train_pairs``."""
    index = list(range(len(labels)))
    if cfg.max_train_pairs is not None and cfg.max_train_pairs < len(index):
        index = sorted(rng.sample(index, cfg.max_train_pairs))
    none_col = labels.shape[1] - 1
    has_rel = (labels[:, :none_col].sum(1) > 0).tolist()
    return [i for i in index if has_rel[i]], [i for i in index if not has_rel[i]]


def train_extractor(model: RelationExtractor, tokenizer, candidates: Sequence[PairCandidate], labels: Tensor,
                    cfg: ExtractorConfig, *, teacher: KGTable | None = None) -> dict:
    """Train ``model`` in place on ``candidates`` with ``labels (n, R + 1)`` (distant supervision from the
    **train** split) for ``cfg.epochs`` epochs on the model's device; returns the history: ``loss`` (per
    step), ``epoch_loss``, ``kd_loss`` (per step, 0 when off), ``num_pairs``, ``num_positive``,
    ``num_no_relation`` (available), ``num_steps``, ``seconds``.

    Each epoch uses every pair with a relation plus ``no_relation_ratio`` times as many "no relation" pairs
    drawn afresh (seeded by ``cfg.seed`` and the epoch), shuffled. With fusion on, the model's table is
    ``teacher`` when none is set yet. ValueError when no pair has a relation, or ``teacher_weight > 0``
    without a ``teacher``. The model is left in eval mode with ``max_length = cfg.max_length``."""
    labels = _check(model, candidates, labels)
    if cfg.teacher_weight > 0 and teacher is None:
        raise ValueError("extractor.teacher_weight > 0 needs the KG teacher (teacher=KGTable)")
    if teacher is not None and teacher.num_relations != model.num_relations:
        raise ValueError(f"teacher (version {teacher.version}) has {teacher.num_relations} relations, the extractor "
                         f"predicts {model.num_relations}")
    if model.fusion and model.table is None:
        if teacher is None:
            raise ValueError("a fusion-on extractor needs a KG table: set_kg_table, or pass teacher=")
        model.set_kg_table(teacher)
    rng = random.Random(cfg.seed)
    positive, negative = _select(labels, cfg, rng)
    if not positive:
        raise ValueError(f"none of the {len(labels)} training pairs has a relation in the labels: nothing to learn "
                         f"(are the labels from the train split, and do the passages link KG entities?)")
    model.max_length = cfg.max_length
    device = _device(model)
    head_ids = {id(p) for p in model.head_parameters()}
    encoder_params = [p for p in model.parameters() if id(p) not in head_ids]
    optimizer = torch.optim.AdamW([{"params": encoder_params, "lr": cfg.lr},
                                   {"params": model.head_parameters(), "lr": cfg.head_lr or cfg.lr}],
                                  weight_decay=cfg.weight_decay, foreach=True)  # one kernel per op, not per tensor
    history: dict = {"loss": [], "kd_loss": [], "epoch_loss": [], "num_pairs": len(positive) + len(negative),
                     "num_positive": len(positive), "num_no_relation": len(negative)}
    start, steps = time.perf_counter(), 0
    model.train()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(cfg.seed)  # dropout
            for epoch in range(cfg.epochs):
                num_neg = len(negative) if cfg.no_relation_ratio is None else min(
                    len(negative), math.ceil(cfg.no_relation_ratio * len(positive)))
                rows = positive + rng.sample(negative, num_neg)
                rng.shuffle(rows)
                total = 0.0
                for i in range(0, len(rows), cfg.batch_size):
                    idx = rows[i:i + cfg.batch_size]
                    batch = {k: v.to(device) for k, v in encode_pairs(tokenizer, [candidates[k] for k in idx],
                                                                      cfg.max_length).items()}
                    logits = model(batch)
                    loss = soft_target_loss(logits, labels[idx].to(device))
                    kd = logits.new_zeros(())
                    if cfg.teacher_weight > 0:
                        h = torch.tensor([candidates[k].h for k in idx])
                        t = torch.tensor([candidates[k].t for k in idx])
                        scores = teacher.relation_scores(h, t).to(device)
                        kd = relation_distillation_loss(logits[:, :-1], scores, cfg.teacher_temperature)
                    total_loss = loss + cfg.teacher_weight * kd
                    optimizer.zero_grad(set_to_none=True)
                    total_loss.backward()
                    if cfg.grad_clip > 0:
                        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                    optimizer.step()
                    history["loss"].append(float(total_loss.detach()))
                    history["kd_loss"].append(float(kd.detach()))
                    total += history["loss"][-1] * len(idx)
                    steps += 1
                history["epoch_loss"].append(total / len(rows))
    finally:
        model.eval()
    history.update(num_steps=steps, seconds=time.perf_counter() - start)
    return history


def calibrate_temperature(model: RelationExtractor, tokenizer, candidates: Sequence[PairCandidate], labels: Tensor,
                          *, batch_size: int = 64, bounds: tuple[float, float] = (0.05, 20.0)) -> float:
    """Fit the softmax temperature on held-out pairs (labelled from **valid** with
    :func:`~bikd.lm.corpus.distant_labels`): ``T = argmin_T nll(logits / T, labels)`` over ``bounds``, set
    as ``model.temperature`` and returned. The NLL is convex in ``1 / T`` (log-sum-exp of a linear function),
    so a golden-section search on ``1 / T`` finds the minimum; the weights are not touched."""
    labels = _check(model, candidates, labels)
    if not len(candidates):
        raise ValueError("no calibration pairs: calibrate on candidates labelled from the valid split")
    lo, hi = bounds
    if not 0 < lo < hi:
        raise ValueError(f"bounds must be 0 < low < high, got {bounds}")
    logits = batch_logits(model, tokenizer, candidates, batch_size, model.max_length)
    f = lambda beta: nll(logits * beta, labels)  # noqa: E731
    a, b = 1.0 / hi, 1.0 / lo
    g = (math.sqrt(5) - 1) / 2
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = f(c), f(d)
    for _ in range(80):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = f(d)
    temperature = 1.0 / ((a + b) / 2)
    model.temperature.fill_(temperature)
    return temperature
