"""Logits processors and the sampler: plain functions on `(B, V)` logits, vLLM / OpenAI / HF semantics.

Each processor takes logits and returns new logits (never in place), with its parameter either one number for
the whole batch or a tensor of shape `(B,)`, one value per row (continuous batching mixes requests). A value
that turns a processor off (top_k=0, top_p=1, min_p=0, penalty 1 / 0) is an identity, per row too.
Everything stays on the logits' device and is vectorised over the vocabulary.

`process_logits` applies them in one fixed order and `sample` picks the ids; `SamplingParams` holds the knobs
a request sets (the OpenAI / vLLM names) and validates them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from lmforge.common import LmforgeError

Param = float | torch.Tensor  # one value for the batch, or a (B,) tensor of per-row values


def _column(x: torch.Tensor, logits: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A (B,) per-row parameter as a (B, 1) column on the logits' device, to broadcast over the vocabulary."""
    return x.to(device=logits.device, dtype=dtype or logits.dtype).reshape(-1, 1)


def temperature(logits: torch.Tensor, t: Param) -> torch.Tensor:
    """Divide logits by the temperature (HF TemperatureLogitsWarper, vLLM `apply_temperature`).

    t < 1 sharpens, t > 1 flattens. t == 0 means greedy, which `sample` handles with an argmax; a row with
    t == 0 is left unscaled here (vLLM does the same), so the other processors still see finite logits.
    """
    if isinstance(t, torch.Tensor):
        t = _column(t, logits)
        return logits / torch.where(t == 0, torch.ones_like(t), t)
    return logits if t in (0, 1) else logits / t


def top_k(logits: torch.Tensor, k: int | torch.Tensor) -> torch.Tensor:
    """Keep the k largest logits per row, set the rest to -inf (HF TopKLogitsWarper, vLLM top-k).

    Like both references, every token tied with the k-th largest value is kept (`logits < kth` is removed),
    so a row can keep more than k tokens on ties. k <= 0 (off, the vLLM/OpenAI-style default) or k >= V keeps all.
    """
    V = logits.shape[-1]
    if not isinstance(k, torch.Tensor):
        if k <= 0 or k >= V:
            return logits
        kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (B, 1)
    else:
        k = k.to(device=logits.device, dtype=torch.long).reshape(-1)
        k = torch.where((k <= 0) | (k > V), torch.full_like(k, V), k)
        # one topk of the largest k in the batch, then each row reads its own k-th value
        values = torch.topk(logits, int(k.max()), dim=-1).values  # (B, k_max)
        kth = values.gather(-1, (k - 1).unsqueeze(-1))  # (B, 1)
    return logits.masked_fill(logits < kth, -math.inf)


def top_p(logits: torch.Tensor, p: Param) -> torch.Tensor:
    """Nucleus sampling (Holtzman et al. 2019): keep the smallest set of most likely tokens whose mass reaches p.

    Computed exactly as HF TopPLogitsWarper (min_tokens_to_keep=1) and vLLM `apply_top_k_top_p` do, so ties
    break the same way: sort ascending, remove every token whose cumulative probability (from the least likely
    up) is <= 1 - p, but never the most likely token. p == 1 keeps all (also per row).
    """
    if not isinstance(p, torch.Tensor) and p >= 1:
        return logits
    sorted_logits, sorted_idx = torch.sort(logits, descending=False)
    cum_probs = sorted_logits.softmax(dim=-1).cumsum(dim=-1)  # (B, V), ascending
    if isinstance(p, torch.Tensor):
        # 1 - p in float64 then rounded once, as HF's Python-float `1 - top_p` is; rows with p >= 1 are off
        threshold = _column(1 - p.double(), logits, torch.float64).to(cum_probs.dtype)
        remove_sorted = (cum_probs <= threshold) & _column(p < 1, logits, torch.bool)
    else:
        remove_sorted = cum_probs <= 1 - p
    remove_sorted[..., -1:] = False  # keep at least the most likely token
    remove = remove_sorted.scatter(-1, sorted_idx, remove_sorted)  # back to vocabulary order
    return logits.masked_fill(remove, -math.inf)


def min_p(logits: torch.Tensor, p: Param) -> torch.Tensor:
    """Min-p sampling (Nguyen et al. 2024): drop tokens whose probability is below p * (top token's probability).

    Matches HF MinPLogitsWarper and vLLM `_apply_min_p`. The threshold scales with the model's confidence.
    HF also forces the top token back in (min_tokens_to_keep=1); with 0 <= p <= 1 it can never fall below
    p * itself, so that step is a no-op here. p == 0 keeps all.
    """
    if not isinstance(p, torch.Tensor):
        if p <= 0:
            return logits
    else:
        p = _column(p, logits)
    probs = logits.softmax(dim=-1)
    remove = probs < p * probs.amax(dim=-1, keepdim=True)
    return logits.masked_fill(remove, -math.inf)


def token_mask(ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(B, T) ids -> (B, V) bool, True where the id occurs in the row; ids outside [0, V) (padding) are ignored."""
    ids = ids.long()
    ids = torch.where((ids < 0) | (ids >= vocab_size), torch.full_like(ids, vocab_size), ids)
    mask = torch.zeros(ids.shape[0], vocab_size + 1, dtype=torch.bool, device=ids.device)
    return mask.scatter_(1, ids, True)[:, :vocab_size]  # the extra column absorbed the padding


def token_counts(ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(B, T) ids -> (B, V) long counts of each id per row; ids outside [0, V) (padding) are ignored."""
    ids = ids.long()
    ids = torch.where((ids < 0) | (ids >= vocab_size), torch.full_like(ids, vocab_size), ids)
    counts = torch.zeros(ids.shape[0], vocab_size + 1, dtype=torch.long, device=ids.device)
    return counts.scatter_add_(1, ids, torch.ones_like(ids))[:, :vocab_size]


def repetition_penalty(logits: torch.Tensor, prev_ids: torch.Tensor, penalty: Param) -> torch.Tensor:
    """CTRL's repetition penalty (Keskar et al. 2019) as HF RepetitionPenaltyLogitsProcessor and vLLM apply it.

    For every token that occurs in `prev_ids` (B, T) (HF: prompt and output), a positive logit is divided by
    `penalty` and a negative one multiplied, so penalty > 1 always makes a seen token less likely. Each token
    counts once however often it occurred. Ids outside [0, V) are padding and ignored. penalty == 1 is off.
    """
    if not isinstance(penalty, torch.Tensor):
        if penalty == 1:
            return logits
    else:
        penalty = _column(penalty, logits)
    seen = token_mask(prev_ids.to(logits.device), logits.shape[-1])  # (B, V)
    penalized = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalized, logits)


def frequency_presence_penalty(logits: torch.Tensor, counts: torch.Tensor, frequency: Param,
                               presence: Param) -> torch.Tensor:
    """OpenAI's frequency and presence penalties (also vLLM's): logits -= counts*frequency + (counts > 0)*presence.

    `counts` (B, V) is how often each token occurs in the output generated so far (not the prompt, as in
    OpenAI and vLLM). Both penalties are additive on logits; positive values discourage repeats, negative
    values encourage them.
    """
    if isinstance(frequency, torch.Tensor):
        frequency = _column(frequency, logits)
    if isinstance(presence, torch.Tensor):
        presence = _column(presence, logits)
    counts = counts.to(logits.device)
    return logits - (counts.to(logits.dtype) * frequency + (counts > 0).to(logits.dtype) * presence)


@dataclass
class SamplingParams:
    """What a generation request sets, with the OpenAI / vLLM names and defaults; validated on construction.

    Defaults sample from the unmodified distribution (temperature 1, no truncation, no penalties);
    temperature=0 is greedy. top_k=0 turns top-k off. `stop` strings end generation and are not included in
    the output (OpenAI); `stop_token_ids` end it on those ids. Use `dataclasses.replace` to change a field so
    the new value is validated too.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None
    max_new_tokens: int = 256
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "frequency_penalty", "presence_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise LmforgeError(f"{name} must be a finite number, got {value!r}")
            setattr(self, name, float(value))
        for name in ("top_k", "max_new_tokens", "seed"):
            value = getattr(self, name)
            if name == "seed" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise LmforgeError(f"{name} must be an integer, got {value!r}")
        _check(self.temperature >= 0, f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        _check(self.top_k >= 0, f"top_k must be >= 0 (0 turns it off), got {self.top_k}")
        _check(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")
        _check(0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}")
        _check(self.repetition_penalty > 0, f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        for name in ("frequency_penalty", "presence_penalty"):  # OpenAI's range
            _check(-2 <= getattr(self, name) <= 2, f"{name} must be in [-2, 2], got {getattr(self, name)}")
        _check(self.max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if isinstance(self.stop, str):  # OpenAI accepts one string or a list
            self.stop = [self.stop]
        self.stop = list(self.stop)
        _check(all(isinstance(s, str) and s for s in self.stop), f"stop must be non-empty strings, got {self.stop}")
        self.stop_token_ids = list(self.stop_token_ids)
        _check(all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in self.stop_token_ids),
               f"stop_token_ids must be non-negative integers, got {self.stop_token_ids}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise LmforgeError(message)


def _batch_value(params: SamplingParams | Sequence[SamplingParams], name: str, dtype: torch.dtype,
                 device: torch.device) -> float | int | torch.Tensor:
    """One field over the batch: a plain number when every row agrees (fast paths, exact HF parity), else (B,)."""
    if isinstance(params, SamplingParams):
        return getattr(params, name)
    values = [getattr(p, name) for p in params]
    if all(v == values[0] for v in values):
        return values[0]
    return torch.tensor(values, dtype=dtype, device=device)


def _is_off(value: float | int | torch.Tensor, off: float) -> bool:
    return not isinstance(value, torch.Tensor) and value == off


def process_logits(logits: torch.Tensor, params: SamplingParams | Sequence[SamplingParams],
                   history_ids: torch.Tensor | None = None, counts: torch.Tensor | None = None) -> torch.Tensor:
    """Apply every processor `params` turns on, in vLLM's order: logits (B, V) -> new float32 logits (B, V).

    `params` is one SamplingParams for the batch or one per row. `history_ids` (B, T) are the prompt and output
    ids (repetition penalty; ids outside [0, V) are padding); `counts` (B, V) count the output tokens only
    (frequency / presence penalties). Each is needed only when its penalty is on.

    Order: penalties -> temperature -> top-k -> top-p -> min-p, as vLLM's sampler (v0 `Sampler.forward`) and
    HF's `_get_logits_processor` both do. Penalties first, because they are defined on raw logits (CTRL,
    OpenAI) and must mean the same whatever the temperature. Temperature next, because top-p and min-p read
    probabilities that temperature reshapes (top-k does not care). Truncation last, each step on the
    distribution the previous one left: top-p measures its mass after top-k, and min-p, being relative to the
    top token, commutes with top-k but not with top-p. Greedy rows (temperature 0) get the penalties only,
    like vLLM's greedy path, so their argmax is that of the penalized logits. Logits are upcast to float32
    first (as vLLM does): softmax and cumulative sums in bf16 are too coarse for top-p.
    """
    logits = logits.float()
    device = logits.device

    def value(name: str, dtype: torch.dtype = torch.float32):
        return _batch_value(params, name, dtype, device)

    penalty = value("repetition_penalty")
    if not _is_off(penalty, 1.0):
        if history_ids is None:
            raise ValueError("repetition_penalty needs history_ids")
        logits = repetition_penalty(logits, history_ids, penalty)
    frequency, presence = value("frequency_penalty"), value("presence_penalty")
    if not (_is_off(frequency, 0.0) and _is_off(presence, 0.0)):
        if counts is None:
            raise ValueError("frequency_penalty / presence_penalty need counts")
        logits = frequency_presence_penalty(logits, counts, frequency, presence)
    t = value("temperature")
    if _is_off(t, 0.0):  # all greedy: truncation cannot change the argmax, skip its sort
        return logits
    penalized = logits
    logits = temperature(logits, t)
    logits = top_k(logits, value("top_k", torch.long))
    logits = top_p(logits, value("top_p", torch.float64))  # float64: see top_p on rounding 1 - p
    logits = min_p(logits, value("min_p"))
    if isinstance(t, torch.Tensor):  # greedy rows keep the penalized logits, as in the all-greedy case
        logits = torch.where(_column(t == 0, logits, torch.bool), penalized, logits)
    return logits


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator | None:
    """A torch.Generator seeded with `seed` on `device` (sampling reproducible per request), or None."""
    return None if seed is None else torch.Generator(device=device).manual_seed(seed)


def sample(logits: torch.Tensor, params: SamplingParams | Sequence[SamplingParams],
           generator: torch.Generator | Sequence[torch.Generator | None] | None = None) -> torch.Tensor:
    """Pick one id per row from processed logits (B, V) -> (B,) long.

    Rows with temperature 0 take the argmax (greedy, deterministic); the others draw from softmax(logits) with
    torch.multinomial (as HF's `_sample`) using `generator`, so a seeded generator reproduces the draw. Pass one
    generator per row (None for unseeded rows) when rows carry their own seeds, so a request's samples do not
    depend on what it is batched with.
    """
    greedy = [p.greedy for p in params] if not isinstance(params, SamplingParams) else [params.greedy]
    if all(greedy):
        return logits.argmax(dim=-1)
    probs = logits.float().softmax(dim=-1)
    if generator is None or isinstance(generator, torch.Generator):
        ids = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    else:  # per-row generators: one small draw each (a loop over the batch, never the vocabulary)
        ids = torch.cat([torch.multinomial(probs[b: b + 1], 1, generator=g).squeeze(-1)
                         for b, g in enumerate(generator)])
    if any(greedy):
        mask = torch.tensor(greedy, device=logits.device)
        ids = torch.where(mask, logits.argmax(dim=-1), ids)
    return ids
