"""Model architectures: one family per file, read top to bottom (config -> layers -> attention -> decoder).

    from lmforge.model import Llama, LlamaConfig, PRESETS
    model = Llama(PRESETS["llama-15m"])
"""

from lmforge.model.config import PRESETS, LlamaConfig, MixtralConfig, flops_per_token, n_params, suggested_lr
from lmforge.model.decoder import Llama
from lmforge.model.gpt2 import GPT2, GPT2Config
from lmforge.model.lab import LabConfig, LabDecoder

__all__ = ["GPT2", "GPT2Config", "PRESETS", "LabConfig", "LabDecoder", "Llama", "LlamaConfig", "MixtralConfig",
           "flops_per_token", "n_params", "suggested_lr"]
