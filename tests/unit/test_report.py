"""bikd/report.py: report.md, PNG plots and a TensorBoard event file from per-round metrics rows; rebuilding
from the same rows gives the same files (a resumed run's report is an uninterrupted one's). And the KG cloze
probe of bikd/lm/probe.py on a tiny fused LM, with the table and withheld."""

from __future__ import annotations

import struct

import torch

from bikd.kg.datasets import load_dataset
from bikd.lm.encoder import EncoderConfig
from bikd.lm.fusion import FusionConfig
from bikd.lm.kg_teacher import KGTable
from bikd.lm.model import LMConfig
from bikd.lm.probe import MASK, cloze_facts, fused_lm_probe
from bikd.lm.train import TINY, build_lm
from bikd.lm.triple_cls import TripleVerbaliser
from bikd.report import write_report, write_tensorboard
from bikd.storage import Storage

ROWS = [
    {"round": 1, "kg_valid_mrr": 0.10, "eval_accuracy": 0.55, "eval_nokg_accuracy": 0.52, "probe_p1": 0.1, "probe_nokg_p1": 0.05,
     "mined": 4, "kge_added_triples": 0, "kg_staleness": 0, "mined_sample": [
         {"triple": ["/m/a", "r", "/m/b"], "confidence": 0.9, "evidence": "A | is r of\nB"}]},
    {"round": 2, "kg_valid_mrr": 0.12, "eval_accuracy": 0.60, "eval_nokg_accuracy": 0.58, "probe_p1": 0.2, "probe_nokg_p1": 0.1,
     "mined": 2, "kge_added_triples": 4, "kg_staleness": 1, "mined_sample": []},
]


def events(data: bytes) -> list[tuple[str, int, float]]:
    """(tag, step, value) of every scalar in a TFRecord event file."""
    from tensorboardX.proto import event_pb2

    out, i = [], 0
    while i < len(data):
        (n,) = struct.unpack("<Q", data[i:i + 8])
        event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
        out += [(v.tag, event.step, v.simple_value) for v in event.summary.value]
        i += 12 + n + 4
    return out


def test_report_plots_and_tensorboard(tmp_path):
    storage = Storage(str(tmp_path))
    write_report(storage, ROWS, title="run", final={"round": 2, "stopped_by": "2 rounds", "kg_test": {"mrr": 0.2}})
    write_tensorboard(storage, ROWS)
    text = (tmp_path / "report.md").read_text()
    assert "Finished after round 2 (2 rounds)" in text and "KG test (filtered, read once at the end): mrr 0.2000" in text
    assert "| 2 | 0.1200 | 0.6000 | 0.5800 |" in text
    assert "| 1 | /m/a r /m/b | 0.9000 | A \\| is r of B |" in text  # one table row, pipes escaped
    for png in ("kg.png", "lm.png", "probe.png", "exchange.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"]({png})" in text
    (event_file,) = (tmp_path / "tensorboard").iterdir()
    got = events(event_file.read_bytes())
    assert ("kg_valid_mrr", 2, 0.12) in [(t, s, round(v, 6)) for t, s, v in got]
    assert {t for t, _, _ in got} >= {"kg_valid_mrr", "eval_nokg_accuracy", "mined", "kg_staleness"}

    before = {p.name: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    write_report(storage, ROWS, title="run", final={"round": 2, "stopped_by": "2 rounds", "kg_test": {"mrr": 0.2}})
    write_tensorboard(storage, ROWS)
    after = {p.name: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    tb = "events.out.tfevents.bikd"  # its header records the time it was written; the scalars are the same
    assert events(after.pop(tb)) == events(before.pop(tb)) and after == before


def test_kg_cloze_probe_with_and_without_the_table():
    umls = load_dataset("umls")
    words = TripleVerbaliser.from_kg(umls)
    facts = cloze_facts(umls.valid, words.entity_names, words.relation_texts, umls.relations.labels, limit=40, seed=1)
    assert len(facts) == 40 and all(f.sentences[0].endswith(f" {MASK}.") for f in facts)
    assert facts[0].sentences[0].startswith(words.entity_names[facts[0].subject])
    g = torch.Generator().manual_seed(0)
    table = KGTable.from_arrays(torch.randn(umls.num_entities, 16, generator=g), torch.randn(umls.num_relations, 16, generator=g),
                                interaction="distmult")
    torch.manual_seed(0)
    lm, tokenizer = build_lm(LMConfig(task="triple_cls", encoder=EncoderConfig(name_or_path=TINY, attn_implementation="eager"),
                                      fusion=FusionConfig(layers=(0,), gate_init=1.0)), table)
    fused, plain = fused_lm_probe(lm, tokenizer, facts, kg=True), fused_lm_probe(lm, tokenizer, facts, kg=False)
    assert 0.0 <= fused.p_at_1 <= 1.0 and fused.num_facts == plain.num_facts > 0
    assert lm.training  # the probe restores the mode it found
