"""FusedLM (bikd/lm/model.py): task heads, the loss bookkeeping, table swaps and state_dict round trips."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bikd.lm.encoder import tiny_bert
from bikd.lm.fusion import FusionConfig
from bikd.lm.kd import KDConfig
from bikd.lm.kg_teacher import KGTable
from bikd.lm.model import FusedLM, LMConfig

B, S, N, R = 2, 12, 20, 4


def table(version=0, n=N, r=R, seed=0) -> KGTable:
    g = torch.Generator().manual_seed(seed)
    return KGTable.from_arrays(torch.randn(n, 8, generator=g), torch.randn(r, 8, generator=g),
                               interaction="transe", version=version)


def batch(**labels):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1000, 5000, (B, S), generator=g)
    te = torch.full((B, S), -1)
    spans = torch.tensor([[0, 2, 4, 3], [0, 6, 7, 5], [0, 9, 10, 3], [1, 1, 2, 7], [1, 5, 7, 19]])
    for b, s, e, ent in spans.tolist():
        te[b, s:e] = ent
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), token_type_ids=torch.zeros_like(ids),
                token_entity=te, mention_spans=spans, **labels)


def model(task="qa", kd=KDConfig(), seed=0, **kw) -> FusedLM:
    torch.manual_seed(seed)
    return FusedLM(LMConfig(task=task, kd=kd, fusion=FusionConfig(layers=(1,)), **kw), tiny_bert(), table())


def test_qa_losses_add_up_and_match_hf_convention():
    lm = model(kd=KDConfig(entity_weight=0.5, relation_weight=2.0)).eval()
    starts, ends = torch.tensor([3, 40]), torch.tensor([5, 7])  # 40 > S: ignored, as in HF
    out = lm(batch(start_positions=starts, end_positions=ends))
    assert out["start_logits"].shape == out["end_logits"].shape == (B, S)
    expected = (F.cross_entropy(out["start_logits"], starts.clamp(0, S), ignore_index=S)
                + F.cross_entropy(out["end_logits"], ends.clamp(0, S), ignore_index=S)) / 2
    torch.testing.assert_close(out["task_loss"], expected)
    for k in ("loss", "task_loss", "kd_entity_loss", "kd_relation_loss"):
        assert out[k].ndim == 0 and torch.isfinite(out[k])
    assert out["kd_entity_loss"] > 0 and out["kd_relation_loss"] > 0
    torch.testing.assert_close(out["loss"], out["task_loss"] + 0.5 * out["kd_entity_loss"] + 2.0 * out["kd_relation_loss"])
    # seq 0 has 3 mentions (entities 3, 5, 3) -> 4 ordered pairs of distinct entities; seq 1 has 2 -> 2
    assert out["pair_logits"].shape == (6, R)


def test_triple_cls_and_missing_labels():
    lm = model(task="triple_cls", num_labels=2, kd=KDConfig(entity_weight=0.0, relation_weight=0.0)).eval()
    labels = torch.tensor([1, 0])
    out = lm(batch(labels=labels))
    assert out["logits"].shape == (B, 2)
    torch.testing.assert_close(out["task_loss"], F.cross_entropy(out["logits"], labels))
    assert out["kd_entity_loss"].item() == 0.0 and out["kd_relation_loss"].item() == 0.0
    torch.testing.assert_close(out["loss"], out["task_loss"])
    assert lm(batch())["task_loss"].item() == 0.0  # inference: no labels


def test_backward_reaches_heads_gate_but_not_the_table():
    lm = model().train()
    out = lm(batch(start_positions=torch.tensor([1, 2]), end_positions=torch.tensor([2, 3])))
    out["loss"].backward()
    for name in ("head.weight", "entity_proj.weight", "pair_classifier.weight", "fused.fusions.1.gate"):
        assert float(dict(lm.named_parameters())[name].grad.abs().sum()) > 0, name
    assert lm.table.entity.grad is None and not lm.table.entity.requires_grad


def test_anchor_gives_skipped_modules_zero_gradients_and_leaves_outputs_unchanged(monkeypatch):
    """A batch without mentions skips the fusion site and both KD heads; the anchor still puts every one of
    their parameters in the graph (a zero gradient, not None) and adds exactly 0.0 to the loss."""
    lm = model(kd=KDConfig(entity_weight=0.5, relation_weight=2.0)).eval()  # eval: no dropout, no masking
    b = batch(start_positions=torch.tensor([1, 2]), end_positions=torch.tensor([2, 3]))
    b.update(token_entity=torch.full((B, S), -1), mention_spans=b["mention_spans"][:0])
    conditional = {n: p for n, p in lm.named_parameters() if n.startswith(("entity_proj.", "pair_classifier.", "fused.fusions."))}
    assert set(conditional) == {"entity_proj.weight", "entity_proj.bias", "pair_classifier.weight", "pair_classifier.bias",
                                "fused.fusions.1.proj.weight", "fused.fusions.1.proj.bias", "fused.fusions.1.gate"}
    assert {id(p) for p in lm.conditional_parameters()} == {id(p) for p in conditional.values()}
    with torch.no_grad():  # no backward: no anchor
        monkeypatch.setattr(lm, "_anchor", lambda: pytest.fail("anchor under no_grad"))
        reference = lm(b)
        monkeypatch.undo()
    out = lm(b)
    assert out["kd_entity_loss"].item() == 0.0 and out["kd_relation_loss"].item() == 0.0 and "pair_logits" not in out
    for k in ("loss", "task_loss", "start_logits", "end_logits", "last_hidden_state"):
        assert torch.equal(out[k], reference[k]), k
    out["loss"].backward()
    for name, p in conditional.items():
        assert p.grad is not None and not p.grad.any(), name
    assert dict(lm.named_parameters())["head.weight"].grad.abs().sum() > 0
    # the same holds in training mode, and a batch with mentions still trains the heads
    lm.train().zero_grad(set_to_none=True)
    lm(b)["loss"].backward()
    assert all(p.grad is not None and not p.grad.any() for p in conditional.values())
    lm.zero_grad(set_to_none=True)
    lm(batch(start_positions=torch.tensor([1, 2]), end_positions=torch.tensor([2, 3])))["loss"].backward()
    assert float(lm.entity_proj.weight.grad.abs().sum()) > 0 and float(lm.pair_classifier.weight.grad.abs().sum()) > 0


def test_alignment_masking_unlinks_whole_mentions_in_training_only():
    lm = model(kd=KDConfig(alignment_mask_prob=0.5, seed=1))
    b = batch()
    masked = lm._mask_alignments(b["token_entity"], b["mention_spans"])
    assert masked is not b["token_entity"] and torch.equal(b["token_entity"], batch()["token_entity"])
    for bi, s, e, ent in b["mention_spans"].tolist():
        span = masked[bi, s:e]
        assert bool((span == ent).all()) or bool((span == -1).all())
    assert int((masked >= 0).sum()) < int((b["token_entity"] >= 0).sum())  # seed 1 drops some
    with torch.no_grad():
        lm.fused.fusions["1"].gate.fill_(1.0)
    lm.eval()
    reference = lm(b)["last_hidden_state"]
    torch.testing.assert_close(lm(b)["last_hidden_state"], reference)  # no masking in eval
    lm.generator.manual_seed(1)  # the draw above, which dropped some mentions
    assert not torch.equal(lm.train()(b)["last_hidden_state"], reference)  # masked in training
    no_ea = model(kd=KDConfig(entity_weight=0.0, alignment_mask_prob=0.5, seed=1))
    no_ea.load_state_dict(lm.state_dict())
    no_ea.generator.manual_seed(1)
    torch.testing.assert_close(no_ea.train()(b)["last_hidden_state"], reference)  # masking only serves EA


def test_state_dict_round_trip_without_the_table():
    src = model(seed=0).eval()
    with torch.no_grad():
        src.fused.fusions["1"].gate.fill_(0.3)
    dst = model(seed=1).eval()
    state = src.state_dict()
    assert not any(k.startswith("table") or "kg" in k for k in state)
    assert not any(v.shape == src.table.entity.shape for v in state.values())
    dst.load_state_dict(state)
    b = batch(start_positions=torch.tensor([1, 2]), end_positions=torch.tensor([2, 3]))
    a, c = src(b), dst(b)
    for k in ("start_logits", "end_logits", "task_loss", "kd_relation_loss"):
        torch.testing.assert_close(a[k], c[k])


def test_table_swap_checks_relations_and_records_the_version():
    lm = model().eval()
    assert lm.table_version == 0
    lm.set_kg_table(table(version=1, seed=5))
    assert lm.table_version == 1
    with pytest.raises(ValueError, match=r"3 relations.*predicts 4"):
        lm.set_kg_table(table(version=2, r=3))
    with pytest.raises(ValueError, match="no KG table"):
        FusedLM(LMConfig(fusion=FusionConfig(layers=(0,), entity_dim=8)), tiny_bert())
    lm_no_table = FusedLM(LMConfig(num_relations=R, fusion=FusionConfig(layers=(0,), entity_dim=8)), tiny_bert())
    with pytest.raises(ValueError, match="no entity table is set"):
        lm_no_table(batch())
    lm_no_table.set_kg_table(table())
    lm_no_table(batch())


def test_bad_mentions_and_config():
    lm = model().eval()
    b = batch()
    b["mention_spans"] = torch.tensor([[0, 2, 4, 25]])
    b["token_entity"] = torch.full((B, S), -1)
    with pytest.raises(ValueError, match=r"mention_spans entity ids hold 25.*20 rows"):
        lm(b)
    for bad in (dict(task="mlm"), dict(num_labels=1), dict(classifier_dropout=1.0), dict(num_relations=0)):
        with pytest.raises(ValueError):
            LMConfig(**bad)
