"""The training loop: exact resume (after max-steps, Ctrl-C, KeyboardInterrupt), accumulation, outputs, errors.

Most tests use a tiny stand-in LM (embedding, causal mean, dropout, head) so they take a fraction of a second;
the integration tests at the end train the real Llama on real token shards with the data package's BatchStream.
"""

from __future__ import annotations

import json
import os
import random
import signal
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmforge.common import LmforgeError
from lmforge.train.loop import TrainConfig, has_checkpoint, perplexity_eval, rng_state, set_rng_state, train

VOCAB, SEQ, BATCH = 32, 12, 4


class TinyLM(nn.Module):
    """Stand-in causal LM: each position sees the mean of the embeddings up to it. Dropout exercises the RNG."""

    def __init__(self, vocab: int = VOCAB, dim: int = 16):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.norm = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, dim)
        self.drop = nn.Dropout(0.1)
        self.head = nn.Linear(dim, vocab)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.embed(idx)  # (B, T, C)
        ctx = h.cumsum(1) / torch.arange(1, idx.shape[1] + 1, device=idx.device)[:, None]
        return self.head(self.drop(torch.tanh(self.proj(self.norm(h + ctx)))))  # (B, T, V)


class RandomWindows:
    """Endless random windows of a token array; the torch.Generator state is the resumable data position."""

    def __init__(self, tokens: torch.Tensor, batch_size: int = BATCH, seq_len: int = SEQ, seed: int = 0):
        self.tokens, self.batch_size, self.seq_len = tokens, batch_size, seq_len
        self.generator = torch.Generator().manual_seed(seed)
        self.served = 0

    def __iter__(self):
        return self

    def __next__(self):
        starts = torch.randint(0, len(self.tokens) - self.seq_len - 1, (self.batch_size,), generator=self.generator)
        windows = torch.stack([self.tokens[s:s + self.seq_len + 1] for s in starts.tolist()])
        self.served += 1
        return windows[:, :-1], windows[:, 1:]

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "served": self.served}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.served = state["served"]


def corpus(n: int = 2000, seed: int = 0) -> torch.Tensor:
    """A learnable stream: a fixed pattern with 10% noise."""
    g = torch.Generator().manual_seed(seed)
    pattern = (torch.arange(n) * 7 + torch.arange(n) // 5) % VOCAB
    noise = torch.randint(0, VOCAB, (n,), generator=g)
    return torch.where(torch.rand(n, generator=g) < 0.1, noise, pattern)


def lm_loss(model, batch):
    x, y = batch
    logits = model(x)
    return F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100), (y != -100).sum()


def cfg(**kw) -> TrainConfig:
    base = dict(max_steps=8, lr=1e-2, warmup_steps=2, progress=False, plot=False, seed=0)
    return TrainConfig(**{**base, **kw})


def run(tmp, steps: int | None = None, loss_fn=lm_loss, model=None, batches=None, eval_fn=None, **kw):
    """A fresh (or resumed) run in `tmp`; model and data are rebuilt as a new process would."""
    torch.manual_seed(123)
    model = model or TinyLM()
    batches = batches or RandomWindows(corpus())
    c = cfg(**({"max_steps": steps} if steps is not None else {}), **kw)
    return train(model, loss_fn, batches, c, tmp, eval_fn=eval_fn), model


# ---------------------------------------------------------------------------------------------- config

def test_from_dict_rejects_unknown_keys_and_checks_ranges():
    with pytest.raises(LmforgeError, match="unknown training option.*bogus, lr_max"):
        TrainConfig.from_dict({"max_steps": 3, "lr_max": 1.0, "bogus": 1})
    c = TrainConfig.from_dict({"max_steps": 3, "betas": [0.9, 0.99]})
    assert c.betas == (0.9, 0.99)
    assert TrainConfig.from_dict(c.to_dict()) == c
    for bad in ({"max_steps": 3, "grad_accum": 0}, {"max_steps": 3, "schedule": "linear"}, {"lr": 1.0},
                {"max_steps": 3, "precision": "fp8"}, {"max_steps": 3, "log_every": 0}):
        with pytest.raises(LmforgeError, match="training config"):
            TrainConfig.from_dict(bad)


# ---------------------------------------------------------------------------------------------- training

def test_loss_goes_down_and_outputs_are_written(tmp_path):
    res, _ = run(tmp_path, steps=30, plot=True, eval_every=10, log_every=5,
                 eval_fn=perplexity_eval(corpus(300, seed=1), seq_len=SEQ))
    losses = list(res.losses.values())
    assert res.step == 30 and len(losses) == 30 and res.stop_reason == "max_steps"
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.3
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [5, 10, 15, 20, 25, 30]
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "mfu", "tokens_seen", "elapsed_s"):
        assert all(key in r for r in rows), key
    assert [r["step"] for r in rows if "val_loss" in r] == [10, 20, 30]
    assert {"val_perplexity", "val_loss"} <= set(rows[-1]) and res.eval == {k: rows[-1][k] for k in res.eval}
    assert rows[-1]["val_perplexity"] == pytest.approx(np.exp(rows[-1]["val_loss"]))
    assert rows[-1]["tokens_seen"] == res.tokens_seen == 30 * BATCH * SEQ
    assert 0 < rows[-1]["mfu"] < 1
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    files = sorted(p.name for p in (tmp_path / "trainer_state").iterdir())
    assert files == ["model.safetensors", "state.json", "state.safetensors"]  # nothing pickled


def test_lr_follows_the_schedule(tmp_path):
    run(tmp_path, steps=10, warmup_steps=2, schedule="wsd", decay_frac=0.5, min_lr_ratio=0.0)
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lrs[:2] == pytest.approx([5e-3, 1e-2])
    assert lrs[2:7] == pytest.approx([1e-2] * 5)  # stable through half of the 8 post-warmup updates
    assert lrs[7] < 1e-2 and lrs == sorted(lrs[:7]) + sorted(lrs[7:], reverse=True)


def _uninterrupted(tmp_path_factory, steps=8, **kw):
    res, model = run(tmp_path_factory.mktemp("full"), steps=steps, schedule_steps=8, **kw)
    return res, model


def test_resume_after_max_steps_is_exact(tmp_path, tmp_path_factory):
    full, full_model = _uninterrupted(tmp_path_factory, eval_every=3, eval_fn=_noisy_eval)
    first, _ = run(tmp_path, steps=4, schedule_steps=8, eval_every=3, eval_fn=_noisy_eval)
    assert first.step == 4 and has_checkpoint(tmp_path)
    second, model = run(tmp_path, steps=8, schedule_steps=8, resume=True, eval_every=3, eval_fn=_noisy_eval)
    assert list(second.losses) == [5, 6, 7, 8]
    assert {**first.losses, **second.losses} == full.losses  # bit-for-bit equal
    for a, b in zip(model.state_dict().values(), full_model.state_dict().values()):
        assert torch.equal(a, b)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 9)) and second.tokens_seen == full.tokens_seen


def _noisy_eval(model):
    """An evaluation that draws from every global RNG: it must not shift the training's random streams."""
    random.random()
    np.random.rand()
    torch.rand(3)
    return {"loss": 1.0}


def test_sigint_finishes_the_step_saves_and_resumes_exactly(tmp_path, tmp_path_factory):
    full, _ = _uninterrupted(tmp_path_factory)
    calls = {"n": 0}

    def interrupting_loss(model, batch):
        calls["n"] += 1
        if calls["n"] == 3:  # during step 3: a real Ctrl-C
            os.kill(os.getpid(), signal.SIGINT)
        return lm_loss(model, batch)

    first, _ = run(tmp_path, steps=8, schedule_steps=8, loss_fn=interrupting_loss)
    assert first.interrupted and first.stop_reason == "interrupted" and first.step == 3
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored
    second, _ = run(tmp_path, steps=8, schedule_steps=8, resume=True)
    assert {**first.losses, **second.losses} == full.losses


def test_keyboard_interrupt_inside_a_step_rolls_back_and_saves(tmp_path, tmp_path_factory):
    full, _ = _uninterrupted(tmp_path_factory, grad_accum=2)
    calls = {"n": 0}

    def raising_loss(model, batch):
        calls["n"] += 1
        if calls["n"] == 10:  # second micro-batch of step 5: steps 1-4 are done
            raise KeyboardInterrupt
        return lm_loss(model, batch)

    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, steps=8, schedule_steps=8, grad_accum=2, loss_fn=raising_loss)
    state = json.loads((tmp_path / "trainer_state" / "state.json").read_text())
    assert state["step"] == 4
    second, _ = run(tmp_path, steps=8, schedule_steps=8, grad_accum=2, resume=True)
    assert list(second.losses) == [5, 6, 7, 8]
    assert second.losses == {k: v for k, v in full.losses.items() if k > 4}


def test_gradient_accumulation_weights_micro_batches_by_tokens(tmp_path):
    """Two micro-batches with different numbers of scored tokens == one batch holding both."""
    torch.manual_seed(0)
    x = torch.randint(0, VOCAB, (4, SEQ))
    y = torch.randint(0, VOCAB, (4, SEQ))
    y[:2, : SEQ - 2] = -100  # the first half has few scored tokens, the second many

    def final_params(grad_accum, batches):
        final_params.calls += 1
        torch.manual_seed(1)
        model = TinyLM()
        model.drop.p = 0.0
        train(model, lm_loss, iter(batches), cfg(max_steps=1, grad_accum=grad_accum, warmup_steps=0,
                                                  grad_clip=None), tmp_path / f"run{final_params.calls}")
        return [p.detach().clone() for p in model.parameters()]

    final_params.calls = 0

    whole = final_params(1, [(x, y)])
    split = final_params(2, [(x[:2], y[:2]), (x[2:], y[2:])])
    for a, b in zip(whole, split):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    nothing = torch.full_like(y, -100)  # a micro-batch with no scored token adds nothing (and no NaN)
    padded = final_params(2, [(x, y), (x, nothing)])
    for a, b in zip(whole, padded):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_time_budget_and_exhausted_data_stop_the_run(tmp_path):
    res, _ = run(tmp_path / "t", steps=None, max_steps=None, time_budget_s=0.5)
    assert res.stop_reason == "time_budget" and res.step >= 1 and res.elapsed_s >= 0.5
    finite = [next(RandomWindows(corpus())) for _ in range(3)]
    res, _ = run(tmp_path / "d", steps=10, batches=iter(finite))
    assert res.stop_reason == "data_exhausted" and res.step == 3


def test_compile_failure_falls_back_to_eager(tmp_path, tmp_path_factory, monkeypatch):
    eager, _ = run(tmp_path_factory.mktemp("eager"), steps=3)

    class Broken(nn.Module):
        def forward(self, *a, **k):
            raise RuntimeError("inductor: no C++ compiler")

    monkeypatch.setattr(torch, "compile", lambda model, **kw: Broken())
    with pytest.warns(UserWarning, match="torch.compile failed.*training eagerly"):
        res, _ = run(tmp_path, steps=3, compile=True)
    assert not res.compiled and res.losses == eager.losses


# ---------------------------------------------------------------------------------------------- errors

def test_resume_without_checkpoint_and_overwrite_are_errors(tmp_path):
    with pytest.raises(LmforgeError, match="no checkpoint to resume"):
        run(tmp_path, steps=2, resume=True)
    run(tmp_path, steps=2)
    with pytest.raises(LmforgeError, match="already holds a training checkpoint"):
        run(tmp_path, steps=2)


@pytest.mark.parametrize("damage", ["json", "tensors", "model", "shape"])
def test_corrupt_checkpoint_is_a_one_line_error(tmp_path, damage):
    run(tmp_path, steps=2)
    state = tmp_path / "trainer_state"
    if damage == "json":
        (state / "state.json").write_text("{not json")
    elif damage == "tensors":
        data = (state / "state.safetensors").read_bytes()
        (state / "state.safetensors").write_bytes(data[: len(data) // 2])
    elif damage == "model":
        (state / "model.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(LmforgeError, match="corrupt or mismatched checkpoint") as exc:
        run(tmp_path, steps=4, resume=True, model=TinyLM(dim=8) if damage == "shape" else None)
    assert "\n" not in str(exc.value)


def test_diverging_loss_is_an_error_and_keeps_the_checkpoint(tmp_path):
    def nan_loss(model, batch):
        loss, n = lm_loss(model, batch)
        return loss * float("nan"), n

    with pytest.raises(LmforgeError, match="training diverged: loss is nan at step 1"):
        run(tmp_path, steps=3, loss_fn=nan_loss)


def test_rng_state_round_trip():
    state = rng_state()
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a


# ---------------------------------------------------------------------------------------------- real model + data

@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from lmforge.data import build_shards
    from lmforge.tokenizer import train_bpe

    rng = random.Random(0)
    words = "the quick brown fox jumps over a lazy dog while models learn to predict tokens".split()
    docs = [" ".join(rng.choice(words) for _ in range(rng.randint(20, 80))) for _ in range(60)]
    tok = train_bpe(docs, vocab_size=300, special_tokens=["<|endoftext|>"])
    out = tmp_path_factory.mktemp("shards")
    build_shards(docs, tok, out, val_fraction=0.1, progress=False, log=None)
    return out, tok


def _llama_run(run_dir, shards, steps, **kw):
    from lmforge.data import BatchStream, TokenShards
    from lmforge.model import Llama, LlamaConfig
    from lmforge.train.pretrain import lm_loss as pretrain_loss

    out, tok = shards
    torch.manual_seed(0)
    model = Llama(LlamaConfig(vocab_size=tok.vocab_size, dim=32, n_layers=2, n_heads=2, max_seq_len=32))
    stream = BatchStream(TokenShards(out, "train"), batch_size=4, seq_len=32, seed=0)
    val = TokenShards(out, "val")
    eval_fn = perplexity_eval(val.tokens(0, val.n_tokens), seq_len=32)
    return train(model, pretrain_loss, stream, cfg(max_steps=steps, schedule_steps=10, lr=3e-3, **kw), run_dir,
                 eval_fn=eval_fn)


def test_llama_on_token_shards_resumes_exactly(tmp_path, tmp_path_factory, shards):
    full = _llama_run(tmp_path_factory.mktemp("llama_full"), shards, 10, eval_every=5)
    first = _llama_run(tmp_path, shards, 5, eval_every=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing that matters for exactness changed
        second = _llama_run(tmp_path, shards, 10, eval_every=5, resume=True)
    assert {**first.losses, **second.losses} == full.losses
    assert second.eval == full.eval and full.eval["val_perplexity"] < 300  # below uniform over the vocabulary
    assert list(full.losses.values())[-1] < list(full.losses.values())[0]


@pytest.mark.slow
def test_real_torch_compile_matches_eager(tmp_path, tmp_path_factory):
    def no_dropout():
        torch.manual_seed(123)
        model = TinyLM()
        model.drop.p = 0.0
        return model

    eager, _ = run(tmp_path_factory.mktemp("eager"), steps=3, model=no_dropout())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's own deprecation notices while compiling
        compiled, _ = run(tmp_path, steps=3, model=no_dropout(), compile=True)
    if not compiled.compiled:
        pytest.skip("torch.compile is not usable on this machine (the loop fell back to eager)")
    assert list(compiled.losses.values()) == pytest.approx(list(eager.losses.values()), rel=1e-4)
