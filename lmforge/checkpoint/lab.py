"""Run directories for the lab decoder (lmforge/model/lab.py): lmforge's own layout, as transformers has no class.

    save_lab(model, cfg, "runs/ablation", tokenizer=tok, meta={"stage": "pretrain"})
    model, cfg = load_lab("runs/ablation")       # save_run / load_run / load_config dispatch here too

No config.json: a lab run is not an HF checkpoint, and without that file `AutoModel.from_pretrained` fails saying
so, instead of misreading a config. The model config is lmforge.json's `"model": {"arch": "lab", "config":
LabConfig.to_dict()}`. Weights: model.safetensors (sharded like save_run's) under the module's own names, a tied
head left out as transformers does. Every file is written atomically.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from lmforge import __version__
from lmforge.checkpoint import run
from lmforge.common import LmforgeError, atomic_write_text
from lmforge.model.lab import LabConfig, LabDecoder

ARCH = "lab"


def is_lab_run(run_dir: str | os.PathLike) -> bool:
    """True for a directory whose lmforge.json names the lab architecture and that has no HF config.json."""
    run_dir = Path(run_dir)
    if (run_dir / run.CONFIG).exists() or not (run_dir / run.META).exists():
        return False
    model = run.read_meta(run_dir).get("model")
    return isinstance(model, dict) and model.get("arch") == ARCH


def expected_shapes(cfg: LabConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every saved tensor (built on the meta device: no memory, no init)."""
    with torch.device("meta"):
        state = LabDecoder(cfg).state_dict()
    return {n: tuple(t.shape) for n, t in state.items() if not (cfg.tie_embeddings and n == "lm_head.weight")}


def _check(tensors: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], where: str) -> None:
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise LmforgeError(f"{where}: lab weights do not match the config (missing: {', '.join(missing[:4]) or '-'}; "
                           f"unexpected: {', '.join(unexpected[:4]) or '-'})")
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise LmforgeError(f"{where}: {name} has shape {tuple(tensors[name].shape)}, the config needs {shape}")


def save_lab(model: torch.nn.Module, cfg: LabConfig, run_dir: str | os.PathLike, tokenizer: Any = None,
             meta: dict[str, Any] | None = None, max_shard_bytes: int | None = None) -> Path:
    """Write `model` (a LabDecoder built from `cfg`) as a run directory; returns its path."""
    run_dir = Path(run_dir)
    state = dict(run._unwrap(model).state_dict())
    if cfg.tie_embeddings:
        state.pop("lm_head.weight", None)  # the embedding's storage: safetensors refuses a shared tensor twice
    _check(state, expected_shapes(cfg), f"save_lab({run_dir})")  # model and cfg must agree
    tensors = {n: t.detach().to("cpu").contiguous() for n, t in state.items()}
    run_dir.mkdir(parents=True, exist_ok=True)
    run._save_weights(tensors, run_dir, max_shard_bytes or run.DEFAULT_SHARD_BYTES)
    (run_dir / run.CONFIG).unlink(missing_ok=True)  # one from an earlier HF save would describe another model
    if tokenizer is not None:
        tokenizer.save(run_dir)
    info = {"lmforge_version": __version__, "stage": None, "args": {}, "metrics": {}, "parent": None,
            **(meta or {}), "model": {"arch": ARCH, "config": cfg.to_dict()}}
    atomic_write_text(run_dir / run.META, json.dumps(info, indent=2, default=str) + "\n")
    return run_dir


def load_lab_config(run_dir: str | os.PathLike) -> LabConfig:
    """The LabConfig recorded in a lab run's lmforge.json."""
    model = run.read_meta(run_dir).get("model")
    if not isinstance(model, dict) or model.get("arch") != ARCH or not isinstance(model.get("config"), dict):
        raise LmforgeError(f"{run_dir}: lmforge.json has no lab model config (\"model\": {{\"arch\": \"lab\", ...}})")
    return LabConfig.from_dict(model["config"])


def load_lab(run_dir: str | os.PathLike, device: str | torch.device = "cpu",
             dtype: torch.dtype | None = None) -> tuple[LabDecoder, LabConfig]:
    """Build the LabDecoder a run directory describes and fill it with its weights; (model, cfg) in eval mode."""
    run_dir = run._existing_dir(run_dir)
    cfg = load_lab_config(run_dir)
    tensors = run.load_tensors(run_dir, device=device)
    _check(tensors, expected_shapes(cfg), str(run_dir))
    model = run.assign_weights(LabDecoder, cfg, tensors, dtype)
    model.reset_buffers(device)  # RoPE / sinusoid / slope tables are derived, never saved
    return model.eval(), cfg
