"""GPT-2 (Radford et al. 2019): learned absolute positions, pre-norm LayerNorm blocks, GELU MLP, tied head.

    cfg = GPT2Config(vocab_size=50257, dim=768, n_layers=12, n_heads=12)   # GPT-2 small's shape
    model = GPT2(cfg)
    logits = model(idx)                                     # (B, T) int64 -> (B, T, V) float32, causal
    logits = model(idx, input_pos=pos, cache=cache)         # cached decoding, see docs/internals.md
    loss = model(idx, targets=y)                            # mean cross-entropy, the (B, T, V) logits never formed

Read top to bottom as nanoGPT's model.py: config -> attention -> MLP -> block -> model. The forward contract is
Llama's (lmforge/model/decoder.py), so KVCache, generate and perplexity work unchanged.

Module names are HF `GPT2LMHeadModel`'s minus its `transformer.` prefix (wte, wpe, h.{i}.ln_1, h.{i}.attn.c_attn,
h.{i}.attn.c_proj, h.{i}.ln_2, h.{i}.mlp.c_fc, h.{i}.mlp.c_proj, ln_f, lm_head), so LoRA targets ("c_attn") mean
what they mean in PEFT. The projections are plain `nn.Linear` (weight (out, in)); HF's `Conv1D` stores the
transpose, (in, out), and lmforge/checkpoint/gpt2.py transposes at the file boundary. Inside lmforge every
projection is then an ordinary Linear, which LoRA/quantization swaps and the CPU decode kernels expect.

No dropout: lmforge's training loop uses none for any family (config.json records pdrop 0.0).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.common import LmforgeError
from lmforge.model import kernels
from lmforge.model.attention import SMALL_QUERY, small_query_attention
from lmforge.model.contract import check_decoder_inputs, head_loss
from lmforge.model.kernels import linears

# HF activation names this model computes: "gelu_new" (OpenAI's tanh approximation, HF NewGELUActivation) and
# "gelu_pytorch_tanh" are the same formula; "gelu" is the exact erf form (some GPT-2-architecture checkpoints).
ACTIVATIONS = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "none"}


@dataclass
class GPT2Config:
    """Shape and numerics of a GPT-2-family decoder (GPT-2 small .. XL, DistilGPT2, nanoGPT checkpoints)."""

    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    ffn_dim: int | None = None  # None -> 4 * dim (HF n_inner)
    max_seq_len: int = 1024  # HF n_positions: the learned position table's size, so a hard limit
    norm_eps: float = 1e-5
    activation: str = "gelu_new"
    tie_embeddings: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self) -> None:
        if self.ffn_dim is None and isinstance(self.dim, int) and self.dim > 0:
            self.ffn_dim = 4 * self.dim
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def n_kv_heads(self) -> int:
        """Every head has its own keys and values (MHA); KVCache reads this attribute."""
        return self.n_heads

    def validate(self) -> None:
        """Raise LmforgeError naming the first inconsistent field (so a bad config fails before allocation)."""
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "ffn_dim", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise LmforgeError(f"GPT2Config.{name} must be a positive integer, got {value!r}")
        if not isinstance(self.norm_eps, (int, float)) or isinstance(self.norm_eps, bool) or not self.norm_eps > 0:
            raise LmforgeError(f"GPT2Config.norm_eps must be a positive number, got {self.norm_eps!r}")
        if self.dim % self.n_heads:
            raise LmforgeError(f"GPT2Config: dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
        if self.activation not in ACTIVATIONS:
            raise LmforgeError(f"GPT2Config.activation {self.activation!r} is not supported "
                               f"(one of {', '.join(ACTIVATIONS)})")
        if not isinstance(self.tie_embeddings, bool):
            raise LmforgeError(f"GPT2Config.tie_embeddings must be a bool, got {self.tie_embeddings!r}")

    # ---- plain dicts (lmforge's own serialization, CLI args) ----

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GPT2Config:
        """Build from a dict of field names; unknown keys are an error (a typo must not be silently ignored)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise LmforgeError(f"unknown GPT2Config keys: {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        missing = sorted(k for k in ("vocab_size", "dim", "n_layers", "n_heads") if k not in d)
        if missing:
            raise LmforgeError(f"GPT2Config is missing required keys: {', '.join(missing)}")
        return cls(**d)

    # ---- Hugging Face config.json ----

    def to_hf(self, dtype: str = "float32") -> dict[str, Any]:
        """HF `config.json` for `GPT2LMHeadModel` (transformers v4 and v5); `dtype` names the weights'."""
        return {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "vocab_size": self.vocab_size,
            "n_embd": self.dim,
            "n_layer": self.n_layers,
            "n_head": self.n_heads,
            "n_inner": self.ffn_dim,
            "n_positions": self.max_seq_len,
            "n_ctx": self.max_seq_len,  # legacy alias old readers still look at
            "activation_function": self.activation,
            "layer_norm_epsilon": self.norm_eps,
            "tie_word_embeddings": self.tie_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "embd_pdrop": 0.0,  # our model has no dropout: record what it was trained with
            "attn_pdrop": 0.0,
            "resid_pdrop": 0.0,
            "scale_attn_weights": True,
            "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False,
            "add_cross_attention": False,
            "initializer_range": 0.02,
            "use_cache": True,
            "dtype": dtype,  # v5 name
            "torch_dtype": dtype,  # v4 name
        }

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> GPT2Config:
        """Read an HF GPT-2 `config.json` dict; a key it omits takes transformers' GPT2Config default, as there.

        Features this model does not compute are an error rather than a silently different model. Dropout rates
        are ignored (training-only, and inference is what a loaded checkpoint must reproduce).
        """
        if not isinstance(d, dict):
            raise LmforgeError(f"config.json must hold a JSON object, got {type(d).__name__}")
        if d.get("model_type") != "gpt2":
            raise LmforgeError(f"config.json has model_type {d.get('model_type')!r}; the GPT2 model needs 'gpt2'")
        unsupported = {"add_cross_attention": True, "scale_attn_by_inverse_layer_idx": True,
                       "scale_attn_weights": False}
        for key, bad in unsupported.items():
            if d.get(key, not bad) == bad:
                raise LmforgeError(f"config.json (gpt2): {key}={str(bad).lower()} is not supported")
        act = d.get("activation_function", "gelu_new")
        if act not in ACTIVATIONS:
            raise LmforgeError(f"config.json (gpt2): activation_function={act!r} is not supported "
                               f"(one of {', '.join(ACTIVATIONS)})")

        def get(name: str, alias: str, default: Any) -> Any:  # v5 may write the generic alias
            return d.get(name, d.get(alias, default))

        return cls.from_dict(dict(
            vocab_size=d.get("vocab_size", 50257), dim=get("n_embd", "hidden_size", 768),
            n_layers=get("n_layer", "num_hidden_layers", 12), n_heads=get("n_head", "num_attention_heads", 12),
            ffn_dim=d.get("n_inner"), max_seq_len=get("n_positions", "max_position_embeddings", 1024),
            norm_eps=d.get("layer_norm_epsilon", 1e-5), activation=act,
            tie_embeddings=bool(d.get("tie_word_embeddings", True)),
            bos_token_id=d.get("bos_token_id"), eos_token_id=d.get("eos_token_id")))


# ---- attention, MLP, block ----


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with one fused q/k/v projection (c_attn), as in GPT-2 and nanoGPT.

    Two paths, as in lmforge/model/attention.py: without a cache, SDPA with `is_causal=True`; with a cache, keys
    and values go through `cache.update` and the boolean mask from `cache.attn_mask` decides what each query
    sees (few queries: the explicit small-query path or the compiled one-query kernel; else masked SDPA).
    """

    def __init__(self, cfg: GPT2Config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx  # the cache's slot for this layer's keys and values
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.c_attn = nn.Linear(cfg.dim, 3 * cfg.dim)  # q, k, v stacked along the output
        self.c_proj = nn.Linear(cfg.dim, cfg.dim)

    def forward(self, x: torch.Tensor, cache: Any = None, input_pos: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, C) -> (B, T, C); mask (B, 1, T, S) bool, only with a cache."""
        B, T, C = x.shape
        qkv = linears(x, self.c_attn)[0].view(B, T, 3, self.n_heads, self.head_dim)  # HF splits q|k|v the same way
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # (B, H, T, D) each, strided views
        if cache is not None:
            k, v = cache.update(self.layer_idx, input_pos, k, v)  # (B, H, S, D)
            y = kernels.attention(q, k, v, mask) if T == 1 else None  # decode steps: one compiled call
            if y is None and T <= SMALL_QUERY:
                y = small_query_attention(q, k, v, mask)
            elif y is None:
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, D)
        return linears(y.transpose(1, 2).reshape(B, T, C), self.c_proj)[0]


class MLP(nn.Module):
    """c_fc -> GELU -> c_proj, hidden size 4 * dim (n_inner)."""

    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.approximate = ACTIVATIONS[cfg.activation]
        self.c_fc = nn.Linear(cfg.dim, cfg.ffn_dim)
        self.c_proj = nn.Linear(cfg.ffn_dim, cfg.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, T, C)
        # "gelu_new" = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) (Hendrycks & Gimpel 2016; OpenAI gpt-2
        # model.py), which is torch's approximate="tanh" formula.
        h = F.gelu(linears(x, self.c_fc)[0], approximate=self.approximate)  # (B, T, F)
        return linears(h, self.c_proj)[0]


class Block(nn.Module):
    """Pre-norm block (GPT-2 moved LayerNorm to each sub-block's input): x + attn(ln_1(x)), x + mlp(ln_2(x))."""

    def __init__(self, cfg: GPT2Config, layer_idx: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.attn = CausalSelfAttention(cfg, layer_idx)
        self.ln_2 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cache: Any = None, input_pos: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache, input_pos, mask)  # (B, T, C)
        return x + self.mlp(self.ln_2(x))


# ---- the model ----


class GPT2(nn.Module):
    """Token + learned position embeddings -> n blocks -> final LayerNorm (ln_f) -> output head (tied by default)."""

    def __init__(self, cfg: GPT2Config):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.wpe = nn.Embedding(cfg.max_seq_len, cfg.dim)
        self.h = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.tie_weights()
        self.apply(self._init_weights)

    def tie_weights(self) -> None:
        """Share the token embedding with the output head when cfg.tie_embeddings (GPT-2 always did)."""
        if self.cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight

    def _init_weights(self, module: nn.Module) -> None:
        """GPT-2's init (nanoGPT `_init_weights`, HF `GPT2PreTrainedModel._init_weights`): N(0, 0.02) for matrices
        and both embeddings, zero biases, LayerNorm (1, 0); the projections that write into the residual stream
        (attn.c_proj, mlp.c_proj) get std 0.02 / sqrt(2 * n_layers) so its variance does not grow with depth."""
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        elif isinstance(module, Block):
            std = 0.02 / math.sqrt(2 * self.cfg.n_layers)
            nn.init.normal_(module.attn.c_proj.weight, mean=0.0, std=std)
            nn.init.normal_(module.mlp.c_proj.weight, mean=0.0, std=std)
        # `apply` visits children before parents: a Block's c_proj weights get 0.02 first, then the scaled std.
        # nn.LayerNorm initializes itself to weight 1, bias 0.

    def forward(self, idx: torch.Tensor, input_pos: torch.Tensor | None = None, cache: Any = None, *,
                targets: torch.Tensor | None = None, ignore_index: int = -100) -> torch.Tensor:
        """idx (B, T) int64 -> logits (B, T, V) float32; with targets (B, T), the mean cross-entropy instead.

        input_pos (B, T) int64 gives each token's absolute position (negative = left padding: it embeds position
        0, its output is unused and the cache never stores it); required with a cache, optional without
        (default 0..T-1, and attention stays plain causal over the T tokens). targets as in `Llama.forward`:
        the fused chunked head + loss, so the logits are never materialized.
        """
        check_decoder_inputs("GPT2", idx, input_pos, cache, self.cfg.max_seq_len)
        T = idx.shape[1]
        if input_pos is None:
            pos = torch.arange(T, device=idx.device)  # (T,), broadcast over the batch
        else:
            pos = input_pos.clamp(min=0)  # (B, T)
        mask = cache.attn_mask(input_pos) if cache is not None else None  # (B, 1, T, S), once per forward
        x = self.wte(idx) + self.wpe(pos)  # (B, T, C)
        for block in self.h:
            x = block(x, cache, input_pos, mask)
        x = self.ln_f(x)
        if targets is None:
            return linears(x, self.lm_head)[0].float()  # (B, T, V)
        return head_loss(self.lm_head, x, idx, targets, ignore_index)
