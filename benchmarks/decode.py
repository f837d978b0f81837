"""Decode speed: lmforge `generate_batch` vs transformers `generate`, same weights, greedy, fp32.

    python benchmarks/decode.py [--preset llama-110m] [--new-tokens 128] [--prompt-len 32] [--repeats 3]

Each measurement interleaves ours and the peer (A B A B ...) in this process with the same thread count
and prints one JSON line {"bench", "ours", "peer", "ratio", "unit", "higher_is_better", ...}. Batch-1
decoding on a CPU is bound by reading the weights once per token, so the script also measures this
machine's memory read bandwidth and reports the roofline: weight bytes / bandwidth = the floor per token.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time

import torch

from lmforge.checkpoint.run import save_run
from lmforge.infer.generate import generate_batch
from lmforge.infer.sampling import SamplingParams
from lmforge.model.config import PRESETS
from lmforge.model.decoder import Llama


def log(msg: str) -> None:
    print(f"[decode bench] {msg}", file=sys.stderr, flush=True)


def read_bandwidth_gbs(n_bytes: int = 1 << 30, repeats: int = 5) -> float:
    """Memory read bandwidth: time a reduction over a buffer far larger than the caches (median GB/s)."""
    x = torch.ones(n_bytes // 4, dtype=torch.float32)
    x.sum()  # touch every page first
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t0)
    return n_bytes / statistics.median(times) / 1e9


def bytes_read_per_step(model) -> int:
    """Weight bytes one decode step must read: every parameter once (a tied embedding is the output head), but
    an untied embedding table contributes one row, i.e. nothing worth counting."""
    seen, total = set(), 0
    embed = model.embed_tokens.weight
    for p in model.parameters():  # parameters() yields a tied tensor once
        if p.data_ptr() in seen or (p is embed and not model.cfg.tie_embeddings):
            continue
        seen.add(p.data_ptr())
        total += p.numel() * p.element_size()
    return total


def run_ours(model, prompts, n_new: int) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_new_tokens=n_new)
    rows: list[list[int]] = [[] for _ in prompts]
    for step in generate_batch(model, prompts, params):
        for b, t in enumerate(step):
            if t is not None:
                rows[b].append(t)
    return rows


def run_peer(hf, prompts, n_new: int) -> list[list[int]]:
    ids = torch.tensor(prompts)
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new, min_new_tokens=n_new,
                      do_sample=False, pad_token_id=0, eos_token_id=None)
    return out[:, ids.shape[1]:].tolist()


def bench(model, hf, batch: int, args, weight_bytes: int, bandwidth: float) -> dict:
    g = torch.Generator().manual_seed(batch)
    prompts = torch.randint(0, model.cfg.vocab_size, (batch, args.prompt_len), generator=g).tolist()
    run_ours(model, prompts, 4), run_peer(hf, prompts, 4)  # warm-up
    ours_s, peer_s, agree = [], [], 0.0
    for i in range(args.repeats):
        t0 = time.perf_counter()
        a = run_ours(model, prompts, args.new_tokens)
        t1 = time.perf_counter()
        b = run_peer(hf, prompts, args.new_tokens)
        t2 = time.perf_counter()
        ours_s.append(t1 - t0)
        peer_s.append(t2 - t1)
        agree = sum(x == y for ra, rb in zip(a, b) for x, y in zip(ra, rb)) / (batch * args.new_tokens)
        log(f"batch {batch} run {i + 1}/{args.repeats}: ours {t1 - t0:.2f}s, peer {t2 - t1:.2f}s, agree {agree:.3f}")
    n = batch * args.new_tokens
    ours, peer = n / statistics.median(ours_s), n / statistics.median(peer_s)
    floor = weight_bytes / (bandwidth * 1e9)  # seconds per decode step at the bandwidth limit
    return {"bench": f"decode_batch{batch}", "ours": round(ours, 2), "peer": round(peer, 2),
            "ratio": round(ours / peer, 3), "unit": "tokens/s", "higher_is_better": True,
            "roofline_tokens_per_s": round(batch / floor, 2),
            "ours_fraction_of_roofline": round(ours / (batch / floor), 3),
            "greedy_agreement": round(agree, 4), "new_tokens": args.new_tokens, "prompt_len": args.prompt_len,
            "threads": torch.get_num_threads(), "peer_name": "transformers LlamaForCausalLM.generate",
            "ours_seconds": [round(s, 3) for s in ours_s], "peer_seconds": [round(s, 3) for s in peer_s]}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="lmforge decode speed vs transformers")
    p.add_argument("--preset", default="llama-110m")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batches", default="1,8")
    args = p.parse_args(argv)
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    cfg = PRESETS[args.preset]
    model = Llama(cfg).eval()
    with tempfile.TemporaryDirectory() as d:
        save_run(model, cfg, d)
        hf = LlamaForCausalLM.from_pretrained(d, torch_dtype=torch.float32).eval()
    weight_bytes = bytes_read_per_step(model)
    bandwidth = read_bandwidth_gbs()
    log(f"{args.preset}: {weight_bytes / 1e6:.0f} MB of weights read per step; read bandwidth {bandwidth:.1f} GB/s")
    for batch in (int(b) for b in args.batches.split(",")):
        record = bench(model, hf, batch, args, weight_bytes, bandwidth)
        record.update(preset=args.preset, weight_mb=round(weight_bytes / 1e6, 1), bandwidth_gbs=round(bandwidth, 2))
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
