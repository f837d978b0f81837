"""Training: the one loop (loop.py), AdamW groups and LR schedules (optim.py), and the stages built on them.

    from lmforge.train import TrainConfig, train
    result = train(model, loss_fn, batches, TrainConfig(max_steps=100), "runs/x")
"""

from lmforge.train.loop import TrainConfig, TrainResult, perplexity_eval, train

__all__ = ["TrainConfig", "TrainResult", "perplexity_eval", "train"]
