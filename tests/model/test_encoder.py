"""The BERT encoder: config, shapes, padding, pooling, and parity with transformers' BertModel / BertForMaskedLM
through run directories in both directions (tiny random configs, fp32, padded batches, max abs diff <= 1e-4)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmforge.checkpoint.bert import load_bert, save_bert, to_hf_name
from lmforge.common import LmforgeError
from lmforge.model.encoder import Bert, BertConfig, pool

pytestmark = pytest.mark.usefixtures("one_thread")
ATOL = 1e-4


def tiny(**kw) -> BertConfig:
    return BertConfig(**{"vocab_size": 99, "dim": 32, "n_layers": 2, "n_heads": 4, "ffn_dim": 37, "max_seq_len": 24,
                         "type_vocab_size": 3, **kw})


def random_bert(cfg: BertConfig, seed: int = 0, **heads) -> Bert:
    """Every weight random, LayerNorms and biases included (identity norms would hide a mix-up)."""
    torch.manual_seed(seed)
    model = Bert(cfg, **heads)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name and name.endswith("weight")
                    else 0.1 * torch.randn_like(p) if p.dim() == 1 else p)
    return model.eval()


def batch(cfg: BertConfig, B: int = 3, T: int = 17, seed: int = 1) -> tuple[torch.Tensor, ...]:
    """Right-padded rows of lengths T, T//2, 1, with random segments."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(1, cfg.vocab_size, (B, T), generator=g)
    lengths = torch.tensor([T, T // 2, 1][:B])
    mask = (torch.arange(T)[None] < lengths[:, None]).long()
    idx = idx.masked_fill(mask == 0, cfg.pad_token_id)
    types = torch.randint(0, cfg.type_vocab_size, (B, T), generator=g)
    return idx, mask, types


# ---- config ----


def test_config_defaults_and_hf_round_trip():
    cfg = BertConfig(vocab_size=30522, dim=384, n_layers=6, n_heads=12)
    assert cfg.ffn_dim == 1536 and cfg.head_dim == 32 and cfg.norm_eps == 1e-12
    assert BertConfig.from_hf(cfg.to_hf()) == cfg
    d = cfg.to_hf(architecture="BertForMaskedLM")
    assert d["model_type"] == "bert" and d["architectures"] == ["BertForMaskedLM"]


@pytest.mark.parametrize(("kw", "match"), [
    (dict(dim=30), "divisible"), (dict(n_layers=0), "n_layers"), (dict(dropout=1.0), "dropout"),
    (dict(pad_token_id=99), "pad_token_id"), (dict(norm_eps=0), "norm_eps")])
def test_config_errors(kw, match):
    with pytest.raises(LmforgeError, match=match):
        tiny(**kw)


@pytest.mark.parametrize(("change", "match"), [
    ({"model_type": "llama"}, "model_type"), ({"hidden_act": "relu"}, "hidden_act"),
    ({"position_embedding_type": "relative_key"}, "position_embedding_type"),
    ({"tie_word_embeddings": False}, "tie_word_embeddings"), ({"is_decoder": True}, "is_decoder")])
def test_from_hf_refuses_what_it_cannot_model(change, match):
    with pytest.raises(LmforgeError, match=match):
        BertConfig.from_hf({**tiny().to_hf(), **change})


def test_from_hf_missing_key():
    d = tiny().to_hf()
    del d["num_attention_heads"]
    with pytest.raises(LmforgeError, match="num_attention_heads"):
        BertConfig.from_hf(d)


# ---- the module ----


def test_shapes_heads_and_tying():
    cfg = tiny()
    model = random_bert(cfg, mlm_head=True, pooler=True)
    idx, mask, types = batch(cfg)
    hidden = model(idx, mask, types)
    assert hidden.shape == (3, 17, 32)
    assert model.mlm_logits(idx, mask, types).shape == (3, 17, 99)
    assert model.pooled_output(hidden).shape == (3, 32)
    assert "mlm.decoder.weight" not in model.state_dict()  # the decoder is the embedding, not a copy
    with pytest.raises(LmforgeError, match="masked-LM head"):
        Bert(cfg).mlm_logits(idx)
    with pytest.raises(LmforgeError, match="positions"):
        model(torch.zeros(1, 25, dtype=torch.long))


def test_padding_changes_nothing_for_real_tokens():
    """A row padded to T gives the same states for its real tokens as the row alone."""
    cfg = tiny()
    model = random_bert(cfg)
    idx, mask, types = batch(cfg)
    full = model(idx, mask, types)
    for row, n in enumerate(mask.sum(1).tolist()):
        alone = model(idx[row:row + 1, :n], mask[row:row + 1, :n], types[row:row + 1, :n])
        torch.testing.assert_close(full[row:row + 1, :n], alone, atol=1e-5, rtol=0)
    assert torch.equal(model(idx[:1]), model(idx[:1], torch.ones_like(idx[:1])))  # no mask = all real


def test_all_padding_row_is_finite():
    cfg = tiny()
    model = random_bert(cfg)
    out = model.embed(torch.zeros(2, 5, dtype=torch.long), torch.zeros(2, 5, dtype=torch.long))
    assert torch.isfinite(out).all()


def test_pool_modes():
    hidden = torch.tensor([[[1.0, 0.0], [3.0, 4.0], [100.0, 100.0]]])  # (1, 3, 2), last token is padding
    mask = torch.tensor([[1, 1, 0]])
    torch.testing.assert_close(pool(hidden, mask, "mean", normalize=False), torch.tensor([[2.0, 2.0]]))
    torch.testing.assert_close(pool(hidden, mask, "cls", normalize=False), torch.tensor([[1.0, 0.0]]))
    torch.testing.assert_close(pool(hidden, mask, "mean"), torch.tensor([[0.5**0.5, 0.5**0.5]]))
    with pytest.raises(LmforgeError, match="pooling"):
        pool(hidden, mask, "max")


def test_dropout_only_in_training():
    cfg = tiny(dropout=0.5, attn_dropout=0.5)
    model = random_bert(cfg)
    idx, mask, types = batch(cfg)
    assert torch.equal(model(idx, mask), model(idx, mask))
    model.train()
    assert not torch.equal(model(idx, mask), model(idx, mask))


def test_init_follows_bert():
    model = Bert(tiny())
    assert torch.all(model.tok_emb.weight[0] == 0)  # the padding row
    assert abs(model.layers[0].fc.weight.std().item() - 0.02) < 0.005
    assert torch.all(model.layers[0].fc.bias == 0) and torch.all(model.emb_norm.weight == 1)


# ---- parity with transformers ----

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()


def hf_model(cls_name: str, run_dir):
    return getattr(transformers, cls_name).from_pretrained(run_dir, attn_implementation="eager").eval()


def test_ours_to_transformers(tmp_path):
    """Hidden states and MLM logits of our model == transformers loading our run dir (BertModel and ForMaskedLM)."""
    cfg = tiny()
    model = random_bert(cfg, mlm_head=True)
    save_bert(model, cfg, tmp_path)
    idx, mask, types = batch(cfg)
    with torch.no_grad():
        mlm = hf_model("BertForMaskedLM", tmp_path)
        base = hf_model("BertModel", tmp_path)  # reads the "bert."-prefixed encoder of the MLM checkpoint
        ours_hidden, ours_logits = model(idx, mask, types), model.mlm_logits(idx, mask, types)
        ref_logits = mlm(input_ids=idx, attention_mask=mask, token_type_ids=types).logits
        ref_hidden = base(input_ids=idx, attention_mask=mask, token_type_ids=types).last_hidden_state
    torch.testing.assert_close(ours_logits, ref_logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(ours_hidden, ref_hidden, atol=ATOL, rtol=0)
    assert mlm.cls.predictions.decoder.weight.data_ptr() == mlm.bert.embeddings.word_embeddings.weight.data_ptr()


def test_transformers_to_ours(tmp_path):
    """What transformers saves (BertForMaskedLM; BertModel with its pooler) loads here with the same outputs."""
    torch.manual_seed(0)
    hf_cfg = transformers.BertConfig(vocab_size=77, hidden_size=24, num_hidden_layers=2, num_attention_heads=3,
                                     intermediate_size=40, max_position_embeddings=20, type_vocab_size=2)
    idx, mask, types = batch(BertConfig.from_hf({**hf_cfg.to_dict(), "model_type": "bert"}), T=15)
    types = types % 2
    for cls_name in ("BertForMaskedLM", "BertModel"):
        ref = getattr(transformers, cls_name)(hf_cfg).eval()
        with torch.no_grad():
            for p in ref.parameters():  # randomize norms and biases too
                if p.dim() == 1:
                    p.add_(0.1 * torch.randn_like(p))
        ref.save_pretrained(tmp_path / cls_name)
        model, cfg = load_bert(tmp_path / cls_name)
        with torch.no_grad():
            out = ref(input_ids=idx, attention_mask=mask, token_type_ids=types)
            if cls_name == "BertForMaskedLM":
                torch.testing.assert_close(model.mlm_logits(idx, mask, types), out.logits, atol=ATOL, rtol=0)
            else:
                hidden = model(idx, mask, types)
                torch.testing.assert_close(hidden, out.last_hidden_state, atol=ATOL, rtol=0)
                torch.testing.assert_close(model.pooled_output(hidden), out.pooler_output, atol=ATOL, rtol=0)


def test_gradients_match_transformers(tmp_path):
    """Same MLM loss, same gradient for every weight (the tied decoder's included)."""
    cfg = tiny(dropout=0.0, attn_dropout=0.0)
    model = random_bert(cfg, mlm_head=True)
    save_bert(model, cfg, tmp_path)
    ref = hf_model("BertForMaskedLM", tmp_path)
    idx, mask, types = batch(cfg)
    targets = torch.randint(0, cfg.vocab_size, idx.shape).masked_fill(mask == 0, -100)
    for logits in (model.mlm_logits(idx, mask, types), ref(input_ids=idx, attention_mask=mask,
                                                          token_type_ids=types).logits):
        F.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()
    ref_grads = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[to_hf_name(name, prefixed=True)].grad, atol=1e-5, rtol=1e-4,
                                   msg=name)
