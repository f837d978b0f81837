"""`lmforge eval run` and `lmforge eval compare`: the harness and its reports on the command line.

    lmforge eval run --model RUN --tasks TASK_FILE_OR_DIR [--tasks ...] --out DIR
                     [--limit N] [--fewshot K] [--seed S] [--batch-size B] [--device D] [--bootstrap N]
    lmforge eval compare DIR_A DIR_B

`run` reads every task first (a bad task file fails before the model loads), scores them (lmforge/eval/
harness.py), writes results.json, items.jsonl, report.md and results.png into DIR (lmforge/eval/report.py)
and prints report.md's table. `compare` prints two such directories side by side with the differences.
Bad input (an unknown task field, a schema failure, an empty task file, a missing run) is an LmforgeError:
`lmforge` prints it as one line and exits 2.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from lmforge.common import LmforgeError


def build_run_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lmforge eval run", description="Score a run directory on evaluation tasks "
                                "(multiple choice by log-likelihood as lm-evaluation-harness, or greedy generation).")
    p.add_argument("--model", required=True, metavar="RUN", help="run directory (decoder-only model + tokenizer)")
    p.add_argument("--tasks", required=True, action="append", type=Path, metavar="PATH",
                   help="task file (.yaml, .jsonl, BIG-bench task.json) or directory of them; repeatable")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="where the report files go")
    p.add_argument("--limit", type=int, metavar="N", help="score only the first N items of each task")
    p.add_argument("--fewshot", type=int, metavar="K", help="few-shot examples per prompt (default: each task's own)")
    p.add_argument("--seed", type=int, metavar="S", help="few-shot sampling seed (default: each task's own)")
    p.add_argument("--batch-size", type=int, default=32, metavar="B",
                   help="continuations per forward pass; prompts per batch when generating (default 32)")
    p.add_argument("--device", help="cpu, cuda, ... (default: the best available)")
    p.add_argument("--bootstrap", type=int, default=1000, metavar="N", help="bootstrap resamples for the "
                   "confidence intervals (default 1000; 0 = none)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar on stderr (default: when stderr is a terminal)")
    return p


def run_main(argv: list[str] | None = None) -> int:
    """`lmforge eval run ...` (argv without "run")."""
    from lmforge.eval.harness import Evaluator
    from lmforge.eval.report import REPORT, write_report
    from lmforge.eval.tasks import load_tasks

    args = build_run_parser().parse_args(argv)
    for name in ("limit", "batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise LmforgeError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if args.fewshot is not None and args.fewshot < 0:
        raise LmforgeError(f"--fewshot must be >= 0, got {args.fewshot}")
    if args.bootstrap < 0:
        raise LmforgeError(f"--bootstrap must be >= 0, got {args.bootstrap}")
    if args.out.exists() and not args.out.is_dir():
        raise LmforgeError(f"--out {args.out} exists and is not a directory")
    tasks = load_tasks(args.tasks)
    start = time.perf_counter()
    evaluator = Evaluator.from_run(args.model, args.device)
    results = evaluator.evaluate(tasks, fewshot=args.fewshot, seed=args.seed, limit=args.limit,
                                 batch_size=args.batch_size, progress=args.progress)
    settings = {"tasks": [str(t) for t in args.tasks], "limit": args.limit, "fewshot": args.fewshot,
                "seed": args.seed, "batch_size": args.batch_size,
                "device": str(next(evaluator.model.parameters()).device),
                "seconds": round(time.perf_counter() - start, 2)}
    write_report(results, args.out, model=str(args.model), settings=settings, resamples=args.bootstrap)
    sys.stdout.write((args.out / REPORT).read_text(encoding="utf-8"))
    print(f"\nwrote {args.out}/ (results.json, items.jsonl, report.md, results.png)")
    return 0


def build_compare_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lmforge eval compare", description="Two `lmforge eval run` reports side by "
                                "side, with B - A and, for items both scored, a paired bootstrap CI of it.")
    p.add_argument("dir_a", type=Path, metavar="DIR_A")
    p.add_argument("dir_b", type=Path, metavar="DIR_B")
    return p


def compare_main(argv: list[str] | None = None) -> int:
    """`lmforge eval compare DIR_A DIR_B` (argv without "compare")."""
    from lmforge.eval.report import compare

    args = build_compare_parser().parse_args(argv)
    print(compare(args.dir_a, args.dir_b))
    return 0
