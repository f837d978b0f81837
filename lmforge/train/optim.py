"""AdamW with decay / no-decay parameter groups, and the learning-rate schedules of the training loop.

Weight decay goes only to the weight matrices of linear layers (attention and MLP projections, an
untied output head). Norm gains, biases (every parameter with fewer than two dimensions) and
embedding tables get none: decaying a norm gain pulls it toward zero, which is not a simpler function,
and decaying an embedding row punishes rare tokens, whose rows get few gradient updates to push back.
This is minGPT's `configure_optimizers` rule (blacklist: norms, biases, `nn.Embedding`). An output head
tied to the embedding is the same parameter, so it is counted once, in the no-decay group.

Schedules are pure functions of (step, progress) so a resumed run recomputes exactly the learning rate
the uninterrupted run would have used; the scheduler's whole state is the step count and the elapsed
time, saved with the trainer state.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lmforge.common import LmforgeError

SCHEDULES = ("cosine", "wsd", "constant")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters split into [decay, no-decay] groups (see the module docstring for the rule)."""
    embedding_ids = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    decay, no_decay = [], []
    for p in model.parameters():  # deduplicated, so a tied head appears once
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or id(p) in embedding_ids else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float] = (0.9, 0.95),
                    eps: float = 1e-8) -> torch.optim.AdamW:
    """AdamW over `param_groups`: the fused kernel when every parameter is on CUDA, else the foreach one.

    Fused AdamW does the whole update in one kernel per dtype (the fastest path on GPUs). On CPU we use
    foreach, the implementation most PyTorch versions have run longest; both give exact resume because
    the optimizer state is saved and restored whole.
    """
    groups = param_groups(model, weight_decay)
    if not any(g["params"] for g in groups):
        raise LmforgeError("the model has no trainable parameters")
    on_cuda = all(p.is_cuda for g in groups for p in g["params"])
    impl = {"fused": True} if on_cuda else {"foreach": True}
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, **impl)


def lr_multiplier(step: int, progress: float, warmup_steps: int, schedule: str = "cosine",
                  min_lr_ratio: float = 0.1, decay_frac: float = 0.2) -> float:
    """Factor on the peak learning rate for update number `step` (0-based).

    `progress` in [0, 1] is how far the run is past warmup toward its end (steps or time; the loop
    decides). Warmup is linear from 1/warmup_steps to 1 (the first update is never at lr 0).
    - cosine: half a cosine from 1 down to `min_lr_ratio` over the rest of the run, as in
      `transformers.get_cosine_schedule_with_warmup` but with a floor (Chinchilla decays to 10%).
    - wsd (warmup-stable-decay): 1 until the last `decay_frac` of the run, then a "1 - sqrt" cooldown to
      `min_lr_ratio` (Hägele et al. 2024, "Scaling Laws and Compute-Optimal Training Beyond Fixed
      Training Durations", which found 1 - sqrt the best cooldown shape). A run can be extended
      from the stable phase without redoing it.
    - constant: 1 after warmup.
    """
    if schedule not in SCHEDULES:
        raise LmforgeError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    p = min(max(progress, 0.0), 1.0)
    if schedule == "cosine":
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * p))
    if schedule == "wsd":
        start = 1.0 - decay_frac
        if p <= start or decay_frac <= 0:
            return 1.0
        done = (p - start) / decay_frac
        return min_lr_ratio + (1.0 - min_lr_ratio) * (1.0 - math.sqrt(done))
    return 1.0


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Write the learning rate into every parameter group (the schedule is ours, not a torch scheduler)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
