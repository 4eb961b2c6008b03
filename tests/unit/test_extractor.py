"""The relation extractor (bikd.lm.extractor): encoding, distant-supervision training, calibration, predict,
save/load, fusion on vs off. A tiny KG with its text written here and the tiny random BERT."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bikd.kge.export import ExportError
from bikd.lm.corpus import distant_labels, pair_candidates
from bikd.lm.encoder import TINY, EncoderConfig
from bikd.lm.extractor import (ExtractorConfig, build_extractor, calibrate_temperature, encode_pairs, load_extractor,
                               make_scorer, predict, save_extractor, snapshot_id, train_extractor)
from bikd.lm.extractor import batch_logits
from bikd.lm.extractor_train import nll
from bikd.lm.kg_teacher import KGTable
from bikd.lm.linking import EntityLinker
from bikd.lm.pairs import PairCandidate, Passage

CITIES = ["Paris", "Berlin", "Rome", "Madrid", "Vienna", "Lisbon"]
COUNTRIES = ["France", "Germany", "Italy", "Spain", "Austria", "Portugal"]
NAMES = CITIES + COUNTRIES  # ids: cities 0..5, countries 6..11
R = 2  # 0 capital_of (city -> its country), 1 borders (country -> next country)
TINY_ENC = EncoderConfig(name_or_path=TINY)


def _kg() -> torch.Tensor:
    n = len(CITIES)
    capital = [[i, 0, n + i] for i in range(n)]
    borders = [[n + i, 1, n + (i + 1) % n] for i in range(n)]
    return torch.tensor(capital + borders)


def _passages() -> list[Passage]:
    out, n = [], len(CITIES)
    for i, (city, country) in enumerate(zip(CITIES, COUNTRIES)):
        other = COUNTRIES[(i + 2) % n]
        out.append(Passage(f"desc:{i}", f"{city} -- {city} is the capital of {country}, far from {other}.", i, len(city)))
        out.append(Passage(f"news:{i}", f"{country} borders {COUNTRIES[(i + 1) % n]}, and {CITIES[(i + 3) % n]} is a city."))
    return out


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # the tiny model is all latency: on 2 shared cores two torch threads per process oversubscribe them
    # (measured 20x slower training here under a load of 4)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data():
    linker = EntityLinker.build({i: [name] for i, name in enumerate(NAMES)})
    cands, _ = pair_candidates(_passages(), linker)
    return cands, distant_labels(cands, _kg(), R)


def _table(seed: int, num_entities: int = len(NAMES)) -> KGTable:
    g = torch.Generator().manual_seed(seed)
    return KGTable.from_arrays(torch.randn(num_entities, 8, generator=g), torch.randn(R, 8, generator=g),
                               interaction="distmult", version=seed)


def test_encode_pairs_keeps_both_mentions_inside_a_cut_window():
    text = "Paris " + "and some more words " * 30 + "end of France"
    h, t = (0, 5), (len(text) - 6, len(text))
    cand = PairCandidate("d", text, 0, 6, h, t)
    _, tok = build_extractor(ExtractorConfig(), R, encoder_cfg=TINY_ENC)
    batch = encode_pairs(tok, [cand, PairCandidate("e", "France is near Paris", 6, 0, (0, 6), (15, 20))], 16)
    assert batch["input_ids"].shape == (2, 16) and batch["mention_spans"].shape == (4, 4)
    for row, (b, s, e, ent) in enumerate(batch["mention_spans"].tolist()):
        words = tok.decode(batch["input_ids"][b, s:e])
        assert words == ("paris", "france", "france", "paris")[row]
        assert (batch["token_entity"][b, s:e] == ent).all()
    assert int((batch["token_entity"][0] >= 0).sum()) == 2  # nothing else is linked
    assert batch["attention_mask"][1].sum() < 16  # the short row is padded
    assert tok.decode(batch["input_ids"][0, 0]) == "[CLS]" and tok.decode(batch["input_ids"][0, -1]) == "[SEP]"


def test_training_lowers_the_loss_and_predict_gives_distributions(data):
    cands, labels = data
    cfg = ExtractorConfig(epochs=8, batch_size=8, lr=1e-3, head_lr=3e-3, no_relation_ratio=None, head_dropout=0.0)
    model, tok = build_extractor(cfg, R, encoder_cfg=TINY_ENC)
    history = train_extractor(model, tok, cands, labels, cfg)
    assert history["num_positive"] == int((labels[:, -1] == 0).sum()) > 0
    assert history["num_steps"] == 8 * -(-len(cands) // 8)
    assert history["epoch_loss"][-1] < 0.5 * history["epoch_loss"][0]
    probs = predict(model, tok, cands, batch_size=5)
    assert probs.shape == (len(cands), R + 1) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    assert (probs.argmax(1) == labels.argmax(1).numpy()).mean() > 0.8  # it fits its training pairs
    np.testing.assert_array_equal(make_scorer(model, tok, batch_size=5)(cands), probs)
    # other batches pad rows differently: equal up to float rounding
    np.testing.assert_allclose(predict(model, tok, cands, batch_size=64), probs, atol=1e-6)
    assert predict(model, tok, []).shape == (0, R + 1)


def test_pairs_of_a_passage_share_its_encoding_without_fusion(data):
    cands, _ = data
    model, tok = build_extractor(ExtractorConfig(), R, encoder_cfg=TINY_ENC)
    shared = encode_pairs(tok, cands, 64, share_rows=True)
    assert len(shared["input_ids"]) == len({c.text for c in cands}) < len(cands)
    assert len(shared["mention_spans"]) == 2 * len(cands)
    with torch.no_grad():
        one_row_each = model(encode_pairs(tok, cands, 64))
    # what predict computes (rows shared, batched by passage) is what one row per pair gives
    torch.testing.assert_close(batch_logits(model, tok, cands, 4, 64), one_row_each, atol=1e-5, rtol=1e-5)


def test_no_relation_subsampling_and_bad_labels(data):
    cands, labels = data
    cfg = ExtractorConfig(epochs=1, batch_size=64, no_relation_ratio=0.5)
    model, tok = build_extractor(cfg, R, encoder_cfg=TINY_ENC)
    history = train_extractor(model, tok, cands, labels, cfg)
    assert history["num_steps"] == 1 and history["num_no_relation"] > 0.5 * history["num_positive"]
    with pytest.raises(ValueError, match=r"labels must be \(num_candidates, R \+ 1\)"):
        train_extractor(model, tok, cands, labels[:, :R], cfg)
    nothing = torch.zeros_like(labels)
    nothing[:, -1] = 1
    with pytest.raises(ValueError, match="has a relation"):
        train_extractor(model, tok, cands, nothing, cfg)
    with pytest.raises(ValueError, match="teacher_weight > 0 needs the KG teacher"):
        train_extractor(model, tok, cands, labels, ExtractorConfig(teacher_weight=1.0))


def test_teacher_soft_targets_are_distilled(data):
    cands, labels = data
    teacher = _table(0)
    cfg = ExtractorConfig(epochs=6, batch_size=8, lr=1e-3, head_lr=3e-3, teacher_weight=1.0, head_dropout=0.0)
    model, tok = build_extractor(cfg, R, encoder_cfg=TINY_ENC)
    history = train_extractor(model, tok, cands, labels, cfg, teacher=teacher)
    assert all(kd > 0 for kd in history["kd_loss"]) and history["kd_loss"][-1] < history["kd_loss"][0]


def test_calibration_lowers_valid_nll_of_an_over_confident_model(data):
    cands, labels = data
    model, tok = build_extractor(ExtractorConfig(), R, encoder_cfg=TINY_ENC)
    with torch.no_grad():  # an over-confident head: logits 30x too large
        model.head[-1].weight.mul_(30.0)
        model.head[-1].bias.mul_(30.0)
    # "valid": the pairs relabelled from another set of triples, as calibration pairs labelled from valid are
    valid_labels = distant_labels(cands, _kg()[[0, 2, 7]], R)
    before = predict(model, tok, cands)
    logits = batch_logits(model, tok, cands, 16, model.max_length)
    temperature = calibrate_temperature(model, tok, cands, valid_labels)
    assert temperature > 1.0 and float(model.temperature) == pytest.approx(temperature)
    assert nll(logits, valid_labels, temperature) < nll(logits, valid_labels, 1.0)
    after = predict(model, tok, cands)
    assert after.max(1).mean() < before.max(1).mean()  # softer
    np.testing.assert_array_equal(after.argmax(1), before.argmax(1))  # same ranking of relations


@pytest.mark.parametrize("fusion", [False, True])
def test_save_load_round_trip(tmp_path, data, fusion):
    cands, labels = data
    cfg = ExtractorConfig(fusion=fusion, fusion_gate_init=0.5, epochs=1, batch_size=16)
    table = _table(1)
    model, tok = build_extractor(cfg, R, encoder_cfg=TINY_ENC, table=table if fusion else None)
    train_extractor(model, tok, cands, labels, cfg, teacher=table)
    model.temperature.fill_(1.7)
    manifest = save_extractor(model, tok, str(tmp_path / "ext"), extra={"round": 1})
    assert manifest["snapshot_id"] == snapshot_id(model) and manifest["requires_kg_table"] is fusion
    assert manifest["extra"] == {"round": 1} and manifest["temperature"] == pytest.approx(1.7)
    loaded, tok2 = load_extractor(str(tmp_path / "ext"), table=table if fusion else None)
    assert snapshot_id(loaded) == manifest["snapshot_id"] and float(loaded.temperature) == pytest.approx(1.7)
    np.testing.assert_array_equal(predict(loaded, tok2, cands), predict(model, tok, cands))
    if fusion:
        assert manifest["table"]["version"] == 1 and manifest["table"]["num_entities"] == len(NAMES)
        bare, _ = load_extractor(str(tmp_path / "ext"))
        with pytest.raises(ValueError, match="set_kg_table"):
            predict(bare, tok2, cands)
    (tmp_path / "ext" / "extractor.safetensors").write_bytes(b"tampered")
    with pytest.raises(ExportError, match="checksum"):
        load_extractor(str(tmp_path / "ext"))
    with pytest.raises(ExportError, match="manifest.json: not found"):
        load_extractor(str(tmp_path / "nothing"))


def test_fusion_on_reads_the_table_and_fusion_off_ignores_it(data):
    cands, _ = data
    a, b = _table(2), _table(3)
    fused, tok = build_extractor(ExtractorConfig(fusion=True, fusion_gate_init=1.0), R, encoder_cfg=TINY_ENC, table=a)
    plain, _ = build_extractor(ExtractorConfig(fusion=False), R, encoder_cfg=TINY_ENC)
    on_a, off_a = predict(fused, tok, cands), predict(plain, tok, cands)
    fused.set_kg_table(b)
    plain.set_kg_table(b)
    on_b, off_b = predict(fused, tok, cands), predict(plain, tok, cands)
    assert np.abs(on_a - on_b).max() > 1e-4  # the fused rows change the prediction
    np.testing.assert_array_equal(off_a, off_b)  # text only
    assert np.abs(on_a - off_a).max() > 1e-4
    with pytest.raises(ValueError, match="relations"):
        plain.set_kg_table(KGTable.from_arrays(torch.randn(3, 4), torch.randn(5, 4), interaction="distmult"))
    with pytest.raises(ValueError, match="pass the KG table"):
        build_extractor(ExtractorConfig(fusion=True), R, encoder_cfg=TINY_ENC)
    with pytest.raises(ValueError, match="extractor.max_length 256 exceeds the encoder's 128 positions"):
        build_extractor(ExtractorConfig(max_length=256), R, encoder_cfg=TINY_ENC)


@pytest.mark.parametrize("key,value", [("max_length", 4), ("epochs", 0), ("lr", 0.0), ("teacher_weight", -1.0),
                                       ("no_relation_ratio", -0.5), ("max_train_pairs", 0), ("head_dropout", 1.0)])
def test_config_errors_name_the_key(key, value):
    with pytest.raises(ValueError, match=f"extractor.{key}"):
        ExtractorConfig(**{key: value})
