"""EncoderConfig(name_or_path="tiny"): a small random BERT with MiniLM's tokenizer, for tests and CI."""

from __future__ import annotations

import pytest
import torch

from bikd.lm.encoder import TINY, EncoderConfig, load_encoder, load_tokenizer


def test_tiny_encoder_has_the_configured_size_and_minilm_tokenizer():
    cfg = EncoderConfig(name_or_path=TINY, tiny_hidden_size=48, tiny_num_layers=3, tiny_num_heads=4,
                        tiny_max_length=64)
    model, tokenizer = load_encoder(cfg)
    assert model.config.hidden_size == 48 and len(model.encoder.layer) == 3
    assert model.config.max_position_embeddings == 64
    # the real vocabulary: ids index the tiny model's embedding table, and the tokenizer is MiniLM's
    assert tokenizer.vocab_size == model.config.vocab_size == 30522
    assert tokenizer("Paris is in France")["input_ids"] == load_tokenizer(EncoderConfig())("Paris is in France")["input_ids"]
    enc = tokenizer(["Paris is in France", "Berlin"], padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**enc).last_hidden_state
    assert out.shape == (2, enc["input_ids"].shape[1], 48)


def test_tiny_encoder_is_seeded():
    a, _ = load_encoder(EncoderConfig(name_or_path=TINY))
    b, _ = load_encoder(EncoderConfig(name_or_path=TINY))
    c, _ = load_encoder(EncoderConfig(name_or_path=TINY, tiny_seed=1))
    wa, wb, wc = (m.embeddings.word_embeddings.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


@pytest.mark.parametrize("key,value", [("tiny_hidden_size", 0), ("tiny_num_layers", -1), ("tiny_max_length", 0)])
def test_tiny_sizes_validated(key, value):
    with pytest.raises(ValueError, match=f"encoder.{key}"):
        EncoderConfig(name_or_path=TINY, **{key: value})
    with pytest.raises(ValueError, match="multiple of encoder.tiny_num_heads"):
        EncoderConfig(name_or_path=TINY, tiny_hidden_size=30, tiny_num_heads=4)
