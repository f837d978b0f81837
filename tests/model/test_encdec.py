"""The T5 encoder-decoder against transformers' T5ForConditionalGeneration (same module names, so the reference
gets our state dict directly): relative position buckets, logits, encoder states, loss and gradients with padded
encoder inputs; cached decoding against recomputation; the config; one-line errors for bad inputs.

Tiny random configs in fp32; logits must agree to 1e-4.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmforge.common import LmforgeError
from lmforge.infer.kv_cache import KVCache
from lmforge.model.encdec import T5, T5Config, relative_position_bucket

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

pytestmark = pytest.mark.usefixtures("one_thread")

ATOL = 1e-4
V = 97


def tiny_t5(seed: int = 0, **kw) -> T5:
    """A tiny T5 with random norms too (its init makes them 1); head_dim != dim / n_heads, as T5 allows."""
    cfg = T5Config(**{"vocab_size": V, "dim": 32, "n_layers": 2, "n_decoder_layers": 3, "n_heads": 4,
                      "head_dim": 6, "ffn_dim": 40, "rel_buckets": 8, "rel_max_distance": 20, **kw})
    torch.manual_seed(seed)
    model = T5(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
    return model.eval()


def hf_twin(model: T5):
    """transformers' T5ForConditionalGeneration holding our weights (eager attention, its reference math)."""
    hf_cfg = {k: v for k, v in model.cfg.to_hf().items() if k not in ("architectures", "model_type", "dtype",
                                                                       "torch_dtype")}
    ref = transformers.T5ForConditionalGeneration(transformers.T5Config(**hf_cfg, attn_implementation="eager"))
    if not model.cfg.tie_embeddings:  # v5 always builds the head tied; a checkpoint's own head unties it
        ref.lm_head.weight = torch.nn.Parameter(ref.lm_head.weight.detach().clone())
    missing, unexpected = ref.load_state_dict(model.state_dict(), strict=False)
    assert set(missing) <= {"encoder.embed_tokens.weight", "decoder.embed_tokens.weight"} and not unexpected
    return ref.eval()


def padded_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Encoder ids (3, 30) with right padding in row 1 and left padding in row 2, their mask, decoder ids (3, 25)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, V, (3, 30), generator=g)
    mask = torch.ones(3, 30, dtype=torch.long)
    mask[1, 20:] = 0
    mask[2, :7] = 0
    ids[mask == 0] = 0
    return ids, mask, torch.randint(0, V, (3, 25), generator=g)


def test_relative_position_bucket_is_hf():
    hf_bucket = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket
    rel = torch.arange(-300, 301)[None]
    for bidirectional in (True, False):
        for buckets, distance in ((32, 128), (8, 20), (6, 7), (4, 100)):
            assert torch.equal(relative_position_bucket(rel, bidirectional, buckets, distance),
                               hf_bucket(rel, bidirectional, buckets, distance))


CASES = {
    "relu-tied": dict(feed_forward_proj="relu"),
    "relu-untied": dict(feed_forward_proj="relu", tie_embeddings=False),
    "gated-gelu-tied": dict(feed_forward_proj="gated-gelu"),
    "gated-gelu-untied": dict(feed_forward_proj="gated-gelu", tie_embeddings=False),
    "gelu-tied-unscaled": dict(feed_forward_proj="gelu", rescale_head=False),
    "gated-silu-untied-scaled": dict(feed_forward_proj="gated-silu", tie_embeddings=False, rescale_head=True),
}


@pytest.mark.parametrize("kw", CASES.values(), ids=CASES.keys())
def test_logits_states_and_loss_match_transformers(kw):
    model = tiny_t5(**kw)
    ref = hf_twin(model)
    ids, mask, dec = padded_batch()
    labels = dec.clone()
    labels[0, 9:] = -100
    with torch.no_grad():
        ours, theirs = model(ids, dec, attention_mask=mask), ref(input_ids=ids, attention_mask=mask,
                                                                   decoder_input_ids=dec).logits
        torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)
        torch.testing.assert_close(model.encode(ids, mask), ref.encoder(input_ids=ids, attention_mask=mask)
                                   .last_hidden_state, atol=ATOL, rtol=0)
        ref_loss = ref(input_ids=ids, attention_mask=mask, labels=labels).loss  # decoder input: labels shifted
        torch.testing.assert_close(model(ids, attention_mask=mask, labels=labels), ref_loss, atol=1e-5, rtol=0)
        torch.testing.assert_close(model(ids, dec, attention_mask=mask, labels=labels),
                                   F.cross_entropy(ours.flatten(0, 1), labels.flatten()), atol=1e-5, rtol=0)


def test_gradients_match_transformers():
    model = tiny_t5(feed_forward_proj="gated-gelu").train()
    ref = hf_twin(model).train()
    for m in ref.modules():  # dropout off, as lmforge trains without it
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    ids, mask, dec = padded_batch(seed=1)
    model(ids, dec, attention_mask=mask, labels=dec).backward()
    ref(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, labels=dec).loss.backward()
    theirs = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, theirs[name].grad, atol=1e-4, rtol=1e-4, msg=name)
    assert model.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight.grad.abs().sum() > 0


def test_padding_does_not_change_a_row():
    """Relative positions: a row padded on either side computes what it computes alone."""
    model = tiny_t5()
    ids, mask, dec = padded_batch()
    with torch.no_grad():
        batch = model(ids, dec, attention_mask=mask)
        for b in range(3):
            alone = model(ids[b: b + 1][mask[b: b + 1] == 1][None], dec[b: b + 1])
            torch.testing.assert_close(batch[b: b + 1], alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("tie", [True, False])
def test_cached_decoding_equals_recomputation(tie):
    model = tiny_t5(feed_forward_proj="gated-gelu" if tie else "relu", tie_embeddings=tie)
    ids, mask, dec = padded_batch()
    cfg = model.cfg
    with torch.no_grad():
        full = model(ids, dec, attention_mask=mask)  # (B, T, V), no cache
        memory = model.cross_attention_cache(model.encode(ids, mask), mask)
        cache = KVCache((cfg.n_decoder_layers, cfg.n_heads, cfg.head_dim), 3, dec.shape[1])
        pos = torch.arange(dec.shape[1]).expand(3, -1)
        steps = [model.decode(dec[:, :4], memory, input_pos=pos[:, :4], cache=cache)]  # a 4-token prefill
        steps += [model.decode(dec[:, t: t + 1], memory, input_pos=pos[:, t: t + 1], cache=cache)
                  for t in range(4, dec.shape[1])]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)


def test_config_round_trips_and_refuses_unknown_keys():
    cfg = T5Config(vocab_size=V, dim=32, n_layers=2, n_heads=4, feed_forward_proj="gated-gelu", tie_embeddings=False)
    assert (cfg.head_dim, cfg.ffn_dim, cfg.n_decoder_layers, cfg.rescale_head) == (8, 128, 2, False)
    assert T5Config.from_hf(cfg.to_hf()) == cfg
    assert T5Config.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(LmforgeError, match="unknown T5Config keys: d_model"):
        T5Config.from_dict({**cfg.to_dict(), "d_model": 32})
    # v4 configs have no scale_decoder_outputs: the rescale follows tie_word_embeddings
    v4 = {k: v for k, v in cfg.to_hf().items() if k != "scale_decoder_outputs"}
    assert T5Config.from_hf({**v4, "tie_word_embeddings": True}).rescale_head is True
    # t5-small's defaults where config.json says nothing
    small = T5Config.from_hf({"model_type": "t5"})
    assert (small.dim, small.head_dim, small.ffn_dim, small.n_layers, small.n_heads, small.vocab_size) == (
        512, 64, 2048, 6, 8, 32128)


@pytest.mark.parametrize("bad, match", [
    (dict(feed_forward_proj="gated-swish"), "feed_forward_proj 'gated-swish' is not supported"),
    (dict(rel_buckets=7), "rel_buckets must be an even integer"),
    (dict(head_dim=0), "head_dim must be a positive integer"),
    (dict(eos_token_id=V), "eos_token_id must be an id below vocab_size"),
    (dict(tie_embeddings=1), "tie_embeddings must be a bool"),
])
def test_bad_config_is_one_line_error(bad, match):
    with pytest.raises(LmforgeError, match=match) as e:
        T5Config(**{"vocab_size": V, "dim": 32, "n_layers": 2, "n_heads": 4, **bad})
    assert "\n" not in str(e.value)


def test_from_hf_refuses_what_it_does_not_compute():
    with pytest.raises(LmforgeError, match="model_type 'bart'"):
        T5Config.from_hf({"model_type": "bart"})
    with pytest.raises(LmforgeError, match="feed_forward_proj='gated-swish'"):
        T5Config.from_hf({"model_type": "t5", "feed_forward_proj": "gated-swish"})
    with pytest.raises(LmforgeError, match="encoder-decoder"):
        T5Config.from_hf({"model_type": "t5", "is_encoder_decoder": False})


def test_bad_inputs_are_one_line_errors():
    model = tiny_t5()
    ids, mask, dec = padded_batch()
    cases = [
        (lambda: model(ids[0], dec), "input_ids of shape \\(B, T\\)"),
        (lambda: model(ids.float(), dec), "input_ids as an int64 tensor"),
        (lambda: model(ids, dec, attention_mask=mask[:, :5]), "attention_mask must be shaped like input_ids"),
        (lambda: model(ids, dec[:2]), "decoder_input_ids has batch 2 but the encoder output has 3"),
        (lambda: model(ids, dec, labels=dec[:, :3]), "labels must be an integer tensor shaped like"),
        (lambda: model(ids), "needs decoder_input_ids or labels"),
        (lambda: model.decode(dec, model.cross_attention_cache(model.encode(ids)), cache=object()),
         "a KV cache needs input_pos"),
    ]
    for call, match in cases:
        with pytest.raises(LmforgeError, match=match) as e:
            call()
        assert "\n" not in str(e.value)
