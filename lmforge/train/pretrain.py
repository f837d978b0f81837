"""`lmforge pretrain`: tokenize text into shards, build a Llama, train it with the loop, save the run directory.

    lmforge pretrain --data corpus/ --tokenizer tok/ --depth 4 --out runs/tiny --time-budget 5m
    lmforge pretrain --out runs/tiny --resume --max-steps 2000        # continue exactly where it stopped
    lmforge pretrain ... --depth 4 --arch lab --lab-config '{"position": "alibi", "mlp": "geglu"}'   # an ablation

Data: text / jsonl / parquet files or directories are tokenized into RUN/data/ (train.bin, val.bin,
meta.json); a single PATH that already is a shard directory (has meta.json) is used as it is. The model is
`LlamaConfig.from_depth(N)` or a named preset, with the tokenizer's vocabulary size and its end-of-text id;
with `--arch lab`, `LabConfig.from_depth(N)` with the switches of `--lab-config` (docs/lab.md).
Validation reports loss, perplexity and bits per byte (eval.perplexity) next to a unigram baseline (token
frequencies of the train split, add-one smoothing): a trained model has to beat it to have learned context.

On --resume every option defaults to the value the run was started with (kept in lmforge.json "args");
options given again override them. Changing max-steps keeps the run exact only when the LR horizon
(--schedule-steps) stays fixed; with the default horizon (= max-steps) the decay is stretched. A time budget
counts the time already spent, so resuming a run that used its budget needs a larger --time-budget (and a
time-budgeted schedule follows the clock, so it cannot be bit-exact across a resume).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmforge.checkpoint import load_config, read_meta, save_run
from lmforge.common import LmforgeError, pick_device, seed_everything
from lmforge.data import BatchStream, TokenShards, build_shards, check_vocab
from lmforge.eval.perplexity import IGNORE_INDEX, token_byte_lengths, unigram_perplexity
from lmforge.model import PRESETS, LabConfig, LabDecoder, Llama, LlamaConfig, flops_per_token, lab, suggested_lr
from lmforge.tokenizer import load_tokenizer
from lmforge.train.loop import TrainConfig, has_checkpoint, perplexity_eval, train
from lmforge.train.optim import SCHEDULES

# Defaults of every option that may be left out; None here means "derived" (see resolve_args).
DEFAULTS: dict[str, Any] = {
    "data": None, "tokenizer": None, "depth": None, "preset": None, "out": None, "max_steps": None,
    "time_budget": None, "batch_size": 8, "seq_len": 256, "lr": None, "grad_accum": 1, "compile": None,
    "eval_every": 250, "save_every": 500, "log_every": 10, "seed": 0, "warmup": None, "schedule": "cosine",
    "schedule_steps": None, "weight_decay": 0.1, "grad_clip": 1.0, "min_lr_ratio": 0.1, "val_fraction": 0.01,
    "eval_tokens": 32768, "device": None, "progress": True, "arch": "llama", "lab_config": None,
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lmforge pretrain", description="Pretrain a Llama from scratch on text.")
    a = p.add_argument
    a("--data", nargs="+", metavar="PATH", help="text/jsonl/parquet files or directories, or one token-shard dir")
    a("--tokenizer", metavar="DIR", help="tokenizer directory (tokenizer.json) with an <|endoftext|> token")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--depth", type=int, help="model size dial: n_layers = depth, dim = 64 * depth")
    size.add_argument("--preset", help=f"named size: {', '.join(PRESETS)}")
    a("--arch", choices=["llama", "lab"], help="llama (default), or lab: the ablation decoder of docs/lab.md")
    a("--lab-config", metavar="JSON", help='--arch lab switches and fields, e.g. \'{"position": "alibi"}\'')
    a("--out", required=True, metavar="RUN", help="run directory to write (or to continue with --resume)")
    a("--max-steps", type=int, help="optimizer updates to train for")
    a("--time-budget", help="wall-clock budget: 90s, 5m, 1h (training stops at the first of the two limits)")
    a("--batch-size", type=int, help="sequences per micro-batch (default 8)")
    a("--seq-len", type=int, help="tokens per sequence (default 256)")
    a("--lr", type=float, help="peak learning rate (default: suggested for the model width)")
    a("--grad-accum", type=int, help="micro-batches per update (default 1)")
    a("--compile", action=argparse.BooleanOptionalAction, help="torch.compile (default: off; see docs/spine.md)")
    a("--resume", action="store_true", help="continue RUN exactly from its last checkpoint")
    a("--eval-every", type=int, help="updates between validations (default 250; 0: only at the end)")
    a("--save-every", type=int, help="updates between checkpoints (default 500; 0: only at the end)")
    a("--log-every", type=int, help="updates between metrics.jsonl rows (default 10)")
    a("--seed", type=int, help="seed for init, data order and the train/val split (default 0)")
    a("--warmup", type=int, help="warmup updates (default: 5%% of max-steps, at most 200; 50 with a time budget)")
    a("--schedule", choices=[s for s in SCHEDULES if s != "constant"], help="LR schedule (default cosine)")
    a("--schedule-steps", type=int, help="LR horizon in updates (default max-steps)")
    a("--weight-decay", type=float, help="AdamW weight decay on matrices (default 0.1)")
    a("--grad-clip", type=float, help="max gradient norm (default 1.0; 0 disables)")
    a("--min-lr-ratio", type=float, help="final lr as a fraction of the peak (default 0.1)")
    a("--val-fraction", type=float, help="fraction of documents held out for validation (default 0.01)")
    a("--eval-tokens", type=int, help="validation tokens scored per evaluation (default 32768)")
    a("--device", help="cuda, cpu, mps (default: the best available)")
    a("--progress", action=argparse.BooleanOptionalAction, help="progress bars on stderr (default on)")
    return p


def parse_duration(text: str) -> float:
    """'90s', '5m', '1.5h', '1h30m' or plain seconds -> seconds."""
    parts = re.fullmatch(r"\s*(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m)?\s*(?:(\d+(?:\.\d+)?)s?)?\s*", text or "")
    if not text or not parts or not any(parts.groups()):
        raise LmforgeError(f"bad --time-budget {text!r}: use a duration like 90s, 5m or 1h")
    h, m, s = (float(g) if g else 0.0 for g in parts.groups())
    seconds = 3600 * h + 60 * m + s
    if seconds <= 0:
        raise LmforgeError(f"--time-budget must be positive, got {text!r}")
    return seconds


def resolve_args(ns: argparse.Namespace) -> dict[str, Any]:
    """Options given now over (on --resume) the run's saved options over DEFAULTS; checked and derived."""
    run_dir = Path(ns.out)
    given = {k: v for k, v in vars(ns).items() if v is not None and k != "resume"}
    saved: dict[str, Any] = {}
    if ns.resume:
        if not has_checkpoint(run_dir):
            raise LmforgeError(f"--resume: no checkpoint in {run_dir} (trainer_state/ is missing); start a new "
                               "run without --resume")
        saved = read_meta(run_dir).get("args") or {}
    elif has_checkpoint(run_dir):
        raise LmforgeError(f"{run_dir} already holds a run; continue it with --resume or choose another --out")
    if "depth" in given or "preset" in given:  # the two are alternatives: a new one replaces the saved one
        saved = {k: v for k, v in saved.items() if k not in ("depth", "preset")}
    args = {**DEFAULTS, **saved, **given, "resume": bool(ns.resume)}
    for name in ("data", "tokenizer"):
        if not args[name]:
            raise LmforgeError(f"--{name} is required")
    if args["depth"] is None and args["preset"] is None:
        raise LmforgeError("give the model size: --depth N or --preset NAME")
    args["lab_config"] = _lab_switches(args)
    if args["preset"] is not None and args["preset"] not in PRESETS:
        raise LmforgeError(f"unknown preset {args['preset']!r}; choose one of {', '.join(PRESETS)}")
    if args["max_steps"] is None and args["time_budget"] is None:
        raise LmforgeError("give --max-steps N or --time-budget (e.g. 5m)")
    if args["time_budget"] is not None:
        parse_duration(args["time_budget"])
    if args["warmup"] is None:
        args["warmup"] = min(200, args["max_steps"] // 20) if args["max_steps"] else 50
    args["data"] = [str(p) for p in args["data"]]
    args["tokenizer"], args["out"] = str(args["tokenizer"]), str(run_dir)
    return args


def _lab_switches(args: dict) -> dict[str, Any] | None:
    """--lab-config as a dict (given as JSON text, or already a dict when read back from lmforge.json)."""
    text = args["lab_config"]
    if args["arch"] != "lab":
        if text is not None:
            raise LmforgeError("--lab-config needs --arch lab")
        return None
    if args["preset"] is not None:
        raise LmforgeError("--arch lab takes its size from --depth (the presets are Llama shapes)")
    if text is None or isinstance(text, dict):
        return text or {}
    try:
        switches = json.loads(text)
    except json.JSONDecodeError as e:
        raise LmforgeError(f"--lab-config is not valid JSON: {e}") from None
    if not isinstance(switches, dict):
        raise LmforgeError(f"--lab-config must be a JSON object of LabConfig fields, got {text!r}")
    taken = sorted({"vocab_size", "eos_token_id"} & set(switches))
    if taken:
        raise LmforgeError(f"--lab-config cannot set {', '.join(taken)}: they come from the tokenizer")
    return switches


def prepare_data(args: dict, tokenizer: Any) -> Path:
    """The shard directory: a prebuilt one given as --data, else RUN/data/ (built now unless resuming)."""
    paths = [Path(p) for p in args["data"]]
    if len(paths) == 1 and (paths[0] / "meta.json").is_file():
        return paths[0]
    out = Path(args["out"]) / "data"
    if args["resume"] and (out / "meta.json").is_file():
        return out
    build_shards(paths, tokenizer, out, val_fraction=args["val_fraction"], seed=args["seed"],
                 progress=args["progress"], log=lambda msg: print(msg, file=sys.stderr))
    return out


def model_config(args: dict, tokenizer: Any, eos_id: int) -> LlamaConfig | LabConfig:
    """From --depth or --preset with the tokenizer's vocabulary; on --resume, the run's own saved config."""
    vocab = tokenizer.vocab_size
    out = Path(args["out"])
    if args["resume"] and ((out / "config.json").is_file() or (read_meta(out).get("model") or {}).get("arch")):
        cfg = load_config(args["out"])
        if cfg.vocab_size != vocab:
            raise LmforgeError(f"tokenizer/model vocab mismatch: the tokenizer has {vocab} ids, the model in "
                               f"{args['out']} has {cfg.vocab_size}; resume with the tokenizer it was trained with")
    elif args["arch"] == "lab":
        fields = {"max_seq_len": args["seq_len"], **args["lab_config"], "eos_token_id": eos_id}
        cfg = LabConfig.from_depth(args["depth"], vocab, **fields)
    elif args["preset"] is not None:
        cfg = dataclasses.replace(PRESETS[args["preset"]], vocab_size=vocab, eos_token_id=eos_id)
    else:
        cfg = LlamaConfig.from_depth(args["depth"], vocab, max_seq_len=args["seq_len"], eos_token_id=eos_id)
    if args["seq_len"] > cfg.max_seq_len:
        raise LmforgeError(f"--seq-len {args['seq_len']} exceeds the model's max_seq_len {cfg.max_seq_len}")
    return cfg


def lm_loss(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy: mean over the targets that are not IGNORE_INDEX, and their count.

    The model computes it with its fused head + loss (lmforge/model/losses.py): no (B, T, V) logits in training.
    """
    x, y = batch
    loss = model(x, targets=y, ignore_index=IGNORE_INDEX)
    return loss, (y != IGNORE_INDEX).sum()


def train_counts(shards: TokenShards, vocab_size: int, chunk: int = 1 << 24) -> np.ndarray:
    """How often each id occurs in a split, read in chunks (the split may be larger than memory)."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for start in range(0, shards.n_tokens, chunk):
        ids = shards.tokens(start, min(chunk, shards.n_tokens - start))
        counts += np.bincount(ids, minlength=vocab_size)[:vocab_size]
    return counts


def train_config(args: dict, model_cfg: LlamaConfig | LabConfig) -> TrainConfig:
    flops = lab.flops_per_token if isinstance(model_cfg, LabConfig) else flops_per_token
    return TrainConfig(
        max_steps=args["max_steps"], time_budget_s=parse_duration(args["time_budget"]) if args["time_budget"] else None,
        schedule_steps=args["schedule_steps"], lr=args["lr"], schedule=args["schedule"],
        warmup_steps=args["warmup"], min_lr_ratio=args["min_lr_ratio"], weight_decay=args["weight_decay"],
        grad_clip=args["grad_clip"], grad_accum=args["grad_accum"], device=args["device"], compile=args["compile"],
        log_every=args["log_every"], eval_every=args["eval_every"], save_every=args["save_every"],
        seed=args["seed"], resume=args["resume"], progress=args["progress"],
        flops_per_token=flops(model_cfg, args["seq_len"])).validate()


def main(argv: list[str] | None = None) -> int:
    args = resolve_args(build_parser().parse_args(argv))
    run_dir = Path(args["out"])
    tokenizer = load_tokenizer(args["tokenizer"])
    shard_dir = prepare_data(args, tokenizer)
    train_split, val_split = TokenShards(shard_dir, "train"), TokenShards(shard_dir, "val")
    model_cfg = model_config(args, tokenizer, train_split.separator_id)
    check_vocab(train_split.meta, model_cfg.vocab_size, tokenizer)
    args["lr"] = args["lr"] or suggested_lr(model_cfg)  # resolved now, so lmforge.json records the value used
    stream = BatchStream(train_split, args["batch_size"], args["seq_len"], seed=args["seed"])
    cfg = train_config(args, model_cfg)
    token_bytes = token_byte_lengths(tokenizer)
    val_tokens = val_split.tokens(0, min(val_split.n_tokens, args["eval_tokens"] + 1))
    if len(val_tokens) < 2:
        raise LmforgeError(f"the validation split of {shard_dir} has {len(val_tokens)} token(s); use more data or a "
                           "larger --val-fraction")
    baseline = unigram_perplexity(train_counts(train_split, model_cfg.vocab_size), val_tokens, token_bytes)
    seed_everything(args["seed"])
    model = LabDecoder(model_cfg) if isinstance(model_cfg, LabConfig) else Llama(model_cfg)
    eval_fn = perplexity_eval(val_tokens, args["seq_len"], args["batch_size"], token_bytes)

    def save_fn(m: torch.nn.Module, info: dict) -> None:
        metrics = {**info, "unigram_perplexity": baseline["perplexity"], "unigram_nll": baseline["nll"],
                   "unigram_bits_per_byte": baseline.get("bits_per_byte")}
        save_run(m, model_cfg, run_dir, tokenizer=tokenizer,
                 meta={"stage": "pretrain", "args": args, "metrics": metrics, "data": str(shard_dir)})

    device = pick_device(args["device"])
    print(f"pretrain: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, {model_cfg.n_layers} layers, "
          f"dim {model_cfg.dim}, vocab {model_cfg.vocab_size}, {train_split.n_tokens:,} train tokens, on {device}",
          file=sys.stderr)
    result = train(model, lm_loss, stream, cfg, run_dir, eval_fn=eval_fn, save_fn=save_fn)
    _report(result, baseline, run_dir)
    return 130 if result.interrupted else 0


def _report(result: Any, baseline: dict, run_dir: Path) -> None:
    """The final numbers on stdout: validation perplexity (and bits per byte) against the unigram baseline."""
    if result.interrupted:
        print(f"interrupted at step {result.step}; saved to {run_dir}; continue with --resume", file=sys.stderr)
    ev = result.eval
    if "val_perplexity" not in ev:
        return
    bpb = f", {ev['val_bits_per_byte']:.3f} bits/byte" if "val_bits_per_byte" in ev else ""
    base_bpb = f", {baseline['bits_per_byte']:.3f} bits/byte" if "bits_per_byte" in baseline else ""
    print(f"step {result.step}: validation perplexity {ev['val_perplexity']:.2f} (loss {ev['val_loss']:.4f}{bpb}); "
          f"unigram baseline {baseline['perplexity']:.2f}{base_bpb}; run saved to {run_dir}")
