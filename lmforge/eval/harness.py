"""The evaluation harness: score a decoder-only run on tasks (lmforge/eval/tasks.py), item by item.

    from lmforge.eval.harness import Evaluator
    ev = Evaluator.from_run("runs/tiny")
    results = ev.evaluate(load_tasks(["tasks/"]), limit=100, batch_size=32)   # [TaskResult, ...]

**Multiple choice** is scored as lm-evaluation-harness scores it (lm_eval/api/model.py, models/huggingface.py):
each choice's continuation `target_delimiter + choice` gets the summed log-likelihood of its tokens given the
context, with the same token boundary: trailing whitespace of the context moves to the continuation, then
`context_ids = encode(context)`, `continuation_ids = encode(context + continuation)[len(context_ids):]`,
where `encode` puts before the text what HF's tokenizer would (its BOS, see `textgen.prompt_prefix`); an
empty context is the tokenizer's BOS (else EOS) id; a pair longer than the model's context keeps its last
max_len + 1 tokens. `acc` picks the highest log-likelihood, `acc_norm` the highest log-likelihood per
character of the choice, `grade` (BIG-bench's multiple_choice_grade) scores the pick by its target score, `ece`
is the calibration error of softmax(log-likelihoods) (both as `lmforge.eval.qa` defines them).

The numbers equal lm-eval's; the work does not. lm-eval runs every (context, choice) pair as its own row,
recomputing the shared context once per choice and the vocabulary projection at every position. Here the
contexts of a batch of items run once, left-padded, into a KV cache, projecting only their last position
(which predicts each choice's first token); the cache rows are then copied once per choice and all choices'
remaining tokens run in one batch after them (skipped entirely when every choice is a single token). Leading
tokens that all of an item's choices share run with its context, once.

**Generative** tasks: greedy decoding (batched, left-padded; `infer.generate_batch`) up to the task's stop
strings, the model's eos or `max_new_tokens`; the text before the stop string is scored with the metric
modules (`exact_match`/`f1`: lmforge.eval.qa, `bleu`, `chrf`, `rouge*`), imported when a task asks for them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import math
import re
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmforge.common import LmforgeError
from lmforge.eval.tasks import GENERATE, MULTIPLE_CHOICE, Item, Task
from lmforge.infer.generate import eos_ids, generate_batch
from lmforge.infer.kv_cache import KVCache
from lmforge.infer.sampling import SamplingParams
from lmforge.infer.stopping import StopChecker


@dataclasses.dataclass
class Metric:
    """One metric of a task: per-item `values` (the score is their mean) or a `corpus` function of item indices
    (BLEU, chrF, ECE: not a mean of per-item numbers). Either way `value(indices)` scores any subset, which is
    what the bootstrap in lmforge/eval/report.py resamples."""

    name: str
    values: list[float] | None = None
    corpus: Callable[[Sequence[int]], float] | None = None
    n: int = 0  # number of items

    def value(self, indices: Sequence[int] | None = None) -> float:
        if self.values is not None:
            vals = self.values if indices is None else [self.values[i] for i in indices]
            return math.fsum(vals) / len(vals)
        assert self.corpus is not None
        return self.corpus(range(self.n) if indices is None else indices)


@dataclasses.dataclass
class TaskResult:
    """A task's per-item records (what items.jsonl holds) and its metrics."""

    task: Task
    records: list[dict]
    metrics: dict[str, Metric]
    seconds: float
    fewshot: int


# ---------------------------------------------------------------------- tokenization (lm-eval's rule)

class Encoder:
    """Text to ids as lm-eval's `HFLM.tok_encode` / `_encode_pair` make them with the run's HF tokenizer."""

    def __init__(self, tok: Any, prefix: Sequence[int] = (), prefix_token_id: int | None = None):
        self.tok, self.prefix, self.prefix_token_id = tok, list(prefix), prefix_token_id
        self._prefix_text = tok.decode([prefix_token_id]) if prefix_token_id is not None else None

    @classmethod
    def from_run(cls, run: str | Path, tok: Any) -> Encoder:
        """The prefix HF's tokenizer adds (`prompt_prefix`), and lm-eval's `prefix_token_id`: BOS, else EOS."""
        from lmforge.textgen import prompt_prefix
        from lmforge.tokenizer.chat import read_special_tokens

        named = read_special_tokens(run)
        ids = [tok.token_to_id(named[n]) for n in ("bos_token", "eos_token") if n in named]
        return cls(tok, prompt_prefix(run, tok), next((i for i in ids if i is not None), None))

    def encode(self, text: str) -> list[int]:
        """HF `tokenizer.encode(text)`: special-token text is matched, the prefix added unless the text starts
        with the prefix token's own text (lm-eval's `has_bos_prefix`)."""
        ids = self.tok.encode(text, allowed_special="all")
        if self._prefix_text and text.startswith(self._prefix_text):
            return ids
        return self.prefix + ids

    def pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context ids, continuation ids) as lm-eval's `loglikelihood` builds them."""
        if context == "":
            cont = self.tok.encode(continuation, allowed_special="all")
            if self.prefix_token_id is None:
                raise LmforgeError("an empty context needs a BOS or EOS token in tokenizer_config.json")
            return ([self.prefix_token_id], cont) if cont[:1] != [self.prefix_token_id] else (cont[:1], cont[1:])
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        whole = self.encode(context + continuation)
        ctx = self.encode(context)
        return ctx, whole[len(ctx):]


# ---------------------------------------------------------------------- log-likelihood scoring

@contextlib.contextmanager
def _last_positions_head(model: nn.Module, n: int) -> Iterator[None]:
    """Project only the last `n` positions to the vocabulary while filling the cache with the contexts: the
    others' logits are never used, and at SmolLM2's 49k vocabulary they cost ~20% of the compute and (B, T, V)
    floats of memory. A temporary module swap, restored on exit; a model without `lm_head` is left alone (the
    caller slices its full logits)."""
    head = getattr(model, "lm_head", None)
    if not isinstance(head, nn.Module):
        yield
        return
    model.lm_head = _LastPositions(head, n)
    try:
        yield
    finally:
        model.lm_head = head


class _LastPositions(nn.Module):
    def __init__(self, head: nn.Module, n: int):
        super().__init__()
        self.head, self.n = head, n

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, n, V)
        return self.head(x[:, -self.n:])


def _select_rows(cache: KVCache, rows: torch.Tensor) -> KVCache:
    """A cache whose row r is row rows[r] of `cache` (one context's keys and values copied for each choice)."""
    out = KVCache((cache.n_layers, cache.n_kv_heads, cache.head_dim), 1, cache.max_len,
                  dtype=cache.k[0].dtype, device=cache.k[0].device)
    out.batch_size = len(rows)
    out.k = [k.index_select(0, rows) for k in cache.k]
    out.v = [v.index_select(0, rows) for v in cache.v]
    out.written = cache.written.index_select(0, rows)
    return out


def _target_logprobs(logits: torch.Tensor, targets: torch.Tensor, rows: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(target) and whether the target is the argmax, per position: logits (N, [T,] V), targets (R, T);
    `rows` (R,) picks a row of logits for each target row (all of a context's choices share its logits).
    The same numbers as log_softmax + gather + argmax without writing a (R, T, V) log-softmax."""
    if logits.dim() == 2:
        logits = logits[:, None]  # (N, 1, V)
    lse, best = torch.logsumexp(logits, -1), logits.argmax(-1)  # (N, T) each
    if rows is not None:
        lse, best = lse.index_select(0, rows), best.index_select(0, rows)
        picked = logits[:, 0].index_select(0, rows).gather(-1, targets)  # (R, 1)
    else:
        picked = logits.gather(-1, targets[..., None])[..., 0]
    return picked - lse, best == targets


def _shared_prefix(conts: Sequence[Sequence[int]]) -> int:
    """How many leading tokens all continuations share, leaving each at least one of its own."""
    n, limit = 0, min(len(k) for k in conts) - 1
    while n < limit and all(k[n] == conts[0][n] for k in conts):
        n += 1
    return n


def _score_chunk(model: nn.Module, groups: Sequence[tuple[Sequence[int], Sequence[Sequence[int]]]]
                 ) -> list[list[tuple[float, bool]]]:
    """(log-likelihood, is_greedy) of every continuation of every (context ids, [continuation ids]) group.

    Tokens that all of a group's continuations start with (" " before digits, say) join its context pass: they
    are scored once from its logits and their log-likelihood added to every choice's.
    """
    device = next(model.parameters()).device
    shared = [_shared_prefix(ks) for _, ks in groups]
    groups = [([*c, *ks[0][:s]], [k[s:] for k in ks]) for (c, ks), s in zip(groups, shared)]
    G, L, S = len(groups), max(len(c) for c, _ in groups), max(shared) + 1
    conts = [k for _, ks in groups for k in ks]
    row_group = torch.tensor([g for g, (_, ks) in enumerate(groups) for _ in ks], device=device)
    R, K = len(conts), max(len(k) for k in conts)
    ids = torch.zeros(G, L, dtype=torch.long)
    pos = torch.full((G, L), -1, dtype=torch.long)
    for g, (ctx, _) in enumerate(groups):  # left-padded: every context ends in the last column
        ids[g, L - len(ctx):] = torch.tensor(ctx)
        pos[g, L - len(ctx):] = torch.arange(len(ctx))
    cache = KVCache(model.cfg, G, L + K - 1, dtype=next(model.parameters()).dtype, device=device)
    with _last_positions_head(model, S):
        last = model(ids.to(device), input_pos=pos.to(device), cache=cache)[:, -S:].float()  # (G, S, V)
    ids = ids.to(device)
    if S > 1:  # the shared tokens: the context's last S - 1 ids, predicted by the S - 1 columns before the last
        is_shared = torch.arange(S - 1, device=device) >= S - 1 - torch.tensor(shared, device=device)[:, None]
        lp, h = _target_logprobs(last[:, :-1], ids[:, L - S + 1:])  # (G, S-1) each
        shared_lp, shared_hit = (lp * is_shared).double().sum(-1), (h | ~is_shared).all(-1)
    targets = torch.zeros(R, K, dtype=torch.long)
    mask = torch.zeros(R, K, dtype=torch.bool)
    for r, k in enumerate(conts):
        targets[r, :len(k)], mask[r, :len(k)] = torch.tensor(k), True
    targets, mask = targets.to(device), mask.to(device)
    token_lp, hit = _target_logprobs(last[:, -1], targets[:, :1], row_group)  # (R, 1) each
    if K > 1:  # the choices' other tokens, one row per choice, after a copy of its context's cache row
        ctx_len = torch.tensor([len(groups[g][0]) for g in row_group.tolist()], device=device)
        steps = torch.arange(K - 1, device=device)
        x = torch.where(mask[:, 1:], targets[:, :-1], 0)  # (R, K-1): each continuation but its last token
        p = torch.where(mask[:, 1:], ctx_len[:, None] + steps, -1)  # right padding: position -1, never stored
        rest = model(x, input_pos=p, cache=_select_rows(cache, row_group))  # (R, K-1, V)
        lp, h = _target_logprobs(rest.float(), targets[:, 1:])
        token_lp, hit = torch.cat([token_lp, lp], dim=1), torch.cat([hit, h], dim=1)  # (R, K)
    sums = (token_lp * mask).double().sum(-1)
    greedy = (hit | ~mask).all(-1)
    if S > 1:
        sums, greedy = sums + shared_lp[row_group], greedy & shared_hit[row_group]
    sums, greedy = sums.tolist(), greedy.tolist()
    out, r = [], 0
    for _, ks in groups:
        out.append([(sums[r + i], greedy[r + i]) for i in range(len(ks))])
        r += len(ks)
    return out


def loglikelihoods(model: nn.Module, requests: Sequence[tuple[Sequence[int], Sequence[int]]], batch_size: int = 32,
                   progress: Callable[[int], None] | None = None) -> list[tuple[float, bool]]:
    """(sum of log p(continuation | context), whether greedy decoding would produce it) per (context ids,
    continuation ids) request, as lm-eval's `_loglikelihood_tokens` computes it. Requests that share a context
    are scored together; `batch_size` bounds the continuations per forward pass (a context's continuations are
    never split). `progress(n)` is told how many contexts each batch finished."""
    max_len = model.cfg.max_seq_len
    groups: dict[tuple[int, ...], list[int]] = {}
    for n, (ctx, cont) in enumerate(requests):
        if not cont:
            raise LmforgeError("a continuation encodes to no tokens (an empty choice?)")
        if len(cont) > max_len:
            raise LmforgeError(f"a continuation of {len(cont)} tokens exceeds the model's context ({max_len})")
        if len(ctx) + len(cont) > max_len + 1:  # lm-eval: keep the last max_len + 1 tokens
            ctx = (list(ctx) + list(cont))[-(max_len + 1):][:-len(cont)]
        groups.setdefault(tuple(ctx), []).append(n)
    # longest first, as lm-eval sorts: little padding within a batch, and memory problems show at once
    order = sorted(groups, key=lambda c: -(len(c) + max(len(requests[n][1]) for n in groups[c])))
    out: list[tuple[float, bool] | None] = [None] * len(requests)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            chunk: list[tuple[int, ...]] = []
            rows = 0
            for ctx in [*order, None]:
                if ctx is None or (chunk and rows + len(groups[ctx]) > batch_size):
                    scored = _score_chunk(model, [(c, [requests[n][1] for n in groups[c]]) for c in chunk])
                    for c, results in zip(chunk, scored):
                        for n, res in zip(groups[c], results):
                            out[n] = res
                    if progress:
                        progress(len(chunk))
                    chunk, rows = [], 0
                if ctx is not None:
                    chunk.append(ctx)
                    rows += len(groups[ctx])
    finally:
        model.train(was_training)
    return out  # type: ignore[return-value]


# ---------------------------------------------------------------------- metrics

def _qa():
    return importlib.import_module("lmforge.eval.qa")


def _mc_metrics(task: Task, records: list[dict]) -> dict[str, Metric]:
    qa = _qa()
    out: dict[str, Metric] = {}
    for name in task.metrics:
        if name in ("acc", "acc_norm", "grade"):
            out[name] = Metric(name, [r["scores"][name] for r in records], n=len(records))
        elif name == "ece":
            conf = [r["confidence"] for r in records]
            right = [r["scores"]["acc"] for r in records]
            out[name] = Metric(name, corpus=lambda idx, c=conf, k=right: qa.expected_calibration_error(
                [c[i] for i in idx], [k[i] for i in idx]), n=len(records))
    return out


def _streams(refs: Sequence[Sequence[str]]) -> list[list[str | None]]:
    """references[k][i] = the k-th reference of item i, None where it has fewer (bleu / chrf's layout)."""
    n = max(len(r) for r in refs)
    return [[r[k] if k < len(r) else None for r in refs] for k in range(n)]


def _corpus(fn: Callable[[list[str], list[list[str | None]]], float], preds: list[str], refs: list[list[str]]):
    return lambda idx: fn([preds[i] for i in idx], _streams([refs[i] for i in idx]))


def generative_metric(name: str, preds: list[str], refs: list[list[str]]) -> Metric | None:
    """The metric `name` over predictions and their references (None if lmforge has no such metric). Per-item
    metrics are fractions in [0, 1]; BLEU and chrF are corpus scores in 0..100, as sacreBLEU reports them."""
    n = len(preds)
    if name in ("exact_match", "f1"):  # SQuAD-normalized (lmforge.eval.qa)
        fn = _qa().exact_match if name == "exact_match" else _qa().token_f1
        return Metric(name, [fn(p, r) for p, r in zip(preds, refs)], n=n)
    if name == "exact_str_match":  # BIG-bench: the output equals a target exactly
        return Metric(name, [float(p in r) for p, r in zip(preds, refs)], n=n)
    if name == "case_insensitive_str_match":
        return Metric(name, [float(p.lower() in [t.lower() for t in r]) for p, r in zip(preds, refs)], n=n)
    if name in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
        rouge = importlib.import_module("lmforge.eval.rouge")
        return Metric(name, [rouge.score(p, r, types=[name])[name].fmeasure for p, r in zip(preds, refs)], n=n)
    if name == "bleu":
        bleu = importlib.import_module("lmforge.eval.bleu")
        return Metric(name, corpus=_corpus(lambda h, s: bleu.corpus_bleu(h, s).score, preds, refs), n=n)
    if name in ("chrf", "chrf++"):
        chrf = importlib.import_module("lmforge.eval.chrf")
        words = 2 if name == "chrf++" else 0
        return Metric(name, corpus=_corpus(lambda h, s: chrf.corpus_chrf(h, s, word_order=words).score, preds, refs),
                      n=n)
    return None


def _gen_metrics(task: Task, records: list[dict]) -> dict[str, Metric]:
    """The task's metrics over the outputs; per-item values are copied into each record's "scores"."""
    preds = [r["output"] for r in records]
    refs = [r["references"] for r in records]
    metrics = {}
    for name in task.metrics:
        metric = generative_metric(name, preds, refs)
        if metric is None:
            raise LmforgeError(f"task {task.name}: unknown metric {name!r}")
        metrics[name] = metric
        for r, v in zip(records, metric.values or ()):
            r.setdefault("scores", {})[name] = v
    return metrics


# ---------------------------------------------------------------------- the evaluator

class Evaluator:
    """A model and its tokenizer, ready to score tasks."""

    def __init__(self, model: nn.Module, tok: Any, encoder: Encoder | None = None):
        if callable(getattr(model, "encode", None)) and callable(getattr(model, "shift_right", None)):
            raise LmforgeError("the evaluation harness scores decoder-only models; this is an encoder-decoder")
        if not hasattr(model, "cfg") or not hasattr(model.cfg, "max_seq_len"):
            raise LmforgeError("the evaluation harness needs a decoder-only language model (a run with config.json)")
        self.model, self.tok = model, tok
        self.encoder = encoder or Encoder(tok)
        self.table = tok.vocab_bytes(model.cfg.vocab_size)

    @classmethod
    def from_run(cls, run: str | Path, device: str | None = None) -> Evaluator:
        from lmforge.textgen import load_for_generation

        model, tok = load_for_generation(run, device)
        return cls(model, tok, Encoder.from_run(run, tok))

    def evaluate(self, tasks: Sequence[Task], *, fewshot: int | None = None, seed: int | None = None,
                 limit: int | None = None, batch_size: int = 32, progress: bool | None = None) -> list[TaskResult]:
        """Score every task. `fewshot` and `seed` override the tasks' own; `limit` keeps each task's first N
        items. `progress`: a tqdm bar on stderr (None: only on a terminal)."""
        from tqdm import tqdm

        if batch_size < 1:
            raise LmforgeError(f"--batch-size must be at least 1, got {batch_size}")
        if limit is not None and limit < 1:
            raise LmforgeError(f"--limit must be at least 1, got {limit}")
        results = []
        for task in tasks:
            items = task.items[:limit]
            bar = tqdm(total=len(items), desc=task.name, unit="item", file=sys.stderr,
                       disable=(not sys.stderr.isatty()) if progress is None else not progress)
            start = time.perf_counter()
            k = task.fewshot if fewshot is None else fewshot
            contexts = [task.context(item, k, seed) for item in items]
            if task.kind == MULTIPLE_CHOICE:
                records = self._multiple_choice(task, items, contexts, batch_size, bar.update)
                metrics = _mc_metrics(task, records)
            else:
                records = self._generate(task, items, contexts, batch_size, bar.update)
                metrics = _gen_metrics(task, records)
            bar.close()
            results.append(TaskResult(task, records, metrics, time.perf_counter() - start, k))
        return results

    def _multiple_choice(self, task: Task, items: list[Item], contexts: list[str], batch_size: int,
                         update: Callable[[int], None]) -> list[dict]:
        qa = _qa()
        requests, spans = [], []
        for item, ctx in zip(items, contexts):
            spans.append(len(requests))
            requests += [self.encoder.pair(ctx, cont) for cont in task.continuations(item)]
        scored = loglikelihoods(self.model, requests, batch_size, update)  # one context per item
        records = []
        for item, ctx, start in zip(items, contexts, spans):
            res = scored[start:start + len(item.choices)]
            lls = [ll for ll, _ in res]
            pick = qa.multiple_choice([lls], [list(item.gold)], choices=[list(item.choices)])
            pred = max(range(len(lls)), key=lls.__getitem__)
            pred_norm = max(range(len(lls)), key=lambda i: lls[i] / len(item.choices[i]))
            top = max(lls)
            probs = [math.exp(ll - top) for ll in lls]
            scores = {"acc": pick["acc"], "acc_norm": pick["acc_norm"]}
            if item.scores is not None:
                scores["grade"] = item.scores[pred]
            elif "grade" in task.metrics:
                scores["grade"] = pick["acc"]
            records.append({"task": task.name, "index": item.index, "context": ctx, "choices": list(item.choices),
                            "gold": list(item.gold), "loglikelihoods": lls, "is_greedy": [g for _, g in res],
                            "pred": pred, "pred_norm": pred_norm, "confidence": probs[pred] / math.fsum(probs),
                            "scores": scores})
        return records

    def _generate(self, task: Task, items: list[Item], contexts: list[str], batch_size: int,
                  update: Callable[[int], None]) -> list[dict]:
        cfg = self.model.cfg
        room = cfg.max_seq_len - task.max_new_tokens
        if room < 1:
            raise LmforgeError(f"task {task.name}: max_new_tokens {task.max_new_tokens} leaves no room for a prompt "
                               f"in the model's context ({cfg.max_seq_len})")
        params = SamplingParams(temperature=0.0, max_new_tokens=task.max_new_tokens, stop=task.stop)
        prompts = [self.encoder.encode(c)[-room:] for c in contexts]  # left-truncated, as lm-eval's generate_until
        order = sorted(range(len(items)), key=lambda i: -len(prompts[i]))
        outputs: list[str] = [""] * len(items)
        for b in range(0, len(order), batch_size):
            batch = order[b:b + batch_size]
            rows: list[list[int]] = [[] for _ in batch]
            for step in generate_batch(self.model, [prompts[i] for i in batch], params,
                                       eos_token_id=cfg.eos_token_id, token_bytes=self.table):
                for r, t in enumerate(step):
                    if t is not None:
                        rows[r].append(t)
            for i, ids in zip(batch, rows):
                outputs[i] = self._finish(task, ids)
            update(len(batch))
        return [{"task": task.name, "index": item.index, "context": ctx, "output": out,
                 "references": list(item.targets)} for item, ctx, out in zip(items, contexts, outputs)]

    def _finish(self, task: Task, ids: list[int]) -> str:
        """Generated ids to the scored text: cut before a stop string (BIG-bench: after it) or the eos, then
        BIG-bench's `output_regex` (its first match, or "")."""
        checker = StopChecker(task.stop, self.table, eos_ids(self.model.cfg.eos_token_id))
        data = b""
        for t in ids:
            res = checker.feed(t)
            data += res.emit
            if res.stopped:
                if task.keep_stop and isinstance(res.stop_reason, bytes):
                    data += res.stop_reason
                break
        else:
            data += checker.finish()
        text = data.decode("utf-8", errors="replace")
        if task.output_regex:
            text = next(iter(re.findall(task.output_regex, text)), "")
        return text


__all__ = ["Encoder", "Evaluator", "GENERATE", "Metric", "TaskResult", "generative_metric", "loglikelihoods"]
