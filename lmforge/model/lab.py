"""An ablation decoder for our own pretraining experiments: positions, norms and MLPs as switches.

    cfg = LabConfig(vocab_size=512, dim=64, n_layers=2, n_heads=4, position="alibi", norm="layernorm",
                    placement="post", mlp="geglu")
    model = LabDecoder(cfg)
    logits = model(idx)                                     # (B, T) int64 -> (B, T, V) float32, causal
    logits = model(idx, input_pos=pos, cache=cache)         # cached decoding, see docs/internals.md
    loss = model(idx, targets=y)                            # fused head + mean cross-entropy

    position   rope | sinusoidal | learned | alibi | none     (Su et al. 2021; Vaswani et al. 2017; Radford et al.
                                                              2019; Press et al. 2022; Kazemnejad et al. 2023)
    norm       rmsnorm | layernorm                            (Zhang & Sennrich 2019; Ba et al. 2016)
    placement  pre | post | deepnorm                          (Xiong et al. 2020; Vaswani et al. 2017; Wang et al. 2022)
    mlp        gelu | swiglu | geglu | relu2                  (Hendrycks & Gimpel 2016; Shazeer 2020; So et al. 2021)

Why a switchboard here when DESIGN.md warns against "one god-config driving a universal model": this file is
the place where one variable is changed while everything else stays fixed, which is what an ablation needs. It
is not a model family: it has no Hugging Face counterpart, no checkpoint name map and no loader of foreign
weights. The HF-compatible Llama (decoder.py) and GPT-2 (gpt2.py) stay separate files, untouched by these knobs.

The forward contract and the KV-cache hook are Llama's (docs/internals.md), so KVCache, `generate`, perplexity
and the training loop work unchanged. docs/lab.md lists each knob with its reference and the property its test
checks (tests/model/test_lab.py).
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
from lmforge.model.layers import RMSNorm, SwiGLU, apply_rotary, rope_tables

POSITIONS = ("rope", "sinusoidal", "learned", "alibi", "none")
NORMS = ("rmsnorm", "layernorm")
PLACEMENTS = ("pre", "post", "deepnorm")
MLPS = ("gelu", "swiglu", "geglu", "relu2")
GATED = ("swiglu", "geglu")
DERIVED = ("rope_cos", "rope_sin", "pos_table", "slopes")  # fp32 tables computed from the config, never saved


@dataclass
class LabConfig:
    """Shape and architecture switches of a LabDecoder. The defaults are Llama's recipe (RoPE, pre-norm RMSNorm,
    SwiGLU), so each switch away from them is one ablation."""

    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int | None = None  # None -> n_heads (MHA); 1 -> MQA; in between -> GQA
    ffn_dim: int | None = None  # the MLP's parameter budget as an ungated hidden width; None -> 4 * dim
    max_seq_len: int = 1024
    position: str = "rope"
    norm: str = "rmsnorm"
    placement: str = "pre"
    mlp: str = "swiglu"
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.ffn_dim is None and isinstance(self.dim, int) and self.dim > 0:
            self.ffn_dim = 4 * self.dim
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def hidden_dim(self) -> int:
        """The MLP's actual hidden width. A gated MLP has three matrices instead of two, so at 2/3 of the width it
        has the same parameters (Shazeer 2020, section 2; Llama's 2/3 * 4d rule): round(2 * ffn_dim / 3). Equal
        exactly when 3 divides ffn_dim, else within one row of `dim` weights."""
        return (2 * self.ffn_dim + 1) // 3 if self.mlp in GATED else self.ffn_dim

    def validate(self) -> None:
        """Raise LmforgeError naming the first inconsistent field (so a bad config fails before allocation)."""
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise LmforgeError(f"LabConfig.{name} must be a positive integer, got {value!r}")
        for name in ("rope_theta", "norm_eps"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise LmforgeError(f"LabConfig.{name} must be a positive number, got {value!r}")
        for name, allowed in (("position", POSITIONS), ("norm", NORMS), ("placement", PLACEMENTS), ("mlp", MLPS)):
            if getattr(self, name) not in allowed:
                raise LmforgeError(f"LabConfig.{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.dim % self.n_heads:
            raise LmforgeError(f"LabConfig: dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
        if self.n_heads % self.n_kv_heads:
            raise LmforgeError(f"LabConfig: n_heads ({self.n_heads}) must be divisible by n_kv_heads "
                               f"({self.n_kv_heads})")
        if self.position == "rope" and self.head_dim % 2:
            raise LmforgeError(f"LabConfig: head_dim ({self.head_dim}) must be even for rotary embeddings")
        if self.position == "sinusoidal" and self.dim % 2:
            raise LmforgeError(f"LabConfig: dim ({self.dim}) must be even for sinusoidal positions (sin/cos pairs)")
        if not isinstance(self.tie_embeddings, bool):
            raise LmforgeError(f"LabConfig.tie_embeddings must be a bool, got {self.tie_embeddings!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LabConfig:
        """Build from a dict of field names; unknown keys are an error (a typo must not be silently ignored)."""
        if not isinstance(d, dict):
            raise LmforgeError(f"LabConfig needs a dict of fields, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise LmforgeError(f"unknown LabConfig keys: {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        missing = sorted(k for k in ("vocab_size", "dim", "n_layers", "n_heads") if k not in d)
        if missing:
            raise LmforgeError(f"LabConfig is missing required keys: {', '.join(missing)}")
        return cls(**d)

    @classmethod
    def from_depth(cls, depth: int, vocab_size: int, max_seq_len: int = 1024, **overrides: Any) -> LabConfig:
        """The size dial of `LlamaConfig.from_depth` (dim = 64 * depth, n_layers = depth, head_dim 64), with
        `overrides` (the switches, or any field) on top."""
        if not isinstance(depth, int) or isinstance(depth, bool) or depth <= 0:
            raise LmforgeError(f"depth must be a positive integer, got {depth!r}")
        fields = dict(vocab_size=vocab_size, dim=64 * depth, n_layers=depth, n_heads=depth, max_seq_len=max_seq_len)
        return cls.from_dict({**fields, **overrides})


# ---- positions ----


def sinusoidal_table(n_positions: int, dim: int, base: float = 10000.0) -> torch.Tensor:
    """(n_positions, dim) fp32: PE(p, 2i) = sin(p / base^(2i/dim)), PE(p, 2i+1) = cos(p / base^(2i/dim)).

    Vaswani et al. 2017, section 3.5 (interleaved sin/cos as in the paper and tensor2tensor's layout per pair).
    For each frequency w the pair (sin wp, cos wp) at p + k is a fixed rotation of the pair at p, so
    PE(p + k) = M_k PE(p) with M_k independent of p: the paper's reason to expect relative attention to be easy.
    Computed in fp64 (p * w for large p loses digits in fp32), stored in fp32.
    """
    freqs = base ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)  # (dim/2,)
    angles = torch.arange(n_positions, dtype=torch.float64)[:, None] * freqs[None, :]  # (P, dim/2)
    return torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(1).float()  # (P, dim): sin, cos, sin, ...


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """ALiBi's per-head slopes (Press et al. 2022, section 3): for n a power of two, the geometric sequence
    2^(-8/n), 2^(-16/n), ..., 2^(-8). Otherwise the 2^floor(log2 n) slopes of the next-lower power of two,
    then every other slope of the sequence for twice that power, until n (the authors' `get_slopes`)."""
    def power_of_2(n: int) -> list[float]:
        return [2 ** (-8 * (i + 1) / n) for i in range(n)]

    if n_heads & (n_heads - 1) == 0:
        slopes = power_of_2(n_heads)
    else:
        p = 2 ** math.floor(math.log2(n_heads))
        slopes = power_of_2(p) + power_of_2(2 * p)[0::2][: n_heads - p]
    return torch.tensor(slopes, dtype=torch.float32)  # (H,)


def alibi_bias(slopes: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """-slope * (query position - key position): the linear penalty ALiBi adds to the attention scores.

    slopes (H,), q_pos (..., T), k_pos (..., S) -> (..., H, T, S) fp32 (leading dims broadcast: () or (B,)).
    Only the distance enters, so shifting every position by the same amount leaves the scores unchanged.
    """
    dist = (q_pos[..., None, :, None] - k_pos[..., None, None, :]).float()  # (..., 1, T, S)
    return -slopes[:, None, None] * dist


# ---- norms and MLPs ----


def make_norm(kind: str, dim: int, eps: float) -> nn.Module:
    """RMSNorm (Zhang & Sennrich 2019: x / rms(x) * w, unit RMS per row, no centering; layers.RMSNorm) or
    LayerNorm (Ba et al. 2016: (x - mean) / std * w + b, zero mean and unit variance per row)."""
    return RMSNorm(dim, eps) if kind == "rmsnorm" else nn.LayerNorm(dim, eps=eps)


def deepnorm_alpha(n_layers: int) -> float:
    """DeepNorm's residual scale for a decoder-only model of N layers: (2N)^(1/4) (Wang et al. 2022, table 1)."""
    return (2 * n_layers) ** 0.25


def deepnorm_beta(n_layers: int) -> float:
    """DeepNorm's init gain for a decoder-only model of N layers: (8N)^(-1/4) (Wang et al. 2022, table 1)."""
    return (8 * n_layers) ** -0.25


def relu_squared(x: torch.Tensor) -> torch.Tensor:
    """relu(x)^2, Primer's activation (So et al. 2021, section 4)."""
    return F.relu(x).square()


class MLP(nn.Module):
    """Ungated MLP: down(act(up(x))) with act GELU (exact erf form, Hendrycks & Gimpel 2016) or ReLU^2."""

    def __init__(self, dim: int, hidden_dim: int, kind: str):
        super().__init__()
        self.act = relu_squared if kind == "relu2" else F.gelu
        self.up_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, T, C)
        return linears(self.act(linears(x, self.up_proj)[0]), self.down_proj)[0]


class GeGLU(SwiGLU):
    """GEGLU (Shazeer 2020): down(gelu(gate(x)) * up(x)); SwiGLU's matrices with GELU in place of SiLU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, T, C)
        gate, up = linears(x, self.gate_proj, self.up_proj)  # (B, T, F) each
        return linears(F.gelu(gate) * up, self.down_proj)[0]


def make_mlp(cfg: LabConfig) -> nn.Module:
    if cfg.mlp == "swiglu":
        return SwiGLU(cfg.dim, cfg.hidden_dim)
    if cfg.mlp == "geglu":
        return GeGLU(cfg.dim, cfg.hidden_dim)
    return MLP(cfg.dim, cfg.hidden_dim, cfg.mlp)


# ---- attention and block ----


class LabAttention(nn.Module):
    """Causal self-attention (MHA / GQA / MQA by n_kv_heads), with RoPE on q and k or an additive score bias.

    Paths as lmforge/model/attention.py: no cache and no bias is SDPA `is_causal=True`; with a cache, the cache's
    mask (compiled one-query kernel, small-query path or masked SDPA). With ALiBi, `bias` (B|1, H, T, S) already
    holds -inf where a key may not be seen, and SDPA adds it to the scores.
    """

    def __init__(self, cfg: LabConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx  # the cache's slot for this layer's keys and values
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None, bias: torch.Tensor | None,
                cache: Any = None, input_pos: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = linears(x, self.q_proj, self.k_proj, self.v_proj)
        q, k = q.view(B, T, self.n_heads, self.head_dim), k.view(B, T, self.n_kv_heads, self.head_dim)
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, H, T, D), (B, Hkv, T, D)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        gqa = self.n_kv_heads != self.n_heads
        if cache is not None:
            k, v = cache.update(self.layer_idx, input_pos, k, v)  # (B, Hkv, S, D)
        if bias is not None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), enable_gqa=gqa)
        elif cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)  # (B, H, T, D)
        else:
            y = kernels.attention(q, k, v, mask) if T == 1 else None  # decode steps: one compiled call
            if y is None and T <= SMALL_QUERY:
                y = small_query_attention(q, k, v, mask)
            elif y is None:
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return linears(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim), self.o_proj)[0]


class LabBlock(nn.Module):
    """One layer; `placement` decides where the norms sit relative to the residual connection:

    pre      x + f(norm(x))          GPT-2, Llama (Xiong et al. 2020: well-behaved gradients, no warmup needed)
    post     norm(x + f(x))          the original Transformer (Vaswani et al. 2017)
    deepnorm norm(alpha * x + f(x))  DeepNet (Wang et al. 2022): post-norm with the residual up-weighted
    """

    def __init__(self, cfg: LabConfig, layer_idx: int):
        super().__init__()
        self.pre = cfg.placement == "pre"
        self.alpha = deepnorm_alpha(cfg.n_layers) if cfg.placement == "deepnorm" else 1.0
        self.attn_norm = make_norm(cfg.norm, cfg.dim, cfg.norm_eps)  # before attention (pre) or after its sum
        self.self_attn = LabAttention(cfg, layer_idx)
        self.mlp_norm = make_norm(cfg.norm, cfg.dim, cfg.norm_eps)
        self.mlp = make_mlp(cfg)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None, bias: torch.Tensor | None,
                cache: Any = None, input_pos: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:  # (B, T, C) -> (B, T, C)
        if self.pre:
            x = x + self.self_attn(self.attn_norm(x), rope, bias, cache, input_pos, mask)
            return x + self.mlp(self.mlp_norm(x))
        x = self.attn_norm(self.alpha * x + self.self_attn(x, rope, bias, cache, input_pos, mask))
        return self.mlp_norm(self.alpha * x + self.mlp(x))


# ---- the model ----


class LabDecoder(nn.Module):
    """Token embedding (+ absolute positions) -> n blocks -> final norm (pre-norm only) -> output head."""

    def __init__(self, cfg: LabConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        if cfg.position == "learned":  # GPT-2's table: one trained vector per position, nothing beyond max_seq_len
            self.pos_embed = nn.Embedding(cfg.max_seq_len, cfg.dim)
        self.layers = nn.ModuleList(LabBlock(cfg, i) for i in range(cfg.n_layers))
        # Post-norm blocks already end in a norm, so only pre-norm needs one before the head (GPT-2's ln_f).
        self.norm = make_norm(cfg.norm, cfg.dim, cfg.norm_eps) if cfg.placement == "pre" else nn.Identity()
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.tie_weights()
        self.reset_buffers()
        self.apply(self._init_weights)

    def tie_weights(self) -> None:
        """Share the embedding matrix with the output head when cfg.tie_embeddings (Press & Wolf 2017); a loader
        calls it again after assigning loaded tensors."""
        if self.cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def reset_buffers(self, device: torch.device | str | None = None) -> None:
        """(Re)compute the fp32 tables derived from cfg (RoPE cos/sin, sinusoids, ALiBi slopes): after building on
        the meta device, or after a cast to a low-precision dtype. Non-persistent: never saved."""
        cfg = self.cfg
        device = self.embed_tokens.weight.device if device is None else device
        if cfg.position == "rope":
            cos, sin = rope_tables(cfg.max_seq_len, cfg.head_dim, cfg.rope_theta, device=device)
            self.register_buffer("rope_cos", cos, persistent=False)  # (S_max, D/2)
            self.register_buffer("rope_sin", sin, persistent=False)
        elif cfg.position == "sinusoidal":
            self.register_buffer("pos_table", sinusoidal_table(cfg.max_seq_len, cfg.dim).to(device),
                                 persistent=False)  # (S_max, C)
        elif cfg.position == "alibi":
            self.register_buffer("slopes", alibi_slopes(cfg.n_heads).to(device), persistent=False)  # (H,)

    def _init_weights(self, module: nn.Module) -> None:
        """GPT-2's init as in Llama (N(0, 0.02); the projections into the residual stream, o_proj and down_proj,
        N(0, 0.02 / sqrt(2 * n_layers))), except under DeepNorm, which prescribes its own (Wang et al. 2022,
        figure 2): Xavier-normal with gain beta for v_proj, o_proj and the MLP's matrices, gain 1 for q_proj and
        k_proj. `apply` visits children before parents, so a block's rule overrides the per-Linear default."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        elif isinstance(module, LabBlock) and self.cfg.placement == "deepnorm":
            beta = deepnorm_beta(self.cfg.n_layers)
            attn = module.self_attn
            for lin in (attn.q_proj, attn.k_proj):
                nn.init.xavier_normal_(lin.weight, gain=1.0)
            for lin in (attn.v_proj, attn.o_proj, *(m for m in module.mlp.children() if isinstance(m, nn.Linear))):
                nn.init.xavier_normal_(lin.weight, gain=beta)
        elif isinstance(module, LabBlock):
            std = 0.02 / math.sqrt(2 * self.cfg.n_layers)
            nn.init.normal_(module.self_attn.o_proj.weight, mean=0.0, std=std)
            nn.init.normal_(module.mlp.down_proj.weight, mean=0.0, std=std)

    def forward(self, idx: torch.Tensor, input_pos: torch.Tensor | None = None, cache: Any = None, *,
                targets: torch.Tensor | None = None, ignore_index: int = -100) -> torch.Tensor:
        """idx (B, T) int64 -> logits (B, T, V) float32; with targets (B, T), the mean cross-entropy instead.

        input_pos (B, T) absolute positions (negative = left padding), required with a cache; without one the
        default is 0..T-1 and attention is causal over the T tokens in order. As `Llama.forward`.
        """
        check_decoder_inputs("LabDecoder", idx, input_pos, cache, self.cfg.max_seq_len)
        table = next((b for n, b in self.named_buffers() if n in DERIVED), None)
        if table is not None and table.dtype != torch.float32:  # a model.to(bfloat16) cast them: rebuild in fp32
            self.reset_buffers(table.device)
        T = idx.shape[1]
        pos = torch.arange(T, device=idx.device) if input_pos is None else input_pos.clamp(min=0)  # (T,) | (B, T)
        mask = cache.attn_mask(input_pos) if cache is not None else None  # (B, 1, T, S), once per forward
        x = self._embed(idx, pos)  # (B, T, C)
        rope = self._rope(pos)
        bias = self._alibi(pos, mask)
        for block in self.layers:
            x = block(x, rope, bias, cache, input_pos, mask)
        x = self.norm(x)
        if targets is None:
            return linears(x, self.lm_head)[0].float()  # (B, T, V)
        return head_loss(self.lm_head, x, idx, targets, ignore_index)

    def _embed(self, idx: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Token embeddings plus the absolute position vectors (sinusoidal, learned), if any."""
        x = self.embed_tokens(idx)  # (B, T, C)
        if self.cfg.position == "learned":
            x = x + self.pos_embed(pos)
        elif self.cfg.position == "sinusoidal":
            # Vaswani et al. 2017, section 3.4: embeddings times sqrt(d_model), so the token signal is not drowned
            # by the unit-amplitude sinusoids (our embeddings start at std 0.02).
            x = x * math.sqrt(self.cfg.dim) + self.pos_table[pos].to(x.dtype)
        return x

    def _rope(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """cos, sin for the tokens: (T, 1, D/2) for positions (T,), else (B, T, 1, D/2)."""
        if self.cfg.position != "rope":
            return None
        return self.rope_cos[pos].unsqueeze(-2), self.rope_sin[pos].unsqueeze(-2)

    def _alibi(self, pos: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor | None:
        """ALiBi's bias with -inf where attention is not allowed: (1|B, H, T, S), the same for every layer.

        Keys are the cache's slots (slot == position) with a cache, else the T tokens themselves, causally."""
        if self.cfg.position != "alibi":
            return None
        slopes = self.slopes
        if mask is not None:
            bias = alibi_bias(slopes, pos, torch.arange(mask.shape[-1], device=pos.device))  # (B, H, T, S)
            return bias.masked_fill(~mask, float("-inf"))
        T = pos.shape[-1]
        causal = torch.ones(T, T, dtype=torch.bool, device=pos.device).tril()  # key j <= query i
        bias = alibi_bias(slopes, pos, pos).masked_fill(~causal, float("-inf"))  # (H, T, T) or (B, H, T, T)
        return bias if bias.dim() == 4 else bias[None]



# ---- sizes and FLOPs (the same accounting as lmforge/model/config.py) ----


def n_params(cfg: LabConfig, include_embeddings: bool = True) -> int:
    """Parameters of `LabDecoder(cfg)` from the shapes. include_embeddings=False leaves out the token embedding,
    the untied head and a learned position table (Kaplan et al. 2020's non-embedding count)."""
    c, hd = cfg.dim, cfg.head_dim
    attn = 2 * c * cfg.n_heads * hd + 2 * c * cfg.n_kv_heads * hd  # q, o and k, v
    mlp = (3 if cfg.mlp in GATED else 2) * c * cfg.hidden_dim
    norm = c * (1 if cfg.norm == "rmsnorm" else 2)  # LayerNorm has a bias
    body = cfg.n_layers * (attn + mlp + 2 * norm) + (norm if cfg.placement == "pre" else 0)
    if not include_embeddings:
        return body
    positions = cfg.max_seq_len * c if cfg.position == "learned" else 0
    return body + positions + cfg.vocab_size * c * (1 if cfg.tie_embeddings else 2)


def flops_per_token(cfg: LabConfig, seq_len: int) -> int:
    """Training FLOPs per token, PaLM's 6N + 12 * L * H * Q * T (as config.flops_per_token; ALiBi's bias add and
    the activations are elementwise and left out, as there)."""
    if seq_len <= 0:
        raise LmforgeError(f"seq_len must be positive, got {seq_len}")
    matmul_params = n_params(cfg, include_embeddings=False) + cfg.vocab_size * cfg.dim
    return 6 * matmul_params + 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len
