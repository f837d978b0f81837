"""Training throughput: lmforge's Llama against transformers' LlamaForCausalLM, same config, same weights.

    python benchmarks/train_throughput.py [--depth 6] [--vocab 8192] [--seq 256] [--batch 8] [--repeats 6] [--steps 2]

Config: `LlamaConfig.from_depth(6, 8192)` (dim 384, 6 layers, 6 heads, ~17M params), fp32 on CPU. One step is
forward + cross-entropy + backward + AdamW (fused where torch supports it on this device, else foreach; the
same for both). Each model computes the loss its own normal training way: ours `model(x, targets=y)`, the fused
chunked head + cross-entropy (lmforge/model/losses.py) that never forms the (B, T, V) logits; the peer
`model(input_ids=x, labels=y)`, logits then `ForCausalLMLoss`, with `shift_labels=y` because the batch is
already shifted (so both score exactly the same targets). The peer loads the very checkpoint `save_run` wrote
(so its weights are ours) with its SDPA attention and `use_cache=False` (no KV cache built during training: its
fastest training setup). Before timing, the two models' logits and first-step losses must agree.

Every measurement runs in this one process with the same thread count, ours and the peer alternating
(A B A B ...) so drift in machine load hits both; warmup steps are excluded; medians are reported. Two phases:
first with the C allocator as the process starts ("ours", "peer", "ratio": what a user gets), then, on glibc,
with freed memory kept in the process ("steady_*": no page faults per step, so only compute is compared; see
`steady_allocator`). Page faults per step are reported for both phases.

stdout carries one JSON line: {"bench", "ours", "peer", "ratio", "unit", "higher_is_better", ...}, ratio =
ours / peer in tokens/s (above 1: ours is faster). Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

import torch

from lmforge.checkpoint import save_run
from lmforge.common import cpu_count, require
from lmforge.model import Llama, LlamaConfig, n_params


def log(msg: str) -> None:
    print(f"[train_throughput] {msg}", file=sys.stderr, flush=True)


def make_optimizer(model: torch.nn.Module, lr: float) -> tuple[torch.optim.Optimizer, str]:
    """AdamW, fused when this torch supports it for the parameters' device, else the foreach implementation."""
    try:
        return torch.optim.AdamW(model.parameters(), lr=lr, fused=True), "fused"
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(model.parameters(), lr=lr, foreach=True), "foreach"


def train_step(loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], opt: torch.optim.Optimizer,
               x: torch.Tensor, y: torch.Tensor) -> float:
    loss = loss_fn(x, y)  # mean cross-entropy over the B*T targets
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def build_pair(cfg: LlamaConfig, seed: int, workdir: str):
    """Our model and the peer with identical weights: the peer loads the run directory we save."""
    transformers = require("transformers", extra="dev")
    torch.manual_seed(seed)
    ours = Llama(cfg)
    save_run(ours, cfg, workdir)
    peer = transformers.LlamaForCausalLM.from_pretrained(workdir, attn_implementation="sdpa", dtype=torch.float32)
    ours.train()
    peer.train()
    return ours, peer


def check_same(ours, peer, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, _ = batch
    with torch.no_grad():
        diff = (ours(x) - peer(input_ids=x, use_cache=False).logits).abs().max().item()
    if diff > 1e-4:
        raise SystemExit(f"models disagree before timing: max |logit diff| = {diff:.3g}")
    log(f"logits agree (max abs diff {diff:.2g})")


def steady_allocator() -> bool:
    """Make glibc keep freed memory in the process (no mmap for big blocks, no heap trimming); False if not glibc.

    With the defaults, every buffer above the mmap threshold (here the 67 MB logits and their gradients) is
    mapped fresh and unmapped on free, so each step page-faults its memory back in. On VMs a fault can cost
    ~100 us, and steps then swing 3-4x with the host's mood. With this setting the process reaches a steady
    state with no faults per step, and what remains is the models' own compute.
    """
    try:
        libc = ctypes.CDLL(None)
        M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
        return bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)) and bool(libc.mallopt(M_MMAP_MAX, 0))
    except (OSError, AttributeError):
        return False


def page_faults() -> int:
    try:
        import resource
    except ImportError:  # not Unix
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def measure(runners: dict, batches: list, args: argparse.Namespace, label: str) -> dict[str, dict[str, float]]:
    """Interleaved rounds (ours, peer, then peer, ours, ...), `steps` steps each; median tokens/s per model."""
    tokens = args.batch * args.seq * args.steps
    rates: dict[str, list[float]] = {name: [] for name in runners}
    faults: dict[str, list[int]] = {name: [] for name in runners}
    for r in range(args.repeats):
        for name in list(runners) if r % 2 == 0 else list(runners)[::-1]:
            gc.collect()
            f0, t0 = page_faults(), time.perf_counter()
            for i in range(args.steps):
                runners[name](batches[i % len(batches)])
            rates[name].append(tokens / (time.perf_counter() - t0))
            faults[name].append((page_faults() - f0) // args.steps)
        log(f"{label} round {r + 1}/{args.repeats}: " + ", ".join(f"{n} {v[-1]:.0f} tok/s" for n, v in rates.items()))
    return {name: {"median": statistics.median(rates[name]), "best": max(rates[name]),
                   "faults_per_step": statistics.median(faults[name])} for name in runners}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depth", type=int, default=6)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=6, help="timed rounds per model and phase (median reported)")
    ap.add_argument("--steps", type=int, default=2, help="training steps per timed round")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per model before the first round")
    ap.add_argument("--threads", type=int, default=cpu_count())
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-steady", action="store_true", help="skip the second phase (steady allocator)")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    cfg = LlamaConfig.from_depth(args.depth, args.vocab, max_seq_len=args.seq)
    g = torch.Generator().manual_seed(args.seed)
    data = [torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), generator=g) for _ in range(4)]
    batches = [(d[:, :-1].contiguous(), d[:, 1:].contiguous()) for d in data]
    with tempfile.TemporaryDirectory() as workdir:
        ours, peer = build_pair(cfg, args.seed, workdir)
    check_same(ours, peer, batches[0])
    opt_ours, kind = make_optimizer(ours, 1e-4)
    opt_peer, _ = make_optimizer(peer, 1e-4)
    runners = {
        "ours": lambda b: train_step(lambda x, y: ours(x, targets=y), opt_ours, *b),
        "peer": lambda b: train_step(lambda x, y: peer(input_ids=x, labels=y, shift_labels=y, use_cache=False).loss,
                                     opt_peer, *b),
    }
    first = {name: run(batches[0]) for name, run in runners.items()}  # step 1 from identical weights
    log(f"first-step losses: {first}")
    if abs(first["ours"] - first["peer"]) > 1e-4:
        raise SystemExit(f"first-step losses disagree: {first}")
    for run in runners.values():
        for i in range(args.warmup):
            run(batches[i % len(batches)])

    default = measure(runners, batches, args, "default allocator")
    steady = None
    if not args.no_steady and steady_allocator():
        for run in runners.values():  # reach the allocator's steady state before timing
            run(batches[0])
        steady = measure(runners, batches, args, "steady allocator")

    ours_rate, peer_rate = default["ours"]["median"], default["peer"]["median"]
    result = {
        "bench": "train_throughput", "ours": round(ours_rate, 1), "peer": round(peer_rate, 1),
        "ratio": round(ours_rate / peer_rate, 3), "unit": "tokens/s", "higher_is_better": True,
        "best_ratio": round(default["ours"]["best"] / default["peer"]["best"], 3),
        "faults_per_step": {n: v["faults_per_step"] for n, v in default.items()},
    }
    if steady is not None:
        result.update({
            "steady_ours": round(steady["ours"]["median"], 1), "steady_peer": round(steady["peer"]["median"], 1),
            "steady_ratio": round(steady["ours"]["median"] / steady["peer"]["median"], 3),
            "steady_faults_per_step": {n: v["faults_per_step"] for n, v in steady.items()},
        })
    result.update({
        "peer_name": f"transformers {require('transformers').__version__} LlamaForCausalLM (sdpa)",
        "params": n_params(cfg), "dim": cfg.dim, "n_layers": cfg.n_layers, "vocab": cfg.vocab_size,
        "seq": args.seq, "batch": args.batch, "dtype": "float32", "device": "cpu", "threads": args.threads,
        "loss": {"ours": "fused chunked linear + cross-entropy", "peer": "logits + ForCausalLMLoss"},
        "optimizer": f"AdamW ({kind})", "repeats": args.repeats, "steps_per_repeat": args.steps,
        "torch": torch.__version__,
    })
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
