"""T5 run directories against transformers' T5ForConditionalGeneration, both directions: logits with padded
encoder inputs and loss, the layouts transformers has written (embed_tokens copies, old unused tensors, v5's
tied-unless-the-file-has-a-head rule), sharding, and one-line errors for broken runs.

Tiny random configs in fp32; logits must agree to 1e-4.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from lmforge.checkpoint.run import read_meta
from lmforge.checkpoint.t5 import load_t5, load_t5_config, save_t5
from lmforge.common import LmforgeError
from lmforge.model.encdec import T5, T5Config

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

pytestmark = pytest.mark.usefixtures("one_thread")

ATOL = 1e-4
V = 97
CASES = {
    "relu-tied": dict(feed_forward_proj="relu"),
    "relu-untied": dict(feed_forward_proj="relu", tie_embeddings=False),
    "gated-gelu-tied": dict(feed_forward_proj="gated-gelu"),
    "gated-gelu-untied": dict(feed_forward_proj="gated-gelu", tie_embeddings=False),  # T5 v1.1 / flan-T5
}


def random_t5(seed: int = 0, **kw) -> T5:
    cfg = T5Config(**{"vocab_size": V, "dim": 32, "n_layers": 2, "n_decoder_layers": 3, "n_heads": 4,
                      "head_dim": 6, "ffn_dim": 40, "rel_buckets": 8, "rel_max_distance": 20, **kw})
    torch.manual_seed(seed)
    model = T5(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
    return model.eval()


def hf_from_run(run_dir):
    return transformers.T5ForConditionalGeneration.from_pretrained(run_dir, attn_implementation="eager").eval()


def hf_random(seed: int = 0, untie: bool = False, **kw):
    """A transformers T5 with random layer norms; `untie` gives it a head of its own (as flan-T5 has)."""
    torch.manual_seed(seed)
    cfg = transformers.T5Config(**{"vocab_size": V, "d_model": 32, "d_kv": 8, "d_ff": 48, "num_layers": 2,
                                   "num_heads": 4, "relative_attention_num_buckets": 8,
                                   "relative_attention_max_distance": 16, "decoder_start_token_id": 0, **kw})
    ref = transformers.T5ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "layer_norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
    if untie:
        ref.lm_head.weight = torch.nn.Parameter(torch.randn(V, 32))
    return ref


def padded_batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, V, (3, 24), generator=g)
    mask = torch.ones(3, 24, dtype=torch.long)
    mask[0, 15:] = 0
    mask[2, :6] = 0
    return ids.masked_fill(mask == 0, 0), mask, torch.randint(0, V, (3, 18), generator=g)


def assert_same_outputs(model: T5, ref) -> None:
    ids, mask, dec = padded_batch()
    labels = dec.masked_fill(torch.arange(18) > 12, -100)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, dec, attention_mask=mask),
                                   ref(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits,
                                   atol=ATOL, rtol=0)
        torch.testing.assert_close(model(ids, attention_mask=mask, labels=labels),
                                   ref(input_ids=ids, attention_mask=mask, labels=labels).loss, atol=1e-5, rtol=0)


# ---- logits, both directions ----


@pytest.mark.parametrize("kw", CASES.values(), ids=CASES.keys())
def test_ours_to_transformers(tmp_path, kw):
    model = random_t5(**kw)
    run = save_t5(model, model.cfg, tmp_path, meta={"stage": "test"})
    ref = hf_from_run(run)
    tied = model.cfg.tie_embeddings
    assert (ref.lm_head.weight.data_ptr() == ref.shared.weight.data_ptr()) == tied
    assert ("lm_head.weight" in load_file(run / "model.safetensors")) != tied
    assert read_meta(run)["stage"] == "test"
    assert_same_outputs(model, ref)


@pytest.mark.parametrize("untie, kw", [
    (False, dict(feed_forward_proj="relu")),
    (True, dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False)),  # flan-T5: own head, no rescale
    (False, dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False)),  # v5 ties it anyway, no rescale
    (True, dict(feed_forward_proj="relu")),  # a head of its own under a tied config: v5 unties, keeps the rescale
], ids=["t5", "flan", "v5-tied-unscaled", "v5-untied-scaled"])
def test_transformers_to_ours(tmp_path, untie, kw):
    ref = hf_random(untie=untie, **kw)
    ref.save_pretrained(tmp_path)
    model, cfg = load_t5(tmp_path)
    assert cfg.tie_embeddings == (not untie) and cfg.rescale_head == ref.config.scale_decoder_outputs
    assert (model.lm_head.weight is model.shared.weight) == cfg.tie_embeddings
    assert_same_outputs(model, ref)


def test_old_layouts_load(tmp_path):
    """embed_tokens copies of `shared`, the unused cross-attention bias table of old checkpoints and a tied head
    saved anyway all load; a file whose only embedding is `encoder.embed_tokens.weight` loads too."""
    ref = hf_random()
    ref.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    shared = tensors["shared.weight"]
    tensors.update({"encoder.embed_tokens.weight": shared.clone(), "decoder.embed_tokens.weight": shared.clone(),
                    "lm_head.weight": shared.clone(),
                    "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight": torch.randn(8, 4)})
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    model, cfg = load_t5(tmp_path)
    assert cfg.tie_embeddings and model.lm_head.weight is model.shared.weight
    assert_same_outputs(model, ref)
    del tensors["shared.weight"]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    assert_same_outputs(load_t5(tmp_path)[0], ref)


def test_sharded_round_trip_is_bit_exact(tmp_path):
    ref = hf_random(untie=True, feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    ref.save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    model, cfg = load_t5(tmp_path / "hf")
    save_t5(model, cfg, tmp_path / "ours", max_shard_bytes=20_000)
    assert len(list((tmp_path / "ours").glob("model-*.safetensors"))) > 2
    assert load_t5_config(tmp_path / "ours") == cfg
    theirs = ref.state_dict()
    for name, t in hf_from_run(tmp_path / "ours").state_dict().items():  # through lmforge and back
        assert torch.equal(t, theirs[name]), name


# ---- broken runs: one line, naming what is wrong ----


def _one_line_error(run_dir, match: str) -> None:
    with pytest.raises(LmforgeError, match=match) as e:
        load_t5(run_dir)
    assert "\n" not in str(e.value)


def test_missing_wrong_shape_and_unexpected_tensors(tmp_path):
    model = random_t5(feed_forward_proj="gated-gelu")
    save_t5(model, model.cfg, tmp_path)
    good = load_file(tmp_path / "model.safetensors")
    name = "decoder.block.2.layer.2.DenseReluDense.wi_1.weight"
    for change, match in [
        (lambda t: t.pop(name), f"missing 1 tensor\\(s\\): {name}"),
        (lambda t: t.update({name: t[name][:, :7].contiguous()}),
         f"wrong tensor shapes .*{name} \\(40, 7\\) != \\(40, 32\\)"),
        (lambda t: t.update({"encoder.block.0.layer.1.DenseReluDense.wi.weight": t[name].clone()}),
         "1 unexpected tensor\\(s\\) .*encoder.block.0.layer.1.DenseReluDense.wi.weight"),
    ]:
        tensors = dict(good)
        change(tensors)
        save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
        _one_line_error(tmp_path, match)


def test_untied_config_without_head_is_an_error(tmp_path):
    model = random_t5(tie_embeddings=False)
    save_t5(model, model.cfg, tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["lm_head.weight"]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    _one_line_error(tmp_path, "missing 1 tensor\\(s\\): lm_head.weight")


def test_bad_config_json(tmp_path):
    model = random_t5()
    save_t5(model, model.cfg, tmp_path)
    hf = json.loads((tmp_path / "config.json").read_text())
    for change, match in [({"feed_forward_proj": "gated-swish"}, "feed_forward_proj='gated-swish'"),
                          ({"model_type": "bart"}, "model_type 'bart'"),
                          ({"d_kv": 0}, "T5Config.head_dim must be a positive integer")]:
        (tmp_path / "config.json").write_text(json.dumps({**hf, **change}))
        _one_line_error(tmp_path, match)
    (tmp_path / "config.json").write_text("{not json")
    _one_line_error(tmp_path, "invalid JSON")


def test_save_refuses_a_model_that_does_not_match_its_config(tmp_path):
    model = random_t5()
    with pytest.raises(LmforgeError, match="missing .*wi_0.weight"):
        save_t5(model, T5Config.from_dict({**model.cfg.to_dict(), "feed_forward_proj": "gated-gelu"}), tmp_path)
    assert not (tmp_path / "model.safetensors").exists()
