"""Run directories: save and load a model as an HF checkpoint plus lmforge's own metadata.

    save_run(model, cfg, "runs/tiny", tokenizer=tok, meta={"stage": "pretrain", "metrics": {"loss": 2.1}})
    model, cfg = load_run("runs/tiny")          # also loads what transformers' save_pretrained writes

Layout (DESIGN.md): config.json (HF Llama), model.safetensors or model-0000k-of-0000n.safetensors shards with
model.safetensors.index.json, tokenizer.json + tokenizer_config.json, lmforge.json. Weights are safetensors
only, never unpickled. Every file is written to a temp file beside its target, fsynced, then renamed over it,
so a crash leaves the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from lmforge import __version__
from lmforge.checkpoint.hf import expected_hf_shapes, from_hf_state_dict, to_hf_state_dict
from lmforge.common import LmforgeError, atomic_write_text, read_text_file
from lmforge.model.config import LlamaConfig, MixtralConfig, config_from_hf
from lmforge.model.decoder import Llama
from lmforge.model.lab import LabConfig

# Families with their own checkpoint module, by config.json model_type: (config class, checkpoint module, its save
# and load functions). The Llama family (llama, qwen2, mistral, mixtral) is handled in this file.
FAMILIES = {
    "gpt2": ("lmforge.model.gpt2:GPT2Config", "lmforge.checkpoint.gpt2", "save_gpt2", "load_gpt2"),
    "t5": ("lmforge.model.encdec:T5Config", "lmforge.checkpoint.t5", "save_t5", "load_t5"),
    "bert": ("lmforge.model.encoder:BertConfig", "lmforge.checkpoint.bert", "save_bert", "load_bert"),
}


def _family(config_class: str) -> tuple[Any, str, str]:
    """(checkpoint module, save name, load name) of the family whose config class is `config_class`."""
    for cls, module, save, load in FAMILIES.values():
        if cls.endswith(":" + config_class):
            return importlib.import_module(module), save, load
    raise LmforgeError(f"no run-directory format for {config_class}")


CONFIG, WEIGHTS, INDEX, META = "config.json", "model.safetensors", "model.safetensors.index.json", "lmforge.json"
DEFAULT_SHARD_BYTES = 5 * 2**30  # transformers v4's default max_shard_size


# ---- save ----


def save_run(model: torch.nn.Module, cfg: Any, run_dir: str | os.PathLike, tokenizer: Any = None,
             meta: dict[str, Any] | None = None, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Write `model` (a Llama built from `cfg`) as a run directory; returns its path.

    `meta` is merged over lmforge.json's defaults (stage, args, metrics, parent, lmforge_version).
    `tokenizer` is anything with `.save(dir)` writing tokenizer.json + tokenizer_config.json (BPETokenizer).
    """
    if isinstance(cfg, LabConfig):  # the ablation decoder: lmforge's own layout, no config.json
        from lmforge.checkpoint import lab
        return lab.save_lab(model, cfg, run_dir, tokenizer, meta, max_shard_bytes)
    if not isinstance(cfg, LlamaConfig):  # a family with its own checkpoint module (GPT-2, T5, BERT)
        module, save, _ = _family(type(cfg).__name__)
        return getattr(module, save)(model, cfg, run_dir, tokenizer, meta=meta, max_shard_bytes=max_shard_bytes)
    run_dir = Path(run_dir)
    model = _unwrap(model)
    with torch.device("meta"):
        expected = expected_hf_shapes(Llama(cfg).state_dict(), cfg.tie_embeddings, _moe(cfg))
    tensors = to_hf_state_dict(model.state_dict(), cfg.tie_embeddings, _moe(cfg))
    from_hf_state_dict(tensors, expected, where=f"save_run({run_dir})")  # model and cfg must agree
    return write_run_files(run_dir, tensors, cfg.to_hf, tokenizer, meta, max_shard_bytes)


def write_run_files(run_dir: Path, tensors: dict[str, torch.Tensor], hf_config: Any, tokenizer: Any = None,
                    meta: dict[str, Any] | None = None, max_shard_bytes: int | None = None) -> Path:
    """The files of a run directory, each written atomically: the (checked) HF-named `tensors` as safetensors
    (sharded above max_shard_bytes), `hf_config(dtype=...)` as config.json, the tokenizer's files, lmforge.json.
    Every family's save function ends here."""
    tensors = {n: t.detach().to("cpu").contiguous() for n, t in tensors.items()}  # views (Conv1D .T) become copies
    dtype = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    run_dir.mkdir(parents=True, exist_ok=True)
    _save_weights(tensors, run_dir, max_shard_bytes or DEFAULT_SHARD_BYTES)
    atomic_write_text(run_dir / CONFIG, json.dumps(hf_config(dtype=dtype), indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save(run_dir)
    info = {"lmforge_version": __version__, "stage": None, "args": {}, "metrics": {}, "parent": None,
            **(meta or {})}
    atomic_write_text(run_dir / META, json.dumps(info, indent=2, default=str) + "\n")
    return run_dir


def _moe(cfg: LlamaConfig) -> bool:
    return isinstance(cfg, MixtralConfig)


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The Llama inside torch.compile's OptimizedModule or DDP's wrapper (whose state-dict keys are prefixed)."""
    while True:
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if not isinstance(inner, torch.nn.Module):
            return model
        model = inner


def _save_weights(tensors: dict[str, torch.Tensor], run_dir: Path, max_shard_bytes: int) -> None:
    """One model.safetensors, or HF-style shards + index when larger than max_shard_bytes; stale files removed."""
    stale = _weight_files(run_dir)
    shards = _plan_shards(tensors, max_shard_bytes)
    if len(shards) == 1:
        _atomic_save_file(tensors, run_dir / WEIGHTS)
        written = {WEIGHTS}
    else:
        n, weight_map = len(shards), {}
        for i, names in enumerate(shards, 1):
            fname = f"model-{i:05d}-of-{n:05d}.safetensors"
            _atomic_save_file({k: tensors[k] for k in names}, run_dir / fname)
            weight_map.update(dict.fromkeys(names, fname))
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        atomic_write_text(run_dir / INDEX, json.dumps(index, indent=2) + "\n")
        written = {INDEX, *weight_map.values()}
    for fname in stale - written:  # only after the new weights are complete
        with contextlib.suppress(FileNotFoundError):
            (run_dir / fname).unlink()


def _plan_shards(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[list[str]]:
    """Greedy split in name order, as transformers does: a new shard when the next tensor would overflow."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def _weight_files(run_dir: Path) -> set[str]:
    """Weight files a previous save left in run_dir (single file, index, and the shards the index names)."""
    files = {f for f in (WEIGHTS, INDEX) if (run_dir / f).exists()}
    if INDEX in files:
        with contextlib.suppress(LmforgeError):
            files |= set(_read_index(run_dir).values())
    return files


def _atomic_save_file(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors `save_file` to a temp path in the same directory, fsync, then rename over `path`."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"format": "pt"})  # transformers refuses files without format=pt
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


# ---- load ----


def load_config(run_dir: str | os.PathLike) -> Any:
    """The model config of a run directory (HF config.json, v4 or v5 layout): a LlamaConfig (llama, qwen2,
    mistral), MixtralConfig, GPT2Config, T5Config or BertConfig; for a lab run (no config.json) the LabConfig
    in lmforge.json."""
    from lmforge.checkpoint import lab
    if lab.is_lab_run(_existing_dir(run_dir)):
        return lab.load_lab_config(run_dir)
    d = _read_json(_existing_dir(run_dir) / CONFIG)
    kind = d.get("model_type") if isinstance(d, dict) else None
    if kind in FAMILIES:
        module_name, class_name = FAMILIES[kind][0].split(":")
        return getattr(importlib.import_module(module_name), class_name).from_hf(d)
    return config_from_hf(d)


def read_meta(run_dir: str | os.PathLike) -> dict[str, Any]:
    """lmforge.json of a run directory ({} for a checkpoint lmforge did not write)."""
    path = _existing_dir(run_dir) / META
    return _read_json(path) if path.exists() else {}


def load_run(run_dir: str | os.PathLike, device: str | torch.device = "cpu",
             dtype: torch.dtype | None = None) -> tuple[torch.nn.Module, Any]:
    """Build the model (Llama family, Mixtral, GPT-2 or the lab decoder) a run directory describes and fill it
    with its weights; returns (model, cfg) in eval mode.

    The model is built on the meta device (no random init of weights about to be overwritten), then the loaded
    tensors are assigned in place. `dtype` casts the weights (default: as stored).
    """
    run_dir = _existing_dir(run_dir)
    cfg = load_config(run_dir)
    if isinstance(cfg, LabConfig):
        from lmforge.checkpoint import lab
        return lab.load_lab(run_dir, device, dtype)
    if not isinstance(cfg, LlamaConfig):  # a family with its own checkpoint module
        module, _, load = _family(type(cfg).__name__)
        return getattr(module, load)(run_dir, device, dtype)
    model = llama_from_hf_tensors(cfg, load_tensors(run_dir, device=device), where=str(run_dir), dtype=dtype)
    model.reset_rope(device)
    return model.eval(), cfg


def llama_from_hf_tensors(cfg: LlamaConfig, tensors: dict[str, torch.Tensor], where: str,
                          dtype: torch.dtype | None = None) -> Llama:
    """A Llama-family model of `cfg` holding `tensors` (HF names), after checking every name and shape."""
    with torch.device("meta"):
        expected = expected_hf_shapes(Llama(cfg).state_dict(), cfg.tie_embeddings, _moe(cfg))
    return assign_weights(Llama, cfg, from_hf_state_dict(tensors, expected, where=where), dtype)


def assign_weights(model_cls: Any, cfg: Any, state: dict[str, torch.Tensor],
                   dtype: torch.dtype | None = None) -> torch.nn.Module:
    """`model_cls(cfg)` built on the meta device (no allocation, no random init of weights about to be replaced)
    holding `state` (our names, already checked), cast to `dtype` if given, tied weights re-tied. Every family's
    loader ends here."""
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    with torch.device("meta"):
        model = model_cls(cfg)
    model.load_state_dict(state, strict=False, assign=True)  # names checked by the caller; a tied head re-tied below
    model.tie_weights()
    return model


def load_tensors(run_dir: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Every tensor of a run directory's weights by HF name, single-file or sharded."""
    run_dir = _existing_dir(run_dir)
    if (run_dir / WEIGHTS).exists():
        return _read_safetensors(run_dir / WEIGHTS, device)
    if (run_dir / INDEX).exists():
        weight_map = _read_index(run_dir)
        tensors: dict[str, torch.Tensor] = {}
        for fname in sorted(set(weight_map.values())):
            tensors.update(_read_safetensors(run_dir / fname, device))
        absent = sorted(n for n, f in weight_map.items() if n not in tensors)
        if absent:
            raise LmforgeError(f"{run_dir / INDEX} lists tensors its shards do not hold: {', '.join(absent[:4])}")
        return tensors
    if any(run_dir.glob("*.bin")) or any(run_dir.glob("*.pt")):
        raise LmforgeError(f"{run_dir} has only pickle weights (.bin/.pt); lmforge reads safetensors only "
                           f"(convert with transformers: save_pretrained(..., safe_serialization=True))")
    raise LmforgeError(f"no weights in {run_dir}: expected {WEIGHTS} or {INDEX}")


def _read_safetensors(path: Path, device: str | torch.device) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise LmforgeError(f"weights file not found: {path}")
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            return {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise LmforgeError(f"corrupt or truncated safetensors file {path}: {_one_line(e)}") from None


def _read_index(run_dir: Path) -> dict[str, str]:
    index = _read_json(run_dir / INDEX)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise LmforgeError(f"{run_dir / INDEX} has no valid 'weight_map'")
    if any(Path(f).name != f for f in weight_map.values()):
        raise LmforgeError(f"{run_dir / INDEX} names shard files outside the run directory")
    return weight_map


def _read_json(path: Path) -> Any:
    try:
        return json.loads(read_text_file(path))
    except json.JSONDecodeError as e:
        raise LmforgeError(f"invalid JSON in {path}: {e}") from None


def _existing_dir(run_dir: str | os.PathLike) -> Path:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise LmforgeError(f"run directory not found: {run_dir}")
    return run_dir


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text[:300] or type(e).__name__
