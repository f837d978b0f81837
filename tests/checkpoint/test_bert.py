"""BERT run directories: what we save, the layouts transformers and sentence-transformers save, and one-line errors
for bad files (missing tensor, wrong shape, truncated file, wrong architecture)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from lmforge.checkpoint.bert import (
    SentenceConfig,
    load_bert,
    load_sentence_config,
    model_dir,
    save_bert,
    to_hf_name,
)
from lmforge.common import LmforgeError
from lmforge.model.encoder import Bert, BertConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(**kw) -> BertConfig:
    return BertConfig(**{"vocab_size": 50, "dim": 16, "n_layers": 2, "n_heads": 2, "ffn_dim": 24, "max_seq_len": 12,
                         **kw})


def random_bert(cfg: BertConfig, **heads) -> Bert:
    torch.manual_seed(0)
    model = Bert(cfg, **heads)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def assert_same_weights(a: Bert, b: Bert) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


@pytest.fixture
def saved(tmp_path):
    """A saved MLM run: (run dir, model)."""
    model = random_bert(tiny(), mlm_head=True)
    return save_bert(model, model.cfg, tmp_path / "run"), model


# ---- our own files ----


@pytest.mark.parametrize("heads", [{}, {"mlm_head": True}, {"pooler": True}, {"mlm_head": True, "pooler": True}])
def test_round_trip_keeps_every_head(tmp_path, heads):
    cfg = tiny()
    model = random_bert(cfg, **heads)
    save_bert(model, cfg, tmp_path, meta={"stage": "test"})
    loaded, cfg2 = load_bert(tmp_path)
    assert cfg2 == cfg and not loaded.training
    assert_same_weights(model, loaded)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "bert"
    assert config["architectures"] == ["BertForMaskedLM" if heads.get("mlm_head") else "BertModel"]
    assert json.loads((tmp_path / "lmforge.json").read_text())["stage"] == "test"


def test_names_follow_transformers(saved):
    run, _ = saved
    names = set(load_file(run / "model.safetensors"))
    assert "bert.encoder.layer.1.attention.self.query.weight" in names
    assert "bert.embeddings.LayerNorm.bias" in names and "cls.predictions.bias" in names
    assert "cls.predictions.transform.LayerNorm.weight" in names
    assert not any("decoder" in n for n in names)  # tied to the embedding, as transformers saves it
    assert to_hf_name("layers.0.fc.weight", prefixed=False) == "encoder.layer.0.intermediate.dense.weight"
    assert to_hf_name("pooler.bias", prefixed=True) == "bert.pooler.dense.bias"


def test_sharded_save_loads(tmp_path):
    cfg = tiny()
    model = random_bert(cfg, mlm_head=True)
    save_bert(model, cfg, tmp_path, max_shard_bytes=4000)
    assert (tmp_path / "model.safetensors.index.json").is_file() and not (tmp_path / "model.safetensors").exists()
    loaded, _ = load_bert(tmp_path)
    assert_same_weights(model, loaded)


def test_dtype_cast_on_load(saved):
    run, _ = saved
    model, _ = load_bert(run, dtype=torch.bfloat16)
    assert model.tok_emb.weight.dtype == torch.bfloat16


def test_save_refuses_a_mismatched_model(tmp_path):
    with pytest.raises(LmforgeError, match="does not match its config"):
        save_bert(random_bert(tiny()), tiny(dim=32), tmp_path)


# ---- other writers' layouts ----


def test_older_transformers_extras_are_dropped(saved):
    """position_ids buffers and saved copies of the tied decoder (older transformers wrote them) load fine."""
    run, model = saved
    tensors = load_file(run / "model.safetensors")
    tensors["bert.embeddings.position_ids"] = torch.arange(12)[None]
    tensors["cls.predictions.decoder.weight"] = tensors["bert.embeddings.word_embeddings.weight"].clone()
    tensors["cls.predictions.decoder.bias"] = tensors["cls.predictions.bias"].clone()
    tensors["cls.seq_relationship.weight"] = torch.zeros(2, 16)  # BertForPreTraining's next-sentence head
    save_file(tensors, run / "model.safetensors", metadata={"format": "pt"})
    loaded, _ = load_bert(run)
    assert_same_weights(model, loaded)
    tensors["cls.predictions.decoder.weight"] += 1
    save_file(tensors, run / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(LmforgeError, match="untied decoder"):
        load_bert(run)


def test_sentence_transformers_layouts(tmp_path):
    cfg = tiny()
    model = random_bert(cfg)
    run = save_bert(model, cfg, tmp_path / "st", sentence=SentenceConfig(pooling="cls", max_seq_length=10))
    assert load_sentence_config(run) == SentenceConfig(pooling="cls", normalize=True, max_seq_length=10)
    modules = json.loads((run / "modules.json").read_text())
    assert [m["type"].rsplit(".", 1)[1] for m in modules] == ["Transformer", "Pooling", "Normalize"]
    # an older layout: the transformer in 0_Transformer/, no Normalize, pooling named the sentence-transformers 5 way
    old = tmp_path / "old"
    (old / "0_Transformer").mkdir(parents=True)
    for f in ("config.json", "model.safetensors", "sentence_bert_config.json"):
        shutil.copy(run / f, old / "0_Transformer" / f)
    shutil.copytree(run / "1_Pooling", old / "1_Pooling")
    (old / "1_Pooling" / "config.json").write_text(json.dumps({"embedding_dimension": 16, "pooling_mode": "mean"}))
    (old / "modules.json").write_text(json.dumps([modules[0] | {"path": "0_Transformer"}, modules[1]]))
    assert model_dir(old) == (old / "0_Transformer").resolve()
    assert_same_weights(model, load_bert(old)[0])
    assert load_sentence_config(old) == SentenceConfig(pooling="mean", normalize=False, max_seq_length=10)
    assert load_sentence_config(tmp_path / "st") != load_sentence_config(old)


def test_plain_bert_defaults(saved):
    run, _ = saved
    assert load_sentence_config(run) == SentenceConfig(pooling="mean", normalize=True, max_seq_length=None)


@pytest.mark.parametrize(("pooling", "match"), [
    ({"pooling_mode_max_tokens": True}, "max_tokens"),
    ({"pooling_mode_mean_tokens": True, "pooling_mode_cls_token": True}, "cls_token\\+mean_tokens"),
    ({"pooling_mode": "lasttoken"}, "lasttoken")])
def test_unsupported_pooling(tmp_path, pooling, match):
    cfg = tiny()
    run = save_bert(random_bert(cfg), cfg, tmp_path, sentence=SentenceConfig())
    (run / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    with pytest.raises(LmforgeError, match=match):
        load_sentence_config(run)


def test_unsupported_module(tmp_path):
    cfg = tiny()
    run = save_bert(random_bert(cfg), cfg, tmp_path, sentence=SentenceConfig())
    modules = json.loads((run / "modules.json").read_text())
    (run / "modules.json").write_text(json.dumps(modules + [{"idx": 3, "path": "3_Dense",
                                                            "type": "sentence_transformers.models.Dense"}]))
    with pytest.raises(LmforgeError, match="Dense"):
        load_sentence_config(run)


# ---- bad files: one line naming the file and the tensor ----


def one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


def test_missing_tensor(saved):
    run, _ = saved
    tensors = load_file(run / "model.safetensors")
    del tensors["bert.encoder.layer.1.output.dense.weight"]
    save_file(tensors, run / "model.safetensors")
    with pytest.raises(LmforgeError) as e:
        load_bert(run)
    msg = one_line(e)
    assert "model.safetensors" in msg and "bert.encoder.layer.1.output.dense.weight" in msg and "missing" in msg


def test_wrong_shape(saved):
    run, _ = saved
    tensors = load_file(run / "model.safetensors")
    tensors["bert.encoder.layer.0.intermediate.dense.weight"] = torch.zeros(25, 16)
    save_file(tensors, run / "model.safetensors")
    with pytest.raises(LmforgeError) as e:
        load_bert(run)
    msg = one_line(e)
    assert "model.safetensors" in msg and "bert.encoder.layer.0.intermediate.dense.weight" in msg
    assert "(25, 16)" in msg and "(24, 16)" in msg


def test_unexpected_tensor(saved):
    run, _ = saved
    tensors = load_file(run / "model.safetensors")
    tensors["bert.encoder.layer.7.output.dense.weight"] = torch.zeros(16, 24)
    save_file(tensors, run / "model.safetensors")
    with pytest.raises(LmforgeError, match="unexpected tensor bert.encoder.layer.7.output.dense.weight"):
        load_bert(run)


def test_truncated_file(saved):
    run, _ = saved
    path = run / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    with pytest.raises(LmforgeError) as e:
        load_bert(run)
    msg = one_line(e)
    assert str(path) in msg and "truncated" in msg and "tensor " in msg
    path.write_bytes(data[:50])
    with pytest.raises(LmforgeError, match="cut inside the header"):
        load_bert(run)
    path.write_bytes((5).to_bytes(8, "little") + b"{oops" + data[100:])
    with pytest.raises(LmforgeError, match="corrupt safetensors header"):
        load_bert(run)


def test_not_a_bert_run(tmp_path, saved):
    run, _ = saved
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps(config | {"model_type": "llama"}))
    with pytest.raises(LmforgeError, match="model_type 'llama': not a BERT encoder"):
        load_bert(run)
    with pytest.raises(LmforgeError, match="run directory not found"):
        load_bert(tmp_path / "nowhere")
