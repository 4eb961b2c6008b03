"""Knowledge fusion (bikd/lm/fusion.py), the KG snapshot (bikd/lm/kg_teacher.py) and the encoder loader."""

from __future__ import annotations

import pytest
import torch

from bikd.kge.interactions import INTERACTIONS
from bikd.lm.encoder import EncoderConfig, tiny_bert
from bikd.lm.fusion import FusedEncoder, FusionConfig
from bikd.lm.kg_teacher import KGTable

B, S, N, D_E = 2, 10, 12, 8


def make_table(version: int = 0, n: int = N, d: int = D_E, seed: int = 0, interaction: str = "transe") -> KGTable:
    g = torch.Generator().manual_seed(seed)
    d_r = d // 2 if interaction == "rotate" else d
    return KGTable.from_arrays(torch.randn(n, d, generator=g), torch.randn(5, d_r, generator=g),
                               interaction=interaction, version=version)


def make_inputs():
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(1000, 5000, (B, S), generator=g)
    token_entity = torch.full((B, S), -1)
    token_entity[0, 2:4] = 3
    token_entity[0, 7] = 11
    token_entity[1, 1] = 0
    return dict(input_ids=input_ids, attention_mask=torch.ones(B, S, dtype=torch.long),
                token_type_ids=torch.zeros(B, S, dtype=torch.long)), token_entity


@pytest.fixture(scope="module")
def bert():
    return tiny_bert(num_layers=3)


def fused(bert, layers=(1,), table=None, **kw) -> FusedEncoder:
    import copy
    return FusedEncoder(copy.deepcopy(bert), FusionConfig(layers=layers, **kw), table or make_table())


def test_identity_at_step_zero(bert):
    inputs, token_entity = make_inputs()
    plain = bert(**inputs)
    model = fused(bert, layers=(0, 2))
    out = model(**inputs, token_entity=token_entity)
    assert torch.equal(out.last_hidden_state, plain.last_hidden_state)
    assert torch.equal(out.pooler_output, plain.pooler_output)
    assert all(float(p.detach().abs().sum()) == 0 for n, p in model.fusions.named_parameters() if n.endswith("gate"))


def _layer_outputs(model: FusedEncoder, inputs, token_entity):
    """Output of every encoder layer, captured by hooks registered after the fusion hooks (so fused)."""
    seen = {}
    handles = [layer.register_forward_hook(lambda m, a, o, i=i: seen.__setitem__(i, o.detach().clone()))
               for i, layer in enumerate(model.encoder.encoder.layer)]
    try:
        model(**inputs, token_entity=token_entity)
    finally:
        for h in handles:
            h.remove()
    return seen


def test_nonzero_gate_changes_only_linked_tokens_at_the_fusion_layer(bert):
    inputs, token_entity = make_inputs()
    model = fused(bert, layers=(1,))
    fusion = model.fusions["1"]
    with torch.no_grad():
        fusion.gate.fill_(0.5)
    plain = _layer_outputs(model, inputs, None)
    fusedo = _layer_outputs(model, inputs, token_entity)
    assert torch.equal(plain[0], fusedo[0])  # before the fusion layer: untouched
    linked = token_entity >= 0
    assert torch.equal(plain[1][~linked], fusedo[1][~linked])
    expected = 0.5 * fusion.proj(model.table.entity[token_entity[linked]])
    torch.testing.assert_close(fusedo[1][linked] - plain[1][linked], expected, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(plain[2][~linked], fusedo[2][~linked])  # attention spreads it afterwards


def test_scalar_gate_and_no_linked_tokens(bert):
    inputs, token_entity = make_inputs()
    model = fused(bert, layers=(0,), gate="scalar", gate_init=0.3)
    # (1,), not (): DeepSpeed's engine broadcasts each parameter as bytes, which fails on a 0-dim tensor
    assert model.fusions["0"].gate.shape == (1,) and all(p.dim() >= 1 for p in model.parameters())
    for p in model.parameters():
        p.data.view(torch.uint8)
    old = {k: (v.reshape(()) if k == "fusions.0.gate" else v) for k, v in model.state_dict().items()}
    again = fused(bert, layers=(0,), gate="scalar")
    again.load_state_dict(old)  # a checkpoint from before, with a 0-dim gate
    assert again.fusions["0"].gate.shape == (1,) and again.fusions["0"].gate.item() == pytest.approx(0.3)
    none_linked = torch.full_like(token_entity, -1)
    assert torch.equal(model(**inputs, token_entity=none_linked).last_hidden_state, bert(**inputs).last_hidden_state)
    assert not torch.equal(model(**inputs, token_entity=token_entity).last_hidden_state,
                           bert(**inputs).last_hidden_state)


def test_swapping_the_table_changes_outputs_and_version_in_place(bert):
    inputs, token_entity = make_inputs()
    model = fused(bert, layers=(1,), table=make_table(version=3))
    with torch.no_grad():
        model.fusions["1"].gate.fill_(1.0)
    keys = list(model.state_dict())
    params = {n: id(p) for n, p in model.named_parameters()}
    before = model(**inputs, token_entity=token_entity).last_hidden_state
    assert model.table_version == 3
    model.set_entity_table(make_table(version=4, n=N + 5, seed=7))  # a newer snapshot may add entities
    after = model(**inputs, token_entity=token_entity).last_hidden_state
    assert model.table_version == 4 and model.table.num_entities == N + 5
    assert not torch.allclose(before, after)
    assert list(model.state_dict()) == keys and {n: id(p) for n, p in model.named_parameters()} == params
    linked = token_entity >= 0
    plain = bert(**inputs).last_hidden_state
    assert not torch.equal(after[linked], plain[linked])


def test_state_dict_holds_w_and_g_but_not_the_table(bert):
    model = fused(bert, layers=(0, 1))
    own = [k for k in model.state_dict() if not k.startswith("encoder.")]
    assert sorted(own) == sorted(f"fusions.{i}.{p}" for i in (0, 1) for p in ("gate", "proj.weight", "proj.bias"))
    assert not any(t is model.table.entity for t in model.state_dict().values())
    assert not any(b.shape == model.table.entity.shape for b in model.buffers())


def test_errors_name_the_numbers(bert):
    inputs, token_entity = make_inputs()
    model = fused(bert, layers=(1,))
    with pytest.raises(ValueError, match=r"dim 6.*8-dim"):
        model.set_entity_table(make_table(d=6))
    small = make_table(version=9, n=5)
    model.set_entity_table(small)
    with pytest.raises(ValueError, match=r"id 11.*version 9.*5 rows"):
        model(**inputs, token_entity=token_entity)
    model.set_entity_table(make_table())
    model(**inputs, token_entity=token_entity)  # ids up to 11 used
    with pytest.raises(ValueError, match=r"5 entities.*ids up to 11"):
        model.set_entity_table(small)
    bad = token_entity.clone()
    bad[1, 4] = -2
    with pytest.raises(ValueError, match=r"-2"):
        model(**inputs, token_entity=bad)
    with pytest.raises(ValueError, match=r"shape"):
        model(**inputs, token_entity=token_entity[:, :4])
    with pytest.raises(ValueError, match=r"3 layers"):
        fused(bert, layers=(3,))
    with pytest.raises(ValueError, match="entity_dim"):
        FusedEncoder(tiny_bert(), FusionConfig(layers=(0,)))
    with pytest.raises(ValueError, match="no entity table"):
        FusedEncoder(tiny_bert(), FusionConfig(layers=(0,), entity_dim=4))(**inputs, token_entity=token_entity)
    for bad_cfg in (dict(layers=()), dict(layers=(1, 1)), dict(layers=(-1,)), dict(dropout=1.0),
                    dict(gate="matrix"), dict(entity_dim=0)):
        with pytest.raises(ValueError):
            FusionConfig(**bad_cfg)


def test_gradient_reaches_w_and_g_but_never_the_table(bert):
    inputs, token_entity = make_inputs()
    source = torch.randn(N, D_E, requires_grad=True)
    table = KGTable.from_arrays(source, torch.randn(5, D_E), interaction="distmult")
    assert not table.entity.requires_grad and table.entity.data_ptr() != source.data_ptr()
    model = fused(bert, layers=(1,), table=table)
    model(**inputs, token_entity=token_entity).last_hidden_state.square().sum().backward()
    fusion = model.fusions["1"]
    assert fusion.gate.grad is not None and float(fusion.gate.grad.abs().sum()) > 0
    assert float(fusion.proj.weight.grad.abs().sum()) == 0  # g = 0: W learns once the gate opens
    model.zero_grad()
    with torch.no_grad():
        fusion.gate.fill_(0.1)
    model(**inputs, token_entity=token_entity).last_hidden_state.square().sum().backward()
    assert float(fusion.proj.weight.grad.abs().sum()) > 0
    assert source.grad is None and table.entity.grad is None and model.table.entity.grad is None


def test_copies_and_pickles_fuse_with_their_own_parameters(bert):
    import copy
    import pickle

    inputs, token_entity = make_inputs()
    model = fused(bert, layers=(0,), gate_init=1.0)
    plain = bert(**inputs).last_hidden_state
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):  # e.g. Ray ships modules pickled
        with torch.no_grad():
            clone.fusions["0"].gate.zero_()
        assert torch.equal(clone(**inputs, token_entity=token_entity).last_hidden_state, plain)
        assert clone.table_version == model.table_version
    assert not torch.equal(model(**inputs, token_entity=token_entity).last_hidden_state, plain)


def test_gradient_checkpointing_gives_the_same_gradients():
    inputs, token_entity = make_inputs()
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)  # the same W in both
        model = FusedEncoder(tiny_bert(num_layers=2), FusionConfig(layers=(0,), gate_init=0.2), make_table())
        model.train()
        if checkpointing:
            model.encoder.activation_checkpointing_enable({"use_reentrant": False})
        calls = []
        model.fusions["0"].register_forward_hook(lambda *a: calls.append(1))
        model(**inputs, token_entity=token_entity).last_hidden_state.square().sum().backward()
        assert len(calls) == 1  # the fusion hook stays outside the recomputation
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1]) > 4
    for a, b in zip(*grads):  # the same up to summation order (the embedding backward's scatter)
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5)


# ---- the KG snapshot -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(INTERACTIONS))
def test_relation_scores_match_naive_scores(name):
    table = make_table(interaction=name)
    h, t = torch.tensor([0, 3, 7]), torch.tensor([1, 3, 2])
    scores = table.relation_scores(h, t)
    assert scores.shape == (3, table.num_relations)
    fn = table.scorer
    naive = torch.tensor([[float(fn.score(table.entity[a], table.relation[r], table.entity[b]))
                           for r in range(table.num_relations)] for a, b in zip(h.tolist(), t.tolist())])
    torch.testing.assert_close(scores, naive, atol=1e-5, rtol=1e-5)


def test_relation_scores_by_hand_transe_and_complex():
    # TransE-L1: -||h + r - t||_1 written out
    e = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    r = torch.tensor([[1.0, 1.0], [-1.0, 2.0]])
    transe = KGTable.from_arrays(e, r, interaction="transe", interaction_kwargs={"p": 1})
    # h + r - t = (1 + 1 - 0, 0 + 1 - 2) = (2, -1) and (1 - 1 - 0, 0 + 2 - 2) = (0, 0)
    assert transe.relation_scores(torch.tensor([0]), torch.tensor([1])).tolist() == [[-(2 + 1), -(0 + 0)]]
    # ComplEx, one complex coordinate: Re(h r conj(t)) with h = 1 + 2i, t = 3 - i, r = 2 + i and r = -i
    e = torch.tensor([[1.0, 2.0], [3.0, -1.0]])
    r = torch.tensor([[2.0, 1.0], [0.0, -1.0]])
    complex_ = KGTable.from_arrays(e, r, interaction="complex")
    want = [(complex(1, 2) * complex(2, 1) * complex(3, 1)).real, (complex(1, 2) * complex(0, -1) * complex(3, 1)).real]
    torch.testing.assert_close(complex_.relation_scores(torch.tensor([0]), torch.tensor([1])), torch.tensor([want]))


def test_table_validation():
    with pytest.raises(ValueError, match="interaction"):
        KGTable.from_arrays(torch.zeros(3, 4), torch.zeros(2, 4), interaction="transh")
    with pytest.raises(ValueError, match="entity dim 4 and relation dim 3"):
        KGTable.from_arrays(torch.zeros(3, 4), torch.zeros(2, 3), interaction="transe")
    with pytest.raises(ValueError, match="2-d"):
        KGTable.from_arrays(torch.zeros(3), torch.zeros(2, 3), interaction="transe")
    with pytest.raises(ValueError, match="2 entity labels"):
        KGTable.from_arrays(torch.zeros(3, 4), torch.zeros(2, 4), interaction="transe", entity_labels=["a", "b"])
    table = make_table()
    with pytest.raises(ValueError, match=r"head ids hold 12.*12 rows"):
        table.relation_scores(torch.tensor([12]), torch.tensor([0]))
    newer = table.with_tables(version=1, entity=torch.zeros(N, D_E), relation=torch.zeros(5, D_E))
    assert newer.version == 1 and newer.interaction == "transe" and table.version == 0


def test_table_from_export(tmp_path):
    from bikd.kge.export import export_embeddings
    from bikd.kge.models import ModelConfig
    from bikd.storage import Storage

    entity, relation = torch.randn(4, 6), torch.randn(3, 6)
    export_embeddings(Storage(str(tmp_path)), entity, relation, ["a", "b", "c", "d"], ["r", "s", "u"],
                      ModelConfig(name="transe", dim=6, p=1), prefix="exp", extra={"version": 5})
    table = KGTable.from_export(Storage(str(tmp_path)), "exp")
    assert (table.version, table.interaction, dict(table.interaction_kwargs)) == (5, "transe", {"p": 1})
    assert table.entity_labels == ("a", "b", "c", "d") and torch.equal(table.entity, entity)
    assert KGTable.from_export(Storage(str(tmp_path)), "exp", version=8).version == 8


# ---- the encoder ---------------------------------------------------------------------------------------


def test_encoder_config_validation():
    with pytest.raises(ValueError):
        EncoderConfig(name_or_path="")
    with pytest.raises(ValueError):
        EncoderConfig(attn_implementation="flash")
    with pytest.raises(ValueError, match="attention_dropout"):
        EncoderConfig(attention_dropout=1.0)


@pytest.mark.slow
def test_default_minilm_loads_offline():
    from bikd.lm.encoder import default_encoder_path, load_encoder

    assert (default_encoder_path() / "model.safetensors").exists()
    model, tokenizer = load_encoder(EncoderConfig())
    n = sum(p.numel() for p in model.parameters())
    assert 22_600_000 < n < 22_800_000, n
    assert (model.config.hidden_size, len(model.encoder.layer)) == (384, 6)
    enc = tokenizer("Barack Obama was born in Hawaii", return_tensors="pt")
    with torch.no_grad():
        out = FusedEncoder(model, FusionConfig(layers=(2,), entity_dim=8))(**enc)
    assert out.last_hidden_state.shape == (1, enc["input_ids"].shape[1], 384)
    # MiniLM's own attention dropout, or none when asked (torch's fused CPU attention needs none)
    attention_dropout = lambda m: {a.dropout.p for a in m.modules() if type(a).__name__.endswith("SelfAttention")}  # noqa: E731
    assert attention_dropout(model) == {0.1}
    assert attention_dropout(load_encoder(EncoderConfig(attention_dropout=0.0))[0]) == {0.0}


def test_fusion_site_in_bf16_takes_float32_rows():
    """Under bf16 training (DeepSpeed on a GPU) the site's weights are bf16 while the KG table stays float32."""
    from bikd.lm.fusion import KnowledgeFusion

    site = KnowledgeFusion(8, 4, gate_init=0.5).to(torch.bfloat16)
    h = torch.zeros(1, 3, 8, dtype=torch.bfloat16)
    out = site(h, torch.tensor([1]), torch.ones(1, 4))
    assert out.dtype == torch.bfloat16 and out[0, 1].abs().sum() > 0 and out[0, 0].abs().sum() == 0
