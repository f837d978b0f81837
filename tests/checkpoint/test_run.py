"""save_run / load_run: round trips, files written, atomicity, sharding, and one-line errors for broken runs."""

from __future__ import annotations

import json
import os

import pytest
import torch

from lmforge import __version__
from lmforge.checkpoint import load_config, load_run, load_tensors, read_meta, save_run
from lmforge.common import LmforgeError
from lmforge.model import Llama, LlamaConfig


def tiny(**kw) -> LlamaConfig:
    return LlamaConfig(**{"vocab_size": 300, "dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
                          "max_seq_len": 32, **kw})


@pytest.fixture
def run(tmp_path):
    torch.manual_seed(0)
    cfg = tiny()
    model = Llama(cfg)
    save_run(model, cfg, tmp_path / "run", meta={"stage": "pretrain", "metrics": {"loss": 1.5}})
    return tmp_path / "run", model, cfg


def test_roundtrip(run):
    run_dir, model, cfg = run
    loaded, cfg2 = load_run(run_dir)
    assert cfg2 == cfg and not loaded.training
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)
    idx = torch.randint(0, 300, (2, 9))
    torch.testing.assert_close(loaded(idx), model(idx), atol=0, rtol=0)
    assert not any(p.is_meta for p in [*loaded.parameters(), *loaded.buffers()])


def test_files_and_meta(run):
    run_dir, _, _ = run
    assert sorted(os.listdir(run_dir)) == ["config.json", "lmforge.json", "model.safetensors"]  # no temp files left
    meta = read_meta(run_dir)
    assert meta["stage"] == "pretrain" and meta["metrics"] == {"loss": 1.5} and meta["lmforge_version"] == __version__
    assert meta["parent"] is None and meta["args"] == {}
    config = json.loads((run_dir / "config.json").read_text())
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    assert config["dtype"] == "float32" and load_config(run_dir) == tiny()
    names = set(load_tensors(run_dir))
    assert "model.embed_tokens.weight" in names and "lm_head.weight" in names
    assert "model.layers.1.self_attn.k_proj.weight" in names and not any("rope" in n for n in names)


def test_tied_save_omits_lm_head(tmp_path):
    cfg = tiny(tie_embeddings=True)
    save_run(Llama(cfg), cfg, tmp_path)
    assert "lm_head.weight" not in load_tensors(tmp_path)
    model, _ = load_run(tmp_path)
    assert model.lm_head.weight is model.embed_tokens.weight


def test_tokenizer_is_saved(tmp_path):
    from lmforge.tokenizer import load_tokenizer, train_bpe

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("hello world, hello lmforge. " * 50)
    tok = train_bpe([corpus], vocab_size=270, special_tokens=["<|endoftext|>"])
    cfg = tiny()
    save_run(Llama(cfg), cfg, tmp_path / "run", tokenizer=tok)
    assert (tmp_path / "run" / "tokenizer.json").exists() and (tmp_path / "run" / "tokenizer_config.json").exists()
    assert load_tokenizer(tmp_path / "run").encode("hello world") == tok.encode("hello world")


def test_sharded_roundtrip_and_stale_files(tmp_path):
    cfg = tiny()
    model = Llama(cfg)
    save_run(model, cfg, tmp_path, max_shard_bytes=20_000)
    shards = sorted(p.name for p in tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 2 and not (tmp_path / "model.safetensors").exists()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == shards
    loaded, _ = load_run(tmp_path)
    idx = torch.randint(0, 300, (1, 5))
    torch.testing.assert_close(loaded(idx), model(idx), atol=0, rtol=0)
    save_run(model, cfg, tmp_path)  # back to one file: the old index and shards go
    assert not list(tmp_path.glob("model-*")) and not (tmp_path / "model.safetensors.index.json").exists()


def test_bfloat16_save_and_load_dtype(tmp_path):
    cfg = tiny()
    model = Llama(cfg).to(torch.bfloat16)
    save_run(model, cfg, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    loaded, _ = load_run(tmp_path)
    assert loaded.embed_tokens.weight.dtype == torch.bfloat16 and loaded.rope_cos.dtype == torch.float32
    loaded32, _ = load_run(tmp_path, dtype=torch.float32)
    assert loaded32.embed_tokens.weight.dtype == torch.float32


def test_save_rejects_model_that_does_not_match_cfg(tmp_path):
    with pytest.raises(LmforgeError, match="wrong tensor shapes"):
        save_run(Llama(tiny()), tiny(vocab_size=301), tmp_path)


# ---- errors: each is one line naming the problem ----


def one_line_error(fn, match):
    with pytest.raises(LmforgeError, match=match) as info:
        fn()
    assert "\n" not in str(info.value)


def test_missing_dir_and_config(tmp_path):
    one_line_error(lambda: load_run(tmp_path / "nope"), "run directory not found")
    one_line_error(lambda: load_run(tmp_path), "file not found: .*config.json")


def test_not_llama(run):
    run_dir, _, _ = run
    config = json.loads((run_dir / "config.json").read_text())
    (run_dir / "config.json").write_text(json.dumps({**config, "model_type": "gpt_neox"}))
    one_line_error(lambda: load_run(run_dir), "model_type 'gpt_neox'")
    (run_dir / "config.json").write_text("{not json")
    one_line_error(lambda: load_run(run_dir), "invalid JSON")


def test_truncated_weights(run):
    run_dir, _, _ = run
    path = run_dir / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    one_line_error(lambda: load_run(run_dir), "corrupt or truncated safetensors file")
    path.write_bytes(data[:5])
    one_line_error(lambda: load_run(run_dir), "corrupt or truncated safetensors file")
    path.write_bytes(b"\x00" * 64)
    one_line_error(lambda: load_run(run_dir), "corrupt or truncated safetensors file")


def test_no_weights_and_pickles_refused(run):
    run_dir, _, _ = run
    (run_dir / "model.safetensors").unlink()
    one_line_error(lambda: load_run(run_dir), "no weights")
    (run_dir / "pytorch_model.bin").write_bytes(b"pickle")
    one_line_error(lambda: load_run(run_dir), "safetensors only")


def _rewrite_weights(run_dir, edit):
    from safetensors.torch import save_file

    tensors = load_tensors(run_dir)
    edit(tensors)
    save_file(tensors, str(run_dir / "model.safetensors"), metadata={"format": "pt"})


def test_missing_unexpected_and_misshapen_tensors(run):
    run_dir, _, _ = run
    _rewrite_weights(run_dir, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    one_line_error(lambda: load_run(run_dir), "missing 1 tensor.*model.layers.1.mlp.up_proj.weight")
    _rewrite_weights(run_dir, lambda t: t.update({"model.layers.1.mlp.up_proj.weight": torch.zeros(5, 5)}))
    one_line_error(lambda: load_run(run_dir), r"wrong tensor shapes.*up_proj.weight \(5, 5\) != \(128, 32\)")
    _rewrite_weights(run_dir, lambda t: t.update({"model.layers.1.mlp.up_proj.weight": torch.zeros(128, 32),
                                                  "model.layers.1.self_attn.q_proj.bias": torch.zeros(32)}))
    one_line_error(lambda: load_run(run_dir), "unexpected tensor.*q_proj.bias")
    _rewrite_weights(run_dir, lambda t: (t.pop("model.layers.1.self_attn.q_proj.bias"),
                                         t.update({"model.rotary_emb.inv_freq": torch.zeros(4)})))
    load_run(run_dir)  # old transformers saved RoPE's inv_freq: ignored


def test_bad_index(tmp_path):
    cfg = tiny()
    save_run(Llama(cfg), cfg, tmp_path, max_shard_bytes=20_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    (tmp_path / first).unlink()
    one_line_error(lambda: load_run(tmp_path), "weights file not found")
    index["weight_map"]["model.norm.weight"] = "../elsewhere.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    one_line_error(lambda: load_run(tmp_path), "outside the run directory")


@pytest.mark.parametrize("family", ["t5", "bert", "gpt2"])
def test_save_run_and_load_run_reach_every_family(tmp_path, family):
    """save_run/load_run dispatch on the config (and config.json's model_type) to each family's own module."""
    from lmforge.model.encdec import T5, T5Config
    from lmforge.model.encoder import Bert, BertConfig
    from lmforge.model.gpt2 import GPT2, GPT2Config

    torch.manual_seed(0)
    build = {"t5": (T5, T5Config(vocab_size=50, dim=32, n_layers=1, n_heads=2)),
             "bert": (Bert, BertConfig(vocab_size=50, dim=32, n_layers=1, n_heads=2)),
             "gpt2": (GPT2, GPT2Config(vocab_size=50, dim=32, n_layers=1, n_heads=2))}
    cls, cfg = build[family]
    model = cls(cfg).eval()
    save_run(model, cfg, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == family
    assert type(load_config(tmp_path)) is type(cfg)
    back, back_cfg = load_run(tmp_path)
    assert type(back) is cls and type(back_cfg) is type(cfg)
    for (name, a), (_, b) in zip(sorted(model.state_dict().items()), sorted(back.state_dict().items())):
        assert torch.equal(a, b), name
