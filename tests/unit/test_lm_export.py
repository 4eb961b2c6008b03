"""bikd/lm/train.py without Ray: export/reload equality, incomplete exports, sharding, task data and evaluation,
and FusedLM's same autograd graph on every rank."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from bikd.kg.datasets import load_dataset
from bikd.kge.export import ExportError
from bikd.lm.fusion import FusionConfig
from bikd.lm.kd import KDConfig
from bikd.lm.kg_teacher import KGTable
from bikd.lm.model import LMConfig
from bikd.lm.squad import SquadFeaturesConfig
from bikd.lm.train import (MANIFEST, TINY, KGTableConfig, TaskConfig, build_linker, build_lm,
                           build_task_data, encoder_num_layers, evaluate_task, export_fused, load_fused, load_fused_and_tokenizer, load_fused_tokenizer,
                           load_kg_table, shard, state_digest)
from bikd.lm.encoder import EncoderConfig, load_tokenizer
from bikd.kge.models import ModelConfig
from bikd.kge.training import KGETrainConfig
from bikd.storage import Storage


@pytest.fixture(scope="module")
def umls():
    return load_dataset("umls")


@pytest.fixture(scope="module")
def table(umls):
    g = torch.Generator().manual_seed(0)
    return KGTable.from_arrays(torch.randn(umls.num_entities, 16, generator=g), torch.randn(umls.num_relations, 16, generator=g),
                               interaction="distmult", version=3)


def tiny_lm(task, table, seed=0):
    torch.manual_seed(seed)
    cfg = LMConfig(task=task, encoder=EncoderConfig(name_or_path=TINY, attn_implementation="eager"),
                   fusion=FusionConfig(layers=(0, 1)), kd=KDConfig(num_sampled_candidates=8))
    lm, tok = build_lm(cfg, table)
    with torch.no_grad():  # gates start at 0 (fusion = identity): make the fusion weights matter
        for site in lm.fused.fusions.values():
            site.gate.normal_()
    return lm.eval(), tok


def squad_file(tmp_path):
    ctx = "The protein binds the enzyme inside a cell. A virus may infect the cell and cause a disease."
    arts = [{"title": f"a{i}", "paragraphs": [{"context": ctx, "qas": [
        {"id": f"q{i}{j}", "question": q, "answers": [{"text": a, "answer_start": ctx.index(a)}]}
        for j, (q, a) in enumerate([("What binds the enzyme?", "The protein"), ("What may infect the cell?", "A virus")])]}]}
        for i in range(4)]
    path = tmp_path / "squad.json"
    path.write_text(json.dumps({"data": arts}))
    return str(path)


def task_data(task, tok, umls, tmp_path, world_size=1, rank=0):
    cfg = TaskConfig(name=task, link=True, max_train=12, max_eval=10, squad_path=squad_file(tmp_path),
                     squad_eval_fraction=0.5, qa=SquadFeaturesConfig(max_length=48, doc_stride=8, max_query_length=12))
    return build_task_data(cfg, tok, umls, build_linker(umls), rank=rank, world_size=world_size)


@pytest.mark.parametrize("task", ["triple_cls", "qa"])
def test_export_reload_gives_equal_outputs(task, table, umls, tmp_path):
    lm, tok = tiny_lm(task, table)
    _, evaluation = task_data(task, tok, umls, tmp_path)
    _, batch = next(evaluation.batches(8))
    assert (batch["token_entity"] >= 0).any() and len(batch["mention_spans"])
    manifest = export_fused(lm, tok, str(tmp_path / "export"), extra={"step": 7})
    back = load_fused(str(tmp_path / "export"))
    assert back.table_version == 3 and manifest["extra"] == {"step": 7} and not back.training
    assert state_digest(back.state_dict()) == state_digest(lm.state_dict())
    with torch.no_grad():
        a, b = lm(batch), back(batch)
    for key in ("logits",) if task == "triple_cls" else ("start_logits", "end_logits"):
        assert torch.equal(a[key], b[key]), key
    assert torch.equal(a["last_hidden_state"], b["last_hidden_state"])
    torch.testing.assert_close(back.table.entity, table.entity, rtol=0, atol=0)
    assert load_fused_tokenizer(str(tmp_path / "export"))("a protein")["input_ids"] == tok("a protein")["input_ids"]
    both, tok2 = load_fused_and_tokenizer(str(tmp_path / "export"))  # one read of the export, the same pair
    assert tok2("a protein")["input_ids"] == tok("a protein")["input_ids"]
    assert state_digest(both.state_dict()) == state_digest(lm.state_dict()) and both.table_version == 3


def test_export_to_s3(table, s3_url):
    lm, tok = tiny_lm("triple_cls", table)
    export_fused(lm, tok, f"{s3_url}/run/export")
    back = load_fused(Storage(f"{s3_url}/run/export"))
    assert state_digest(back.state_dict()) == state_digest(lm.state_dict())


def test_incomplete_or_corrupt_export_is_refused(table, tmp_path):
    lm, tok = tiny_lm("triple_cls", table)
    export_fused(lm, tok, str(tmp_path / "e"))
    (tmp_path / "e" / "fused.safetensors").write_bytes(b"x")
    with pytest.raises(ExportError, match="fused.safetensors: contents differ from the checksum"):
        load_fused(str(tmp_path / "e"))
    (tmp_path / "e" / MANIFEST).unlink()  # what a crash before the last write leaves
    with pytest.raises(ExportError, match="holds no fused-LM export or an incomplete one"):
        load_fused(str(tmp_path / "e"))
    with pytest.raises(ExportError, match="incomplete"):
        load_fused(str(tmp_path / "never-written"))


def test_shard_pads_so_every_rank_gets_as_many_rows():
    idx = torch.arange(10, 15)
    parts = [shard(idx, r, 3) for r in range(3)]
    assert [p.tolist() for p in parts] == [[10, 13], [11, 14], [12, 10]]
    assert set(torch.cat(parts).tolist()) == set(idx.tolist())
    with pytest.raises(ValueError, match="rank 3 outside"):
        shard(idx, 3, 3)


@pytest.mark.parametrize("task", ["triple_cls", "qa"])
def test_task_data_and_distributed_evaluation_agree(task, table, umls, tmp_path):
    lm, tok = tiny_lm(task, table)
    train, evaluation = task_data(task, tok, umls, tmp_path)
    shards = [task_data(task, tok, umls, tmp_path, world_size=2, rank=r)[0] for r in range(2)]
    assert shards[0].num_batches(4) == shards[1].num_batches(4) == -(-(-(-len(train.features) // 2)) // 4)
    rows = [s.rows(epoch=1) for s in shards]
    assert set(torch.cat(rows).tolist()) == set(range(len(train.features))) and not torch.equal(rows[0], shards[0].rows(epoch=2))
    metrics = evaluate_task(lm, evaluation, task, batch_size=3)
    if task == "triple_cls":
        assert len(evaluation.features) == 20 and 0.0 <= metrics["accuracy"] <= 1.0  # 10 positives + 10 negatives
    else:
        assert metrics["num_questions"] == 4 and 0.0 <= metrics["f1"] <= 100.0 and "exact_match" in metrics


def test_kg_table_trained_in_process_is_deterministic(umls):
    cfg = KGTableConfig(train=KGETrainConfig(epochs=1, batch_size=2048, model=ModelConfig(name="transe", dim=8)))
    a, b = load_kg_table(cfg, umls), load_kg_table(cfg, umls)
    assert torch.equal(a.entity, b.entity) and a.entity_labels == umls.entities.labels
    assert a.num_relations == umls.num_relations and a.interaction == "transe"


@pytest.mark.parametrize("anchor", [True, False])
def test_static_graph_gives_every_rank_the_same_gradient_order(anchor, table, umls, tmp_path, monkeypatch):
    """A batch with mentions and one without must produce gradients for the same parameters in the same
    order (what ZeRO's gradient buckets need to line up across ranks); without its anchor FusedLM does not."""
    lm, tok = tiny_lm("triple_cls", table)
    train, _ = task_data("triple_cls", tok, umls, tmp_path)
    _, linked = next(train.batches(4))
    bare = dict(linked, token_entity=torch.full_like(linked["token_entity"], -1), mention_spans=linked["mention_spans"][:0])
    if not anchor:
        monkeypatch.setattr(lm, "_anchor", lambda: torch.zeros(()))
    model = lm.train()
    orders = []
    for batch in (linked, bare):
        order = []
        hooks = [p.register_post_accumulate_grad_hook(lambda p, n=n: order.append(n)) for n, p in model.named_parameters()]
        model.zero_grad(set_to_none=True)
        model(batch)["loss"].backward()
        for h in hooks:
            h.remove()
        orders.append(order)
    assert (orders[0] == orders[1]) == anchor  # without the anchor, no mentions skips the KD heads and fusion
    if anchor:
        assert set(orders[0]) == {n for n, _ in model.named_parameters()}


def test_squad_holdout_never_reads_the_eval_articles(umls, tmp_path):
    tok = load_tokenizer()
    cfg = TaskConfig(name="qa", squad_path=squad_file(tmp_path), squad_eval_fraction=0.5,
                     qa=SquadFeaturesConfig(max_length=48, doc_stride=8, max_query_length=12))
    train, evaluation = build_task_data(cfg, tok, umls, None)
    fit, held = build_task_data(dataclasses.replace(cfg, squad_holdout=True), tok, umls, None)
    article = lambda data: {qid[1] for qid in data.answers}  # noqa: E731  ids are q<article><question>
    assert len(article(evaluation)) == 2 and len(article(held)) == 1
    assert not article(held) & article(evaluation)  # held-out questions come from fine-tune articles
    assert len(fit.features) == len(train.features) // 2  # and leave training with the other one


def test_build_lm_honours_the_tiny_encoder_fields(table):
    # lm_train used to build the default tiny BERT whatever encoder.tiny_* said (a silently ignored option)
    encoder = EncoderConfig(name_or_path=TINY, tiny_hidden_size=48, tiny_num_layers=3, tiny_num_heads=4)
    cfg = LMConfig(task="triple_cls", encoder=encoder, fusion=FusionConfig(layers=(2,)), kd=KDConfig(num_sampled_candidates=8))
    lm, _ = build_lm(cfg, table)
    assert encoder_num_layers(encoder) == 3 and len(lm.fused.encoder.encoder.layer) == 3
    assert lm.fused.encoder.config.hidden_size == 48


def test_test_rows_do_not_depend_on_the_train_rows(umls):
    # the driver's final LM test builds one train row (not the whole split) next to the test rows it reads
    tok = load_tokenizer()
    cfg = TaskConfig(name="triple_cls", eval_split="test", max_eval=10)
    _, full = build_task_data(cfg, tok, umls, None)
    _, lean = build_task_data(dataclasses.replace(cfg, max_train=1), tok, umls, None)
    assert len(full.features) > 0 and full.features.tensors.keys() == lean.features.tensors.keys()
    assert all(torch.equal(v, lean.features.tensors[k]) for k, v in full.features.tensors.items())
    assert torch.equal(full.features.mention_spans, lean.features.mention_spans)
