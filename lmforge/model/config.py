"""Llama-family configuration: the dataclass, named sizes, the depth dial, and the HF `config.json` mapping.

The family is the rotary / RMSNorm / SwiGLU decoder that HF spells three ways: `llama`, `qwen2` (bias on the
q, k, v projections) and `mistral` (sliding-window attention). They differ by a few switches, not by
architecture, so one config carries them (`model_type` picks the config.json spelling); families that differ
in structure (GPT-2, Mixtral, BERT, T5) have their own files.

    cfg = LlamaConfig(vocab_size=8192, dim=384, n_layers=6, n_heads=6)    # n_kv_heads, ffn_dim derived
    cfg = LlamaConfig.from_depth(6, vocab_size=8192)                        # nanochat-style size dial
    cfg = PRESETS["llama-15m"]                                              # named sizes, ~1M .. ~1B params
    LlamaConfig.from_hf(json.load(open("config.json"))).to_hf()            # HF v4 and v5 layouts

Pure Python: nothing here imports torch, so configs can be built and checked (param counts, FLOPs,
learning rate) without touching the model.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from lmforge.common import LmforgeError

# The one RoPE scaling family besides plain RoPE that the model implements: Llama 3.1's frequency-dependent
# interpolation (HF `_compute_llama3_parameters`). Keys as in HF's rope_scaling dict.
LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


# config.json model_type -> the transformers class that loads it
HF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM",
                    "mixtral": "MixtralForCausalLM"}


def llama_ffn_dim(dim: int, multiple_of: int = 64) -> int:
    """SwiGLU hidden size by the Llama rule: 2/3 of 4*dim (same parameters as a 4*dim GELU MLP), rounded up.

    Matches `FeedForward.__init__` of meta-llama/llama `model.py` (hidden = int(2 * 4 * dim / 3), then
    rounded up to `multiple_of`); Llama 1/2 used multiple_of=256, we default to 64 so tiny models stay tiny.
    """
    hidden = int(2 * 4 * dim / 3)
    return multiple_of * math.ceil(hidden / multiple_of)


@dataclass
class LlamaConfig:
    """Shape and numerics of a Llama-family decoder (Llama 1/2/3, SmolLM, TinyLlama, ...)."""

    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int | None = None  # None -> n_heads (MHA); 1 -> MQA; in between -> GQA
    ffn_dim: int | None = None  # None -> llama_ffn_dim(dim)
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # HF's dict verbatim: {"rope_type": "llama3", "factor", ...}
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    qkv_bias: bool = False  # bias on q/k/v projections (Qwen2; Llama's attention_bias sets this and o_bias)
    o_bias: bool = False  # bias on the output projection
    mlp_bias: bool = False  # bias on gate/up/down (Llama's mlp_bias)
    sliding_window: int | None = None  # a query sees only the last `sliding_window` positions (Mistral)
    model_type: str = "llama"  # config.json spelling: "llama", "qwen2" or "mistral"

    MODEL_TYPES = ("llama", "qwen2", "mistral")  # a class attribute, not a field

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.ffn_dim is None and isinstance(self.dim, int) and self.dim > 0:
            self.ffn_dim = llama_ffn_dim(self.dim)
        if self.rope_scaling is not None:
            self.rope_scaling = dict(self.rope_scaling)
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def validate(self) -> None:
        """Raise LmforgeError naming the first inconsistent field (so a bad config fails before allocation)."""
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise LmforgeError(f"LlamaConfig.{name} must be a positive integer, got {value!r}")
        for name in ("rope_theta", "norm_eps"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise LmforgeError(f"LlamaConfig.{name} must be a positive number, got {value!r}")
        if self.dim % self.n_heads:
            raise LmforgeError(f"LlamaConfig: dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
        if self.n_heads % self.n_kv_heads:
            raise LmforgeError(f"LlamaConfig: n_heads ({self.n_heads}) must be divisible by n_kv_heads "
                               f"({self.n_kv_heads})")
        if self.head_dim % 2:
            raise LmforgeError(f"LlamaConfig: head_dim ({self.head_dim}) must be even for rotary embeddings")
        for name in ("tie_embeddings", "qkv_bias", "o_bias", "mlp_bias"):
            if not isinstance(getattr(self, name), bool):
                raise LmforgeError(f"LlamaConfig.{name} must be a bool, got {getattr(self, name)!r}")
        w = self.sliding_window
        if w is not None and (not isinstance(w, int) or isinstance(w, bool) or w <= 0):
            raise LmforgeError(f"LlamaConfig.sliding_window must be a positive integer or None, got {w!r}")
        if self.model_type not in self.MODEL_TYPES:
            raise LmforgeError(f"{type(self).__name__}.model_type must be one of {', '.join(self.MODEL_TYPES)}, "
                               f"got {self.model_type!r}")
        _check_rope_scaling(self.rope_scaling)

    # ---- plain dicts (lmforge's own serialization, CLI args) ----

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LlamaConfig:
        """Build from a dict of field names; unknown keys are an error (a typo must not be silently ignored)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise LmforgeError(f"unknown LlamaConfig keys: {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        missing = sorted(k for k in ("vocab_size", "dim", "n_layers", "n_heads") if k not in d)
        if missing:
            raise LmforgeError(f"LlamaConfig is missing required keys: {', '.join(missing)}")
        return cls(**d)

    # ---- the size dial ----

    @classmethod
    def from_depth(cls, depth: int, vocab_size: int, max_seq_len: int = 1024, **overrides: Any) -> LlamaConfig:
        """One integer sets the size, as in nanochat (`--depth`): width grows with depth at a fixed aspect ratio.

        dim = 64 * depth, head_dim = 64 (n_heads = depth), MHA (n_kv_heads = n_heads: at these sizes the KV cache
        is small and GQA only costs quality), n_layers = depth, ffn by the Llama rule. depth 6 ~ 17M params with a
        8192 vocab, depth 12 ~ 134M, depth 20 ~ 478M (vocab 32000). `overrides` replace any field.
        """
        if not isinstance(depth, int) or depth <= 0:
            raise LmforgeError(f"depth must be a positive integer, got {depth!r}")
        dim = 64 * depth
        fields = dict(vocab_size=vocab_size, dim=dim, n_layers=depth, n_heads=max(1, dim // 64),
                      n_kv_heads=max(1, dim // 64), ffn_dim=llama_ffn_dim(dim), max_seq_len=max_seq_len)
        fields.update(overrides)
        return cls.from_dict(fields)

    # ---- Hugging Face config.json ----

    def to_hf(self, dtype: str = "float32") -> dict[str, Any]:
        """HF `config.json` for `LlamaForCausalLM`, readable by transformers v4 and v5; `dtype` names the weights'.

        RoPE is written in both layouts: v4's top-level `rope_theta` + `rope_scaling`, and v5's `rope_parameters`
        (v5 reads either; v4 ignores `rope_parameters`, so without the v4 keys it would silently use theta=1e4).
        """
        rope_parameters = {"rope_type": "default", **(self.rope_scaling or {}), "rope_theta": float(self.rope_theta)}
        d = {
            "architectures": [HF_ARCHITECTURES[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.dim,
            "intermediate_size": self.ffn_dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_seq_len,
            "rms_norm_eps": self.norm_eps,
            "rope_theta": float(self.rope_theta),
            "rope_scaling": dict(self.rope_scaling) if self.rope_scaling else None,
            "rope_parameters": rope_parameters,
            "tie_word_embeddings": self.tie_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "attention_dropout": 0.0,
            "initializer_range": 0.02,
            "use_cache": True,
            "dtype": dtype,  # v5 name
            "torch_dtype": dtype,  # v4 name
        }
        if self.model_type == "llama":
            d.update(attention_bias=self.qkv_bias, mlp_bias=self.mlp_bias, pretraining_tp=1)
        elif self.model_type == "qwen2":  # bias on q/k/v is built in; one window for every layer or none
            d.update(use_sliding_window=self.sliding_window is not None, sliding_window=self.sliding_window,
                     max_window_layers=0 if self.sliding_window is not None else self.n_layers)
        else:
            d.update(sliding_window=self.sliding_window)
        return d

    @classmethod
    def _hf_extra_fields(cls, d: dict[str, Any]) -> dict[str, Any]:
        """Fields a subclass reads from config.json beyond the Llama family's."""
        return {}

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> LlamaConfig:
        """Read an HF Llama `config.json` dict (v4 or v5 layout); anything the model cannot reproduce is an error."""
        if not isinstance(d, dict):
            raise LmforgeError(f"config.json must hold a JSON object, got {type(d).__name__}")
        kind = d.get("model_type")
        if kind not in cls.MODEL_TYPES:
            raise LmforgeError(f"config.json has model_type {kind!r}; {cls.__name__} reads "
                               f"{', '.join(cls.MODEL_TYPES)}")
        _check_hf_supported(d)
        try:
            n_heads = d["num_attention_heads"]
            fields = dict(vocab_size=d["vocab_size"], dim=d["hidden_size"], n_layers=d["num_hidden_layers"],
                          n_heads=n_heads, n_kv_heads=d.get("num_key_value_heads") or n_heads,
                          ffn_dim=d["intermediate_size"])
        except KeyError as e:
            raise LmforgeError(f"config.json ({kind}) is missing {e.args[0]!r}") from None
        fields.update(model_type=kind, **_hf_family_switches(d), **cls._hf_extra_fields(d))
        theta, scaling = _hf_rope(d)
        fields.update(max_seq_len=d.get("max_position_embeddings", 2048), rope_theta=theta, rope_scaling=scaling,
                      norm_eps=d.get("rms_norm_eps", 1e-6), tie_embeddings=bool(d.get("tie_word_embeddings", False)),
                      bos_token_id=d.get("bos_token_id"), eos_token_id=d.get("eos_token_id"))
        cfg = cls.from_dict(fields)
        head_dim = d.get("head_dim")
        if head_dim is not None and head_dim != cfg.head_dim:
            raise LmforgeError(f"config.json head_dim={head_dim} but hidden_size/num_attention_heads="
                               f"{cfg.head_dim}; a decoupled head_dim is not supported")
        return cfg


@dataclass
class MixtralConfig(LlamaConfig):
    """Mixtral: Mistral's decoder with a sparse mixture of SwiGLU experts in place of each MLP (model/moe.py)."""

    n_experts: int = 8
    n_experts_per_tok: int = 2
    router_aux_loss_coef: float = 0.001  # weight of the load-balancing loss added to the training loss
    model_type: str = "mixtral"

    MODEL_TYPES = ("mixtral",)

    def validate(self) -> None:
        super().validate()
        for name in ("n_experts", "n_experts_per_tok"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise LmforgeError(f"MixtralConfig.{name} must be a positive integer, got {value!r}")
        if self.n_experts_per_tok > self.n_experts:
            raise LmforgeError(f"MixtralConfig: n_experts_per_tok ({self.n_experts_per_tok}) > n_experts "
                               f"({self.n_experts})")
        if not isinstance(self.router_aux_loss_coef, (int, float)) or self.router_aux_loss_coef < 0:
            raise LmforgeError(f"MixtralConfig.router_aux_loss_coef must be >= 0, got {self.router_aux_loss_coef!r}")

    def to_hf(self, dtype: str = "float32") -> dict[str, Any]:
        return {**super().to_hf(dtype), "num_local_experts": self.n_experts,
                "num_experts_per_tok": self.n_experts_per_tok, "router_aux_loss_coef": self.router_aux_loss_coef,
                "output_router_logits": False, "router_jitter_noise": 0.0}

    @classmethod
    def _hf_extra_fields(cls, d: dict[str, Any]) -> dict[str, Any]:
        if d.get("router_jitter_noise", 0.0):
            raise LmforgeError("config.json (mixtral): router_jitter_noise is not supported")
        return dict(n_experts=d.get("num_local_experts", 8), n_experts_per_tok=d.get("num_experts_per_tok", 2),
                    router_aux_loss_coef=d.get("router_aux_loss_coef", 0.001))


def config_from_hf(d: dict[str, Any]) -> LlamaConfig:
    """The config class a config.json's model_type names, read from it."""
    return (MixtralConfig if isinstance(d, dict) and d.get("model_type") == "mixtral" else LlamaConfig).from_hf(d)


def _check_rope_scaling(scaling: dict[str, Any] | None) -> None:
    if scaling is None:
        return
    if not isinstance(scaling, dict):
        raise LmforgeError(f"LlamaConfig.rope_scaling must be a dict or None, got {scaling!r}")
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind != "llama3":
        raise LmforgeError(f"rope_scaling type {kind!r} is not supported (only 'llama3', or None for plain RoPE)")
    missing = [k for k in LLAMA3_ROPE_KEYS if k not in scaling]
    if missing:
        raise LmforgeError(f"llama3 rope_scaling is missing {', '.join(missing)}")
    extra = sorted(set(scaling) - {"rope_type", "type", *LLAMA3_ROPE_KEYS})
    if extra:
        raise LmforgeError(f"llama3 rope_scaling has unsupported keys: {', '.join(extra)}")
    if scaling["high_freq_factor"] == scaling["low_freq_factor"]:
        raise LmforgeError("llama3 rope_scaling needs high_freq_factor != low_freq_factor")


def _hf_family_switches(d: dict[str, Any]) -> dict[str, Any]:
    """qkv_bias / o_bias / mlp_bias / sliding_window as each model_type's config.json spells them."""
    kind = d["model_type"]
    if kind == "llama":
        bias = bool(d.get("attention_bias", False))
        return dict(qkv_bias=bias, o_bias=bias, mlp_bias=bool(d.get("mlp_bias", False)))
    if kind == "qwen2":
        window = d.get("sliding_window") if d.get("use_sliding_window") else None
        types = d.get("layer_types")
        if window is not None and (d.get("max_window_layers", 0) != 0 if types is None else
                                   any(t != "sliding_attention" for t in types)):
            raise LmforgeError("config.json (qwen2): a sliding window on only some layers is not supported")
        return dict(qkv_bias=True, sliding_window=window)
    return dict(sliding_window=d.get("sliding_window"))  # mistral


def _check_hf_supported(d: dict[str, Any]) -> None:
    """Refuse config.json features our Llama does not implement, instead of loading a silently different model."""
    act = d.get("hidden_act", "silu")
    if act != "silu":
        raise LmforgeError(f"config.json: hidden_act={act!r} is not supported (only 'silu')")
    if d.get("pretraining_tp", 1) not in (1, None):
        raise LmforgeError(f"config.json: pretraining_tp={d['pretraining_tp']} is not supported (only 1)")


def _hf_rope(d: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, rope_scaling) from v5's `rope_parameters` or v4's `rope_theta` + `rope_scaling`."""
    params = d.get("rope_parameters")
    if isinstance(params, dict) and "rope_theta" not in params and set(params) and all(
            isinstance(v, dict) for v in params.values()):
        raise LmforgeError("config.json: per-layer-type rope_parameters are not supported")
    if isinstance(params, dict):
        theta = params.get("rope_theta", d.get("rope_theta", 10000.0))
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    else:
        theta = d.get("rope_theta", 10000.0)
        scaling = dict(d.get("rope_scaling") or {})
    if "type" in scaling and "rope_type" not in scaling:  # transformers < 4.42 wrote "type"
        scaling["rope_type"] = scaling.pop("type")
    scaling.pop("type", None)
    if scaling.get("partial_rotary_factor", 1.0) != 1.0:
        raise LmforgeError(f"config.json: partial_rotary_factor={scaling['partial_rotary_factor']} is not supported")
    scaling.pop("partial_rotary_factor", None)
    if scaling.get("rope_type", "default") == "default":
        extra = sorted(set(scaling) - {"rope_type"})
        if extra:
            raise LmforgeError(f"config.json: plain RoPE with unsupported parameters {extra}")
        return float(theta), None
    return float(theta), scaling


# ---- sizes, FLOPs, learning rate ----


def n_params(cfg: LlamaConfig, include_embeddings: bool = True) -> int:
    """Parameters of `Llama(cfg)`, counted from the shapes (equals sum(p.numel()) of the built model).

    include_embeddings=False gives Kaplan et al.'s "non-embedding" count: without the token embedding and
    without the (untied) output head.
    """
    c, f, hd = cfg.dim, cfg.ffn_dim, cfg.head_dim
    attn = c * cfg.n_heads * hd + 2 * c * cfg.n_kv_heads * hd + cfg.n_heads * hd * c  # q, k, v, o
    attn += cfg.qkv_bias * (cfg.n_heads + 2 * cfg.n_kv_heads) * hd + cfg.o_bias * c
    mlp = 3 * c * f + cfg.mlp_bias * (2 * f + c)  # gate, up, down
    n_experts = getattr(cfg, "n_experts", None)
    if n_experts:
        mlp = n_experts * mlp + c * n_experts  # every expert's SwiGLU + the router
    per_layer = attn + mlp + 2 * c  # + two RMSNorm weights
    body = cfg.n_layers * per_layer + c  # + final norm
    if not include_embeddings:
        return body
    return body + cfg.vocab_size * c * (1 if cfg.tie_embeddings else 2)


def flops_per_token(cfg: LlamaConfig, seq_len: int) -> int:
    """Training FLOPs (forward + backward) per token at context `seq_len`: 6N + 12 * L * H * Q * T.

    The PaLM paper's formula (Chowdhery et al. 2022, appendix B; Chinchilla appendix F is the same estimate),
    also used by nanoGPT's `estimate_mfu`. N counts every weight a token multiplies by: the non-embedding
    parameters plus the output head (vocab * dim, tied or not); the embedding lookup is not a matmul. The
    attention term is not halved for the causal mask, as in PaLM.
    """
    if seq_len <= 0:
        raise LmforgeError(f"seq_len must be positive, got {seq_len}")
    matmul_params = n_params(cfg, include_embeddings=False) + cfg.vocab_size * cfg.dim
    return 6 * matmul_params + 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len


def suggested_lr(cfg: LlamaConfig) -> float:
    """A peak AdamW learning rate for pretraining from scratch: 6e-4 * sqrt(768 / dim), capped at 3e-3.

    Anchored at GPT-3 Small (dim 768, lr 6e-4; Brown et al. 2020, table 2.1); the 1/sqrt(width) decay then
    lands near published Llama-1 values (Touvron et al. 2023, table 2: dim 4096 -> 3e-4 vs 2.6e-4 here,
    dim 8192 -> 1.5e-4 vs 1.8e-4 here). A starting point for a sweep, not a law.
    """
    return min(3e-3, 6e-4 * math.sqrt(768 / cfg.dim))


def _preset(**kw: Any) -> LlamaConfig:
    return LlamaConfig(**kw)


# Named sizes. The small ones follow karpathy/llama2.c's TinyStories models (vocab 32000, tied); llama-1b is
# Llama 3.2 1B's shape. Param counts (n_params): 1m ~1.4M, 15m ~15M, 42m ~42M, 110m ~110M, 1b ~1.24B.
PRESETS: dict[str, LlamaConfig] = {
    "llama-1m": _preset(vocab_size=4096, dim=128, n_layers=4, n_heads=4, n_kv_heads=4, ffn_dim=384,
                        max_seq_len=512, tie_embeddings=True),
    "llama-15m": _preset(vocab_size=32000, dim=288, n_layers=6, n_heads=6, n_kv_heads=6, ffn_dim=768,
                         max_seq_len=256, tie_embeddings=True),
    "llama-42m": _preset(vocab_size=32000, dim=512, n_layers=8, n_heads=8, n_kv_heads=8, ffn_dim=1376,
                         max_seq_len=1024, tie_embeddings=True),
    "llama-110m": _preset(vocab_size=32000, dim=768, n_layers=12, n_heads=12, n_kv_heads=12, ffn_dim=2048,
                          max_seq_len=1024, tie_embeddings=True),
    "llama-1b": _preset(vocab_size=128256, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim=8192,
                        max_seq_len=131072, rope_theta=500000.0, norm_eps=1e-5, tie_embeddings=True,
                        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
}
