"""bikd/lm/trainer.py without Ray or DeepSpeed: a stopped-and-resumed run equals an uninterrupted one (the KG
table swapped mid-run included), evaluation with the table withheld ignores it, the schedule."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from bikd.kg.datasets import load_dataset
from bikd.lm.encoder import EncoderConfig
from bikd.lm.fusion import FusionConfig
from bikd.lm.kd import KDConfig
from bikd.lm.kg_teacher import KGTable
from bikd.lm.model import LMConfig
from bikd.lm.train import TINY, TaskConfig, state_digest
from bikd.lm.trainer import LMTrainer, TorchEngine, TrainConfig, build_parts, lr_at
from bikd.lm.triple_cls import TripleClsConfig


@pytest.fixture(scope="module")
def umls():
    return load_dataset("umls")


def table_v(umls, version: int) -> KGTable:
    g = torch.Generator().manual_seed(version)
    return KGTable.from_arrays(torch.randn(umls.num_entities, 16, generator=g), torch.randn(umls.num_relations, 16, generator=g),
                               interaction="distmult", version=version)


LM = LMConfig(task="triple_cls", num_labels=2, encoder=EncoderConfig(name_or_path=TINY, attn_implementation="eager"),
              fusion=FusionConfig(layers=(0,), gate_init=0.5), kd=KDConfig(num_sampled_candidates=8))
TASK = TaskConfig(max_train=12, max_eval=6, link=True, triple_cls=TripleClsConfig(max_length=24))
TRAIN = TrainConfig(lr=1e-3, warmup_steps=2, batch_size=4, eval_batch_size=8, epochs=2)


def trainer(umls, table) -> LMTrainer:
    parts = build_parts(LM, TASK, umls, None, table, seed=TRAIN.seed)
    total = TRAIN.epochs * parts.train_data.num_batches(TRAIN.batch_size)
    engine = TorchEngine(parts.model, TRAIN, total)
    return LMTrainer(parts.model, engine, parts.train_data, parts.eval_data, TRAIN, task="triple_cls")


def run_to(t: LMTrainer, until: int, swaps: dict[int, KGTable]) -> None:
    while t.step < until:
        if t.step in swaps:
            t.swap_table(swaps[t.step])
        t.train_step()


def test_resumed_run_equals_an_uninterrupted_one_with_a_table_swap_in_between(umls):
    swaps = {3: table_v(umls, 2), 7: table_v(umls, 5)}  # two swaps: across epochs (6 steps per epoch)
    whole = trainer(umls, table_v(umls, 1))
    assert whole.total == 12
    run_to(whole, whole.total, swaps)
    assert whole.table_version == 5

    first = trainer(umls, table_v(umls, 1))
    run_to(first, 5, swaps)  # stopped mid-epoch, after the first swap
    engine_state, loop_state = first.engine.state_dict(), first.state_dict()
    assert loop_state == {"step": 5, "table_version": 2}
    second = trainer(umls, table_v(umls, 1))
    second.engine.load_state_dict(engine_state)
    asked = []
    second.load_state_dict(loop_state, lambda v: asked.append(v) or table_v(umls, v))
    assert asked == [2] and second.table_version == 2 and second.step == 5
    run_to(second, second.total, swaps)
    assert state_digest(second.model.state_dict()) == state_digest(whole.model.state_dict())
    assert second.lr() == pytest.approx(whole.lr())


def test_a_checkpoint_of_another_table_version_needs_a_source(umls):
    t = trainer(umls, table_v(umls, 1))
    with pytest.raises(ValueError, match="fused KG table version 4"):
        t.load_state_dict({"step": 2, "table_version": 4})
    with pytest.raises(ValueError, match="asked for KG table version 4, got version 3"):
        t.load_state_dict({"step": 2, "table_version": 4}, lambda v: table_v(umls, 3))
    t.load_state_dict({"step": 2, "table_version": 1})  # the one in use: nothing to read
    assert t.step == 2


def test_withheld_table_means_no_fusion(umls):
    t = trainer(umls, table_v(umls, 1))
    run_to(t, 3, {})
    with_1, without_1 = t.evaluate(kg=True), t.evaluate(kg=False)
    assert t.swap_table(table_v(umls, 9)) and not t.swap_table(table_v(umls, 9))
    without_9 = t.evaluate(kg=False)
    assert without_9 == without_1  # the LM's own weights only
    both = t.evaluate_both()
    assert set(both) == {"eval_accuracy", "eval_num_examples", "eval_nokg_accuracy"}
    assert both["eval_nokg_accuracy"] == without_1["accuracy"] and with_1["num_examples"] == 12


def test_fusion_changes_the_logits_so_withholding_is_measurable(umls):
    parts = build_parts(LM, TASK, umls, None, table_v(umls, 1), seed=0)
    _, batch = next(parts.eval_data.batches(8))
    batch.pop("mention_spans")
    assert (batch["token_entity"] >= 0).any()
    lm = parts.model.eval()
    with torch.no_grad():
        fused = lm(batch)["logits"]
        plain = lm({k: v for k, v in batch.items() if k != "token_entity"})["logits"]
    assert not torch.equal(fused, plain)


def test_schedule_is_warmup_then_linear_decay():
    cfg = dataclasses.replace(TRAIN, lr=1.0, warmup_steps=4)
    assert [lr_at(s, cfg, 12) for s in (0, 2, 4, 8, 12, 13)] == [0.0, 0.5, 1.0, 0.5, 0.0, 0.0]


def test_plain_training_goes_without_the_kg(umls):
    parts = build_parts(LM, TASK, umls, None, table_v(umls, 1), seed=0)
    plain = [p for p in parts.model.parameters() if p.requires_grad and id(p) not in {id(q) for q in parts.model.conditional_parameters()}]
    engine = TorchEngine(parts.model, TRAIN, 4, params=plain)
    t = LMTrainer(parts.model, engine, parts.train_data, parts.eval_data, TRAIN, task="triple_cls", kg=False)
    gates = [site.gate.detach().clone() for site in parts.model.fused.fusions.values()]
    losses = t.train_step()
    assert losses[2] == 0 and losses[3] == 0 and losses[1] > 0  # no KD term, only the task
    assert all(torch.equal(g, site.gate) for g, site in zip(gates, parts.model.fused.fusions.values()))
