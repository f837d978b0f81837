"""Logits processors vs the transformers processors/warpers on the same logits; penalties, params, sampler.

Parity is exact (rtol=atol=0, so the -inf positions agree too): our processors compute the same float ops in
the same order as HF's, which is also what makes top-p break ties the same way.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from lmforge.common import LmforgeError
from lmforge.infer.sampling import (
    SamplingParams,
    frequency_presence_penalty,
    make_generator,
    min_p,
    process_logits,
    repetition_penalty,
    sample,
    temperature,
    token_counts,
    top_k,
    top_p,
)

B, V = 4, 64
SEEDS = range(20)
NO_IDS = torch.zeros(B, 0, dtype=torch.long)  # HF warpers ignore input_ids


def random_logits(seed: int, ties: bool = False, b: int = B, v: int = V) -> torch.Tensor:
    """(b, v) logits with a realistic spread; `ties` rounds them so many values repeat exactly."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, v, generator=g) * 3
    return logits.round() if ties else logits


def exact(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def per_row(warper_cls, logits: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """The HF warper applied row by row, each row with its own scalar parameter."""
    rows = [warper_cls(v.item())(NO_IDS[:1], logits[i: i + 1]) for i, v in enumerate(values)]
    return torch.cat(rows)


# --- each processor vs its transformers counterpart ----------------------------------------------------------

@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("t", [0.1, 0.7, 1.3, 2.0])
def test_temperature_matches_hf(seed, t):
    logits = random_logits(seed)
    exact(temperature(logits, t), TemperatureLogitsWarper(t)(NO_IDS, logits))


def test_temperature_zero_and_one_leave_logits():
    logits = random_logits(0)
    exact(temperature(logits, 0.0), logits)
    exact(temperature(logits, torch.tensor([0.0, 1.0, 0.0, 1.0])), logits)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("k", [1, 2, 5, 17, V - 1, V, V + 3])
def test_top_k_matches_hf(seed, ties, k):
    logits = random_logits(seed, ties)
    exact(top_k(logits, k), TopKLogitsWarper(k)(NO_IDS, logits))


def test_top_k_zero_is_off():
    logits = random_logits(0)
    exact(top_k(logits, 0), logits)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("p", [0.01, 0.1, 0.5, 0.9, 0.95, 0.999])
def test_top_p_matches_hf(seed, ties, p):
    logits = random_logits(seed, ties)
    exact(top_p(logits, p), TopPLogitsWarper(p)(NO_IDS, logits))


def test_top_p_ties_and_min_tokens_to_keep():
    # all equal: cumulative mass 1/4, 2/4, 3/4, 1; p=0.5 removes the two whose mass is <= 0.5, like HF
    logits = torch.zeros(1, 4)
    exact(top_p(logits, 0.5), TopPLogitsWarper(0.5)(NO_IDS[:1], logits))
    assert torch.isfinite(top_p(logits, 0.5)).sum() == 2
    # a tiny p still keeps one token (the most likely), never zero
    peaked = torch.tensor([[0.0, 1.0, 5.0, 2.0]])
    kept = top_p(peaked, 1e-6)
    assert torch.isfinite(kept).tolist() == [[False, False, True, False]]
    exact(kept, TopPLogitsWarper(1e-6)(NO_IDS[:1], peaked))


def test_top_p_one_is_off():
    logits = random_logits(0)
    logits[0, :10] = -1e4  # probability underflows to 0: p=1 must still keep them (off means off)
    exact(top_p(logits, 1.0), logits)
    exact(top_p(logits, torch.ones(B)), logits)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("p", [0.01, 0.05, 0.2, 0.5, 0.9, 1.0])
def test_min_p_matches_hf(seed, ties, p):
    logits = random_logits(seed, ties)
    exact(min_p(logits, p), MinPLogitsWarper(p)(NO_IDS, logits))


def random_history(seed: int, t: int = 12) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 1000)
    return torch.randint(0, V, (B, t), generator=g)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("penalty", [0.5, 1.1, 1.3, 2.0])
def test_repetition_penalty_matches_hf(seed, penalty):
    logits, ids = random_logits(seed), random_history(seed)
    exact(repetition_penalty(logits, ids, penalty), RepetitionPenaltyLogitsProcessor(penalty)(ids, logits.clone()))


def test_repetition_penalty_ignores_padding_and_empty_history():
    logits, ids = random_logits(3), random_history(3, t=6)
    padded = torch.cat([torch.full((B, 3), -1), ids, torch.full((B, 2), V)], dim=1)  # out-of-vocab = padding
    exact(repetition_penalty(logits, padded, 1.5), repetition_penalty(logits, ids, 1.5))
    exact(repetition_penalty(logits, NO_IDS, 1.5), logits)
    exact(repetition_penalty(logits, ids, 1.0), logits)


def test_frequency_presence_penalty_matches_openai_formula():
    """OpenAI: mu[j] -= c[j] * alpha_frequency + float(c[j] > 0) * alpha_presence, computed by hand."""
    for seed in SEEDS:
        logits = random_logits(seed)
        counts = token_counts(random_history(seed, t=30), V)
        freq, pres = 0.3 + 0.05 * seed, -0.4 + 0.1 * seed
        expected = logits.double().clone()
        for b in range(B):
            for j in range(V):
                c = int(counts[b, j])
                expected[b, j] -= c * freq + (1.0 if c > 0 else 0.0) * pres
        torch.testing.assert_close(frequency_presence_penalty(logits, counts, freq, pres), expected.float())


def test_token_counts():
    ids = torch.tensor([[1, 2, 2, -1, 5], [0, 0, 0, 7, 4]])
    counts = token_counts(ids, 6)
    assert counts.tolist() == [[0, 1, 2, 0, 0, 1], [3, 0, 0, 0, 1, 0]]


# --- per-row parameters ----------------------------------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), ties=st.booleans(),
       ps=st.lists(st.floats(0.001, 1.0), min_size=B, max_size=B))
def test_per_row_top_p_and_min_p_match_hf_row_by_row(seed, ties, ps):
    logits = random_logits(seed, ties)
    p = torch.tensor(ps)  # float32: HF gets the same float32 value as a Python float
    exact(top_p(logits, p), per_row(TopPLogitsWarper, logits, p))
    exact(min_p(logits, p), per_row(MinPLogitsWarper, logits, p))


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), ties=st.booleans(), ks=st.lists(st.integers(0, V + 5), min_size=B, max_size=B),
       ts=st.lists(st.floats(0.05, 3.0), min_size=B, max_size=B),
       penalties=st.lists(st.floats(0.2, 3.0), min_size=B, max_size=B))
def test_per_row_top_k_temperature_penalty_match_scalar_row_by_row(seed, ties, ks, ts, penalties):
    logits, ids = random_logits(seed, ties), random_history(seed)
    k = torch.tensor(ks)
    expected = torch.cat([top_k(logits[i: i + 1], ks[i]) for i in range(B)])
    exact(top_k(logits, k), expected)
    t = torch.tensor(ts)
    exact(temperature(logits, t), per_row(TemperatureLogitsWarper, logits, t))
    pen = torch.tensor(penalties)
    expected = torch.cat([RepetitionPenaltyLogitsProcessor(pen[i].item())(ids[i: i + 1], logits[i: i + 1].clone())
                          for i in range(B)])
    exact(repetition_penalty(logits, ids, pen), expected)


def test_per_row_frequency_presence():
    logits, counts = random_logits(5), token_counts(random_history(5, t=20), V)
    freq, pres = torch.tensor([0.0, 0.5, -1.0, 2.0]), torch.tensor([1.0, 0.0, 0.3, -2.0])
    expected = torch.cat([frequency_presence_penalty(logits[i: i + 1], counts[i: i + 1], freq[i].item(),
                                                     pres[i].item()) for i in range(B)])
    torch.testing.assert_close(frequency_presence_penalty(logits, counts, freq, pres), expected)


# --- process_logits: the whole chain ---------------------------------------------------------------------------

@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), ties=st.booleans(), t=st.floats(0.1, 2.0), k=st.integers(0, V + 2),
       p=st.floats(0.05, 1.0), mp=st.floats(0.0, 1.0), rep=st.floats(0.5, 2.0))
def test_process_logits_matches_hf_chain(seed, ties, t, k, p, mp, rep):
    """HF's order (repetition penalty, then the warpers temperature, top-k, top-p, min-p) is ours too."""
    logits, ids = random_logits(seed, ties), random_history(seed)
    params = SamplingParams(temperature=t, top_k=k, top_p=p, min_p=mp, repetition_penalty=rep)
    chain = [RepetitionPenaltyLogitsProcessor(rep), TemperatureLogitsWarper(t)]
    chain += [TopKLogitsWarper(k)] if k > 0 else []
    chain += [TopPLogitsWarper(p)] if p < 1 else []
    chain += [MinPLogitsWarper(mp)] if mp > 0 else []
    exact(process_logits(logits, params, ids), LogitsProcessorList(chain)(ids, logits.clone()))


def test_process_logits_applies_penalties_before_temperature():
    logits, ids = random_logits(1), random_history(1)
    counts = token_counts(ids[:, 6:], V)  # output tokens only
    params = SamplingParams(temperature=0.5, repetition_penalty=1.3, frequency_penalty=0.4, presence_penalty=0.2)
    expected = repetition_penalty(logits, ids, 1.3)
    expected = frequency_presence_penalty(expected, counts, 0.4, 0.2) / 0.5
    exact(process_logits(logits, params, ids, counts), expected)


def test_process_logits_per_row_params_match_each_row_alone():
    logits, ids = random_logits(2), random_history(2)
    counts = token_counts(ids, V)
    rows = [SamplingParams(temperature=0.7, top_k=5, top_p=0.9, repetition_penalty=1.2, frequency_penalty=0.5),
            SamplingParams(),
            SamplingParams(temperature=0.0, top_k=1, presence_penalty=1.0),
            SamplingParams(temperature=1.5, top_p=0.5, min_p=0.1, repetition_penalty=0.8)]
    batched = process_logits(logits, rows, ids, counts)
    for i, params in enumerate(rows):
        alone = process_logits(logits[i: i + 1], params, ids[i: i + 1], counts[i: i + 1])
        exact(batched[i: i + 1], alone)


def test_process_logits_greedy_gets_penalties_only_and_upcasts():
    logits, ids = random_logits(4).bfloat16(), random_history(4)
    params = SamplingParams(temperature=0.0, top_k=3, top_p=0.5, repetition_penalty=1.5)
    out = process_logits(logits, params, ids)
    assert out.dtype == torch.float32
    exact(out, repetition_penalty(logits.float(), ids, 1.5))


def test_process_logits_defaults_are_identity_and_do_not_modify_input():
    logits = random_logits(6)
    before = logits.clone()
    exact(process_logits(logits, SamplingParams()), logits)
    process_logits(logits, SamplingParams(temperature=0.5, top_k=3, top_p=0.5, min_p=0.2, repetition_penalty=2.0),
                   random_history(6))
    exact(logits, before)


def test_process_logits_needs_history_for_penalties():
    with pytest.raises(ValueError, match="history_ids"):
        process_logits(random_logits(0), SamplingParams(repetition_penalty=1.2))
    with pytest.raises(ValueError, match="counts"):
        process_logits(random_logits(0), SamplingParams(presence_penalty=1.0))


# --- sampling --------------------------------------------------------------------------------------------------

def test_greedy_is_argmax():
    for seed in SEEDS:
        logits = random_logits(seed)
        assert torch.equal(sample(logits, SamplingParams(temperature=0.0)), logits.argmax(dim=-1))


def test_seeded_sampling_is_reproducible():
    logits = random_logits(0)
    params = SamplingParams(temperature=1.0, seed=123)
    runs = [sample(logits, params, make_generator(params.seed)).tolist() for _ in range(3)]
    assert runs[0] == runs[1] == runs[2]
    g1, g2 = make_generator(7), make_generator(7)
    seq1 = [sample(logits, params, g1) for _ in range(50)]
    seq2 = [sample(logits, params, g2) for _ in range(50)]
    assert all(torch.equal(a, b) for a, b in zip(seq1, seq2))
    g3 = make_generator(8)
    assert any(not torch.equal(a, sample(logits, params, g3)) for a in seq1)
    assert make_generator(None) is None


def test_sampling_follows_the_distribution():
    logits = torch.tensor([[0.0, 1.0, 2.0, -1.0, 0.5]]).repeat(20_000, 1)
    ids = sample(logits, SamplingParams(), make_generator(0))
    freq = torch.bincount(ids, minlength=5).float() / len(ids)
    torch.testing.assert_close(freq, logits[0].softmax(-1), atol=0.01, rtol=0)


def test_sampling_never_picks_a_removed_token():
    logits = random_logits(9, b=256)
    params = SamplingParams(top_k=3)
    processed = process_logits(logits, params)
    ids = sample(processed, params, make_generator(1))
    assert torch.isfinite(processed.gather(1, ids[:, None])).all()


def test_mixed_greedy_rows_and_per_row_generators():
    logits = random_logits(10)
    rows = [SamplingParams(temperature=0.0), SamplingParams(seed=1), SamplingParams(seed=2), SamplingParams()]
    gens = [None, make_generator(1), make_generator(2), None]
    ids = sample(logits, rows, gens)
    assert ids[0] == logits[0].argmax()
    # a seeded row draws the same whatever it is batched with
    assert ids[1] == sample(logits[1:2], rows[1], make_generator(1))[0]
    assert ids[2] == sample(logits[2:3], rows[2], [make_generator(2)])[0]


# --- SamplingParams --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [
    {"temperature": -0.1}, {"temperature": float("nan")}, {"temperature": float("inf")}, {"temperature": "1"},
    {"top_k": -1}, {"top_k": 2.5}, {"top_k": True},
    {"top_p": 0.0}, {"top_p": 1.01}, {"top_p": -0.5},
    {"min_p": -0.1}, {"min_p": 1.5},
    {"repetition_penalty": 0.0}, {"repetition_penalty": -1.0},
    {"frequency_penalty": 2.5}, {"presence_penalty": -2.1},
    {"seed": 1.5}, {"max_new_tokens": 0}, {"max_new_tokens": None},
    {"stop": [""]}, {"stop": [b"x"]}, {"stop_token_ids": [-1]}, {"stop_token_ids": ["2"]},
])
def test_sampling_params_reject_bad_values(bad):
    with pytest.raises(LmforgeError):
        SamplingParams(**bad)


def test_sampling_params_defaults_and_normalisation():
    p = SamplingParams()
    assert (p.temperature, p.top_k, p.top_p, p.min_p, p.repetition_penalty) == (1.0, 0, 1.0, 0.0, 1.0)
    assert (p.frequency_penalty, p.presence_penalty, p.seed, p.stop, p.stop_token_ids) == (0.0, 0.0, None, [], [])
    q = SamplingParams(temperature=0, stop="###", stop_token_ids=(2, 3), seed=0, top_p=1)
    assert q.greedy and q.stop == ["###"] and q.stop_token_ids == [2, 3] and isinstance(q.temperature, float)
    with pytest.raises(LmforgeError):
        dataclasses.replace(q, top_p=2.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_everything_stays_on_the_logits_device():
    logits, ids = random_logits(0).cuda(), random_history(0).cuda()
    counts = token_counts(ids, V)
    rows = [SamplingParams(temperature=0.0), SamplingParams(top_k=5, top_p=0.9, min_p=0.05, seed=1),
            SamplingParams(temperature=0.7, repetition_penalty=1.2, frequency_penalty=0.5), SamplingParams(top_p=0.3)]
    processed = process_logits(logits, rows, ids, counts)
    assert processed.is_cuda
    exact(processed.cpu(), process_logits(logits.cpu(), rows, ids.cpu(), counts.cpu()))
    gens = [make_generator(p.seed, "cuda") for p in rows]
    assert sample(processed, rows, gens).is_cuda
    assert sample(processed, rows[1], make_generator(3, "cuda")).is_cuda
