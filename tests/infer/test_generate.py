"""generate / generate_batch: greedy equal to transformers' generate, cached equal to full recomputation,
seeded sampling equal to a reference loop, stopping (eos, stop ids, stop strings, length), errors.

Tiny random fp32 models (see `tiny_llama` for why not the training init).
"""

from __future__ import annotations

import pytest
import torch

from lmforge.checkpoint import save_run
from lmforge.common import LmforgeError
from lmforge.infer.generate import decode_step, generate, generate_batch, prefill
from lmforge.infer.kv_cache import KVCache
from lmforge.infer.sampling import SamplingParams, make_generator, process_logits, sample, token_counts
from lmforge.model import Llama, LlamaConfig

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

V = 113
N_NEW = 24
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}  # prompts + 24 new tokens go past 16: the scaling matters
CASES = {
    "gqa-untied-llama3": dict(n_kv_heads=2, rope_scaling=LLAMA3, rope_theta=5e5),
    "gqa-tied-llama3": dict(n_kv_heads=2, tie_embeddings=True, rope_scaling=LLAMA3),
    "mha-untied-llama3": dict(n_kv_heads=4, rope_scaling=LLAMA3),
    "mha-tied": dict(n_kv_heads=4, tie_embeddings=True),
}
GREEDY = SamplingParams(temperature=0, max_new_tokens=N_NEW)


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_llama(seed: int = 0, **kw) -> Llama:
    """Random Llama: every matrix N(0, 1/fan_in), norm weights N(0, 1) (mixed signs).

    Not the training init on purpose: at that init a tiny model's next token is mostly a function of the last
    token (with tied embeddings it repeats the input token forever), so greedy outputs would be degenerate and
    comparing them would prove little. Here outputs vary and logits are spread out (no near-ties for rounding
    to flip between implementations).
    """
    cfg = LlamaConfig(**{"vocab_size": V, "dim": 64, "n_layers": 2, "n_heads": 4, "max_seq_len": 64, **kw})
    torch.manual_seed(seed)
    model = Llama(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) if "norm" in name else torch.randn_like(p) / p.shape[-1] ** 0.5)
    return model.eval()


def prompt(length: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(1000 + seed)
    return torch.randint(0, V, (length,), generator=g).tolist()


def greedy(model: Llama, ids: list[int], n: int = N_NEW, **kw) -> list[int]:
    return list(generate(model, ids, SamplingParams(temperature=0, max_new_tokens=n), **kw))


@torch.inference_mode()
def greedy_uncached(model: Llama, ids: list[int], n: int = N_NEW) -> list[int]:
    """The reference: recompute the whole sequence every step, no cache, take the argmax of the last column."""
    seq = list(ids)
    for _ in range(n):
        seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(ids):]


def first_fresh_index(ids: list[int], start: int, avoid=()) -> int:
    """Smallest k >= start whose token does not occur before k in `ids` nor in `avoid`."""
    for k in range(start, len(ids)):
        if ids[k] not in ids[:k] and ids[k] not in avoid:
            return k
    raise AssertionError(f"no fresh token after index {start} in {ids}")


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    """(our model, transformers' greedy continuation of a prompt: LlamaForCausalLM loaded from our run directory,
    results memoized because its generate is the slow part of this file)."""
    model = tiny_llama(**CASES[request.param])
    run = save_run(model, model.cfg, tmp_path_factory.mktemp(request.param))
    ref = transformers.LlamaForCausalLM.from_pretrained(run, attn_implementation="eager").eval()
    ref.generation_config.eos_token_id = None  # belt and braces: eos_token_id=None is passed too
    memo: dict[tuple[int, ...], list[int]] = {}

    def hf(ids: list[int]) -> list[int]:
        if tuple(ids) not in memo:
            memo[tuple(ids)] = hf_greedy(ref, ids)
        return memo[tuple(ids)]

    return model, hf


@pytest.fixture(scope="module")
def model():
    return tiny_llama(**CASES["gqa-untied-llama3"])


def hf_greedy(ref, ids: list[int], n: int = N_NEW) -> list[int]:
    x = torch.tensor([ids])
    out = ref.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
                       eos_token_id=None, pad_token_id=0, top_k=None, top_p=None)
    return out[0, len(ids):].tolist()


# --- greedy vs transformers, cached vs uncached ---------------------------------------------------------------

@pytest.mark.parametrize("length", [1, 7])
def test_greedy_equals_transformers(case, length):
    model, hf = case
    ids = prompt(length)
    ours = greedy(model, ids)
    assert len(ours) == N_NEW
    assert len(set(ours)) >= 4, f"degenerate model output, the comparison would prove little: {ours}"
    assert ours == hf(ids)


@pytest.mark.parametrize("length", [1, 7])
def test_cached_equals_uncached(case, length):
    model, _ = case
    ids = prompt(length, seed=1)
    assert greedy(model, ids) == greedy_uncached(model, ids)


def test_prefill_and_decode_step_logits_equal_full_forward(model):
    ids = torch.tensor([prompt(7) + prompt(5, seed=3)])  # (1, 12)
    with torch.inference_mode():
        full = model(ids)[0]
        cache = KVCache(model.cfg, 1, 12)
        got = [prefill(model, ids[:, :7], torch.arange(7)[None], cache)[0]]
        for t in range(7, 12):
            got.append(decode_step(model, ids[:, t], torch.tensor([t]), cache)[0])
    torch.testing.assert_close(torch.stack(got), full[6:], atol=1e-5, rtol=0)


def test_batched_left_padded_equals_each_prompt_alone(case):
    model, hf = case
    prompts = [prompt(1), prompt(7), prompt(4, seed=2)]  # the first two as in test_greedy_equals_transformers
    steps = list(generate_batch(model, prompts, GREEDY))
    assert len(steps) == N_NEW and all(len(s) == 3 for s in steps)
    for b, p in enumerate(prompts):
        row = [s[b] for s in steps]
        assert row == greedy(model, p), f"row {b}"
        assert row == hf(p), f"row {b} vs transformers"


def test_batch_of_one_equals_generate(model):
    ids = prompt(5)
    assert [s[0] for s in generate_batch(model, [ids], GREEDY)] == greedy(model, ids)


# --- sampling -------------------------------------------------------------------------------------------------

@torch.inference_mode()
def sample_reference(model: Llama, ids: list[int], params: SamplingParams) -> list[int]:
    """Sampling spelled out: full recomputation, penalty state from scratch each step, one seeded generator."""
    gen = make_generator(params.seed)
    seq = list(ids)
    for _ in range(params.max_new_tokens):
        logits = model(torch.tensor([seq]))[:, -1]
        out = torch.tensor([seq[len(ids):]], dtype=torch.long)
        logits = process_logits(logits, params, torch.tensor([seq]), token_counts(out, V))
        seq.append(int(sample(logits, params, gen)[0]))
    return seq[len(ids):]


def sampled(model, ids, **kw) -> list[int]:
    return list(generate(model, ids, SamplingParams(max_new_tokens=N_NEW, **kw)))


def test_seeded_sampling_is_reproducible(model):
    ids = prompt(4)
    a = sampled(model, ids, seed=7)
    assert a == sampled(model, ids, seed=7)
    assert a != sampled(model, ids, seed=8)
    assert a != greedy(model, ids)  # it does sample


@pytest.mark.parametrize("knobs", [
    dict(temperature=1.0),
    dict(temperature=0.8, top_k=5),
    dict(temperature=1.3, top_p=0.9),
    dict(temperature=1.0, min_p=0.05),
    dict(temperature=1.1, top_k=20, top_p=0.95, min_p=0.02, repetition_penalty=1.3),
    dict(temperature=1.0, frequency_penalty=0.7, presence_penalty=0.5),
    dict(temperature=0.9, top_k=8, repetition_penalty=1.5, frequency_penalty=-0.5, presence_penalty=1.0),
], ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()))
def test_sampling_equals_reference_loop(model, knobs):
    """Same seed, same ids as the spelled-out loop: the processors see the right history and output counts."""
    params = SamplingParams(max_new_tokens=N_NEW, seed=3, **knobs)
    ids = prompt(6, seed=4)
    ours = list(generate(model, ids, params))
    assert len(ours) == N_NEW and all(0 <= t < V for t in ours)
    assert ours == sample_reference(model, ids, params)


@pytest.mark.parametrize("knobs", [dict(repetition_penalty=1.8), dict(frequency_penalty=1.5, presence_penalty=1.0)])
def test_greedy_with_penalties_equals_reference(model, knobs):
    params = SamplingParams(temperature=0, max_new_tokens=N_NEW, **knobs)
    ids = prompt(6, seed=5)
    ours = list(generate(model, ids, params))
    assert ours == sample_reference(model, ids, params)
    assert ours != greedy(model, ids)  # the penalty changed something, or this test proves nothing


@pytest.mark.parametrize("knobs", [dict(top_k=1), dict(top_p=1e-9), dict(min_p=1.0)])
def test_truncation_to_one_token_is_greedy(model, knobs):
    ids = prompt(3, seed=6)
    for seed in (0, 1):
        assert sampled(model, ids, temperature=1.5, seed=seed, **knobs) == greedy(model, ids)


def test_batched_penalties_are_per_row():
    """Penalty state (prompt + output history, output counts) belongs to each row, and left padding is not part
    of a row's history: batched equals alone. Token 0 is made likely (and kept out of the prompts), so padding
    with id 0 counted as history would show."""
    model = tiny_llama(seed=1)
    with torch.no_grad():
        model.lm_head.weight[0] *= 3
    params = SamplingParams(temperature=0, max_new_tokens=N_NEW, repetition_penalty=1.8, frequency_penalty=0.5,
                            presence_penalty=0.5)
    prompts = [[t or 1 for t in prompt(n, seed=15 + n)] for n in (2, 7, 4)]
    steps = list(generate_batch(model, prompts, params))
    for b, p in enumerate(prompts):
        assert [s[b] for s in steps] == list(generate(model, p, params)) == sample_reference(model, p, params)


def test_sampled_batch_rows_are_reproducible(model):
    prompts = [prompt(2, seed=7), prompt(5, seed=8)]
    params = SamplingParams(temperature=1.0, top_k=10, seed=11, max_new_tokens=N_NEW)
    a = list(generate_batch(model, prompts, params))
    assert a == list(generate_batch(model, prompts, params))
    assert [s[0] for s in a] != [s[1] for s in a]


# --- stopping -------------------------------------------------------------------------------------------------

def test_eos_stops_and_is_yielded_last(model):
    ids = prompt(4, seed=9)
    full = greedy(model, ids)
    k = first_fresh_index(full, 3)
    assert greedy(model, ids, eos_token_id=full[k]) == full[: k + 1]
    assert greedy(model, ids, eos_token_id=full[0]) == full[:1]


def test_stop_token_ids_stop(model):
    ids = prompt(4, seed=9)
    full = greedy(model, ids)
    k1, k2 = first_fresh_index(full, 2), first_fresh_index(full, 6)
    got = list(generate(model, ids, SamplingParams(temperature=0, max_new_tokens=N_NEW,
                                                   stop_token_ids=[full[k2], full[k1]])))
    assert got == full[: k1 + 1]
    absent = next(t for t in range(V) if t not in full)
    got = list(generate(model, ids, SamplingParams(temperature=0, max_new_tokens=N_NEW, stop_token_ids=[absent]),
                        eos_token_id=full[k2]))
    assert got == full[: k2 + 1]  # eos and stop ids together


TABLE = [f"<{i}>".encode() for i in range(V)]  # "<i>": no token's bytes occur inside another's


@pytest.mark.parametrize("span", [1, 2, 3])
def test_stop_strings_stop_across_tokens(model, span):
    """The stop string is the text of `span` consecutive tokens minus their outer brackets: it starts inside one
    token and ends inside another. Generation ends with the token that completes it."""
    ids = prompt(4, seed=10)
    full = greedy(model, ids)
    k = first_fresh_index(full, 4)
    stop = b"".join(TABLE[t] for t in full[k - span + 1: k + 1])[1:-1].decode()
    text = [b"".join(TABLE[t] for t in full[: i + 1]).decode() for i in range(N_NEW)]
    expect = next(i for i in range(N_NEW) if stop in text[i])  # first step where the stop string is complete
    params = SamplingParams(temperature=0, max_new_tokens=N_NEW, stop=["never", stop])
    assert list(generate(model, ids, params, token_bytes=TABLE)) == full[: expect + 1]
    assert expect <= k < N_NEW - 1  # it really cut the generation short


@pytest.mark.parametrize("n", [1, 2, 5])
def test_max_new_tokens_respected(model, n):
    ids = prompt(3)
    assert greedy(model, ids, n=n) == greedy(model, ids)[:n]
    steps = list(generate_batch(model, [ids, prompt(6)], SamplingParams(temperature=0, max_new_tokens=n)))
    assert len(steps) == n


def test_batch_rows_finish_independently(model):
    prompts = [prompt(3, seed=12), prompt(6, seed=13), prompt(1, seed=14)]
    alone = [greedy(model, p) for p in prompts]
    k0 = first_fresh_index(alone[0], 2, avoid=alone[1] + alone[2])  # stops row 0 only
    stop = alone[0][k0]
    steps = list(generate_batch(model, prompts, SamplingParams(temperature=0, max_new_tokens=N_NEW,
                                                               stop_token_ids=[stop])))
    assert len(steps) == N_NEW
    assert [s[0] for s in steps] == alone[0][: k0 + 1] + [None] * (N_NEW - k0 - 1)
    assert [s[1] for s in steps] == alone[1] and [s[2] for s in steps] == alone[2]
    # every row stopped on its own eos: the generator ends at the last row's stop, earlier rows read None
    ends = [first_fresh_index(a, 2 + b) for b, a in enumerate(alone)]
    stops = [a[k] for a, k in zip(alone, ends)]
    ends = [min(i for i, t in enumerate(a) if t in stops) for a in alone]  # a row may hit another row's stop
    steps = list(generate_batch(model, prompts, SamplingParams(temperature=0, max_new_tokens=N_NEW,
                                                               stop_token_ids=stops)))
    assert len(steps) == max(ends) + 1 < N_NEW
    for b, a in enumerate(alone):
        assert [s[b] for s in steps] == a[: ends[b] + 1] + [None] * (len(steps) - ends[b] - 1)


# --- errors ---------------------------------------------------------------------------------------------------

def test_errors(model):
    with pytest.raises(LmforgeError, match="at least one token"):
        list(generate(model, []))
    with pytest.raises(LmforgeError, match="at least one token"):
        list(generate_batch(model, [[1, 2], []]))
    with pytest.raises(LmforgeError, match="at least one token"):
        list(generate_batch(model, []))
    for bad in ([V], [3, -1], [0, V + 5]):
        with pytest.raises(LmforgeError, match="outside the model's vocabulary"):
            list(generate(model, bad))
    with pytest.raises(LmforgeError, match="exceeds the model's context"):
        list(generate(model, prompt(60), SamplingParams(max_new_tokens=5)))
    with pytest.raises(LmforgeError, match="exceeds the model's context"):
        list(generate_batch(model, [prompt(2), prompt(62)], SamplingParams(max_new_tokens=3)))
    with pytest.raises(LmforgeError, match="token_bytes"):
        list(generate(model, prompt(3), SamplingParams(stop=["x"], max_new_tokens=4)))


def test_context_boundary_fits(model):
    """prompt + max_new_tokens == max_seq_len is allowed, and still equals full recomputation."""
    ids = prompt(60)
    assert greedy(model, ids, n=4) == greedy_uncached(model, ids, n=4)
