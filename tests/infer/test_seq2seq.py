"""Encoder-decoder generation against transformers' T5 `generate`: greedy token for token on a batch of inputs of
different lengths (stopping at EOS), sampled with the same seed, with a repetition penalty; cached decoding equal
to recomputing the whole decoder each step; stop conditions and input errors.
"""

from __future__ import annotations

import pytest
import torch

from lmforge.checkpoint.t5 import save_t5
from lmforge.common import LmforgeError
from lmforge.infer.sampling import SamplingParams
from lmforge.infer.seq2seq import generate_seq2seq, generate_seq2seq_ids
from lmforge.model.encdec import T5, T5Config

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

pytestmark = pytest.mark.usefixtures("one_thread")

V = 97
N_NEW = 20
LENGTHS = (5, 17, 11)


@pytest.fixture(scope="module", params=["relu-tied", "gated-gelu-untied"])
def pair(request, tmp_path_factory):
    """Our T5 and transformers' loaded from the run directory we saved."""
    untied = request.param == "gated-gelu-untied"
    cfg = T5Config(vocab_size=V, dim=32, n_layers=2, n_heads=4, head_dim=8, ffn_dim=48, rel_buckets=8,
                   rel_max_distance=16, feed_forward_proj="gated-gelu" if untied else "relu", tie_embeddings=not untied)
    torch.manual_seed(0)
    model = T5(cfg).eval()
    run = save_t5(model, cfg, tmp_path_factory.mktemp(request.param))
    ref = transformers.T5ForConditionalGeneration.from_pretrained(run, attn_implementation="eager").eval()
    return model, ref


def inputs(seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, V, (n,), generator=g).tolist() for n in LENGTHS]


def hf_generate(ref, rows: list[list[int]], **kw) -> list[list[int]]:
    """transformers' generate on right-padded inputs; each row cut after its EOS (the rest is padding)."""
    ids = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, x in enumerate(rows):
        ids[b, : len(x)], mask[b, : len(x)] = torch.tensor(x), 1
    out = ref.generate(input_ids=ids, attention_mask=mask, max_new_tokens=N_NEW, min_length=0, **kw)[:, 1:]
    eos = kw.get("eos_token_id")
    rows_out = []
    for row in out.tolist():
        rows_out.append(row[: row.index(eos) + 1] if eos is not None and eos in row else row)
    return rows_out


def test_greedy_equals_transformers_and_stops_at_eos(pair):
    model, ref = pair
    rows = inputs()
    free = generate_seq2seq_ids(model, rows, SamplingParams(temperature=0, max_new_tokens=N_NEW), eos_token_id=[])
    assert free == hf_generate(ref, rows, do_sample=False, eos_token_id=None)
    eos = free[1][6]  # a token row 1 produces mid-way: rows end at different steps
    out = generate_seq2seq_ids(model, rows, SamplingParams(temperature=0, max_new_tokens=N_NEW), eos_token_id=eos)
    assert out == hf_generate(ref, rows, do_sample=False, eos_token_id=eos, pad_token_id=0)
    assert len(out[1]) <= 7 and out[1][-1] == eos


def test_cached_generation_equals_recomputation(pair):
    """Greedy with both caches == recomputing the encoder and the whole decoder for every new token."""
    model, _ = pair
    rows = inputs(seed=2)
    cached = generate_seq2seq_ids(model, rows, SamplingParams(temperature=0, max_new_tokens=12), eos_token_id=[])
    for row, out in zip(rows, cached):
        dec = [model.cfg.decoder_start_token_id]
        with torch.no_grad():
            for _ in range(12):
                dec.append(int(model(torch.tensor([row]), torch.tensor([dec]))[0, -1].argmax()))
        assert dec[1:] == out


@pytest.mark.parametrize("kw, hf_kw", [
    (dict(temperature=0.8, top_k=20), dict(do_sample=True, temperature=0.8, top_k=20)),
    (dict(temperature=1.0, top_p=0.9), dict(do_sample=True, top_p=0.9, top_k=None)),
    (dict(temperature=0, repetition_penalty=1.5), dict(do_sample=False, repetition_penalty=1.5)),
])
def test_sampling_and_penalty_equal_transformers(pair, kw, hf_kw):
    """Same processors, same torch.multinomial draws from the same seed: the same tokens."""
    model, ref = pair
    rows = inputs(seed=3)
    ours = generate_seq2seq_ids(model, rows, SamplingParams(max_new_tokens=N_NEW, seed=123, **kw), eos_token_id=[])
    torch.manual_seed(123)
    assert ours == hf_generate(ref, rows, eos_token_id=None, **hf_kw)


def test_steps_and_stop_conditions(pair):
    model, _ = pair
    rows = inputs()
    steps = list(generate_seq2seq(model, rows, SamplingParams(temperature=0, max_new_tokens=5), eos_token_id=[]))
    assert len(steps) == 5 and all(len(s) == 3 and None not in s for s in steps)
    first = steps[0][0]
    steps = list(generate_seq2seq(model, rows, SamplingParams(temperature=0, max_new_tokens=5,
                                                              stop_token_ids=[first]), eos_token_id=[]))
    assert steps[0][0] == first and all(s[0] is None for s in steps[1:])
    token_bytes = [bytes([65 + i % 26]) for i in range(V)]
    text = bytes(token_bytes[t][0] for t in generate_seq2seq_ids(
        model, rows[:1], SamplingParams(temperature=0, max_new_tokens=N_NEW), eos_token_id=[])[0])
    stop = text[3:5].decode()
    out = generate_seq2seq_ids(model, rows[:1], SamplingParams(temperature=0, max_new_tokens=N_NEW, stop=[stop]),
                               eos_token_id=[], token_bytes=token_bytes)
    assert len(out[0]) == text.index(stop.encode()) + 2  # ends on the token that completes the stop string


def test_bad_inputs_are_one_line_errors(pair):
    model, _ = pair
    greedy = SamplingParams(temperature=0, max_new_tokens=3)
    for rows, kw, match in [
        ([[5, 6], []], {}, "every encoder input needs at least one token"),
        ([[5, V]], {}, "outside the model's vocabulary"),
        ([[5, 6]], dict(decoder_start_token_id=V), "decoder_start_token_id 97 is outside the vocabulary"),
        ([[5, 6]], dict(params=SamplingParams(stop=["x"])), "stop strings need the vocabulary as bytes"),
    ]:
        with pytest.raises(LmforgeError, match=match) as e:
            generate_seq2seq_ids(model, rows, **{"params": greedy, **kw})
        assert "\n" not in str(e.value)
