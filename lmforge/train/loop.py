"""THE training loop: one loop for every objective (pretraining now; SFT, DPO, distillation reuse it).

    from lmforge.train.loop import TrainConfig, train
    result = train(model, loss_fn, batches, TrainConfig(max_steps=1000, lr=3e-4), "runs/x", eval_fn=..., save_fn=...)

The objective is `loss_fn(model, batch) -> (loss, n_tokens)`: `loss` is the mean over the `n_tokens`
tokens of that micro-batch (an int or a 0-d tensor; a micro-batch with 0 tokens is skipped). `batches`
yields batches (tensors, tuples or dicts of them; the loop moves them to the device) and has
`state_dict()` / `load_state_dict()` so a resumed run reads the same data.
The loop owns everything else, in this order per optimizer update:

1. learning rate from the schedule (optim.py; warmup + cosine, WSD or constant),
2. `grad_accum` micro-batches, each backward on `loss * n_tokens`, then the summed gradient divided by the
   step's total tokens: the exact token-weighted mean even when micro-batches hold different numbers of
   tokens (SFT masks), which averaging per-micro-batch means gets wrong,
3. gradient clipping (the pre-clip norm is logged), a non-finite loss stops the run with an error before
   it can reach the weights, a non-finite gradient skips the update,
4. AdamW (decay / no-decay groups, fused on CUDA, foreach elsewhere),
5. log row, evaluation every `eval_every` updates, checkpoint every `save_every` updates.

Precision: bf16 autocast on CUDA (fp32 master weights, no loss scaling needed), fp32 on CPU. A GPU
without bf16 trains in fp32 (fp16 would need a GradScaler; not worth the code). `torch.compile` is opt-in
(off by default, see TrainConfig.compile); if compiling fails, the first step reruns eagerly with a warning.

The run directory gets `metrics.jsonl` (one JSON line per log step), `loss.png` (train and validation
loss) and `trainer_state/` for exact resume: `model.safetensors` (the exact training weights under the
module's own names), `state.safetensors` (optimizer moments, RNG states, data-iterator tensors) and
`state.json` (step, tokens seen, elapsed time, the config and the non-tensor rest). Nothing is pickled.
The directory is written beside the old one and swapped in, so a crash mid-save keeps the previous one.

Ctrl-C (SIGINT) finishes the current update, saves and returns with `interrupted=True`. A KeyboardInterrupt
raised inside an update (a second Ctrl-C, or the first where no handler can be installed: not the main
thread) abandons it: data position, RNG and gradients are rolled back to its start, that state is saved,
and the KeyboardInterrupt propagates. Either way the checkpoint resumes exactly.

MFU (model FLOPs utilization, PaLM appendix B) = flops_per_token x tokens/s / peak FLOP/s. flops_per_token
comes from the caller (pretrain computes 6N + 12·L·d·T from the model config) or defaults to 6 x
trainable parameters. The peak is the datasheet dense bf16 figure for known GPUs; for CPUs and unknown
GPUs it is measured: the best rate of a 1024x1024 matmul in the training dtype, so CPU MFU reads as
"fraction of what this machine's BLAS achieves", not of a theoretical peak.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import io
import json
import math
import os
import random
import shutil
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn
from tqdm import tqdm

from lmforge.common import LmforgeError, atomic_write_bytes, atomic_write_text, pick_device, seed_everything
from lmforge.eval.perplexity import perplexity
from lmforge.train.optim import SCHEDULES, build_optimizer, lr_multiplier, set_lr

STATE_DIR = "trainer_state"
STATE_FORMAT = 1
METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"
PRECISIONS = ("auto", "bf16", "fp32")
# Knobs that may change between a run and its resume without breaking exactness.
RESUMABLE_CHANGES = {"max_steps", "time_budget_s", "resume", "progress", "plot", "log_every", "eval_every",
                     "save_every", "device", "compile", "flops_per_token", "peak_flops"}


@dataclass
class TrainConfig:
    """Every knob of the loop. `from_dict` rejects unknown keys; `validate` checks ranges."""

    max_steps: int | None = None  # optimizer updates to stop at
    time_budget_s: float | None = None  # or wall-clock seconds (whichever comes first)
    schedule_steps: int | None = None  # LR horizon in updates (default max_steps); fix it to extend a run exactly
    lr: float = 3e-4  # peak learning rate
    schedule: str = "cosine"  # cosine | wsd | constant
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1  # final lr = min_lr_ratio * lr
    decay_frac: float = 0.2  # WSD: fraction of the run spent in the cooldown
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float | None = 1.0  # max global grad norm; None or 0: no clipping (the norm is still logged)
    grad_accum: int = 1  # micro-batches per optimizer update
    device: str | None = None  # default: cuda, else mps, else cpu
    precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 elsewhere | bf16 | fp32
    # torch.compile; None = off. Not on by default anywhere yet: at this commit inductor fails on the Llama with
    # its custom RoPE/RMSNorm autograd Functions on CPU, and aot_eager gave a k_proj gradient far from eager's.
    compile: bool | None = None
    log_every: int = 1  # updates between metrics rows
    eval_every: int = 0  # updates between evaluations (0: only at the end)
    save_every: int = 0  # updates between checkpoints (0: only at the end and on Ctrl-C)
    seed: int = 0  # seeds python, numpy and torch at the start of a fresh run
    resume: bool = False  # continue from run_dir/trainer_state (an error if there is none)
    progress: bool = True  # tqdm bar on stderr
    plot: bool = True  # write loss.png at every checkpoint
    flops_per_token: float | None = None  # for MFU (default 6 x trainable parameters)
    peak_flops: float | None = None  # for MFU (default: datasheet for known GPUs, else measured)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise LmforgeError(f"unknown training option(s): {', '.join(unknown)}")
        d = dict(d)
        if d.get("betas") is not None:
            d["betas"] = tuple(d["betas"])
        return cls(**d).validate()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self) -> TrainConfig:
        """Raise a one-line LmforgeError for the first out-of-range knob; return self."""
        checks = [
            (self.max_steps is not None or self.time_budget_s is not None, "give max_steps or time_budget_s"),
            (self.max_steps is None or self.max_steps >= 0, "max_steps must be >= 0"),
            (self.time_budget_s is None or self.time_budget_s > 0, "time_budget_s must be > 0"),
            (self.schedule_steps is None or self.schedule_steps > 0, "schedule_steps must be > 0"),
            (self.lr > 0, "lr must be > 0"),
            (self.schedule in SCHEDULES, f"schedule must be one of {', '.join(SCHEDULES)}"),
            (self.warmup_steps >= 0, "warmup_steps must be >= 0"),
            (0 <= self.min_lr_ratio <= 1, "min_lr_ratio must be in [0, 1]"),
            (0 <= self.decay_frac <= 1, "decay_frac must be in [0, 1]"),
            (self.weight_decay >= 0, "weight_decay must be >= 0"),
            (self.grad_accum >= 1, "grad_accum must be >= 1"),
            (self.grad_clip is None or self.grad_clip >= 0, "grad_clip must be >= 0"),
            (self.precision in PRECISIONS, f"precision must be one of {', '.join(PRECISIONS)}"),
            (self.log_every >= 1 and self.eval_every >= 0 and self.save_every >= 0,
             "log_every must be >= 1, eval_every and save_every >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise LmforgeError(f"training config: {message}")
        return self


@dataclass
class TrainResult:
    """What a call to `train` did: where it stopped, the loss of every update it ran, the last evaluation."""

    step: int
    tokens_seen: int
    elapsed_s: float
    losses: dict[int, float] = field(default_factory=dict)  # step (1-based, after the update) -> train loss
    eval: dict[str, float] = field(default_factory=dict)  # last evaluation, keys prefixed "val_"
    interrupted: bool = False
    stop_reason: str = ""  # max_steps | time_budget | interrupted | data_exhausted
    compiled: bool = False


# ---------------------------------------------------------------------------------------------------
# Trainer state on disk: tensors in safetensors, everything else in JSON (tuples, int keys and numpy
# arrays are tagged so they come back exactly as they were; nothing is pickled).


def _encode(obj: Any, key: str, tensors: dict[str, torch.Tensor]) -> Any:
    """A JSON-able mirror of `obj` whose tensors and arrays move into `tensors` under path-like keys."""
    if isinstance(obj, torch.Tensor):
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        tensors[key] = torch.from_numpy(np.frombuffer(np.ascontiguousarray(obj).tobytes(), dtype=np.uint8).copy())
        return {"__ndarray__": key, "dtype": obj.dtype.str, "shape": list(obj.shape)}
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, f"{key}.{k}", tensors) for k, v in obj.items()}
        return {"__items__": [[_encode(k, f"{key}.k{i}", tensors), _encode(v, f"{key}.{i}", tensors)]
                              for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, f"{key}.{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, f"{key}.{i}", tensors) for i, v in enumerate(obj)]
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise LmforgeError(f"cannot save training state: {key} is a {type(obj).__name__}")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of `_encode`."""
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__ndarray__" in obj:
        raw = tensors[obj["__ndarray__"]].numpy().tobytes()
        return np.frombuffer(raw, dtype=np.dtype(obj["dtype"])).reshape(obj["shape"]).copy()
    if "__items__" in obj:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__items__"]}
    if "__tuple__" in obj:
        return tuple(_decode(v, tensors) for v in obj["__tuple__"])
    return {k: _decode(v, tensors) for k, v in obj.items()}


def rng_state() -> dict:
    """Python, NumPy, torch CPU (and CUDA) generator states."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextlib.contextmanager
def isolated_rng() -> Iterator[None]:
    """Run a block (evaluation) without moving any random stream the training steps draw from."""
    saved = rng_state()
    try:
        yield
    finally:
        set_rng_state(saved)


def _fsync(path: Path) -> None:
    """Flush a written file to disk and give it the mode open() would (safetensors writes 0600)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def _state_dir(run_dir: Path) -> Path | None:
    """The complete trainer-state directory of a run, if any (a crash mid-swap leaves the `.old` one)."""
    for d in (run_dir / STATE_DIR, run_dir / f".{STATE_DIR}.old"):
        if (d / "state.json").is_file():
            return d
    return None


def has_checkpoint(run_dir: str | os.PathLike) -> bool:
    return _state_dir(Path(run_dir)) is not None


def save_trainer_state(run_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer, batches: Any,
                       meta: dict) -> None:
    """Write RUN/trainer_state/ whole: into a temp dir, fsync, then swap it for the old one."""
    final, tmp, old = run_dir / STATE_DIR, run_dir / f".{STATE_DIR}.tmp", run_dir / f".{STATE_DIR}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(model, str(tmp / "model.safetensors"))
    tensors: dict[str, torch.Tensor] = {}
    data = batches.state_dict() if hasattr(batches, "state_dict") else None
    doc = {"format": STATE_FORMAT, **meta, "optimizer": _encode(optimizer.state_dict(), "optimizer", tensors),
           "rng": _encode(rng_state(), "rng", tensors), "data": _encode(data, "data", tensors)}
    save_file(tensors, str(tmp / "state.safetensors"))
    (tmp / "state.json").write_text(json.dumps(doc), encoding="utf-8")  # last: its presence marks completeness
    for name in ("model.safetensors", "state.safetensors", "state.json"):
        _fsync(tmp / name)
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def load_trainer_state(run_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer, batches: Any,
                       device: str) -> dict:
    """Restore model, optimizer, data position and RNG from RUN/trainer_state/; return state.json's metadata."""
    d = _state_dir(run_dir)
    if d is None:
        raise LmforgeError(f"no checkpoint to resume in {run_dir} ({STATE_DIR}/state.json is missing)")
    try:
        doc = json.loads((d / "state.json").read_text(encoding="utf-8"))
        if doc.get("format") != STATE_FORMAT:
            raise ValueError(f"unknown trainer-state format {doc.get('format')!r}")
        missing, unexpected = load_model(model, str(d / "model.safetensors"), strict=True, device=device)
        tensors = load_file(str(d / "state.safetensors"))
        optimizer.load_state_dict(_decode(doc["optimizer"], tensors))
        data = _decode(doc["data"], tensors)
        if data is not None:
            if not hasattr(batches, "load_state_dict"):
                raise ValueError("the checkpoint has a data position but the batch iterator cannot restore one")
            batches.load_state_dict(data)
        set_rng_state(_decode(doc["rng"], tensors))
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LmforgeError(f"corrupt or mismatched checkpoint in {d}: {reason}") from None
    return {k: doc[k] for k in ("step", "tokens_seen", "elapsed_s", "config")}


# ---------------------------------------------------------------------------------------------------
# Metrics JSONL, loss plot, progress, MFU.


class MetricsLog:
    """RUN/metrics.jsonl: one JSON object per line. A resume drops rows past the checkpoint's step."""

    def __init__(self, path: Path, keep_upto: int | None):
        self.path = path
        self.rows: list[dict] = []
        if keep_upto is not None and path.exists():
            for line in path.read_text(encoding="utf-8").splitlines():
                with contextlib.suppress(json.JSONDecodeError):
                    row = json.loads(line)
                    if row.get("step", math.inf) <= keep_upto:
                        self.rows.append(row)
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in self.rows))

    def write(self, row: dict) -> None:
        self.rows.append(row)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")


def plot_losses(rows: list[dict], path: Path) -> None:
    """Train (and validation) loss against step as a PNG, written atomically (matplotlib's Agg canvas)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    train = [(r["step"], r["loss"]) for r in rows if r.get("loss") is not None]
    val = [(r["step"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
    if train:
        ax.plot(*zip(*train), label="train", linewidth=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation", markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    ax.grid(alpha=0.3)
    if train or val:
        ax.legend()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())


# Dense bf16 tensor-core peaks from the vendors' datasheets (FLOP/s); more specific names first.
GPU_PEAK_FLOPS = [("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("GH200", 989e12), ("B200", 2250e12),
                  ("A100", 312e12), ("L40S", 362e12), ("L4", 121e12), ("A10G", 70e12), ("A10", 125e12),
                  ("4090", 165e12), ("3090", 71e12), ("V100", 125e12), ("T4", 65e12)]


@functools.cache
def peak_flops(device: str, dtype: torch.dtype = torch.float32) -> float:
    """FLOP/s to divide by for MFU: the datasheet figure for known GPUs, else a measured matmul rate."""
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(torch.device(device))
        for key, flops in GPU_PEAK_FLOPS:
            if key in name:
                return flops
    n = 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = math.inf
    for _ in range(6):  # the first round warms up the BLAS; the best of the rest is the rate
        _synchronize(device)
        t0 = time.perf_counter()
        (a @ b).sum().item()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _fmt_seconds(s: float) -> str:
    s = max(0, int(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class _StopFlag:
    """While active, Ctrl-C (SIGINT) only sets `requested`; a second Ctrl-C raises KeyboardInterrupt."""

    def __enter__(self) -> _StopFlag:
        self.requested = False
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.getsignal(signal.SIGINT)
            signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        tqdm.write("interrupt: finishing this step, then saving (Ctrl-C again to abort)", file=sys.stderr)

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def _to_device(batch: Any, device: str) -> Any:
    """Move the tensors of a batch (a tensor, or tuples / lists / dicts of them) to `device`."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(_to_device(v, device) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _autocast_dtype(device: str, precision: str) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32 (see the module docstring)."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.startswith("cuda") and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


# ---------------------------------------------------------------------------------------------------
# The loop.


class _Run:
    """What one call to `train` shares between its steps: model, optimizer, data, counters, outputs."""

    def __init__(self, model: nn.Module, loss_fn: Callable, batches: Any, cfg: TrainConfig, run_dir: Path,
                 eval_fn: Callable | None, save_fn: Callable | None):
        self.cfg, self.run_dir, self.loss_fn, self.eval_fn, self.save_fn = cfg, run_dir, loss_fn, eval_fn, save_fn
        self.batches = batches
        self.batch_iter = batches if hasattr(batches, "__next__") else iter(batches)
        self.device = pick_device(cfg.device)
        if self.device.startswith("cuda"):
            torch.set_float32_matmul_precision("high")  # TF32 for the few fp32 matmuls left outside autocast
        self.model = model.to(self.device)
        self.model.train()
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay, cfg.betas, cfg.eps)
        self.dtype = _autocast_dtype(self.device, cfg.precision)
        self.fwd_model, self.compiled = self._compile()
        self.step, self.tokens_seen, self.elapsed_before = 0, 0, 0.0
        self.t0 = time.perf_counter()
        self.updating = False
        self.eval_step: int | None = None
        self.metrics: MetricsLog | None = None
        self.result = TrainResult(step=0, tokens_seen=0, elapsed_s=0.0)
        self.window = {"loss": 0.0, "steps": 0, "tokens": 0, "time": 0.0}
        self.flops_per_token = cfg.flops_per_token or 6 * sum(p.numel() for p in self.params)
        self.peak = cfg.peak_flops or peak_flops(self.device, self.dtype or torch.float32)

    def _compile(self) -> tuple[nn.Module, bool]:
        enabled = bool(self.cfg.compile)
        if not enabled:
            return self.model, False
        try:
            return torch.compile(self.model), True
        except Exception as e:  # any failure means "run eagerly", reported below
            warnings.warn(f"torch.compile unavailable ({type(e).__name__}: {e}); training eagerly", stacklevel=3)
            return self.model, False

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=torch.device(self.device).type, dtype=self.dtype)

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.t0

    def start(self) -> MetricsLog:
        """Resume from the run directory, or check it holds no checkpoint and seed a fresh run."""
        metrics_path = self.run_dir / METRICS_FILE
        if self.cfg.resume:
            meta = load_trainer_state(self.run_dir, self.model, self.optimizer, self.batches, self.device)
            self.step, self.tokens_seen, self.elapsed_before = meta["step"], meta["tokens_seen"], meta["elapsed_s"]
            changed = sorted(k for k, v in meta["config"].items()
                             if k not in RESUMABLE_CHANGES and _comparable(getattr(self.cfg, k, None)) != v)
            if changed:
                warnings.warn(f"resuming with changed {', '.join(changed)}: the run will not match an "
                              "uninterrupted one exactly", stacklevel=3)
            return MetricsLog(metrics_path, keep_upto=self.step)
        if has_checkpoint(self.run_dir):
            raise LmforgeError(f"{self.run_dir} already holds a training checkpoint; resume it or choose "
                               "another output directory")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        seed_everything(self.cfg.seed)
        return MetricsLog(metrics_path, keep_upto=None)

    def finished(self) -> str:
        """Why the run should stop now ('' while it should go on)."""
        if self.cfg.max_steps is not None and self.step >= self.cfg.max_steps:
            return "max_steps"
        if self.cfg.time_budget_s is not None and self.elapsed() >= self.cfg.time_budget_s:
            return "time_budget"
        return ""

    def lr(self) -> float:
        """Learning rate of the next update: the schedule at this step and this fraction of the run."""
        cfg = self.cfg
        progress = 0.0
        horizon = cfg.schedule_steps or cfg.max_steps
        if horizon:
            progress = (self.step - cfg.warmup_steps) / max(1, horizon - cfg.warmup_steps)
        if cfg.time_budget_s:
            progress = max(progress, self.elapsed() / cfg.time_budget_s)
        return cfg.lr * lr_multiplier(self.step, progress, cfg.warmup_steps, cfg.schedule, cfg.min_lr_ratio,
                                      cfg.decay_frac)

    def train_step(self) -> tuple[float, int, float, float]:
        """One optimizer update over grad_accum micro-batches: (mean loss, tokens, pre-clip grad norm, lr)."""
        lr = self.lr()
        set_lr(self.optimizer, lr)
        loss_sum = torch.zeros((), device=self.device)
        tokens = 0
        for _ in range(self.cfg.grad_accum):
            batch = _to_device(next(self.batch_iter), self.device)
            with self.autocast():
                loss, n_tokens = self.loss_fn(self.fwd_model, batch)
            n_tokens = int(n_tokens)  # a host sync, so that a micro-batch with nothing to learn (all masked)
            if n_tokens == 0:  # can be skipped: its mean loss is 0/0 and would put NaN into the gradients
                continue
            (loss.float() * n_tokens).backward()  # sum over tokens; divided by the step's total below
            loss_sum += loss.detach().float() * n_tokens
            tokens += n_tokens
        for p in self.params:
            if p.grad is not None:
                p.grad.div_(max(tokens, 1))
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip or math.inf)
        loss_value, norm_value = torch.stack([loss_sum / max(tokens, 1), norm.float()]).tolist()
        if not math.isfinite(loss_value):
            raise LmforgeError(f"training diverged: loss is {loss_value} at step {self.step + 1}; lower the "
                               "learning rate or check the data (the last checkpoint is intact)")
        if math.isfinite(norm_value):
            self.updating = True
            self.optimizer.step()
            self.updating = False
        else:
            tqdm.write(f"step {self.step + 1}: gradient norm is {norm_value}; update skipped", file=sys.stderr)
        self.optimizer.zero_grad(set_to_none=True)
        return loss_value, tokens, norm_value, lr

    def guarded_step(self) -> tuple[float, int, float, float] | None:
        """`train_step`, rolled back to its start on KeyboardInterrupt or exhausted data; None when data ran out.

        If the compiled model fails on the very first step, the step reruns eagerly with a warning.
        """
        data = copy.deepcopy(self.batches.state_dict()) if hasattr(self.batches, "state_dict") else None
        snapshot = (data, rng_state())
        try:
            return self.train_step()
        except KeyboardInterrupt:
            if not self.updating:  # weights untouched: save the state before this step, then stop
                self._rollback(snapshot)
                self.save()
            raise
        except StopIteration:
            self._rollback(snapshot)
            return None
        except Exception as e:  # only a compile failure is handled; anything else re-raises
            if not self.compiled or self.result.losses:
                raise
            warnings.warn(f"torch.compile failed ({type(e).__name__}: {str(e)[:200]}); training eagerly",
                          stacklevel=3)
            self.fwd_model, self.compiled = self.model, False
            self._rollback(snapshot)
            return self.train_step()

    def _rollback(self, snapshot: tuple[Any, dict]) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        if snapshot[0] is not None:
            self.batches.load_state_dict(snapshot[0])
        set_rng_state(snapshot[1])

    def evaluate(self) -> dict[str, float]:
        """Run eval_fn(model) in eval mode, without gradients, under autocast, without touching training RNG."""
        if self.eval_fn is None:
            return {}
        self.model.eval()
        try:
            with isolated_rng(), torch.no_grad(), self.autocast():
                metrics = self.eval_fn(self.model)
        finally:
            self.model.train()
        self.result.eval = {f"val_{k}": float(v) for k, v in metrics.items()}
        self.eval_step = self.step
        return self.result.eval

    def save(self) -> None:
        """Checkpoint: the caller's save_fn (e.g. the HF run files), trainer_state/, the loss plot."""
        info = {"step": self.step, "tokens_seen": self.tokens_seen, **self.result.eval}
        if self.save_fn is not None:
            self.save_fn(self.model, info)
        meta = {"step": self.step, "tokens_seen": self.tokens_seen, "elapsed_s": self.elapsed(),
                "config": {k: _comparable(v) for k, v in self.cfg.to_dict().items()}}
        save_trainer_state(self.run_dir, self.model, self.optimizer, self.batches, meta)
        if self.cfg.plot:
            plot_losses(self.metrics.rows, self.run_dir / PLOT_FILE)

    def record(self, out: tuple[float, int, float, float], step_time: float, bar: tqdm, stop_requested: bool) -> str:
        """Count an update; log, evaluate and checkpoint when due. Returns why to stop ('' to go on)."""
        loss, tokens, norm, lr = out
        self.step += 1
        self.tokens_seen += tokens
        self.result.losses[self.step] = loss
        w = self.window
        w["loss"], w["steps"], w["tokens"] = w["loss"] + loss, w["steps"] + 1, w["tokens"] + tokens
        w["time"] += step_time
        tokens_per_s = w["tokens"] / max(w["time"], 1e-9)
        mfu = self.flops_per_token * tokens_per_s / self.peak
        cfg = self.cfg
        reason = "interrupted" if stop_requested else self.finished()
        due = cfg.eval_every and self.step % cfg.eval_every == 0
        evaluated = self.evaluate() if due or reason in ("max_steps", "time_budget") else {}
        if self.step % cfg.log_every == 0 or evaluated or reason:
            self.metrics.write({"step": self.step, "loss": w["loss"] / w["steps"], "lr": lr, "grad_norm": norm,
                                "tokens_per_s": tokens_per_s, "mfu": mfu, "tokens_seen": self.tokens_seen,
                                "elapsed_s": round(self.elapsed(), 3), **evaluated})
            self.window = {"loss": 0.0, "steps": 0, "tokens": 0, "time": 0.0}
        left = f" | left {_fmt_seconds(cfg.time_budget_s - self.elapsed())}" if cfg.time_budget_s else ""
        bar.set_postfix_str(f"loss {loss:.4f} | {tokens_per_s:,.0f} tok/s | mfu {mfu:.1%}{left}", refresh=False)
        bar.update(1)
        if cfg.save_every and self.step % cfg.save_every == 0 and not reason:
            self.save()
        return reason


def _comparable(value: Any) -> Any:
    """A config value as it reads back from JSON (tuples become lists)."""
    return list(value) if isinstance(value, tuple) else value


def train(model: nn.Module, loss_fn: Callable, batches: Any, cfg: TrainConfig, run_dir: str | os.PathLike,
          eval_fn: Callable[[nn.Module], dict] | None = None,
          save_fn: Callable[[nn.Module, dict], None] | None = None) -> TrainResult:
    """Train `model` on `batches` with `loss_fn(model, batch) -> (mean loss, n_tokens)`; see the module docstring.

    `eval_fn(model) -> {name: value}` runs every `cfg.eval_every` updates and at the end (its keys are
    logged with a "val_" prefix; `perplexity_eval` makes the usual one). `save_fn(model, info)` runs at every
    checkpoint before trainer_state/ is written (info: step, tokens_seen, last validation metrics); use
    it to write the run directory's published weights. Returns a TrainResult; the model is trained in place.
    """
    run = _Run(model, loss_fn, batches, cfg.validate(), Path(run_dir), eval_fn, save_fn)
    run.metrics = run.start()
    start_step = run.step
    bar = tqdm(total=cfg.max_steps, initial=run.step, unit="step", dynamic_ncols=True, disable=not cfg.progress,
               file=sys.stderr, desc="train")
    with _StopFlag() as stop, bar:
        reason = run.finished()
        while not reason:
            t0 = time.perf_counter()
            out = run.guarded_step()
            if out is None:
                reason = "data_exhausted"
                break
            reason = run.record(out, time.perf_counter() - t0, bar, stop.requested)
        if reason != "interrupted" and run.eval_step != run.step:  # data ran out, or a resume with nothing to do
            evaluated = run.evaluate()
            if evaluated and run.step > start_step:
                run.metrics.write({"step": run.step, **evaluated})
        if run.step > start_step or not has_checkpoint(run.run_dir):
            run.save()
    res = run.result
    res.step, res.tokens_seen, res.elapsed_s = run.step, run.tokens_seen, run.elapsed()
    res.interrupted, res.stop_reason, res.compiled = reason == "interrupted", reason, run.compiled
    return res


def perplexity_eval(val_tokens: Any, seq_len: int, batch_size: int = 8, token_bytes: Any = None,
                    max_tokens: int | None = None) -> Callable[[nn.Module], dict]:
    """An eval_fn for `train`: validation loss (mean nll), perplexity and bits per byte from eval.perplexity."""

    def eval_fn(model: nn.Module) -> dict:
        r = perplexity(model, val_tokens, seq_len=seq_len, batch_size=batch_size, token_bytes=token_bytes,
                       max_tokens=max_tokens)
        out = {"loss": r["nll"], "perplexity": r["perplexity"]}
        if "bits_per_byte" in r:
            out["bits_per_byte"] = r["bits_per_byte"]
        return out

    return eval_fn
