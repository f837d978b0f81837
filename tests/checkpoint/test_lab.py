"""Lab run directories (lmforge/checkpoint/lab.py): no config.json, the config in lmforge.json, exact round trip."""

from __future__ import annotations

import json

import pytest
import torch

from lmforge.checkpoint import load_config, load_run, save_run
from lmforge.common import LmforgeError
from lmforge.model.lab import LabConfig, LabDecoder

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("kw", [dict(position="alibi", tie_embeddings=True),
                                dict(position="sinusoidal", norm="layernorm", placement="deepnorm", mlp="geglu"),
                                dict(position="learned", mlp="relu2")])
def test_save_load_roundtrip(tmp_path, kw):
    cfg = LabConfig(vocab_size=50, dim=32, n_layers=2, n_heads=4, max_seq_len=32, eos_token_id=3, **kw)
    torch.manual_seed(0)
    model = LabDecoder(cfg).eval()
    save_run(model, cfg, tmp_path / "run", meta={"stage": "test"})
    assert not (tmp_path / "run" / "config.json").exists()
    meta = json.loads((tmp_path / "run" / "lmforge.json").read_text())
    assert meta["stage"] == "test" and meta["model"] == {"arch": "lab", "config": cfg.to_dict()}
    assert load_config(tmp_path / "run") == cfg
    loaded, cfg2 = load_run(tmp_path / "run")
    assert cfg2 == cfg and isinstance(loaded, LabDecoder)
    assert (loaded.lm_head.weight is loaded.embed_tokens.weight) == cfg.tie_embeddings
    idx = torch.randint(0, 50, (2, 12))
    with torch.no_grad():
        assert torch.equal(loaded(idx), model(idx))


def test_mismatched_weights_are_one_line_errors(tmp_path):
    cfg = LabConfig(vocab_size=50, dim=32, n_layers=2, n_heads=4, max_seq_len=32)
    other = LabConfig(vocab_size=50, dim=32, n_layers=2, n_heads=4, max_seq_len=32, mlp="gelu")
    with pytest.raises(LmforgeError, match="do not match the config"):
        save_run(LabDecoder(cfg), other, tmp_path / "run")
