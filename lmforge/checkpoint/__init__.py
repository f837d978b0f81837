"""Run directories: HF-compatible checkpoints (config.json + safetensors) plus lmforge.json metadata.

    from lmforge.checkpoint import save_run, load_run
    save_run(model, cfg, "runs/tiny", tokenizer=tok, meta={"stage": "pretrain"})
    model, cfg = load_run("runs/tiny")
"""

from lmforge.checkpoint.run import load_config, load_run, load_tensors, read_meta, save_run

__all__ = ["load_config", "load_run", "load_tensors", "read_meta", "save_run"]
