"""T5 (Raffel et al. 2020): an encoder-decoder Transformer with bucketed relative position bias and RMS norms.

    cfg = T5Config(vocab_size=32128, dim=512, n_layers=6, n_heads=8, head_dim=64, ffn_dim=2048)   # t5-small
    model = T5(cfg)
    logits = model(input_ids, decoder_input_ids, attention_mask=mask)   # (B, S), (B, T) -> (B, T, V) float32
    loss = model(input_ids, attention_mask=mask, labels=labels)         # mean CE; decoder input = labels shifted
    hidden = model.encode(input_ids, mask)                              # (B, S, C) encoder states
    memory = model.cross_attention_cache(hidden, mask)                  # every decoder layer's cross k/v, once
    logits = model.decode(ids, memory, input_pos=pos, cache=cache)      # cached decoding (the KV-cache hook)

Computes what HF `T5ForConditionalGeneration` computes (transformers' models/t5/modeling_t5.py, itself after
Mesh TensorFlow): a shared token embedding; an encoder of pre-norm blocks with bidirectional self-attention; a
decoder of pre-norm blocks with causal self-attention, then cross-attention over the encoder states; T5's layer
norm (RMS, no mean, no bias); no 1/sqrt(d) on the attention scores (T5 folds it into the query's init); one
relative position bias table per stack, in its first layer, whose (H, T, S) bias every layer of that stack adds;
a ReLU MLP (T5) or a gated-GELU one (T5 v1.1, flan-T5); a head tied to the embedding with the decoder output
scaled by dim**-0.5 (T5), or untied and unscaled (v1.1).

Module names are HF's (`encoder.block.{i}.layer.0.SelfAttention.q`, `layer.1.DenseReluDense.wi`, decoder
`layer.1.EncDecAttention`, `final_layer_norm`, `shared`, `lm_head`), so a checkpoint maps one to one and PEFT's
T5 targets ("q", "v") mean the same here. The stacks hold no embedding of their own: HF's
`{encoder,decoder}.embed_tokens` are the same tensor as `shared`.

No dropout: lmforge trains every family without it (config.json records dropout_rate 0.0).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.common import LmforgeError
from lmforge.model.attention import SMALL_QUERY
from lmforge.model.kernels import linears
from lmforge.model.layers import RMSNorm
from lmforge.model.losses import linear_cross_entropy

# HF feed_forward_proj -> activation. "gated-X" multiplies act(wi_0 x) by wi_1 x (Shazeer 2020); HF computes
# "gated-gelu" with the tanh approximation (gelu_new, kept for backward compatibility) but plain "gelu" exactly.
FEED_FORWARD: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gated-gelu": functools.partial(F.gelu, approximate="tanh"),
    "gated-relu": F.relu,
    "gated-silu": F.silu,
}


@dataclass
class T5Config:
    """Shape and numerics of a T5-family encoder-decoder (T5, T5 v1.1, flan-T5)."""

    vocab_size: int
    dim: int  # HF d_model
    n_layers: int  # encoder blocks (HF num_layers)
    n_heads: int
    head_dim: int | None = None  # HF d_kv, independent of dim / n_heads in T5; None -> dim // n_heads
    ffn_dim: int | None = None  # HF d_ff; None -> 4 * dim
    n_decoder_layers: int | None = None  # HF num_decoder_layers; None -> n_layers
    rel_buckets: int = 32  # HF relative_attention_num_buckets
    rel_max_distance: int = 128  # HF relative_attention_max_distance: farther offsets share the last bucket
    norm_eps: float = 1e-6
    feed_forward_proj: str = "relu"
    tie_embeddings: bool = True  # lm_head shares `shared`'s weight
    rescale_head: bool | None = None  # decoder output * dim**-0.5 before the head (HF scale_decoder_outputs)
    pad_token_id: int = 0
    eos_token_id: int | list[int] | None = 1
    decoder_start_token_id: int | None = None  # None -> pad_token_id, as every T5 checkpoint has it

    def __post_init__(self) -> None:
        ok = all(isinstance(getattr(self, n), int) and getattr(self, n) > 0 for n in ("dim", "n_heads", "n_layers"))
        if ok and self.head_dim is None:
            self.head_dim = self.dim // self.n_heads
        if ok and self.ffn_dim is None:
            self.ffn_dim = 4 * self.dim
        if self.n_decoder_layers is None:
            self.n_decoder_layers = self.n_layers
        if self.rescale_head is None:
            self.rescale_head = self.tie_embeddings  # original T5 scales exactly when tied
        if self.decoder_start_token_id is None:
            self.decoder_start_token_id = self.pad_token_id
        self.validate()

    @property
    def gated(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    def validate(self) -> None:
        """Raise LmforgeError naming the first inconsistent field (so a bad config fails before allocation)."""
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "head_dim", "ffn_dim", "n_decoder_layers",
                     "rel_buckets", "rel_max_distance"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise LmforgeError(f"T5Config.{name} must be a positive integer, got {value!r}")
        if self.rel_buckets < 4 or self.rel_buckets % 2:
            raise LmforgeError(f"T5Config.rel_buckets must be an even integer >= 4, got {self.rel_buckets}")
        if not isinstance(self.norm_eps, (int, float)) or isinstance(self.norm_eps, bool) or not self.norm_eps > 0:
            raise LmforgeError(f"T5Config.norm_eps must be a positive number, got {self.norm_eps!r}")
        if self.feed_forward_proj not in FEED_FORWARD:
            raise LmforgeError(f"T5Config.feed_forward_proj {self.feed_forward_proj!r} is not supported "
                               f"(one of {', '.join(FEED_FORWARD)})")
        for name in ("tie_embeddings", "rescale_head"):
            if not isinstance(getattr(self, name), bool):
                raise LmforgeError(f"T5Config.{name} must be a bool, got {getattr(self, name)!r}")
        for name in ("pad_token_id", "decoder_start_token_id", "eos_token_id"):
            value = getattr(self, name)
            for i in value if isinstance(value, list) else [value]:
                if i is not None and (not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < self.vocab_size):
                    raise LmforgeError(f"T5Config.{name} must be an id below vocab_size, got {value!r}")

    # ---- plain dicts (lmforge's own serialization, CLI args) ----

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> T5Config:
        """Build from a dict of field names; unknown keys are an error (a typo must not be silently ignored)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise LmforgeError(f"unknown T5Config keys: {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        missing = sorted(k for k in ("vocab_size", "dim", "n_layers", "n_heads") if k not in d)
        if missing:
            raise LmforgeError(f"T5Config is missing required keys: {', '.join(missing)}")
        return cls(**d)

    # ---- Hugging Face config.json ----

    def to_hf(self, dtype: str = "float32") -> dict[str, Any]:
        """HF `config.json` for `T5ForConditionalGeneration` (transformers v4 and v5); `dtype` names the weights'.

        v4 reads `tie_word_embeddings` as "tied and rescaled"; v5 always ties unless the checkpoint holds its own
        `lm_head.weight` and reads the rescale from `scale_decoder_outputs`. Both keys are written.
        """
        return {
            "architectures": ["T5ForConditionalGeneration"],
            "model_type": "t5",
            "vocab_size": self.vocab_size,
            "d_model": self.dim,
            "d_kv": self.head_dim,
            "d_ff": self.ffn_dim,
            "num_layers": self.n_layers,
            "num_decoder_layers": self.n_decoder_layers,
            "num_heads": self.n_heads,
            "relative_attention_num_buckets": self.rel_buckets,
            "relative_attention_max_distance": self.rel_max_distance,
            "layer_norm_epsilon": self.norm_eps,
            "feed_forward_proj": self.feed_forward_proj,
            "tie_word_embeddings": self.tie_embeddings,
            "scale_decoder_outputs": self.rescale_head,
            "pad_token_id": self.pad_token_id,
            "eos_token_id": self.eos_token_id,
            "decoder_start_token_id": self.decoder_start_token_id,
            "is_encoder_decoder": True,
            "dropout_rate": 0.0,  # our model has no dropout: record what it was trained with
            "initializer_factor": 1.0,
            "use_cache": True,
            "dtype": dtype,  # v5 name
            "torch_dtype": dtype,  # v4 name
        }

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> T5Config:
        """Read an HF T5 `config.json` dict; a key it omits takes transformers' T5Config default (t5-small).

        Features this model does not compute are an error rather than a silently different model. Dropout and
        init settings are ignored (training-only). The head's rescale is v5's `scale_decoder_outputs` when
        present, else `tie_word_embeddings` (v4's rule).
        """
        if not isinstance(d, dict):
            raise LmforgeError(f"config.json must hold a JSON object, got {type(d).__name__}")
        if d.get("model_type") != "t5":
            raise LmforgeError(f"config.json has model_type {d.get('model_type')!r}; the T5 model needs 't5'")
        if d.get("is_encoder_decoder", True) is not True or d.get("is_decoder", False) is not False:
            raise LmforgeError("config.json (t5): only the encoder-decoder T5 is supported (is_encoder_decoder true)")
        proj = d.get("feed_forward_proj", "relu")
        if proj not in FEED_FORWARD:
            raise LmforgeError(f"config.json (t5): feed_forward_proj={proj!r} is not supported "
                               f"(one of {', '.join(FEED_FORWARD)})")
        tie = bool(d.get("tie_word_embeddings", True))
        pad = d.get("pad_token_id", 0)
        return cls.from_dict(dict(
            vocab_size=d.get("vocab_size", 32128), dim=d.get("d_model", 512), n_layers=d.get("num_layers", 6),
            n_heads=d.get("num_heads", 8), head_dim=d.get("d_kv", 64), ffn_dim=d.get("d_ff", 2048),
            n_decoder_layers=d.get("num_decoder_layers"), rel_buckets=d.get("relative_attention_num_buckets", 32),
            rel_max_distance=d.get("relative_attention_max_distance", 128), norm_eps=d.get("layer_norm_epsilon", 1e-6),
            feed_forward_proj=proj, tie_embeddings=tie, rescale_head=bool(d.get("scale_decoder_outputs", tie)),
            pad_token_id=pad, eos_token_id=d.get("eos_token_id", 1),
            decoder_start_token_id=d.get("decoder_start_token_id", pad)))


# ---- relative position bias ----


def relative_position_bucket(relative_position: torch.Tensor, bidirectional: bool = True, num_buckets: int = 32,
                             max_distance: int = 128) -> torch.Tensor:
    """Bucket of each `key_pos - query_pos` offset, exactly HF `T5Attention._relative_position_bucket` (from Mesh
    TensorFlow's `_relative_position_bucket`).

    Bidirectional (encoder): half the buckets for keys after the query, half for keys before. Unidirectional
    (decoder): keys after the query all map to bucket 0 (they are masked anyway). Within a half, offsets below
    num_buckets / 2 (of that half) each get their own bucket; larger ones share logarithmically wider buckets up
    to max_distance, beyond which everything falls into the last bucket.
    """
    buckets = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets += (relative_position > 0).to(torch.long) * num_buckets
        distance = torch.abs(relative_position)
    else:
        distance = -torch.min(relative_position, torch.zeros_like(relative_position))
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    # log(0) = -inf for distance 0 is harmless: `is_small` picks the exact bucket there
    large = max_exact + (torch.log(distance.float() / max_exact) / math.log(max_distance / max_exact)
                         * (num_buckets - max_exact)).to(torch.long)
    large = torch.min(large, torch.full_like(large, num_buckets - 1))
    return buckets + torch.where(is_small, distance, large)


def _neg_inf(dtype: torch.dtype) -> float:
    """The additive mask value: the dtype's most negative finite number, as HF's masks (a fully masked row then
    softmaxes to uniform weights instead of NaN)."""
    return torch.finfo(dtype).min


# ---- attention, MLP, sub-layers, block ----


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T + bias) v with no 1/sqrt(D): q (B, H, T, D), k/v (B, H, S, D), bias additive, broadcastable
    to (B, H, T, S) (relative position bias plus the mask). A few queries (decode steps) take two small matmuls;
    more go through SDPA with the bias as its float mask and scale 1."""
    if q.shape[2] <= SMALL_QUERY:
        return ((q @ k.transpose(-1, -2)) + bias).softmax(dim=-1) @ v
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)


class T5Attention(nn.Module):
    """Multi-head attention without biases or score scaling (HF T5Attention). Self-attention projects its keys and
    values from x (through the KV cache when decoding); cross-attention is handed the encoder's, projected once
    by `project_kv`. The first self-attention layer of each stack owns the relative position bias table."""

    def __init__(self, cfg: T5Config, layer_idx: int, relative_bias: bool = False):
        super().__init__()
        self.layer_idx = layer_idx  # the cache's slot for this layer's keys and values
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        inner = cfg.n_heads * cfg.head_dim
        self.q = nn.Linear(cfg.dim, inner, bias=False)
        self.k = nn.Linear(cfg.dim, inner, bias=False)
        self.v = nn.Linear(cfg.dim, inner, bias=False)
        self.o = nn.Linear(inner, cfg.dim, bias=False)
        if relative_bias:
            self.relative_attention_bias = nn.Embedding(cfg.rel_buckets, cfg.n_heads)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, H*D) -> (B, H, T, D), a strided view
        return x.view(*x.shape[:2], self.n_heads, self.head_dim).transpose(1, 2)

    def project_kv(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the encoder states (B, S, C) -> (B, H, S, D) each (cross-attention, once per input)."""
        k, v = linears(memory, self.k, self.v)
        return self._heads(k), self._heads(v)

    def forward(self, x: torch.Tensor, bias: torch.Tensor, cache: Any = None, input_pos: torch.Tensor | None = None,
                kv: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """x (B, T, C) -> (B, T, C). `kv` given: cross-attention over it; else self-attention over x."""
        B, T, _ = x.shape
        if kv is None:
            q, k, v = linears(x, self.q, self.k, self.v)  # one kernel call when decoding on CPU
            k, v = self._heads(k), self._heads(v)  # (B, H, T, D)
            if cache is not None:
                k, v = cache.update(self.layer_idx, input_pos, k, v)  # (B, H, S, D)
        else:
            q, (k, v) = linears(x, self.q)[0], kv
        y = attend(self._heads(q), k, v, bias)  # (B, H, T, D)
        return linears(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim), self.o)[0]


class DenseReluDense(nn.Module):
    """The MLP: wo(act(wi x)), or wo(act(wi_0 x) * wi_1 x) when gated (HF T5DenseActDense / T5DenseGatedActDense)."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.act = FEED_FORWARD[cfg.feed_forward_proj]
        if cfg.gated:
            self.wi_0 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
            self.wi_1 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        else:
            self.wi = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.wo = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, T, C)
        if hasattr(self, "wi"):
            h = self.act(linears(x, self.wi)[0])
        else:
            gate, up = linears(x, self.wi_0, self.wi_1)  # (B, T, F) each
            h = self.act(gate) * up
        return linears(h, self.wo)[0]


class SelfAttentionLayer(nn.Module):
    """x + SelfAttention(layer_norm(x)) (HF T5LayerSelfAttention)."""

    def __init__(self, cfg: T5Config, layer_idx: int):
        super().__init__()
        self.SelfAttention = T5Attention(cfg, layer_idx, relative_bias=layer_idx == 0)
        self.layer_norm = RMSNorm(cfg.dim, eps=cfg.norm_eps)

    def forward(self, x: torch.Tensor, bias: torch.Tensor, cache: Any = None,
                input_pos: torch.Tensor | None = None) -> torch.Tensor:
        return x + self.SelfAttention(self.layer_norm(x), bias, cache, input_pos)


class CrossAttentionLayer(nn.Module):
    """x + EncDecAttention(layer_norm(x)) over the encoder's keys and values (HF T5LayerCrossAttention)."""

    def __init__(self, cfg: T5Config, layer_idx: int):
        super().__init__()
        self.EncDecAttention = T5Attention(cfg, layer_idx)
        self.layer_norm = RMSNorm(cfg.dim, eps=cfg.norm_eps)

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor], bias: torch.Tensor) -> torch.Tensor:
        return x + self.EncDecAttention(self.layer_norm(x), bias, kv=kv)


class FeedForwardLayer(nn.Module):
    """x + DenseReluDense(layer_norm(x)) (HF T5LayerFF)."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.DenseReluDense = DenseReluDense(cfg)
        self.layer_norm = RMSNorm(cfg.dim, eps=cfg.norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.DenseReluDense(self.layer_norm(x))


class Block(nn.Module):
    """Pre-norm sub-layers, each with its own norm: self-attention, cross-attention (decoder only), MLP. Kept in
    HF's `layer` list so `layer.{0,1,2}` names match checkpoints."""

    def __init__(self, cfg: T5Config, layer_idx: int, decoder: bool):
        super().__init__()
        cross = [CrossAttentionLayer(cfg, layer_idx)] if decoder else []
        self.layer = nn.ModuleList([SelfAttentionLayer(cfg, layer_idx), *cross, FeedForwardLayer(cfg)])

    def forward(self, x: torch.Tensor, bias: torch.Tensor, cache: Any = None, input_pos: torch.Tensor | None = None,
                cross: tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """x (B, T, C); bias (B|1, H, T, S) self-attention bias + mask; cross ((k, v), mask) in the decoder."""
        x = self.layer[0](x, bias, cache, input_pos)
        if cross is not None:
            x = self.layer[1](x, *cross)
        return self.layer[-1](x)


class T5Stack(nn.Module):
    """Blocks -> final_layer_norm. The encoder's relative positions are bidirectional, the decoder's causal."""

    def __init__(self, cfg: T5Config, n_layers: int, decoder: bool):
        super().__init__()
        self.cfg, self.decoder = cfg, decoder
        self.block = nn.ModuleList(Block(cfg, i, decoder) for i in range(n_layers))
        self.final_layer_norm = RMSNorm(cfg.dim, eps=cfg.norm_eps)

    def position_bias(self, query_pos: torch.Tensor, key_pos: torch.Tensor) -> torch.Tensor:
        """query_pos (B|1, T), key_pos (S,) -> (B|1, H, T, S) from the first layer's table, shared by every layer
        (HF computes it in block 0 and passes it on)."""
        table = self.block[0].layer[0].SelfAttention.relative_attention_bias
        relative = key_pos[None, None, :] - query_pos[:, :, None]  # (B|1, T, S): memory - context position
        buckets = relative_position_bucket(relative, not self.decoder, self.cfg.rel_buckets, self.cfg.rel_max_distance)
        return table(buckets).permute(0, 3, 1, 2)  # (B|1, T, S, H) -> (B|1, H, T, S)


@dataclass
class CrossAttentionCache:
    """What the decoder needs from the encoder, computed once per input: each decoder layer's cross-attention keys
    and values (B, H, S, D) and the additive padding mask (B, 1, 1, S) of the encoder positions."""

    kv: list[tuple[torch.Tensor, torch.Tensor]]
    mask: torch.Tensor


# ---- the model ----


class T5(nn.Module):
    """shared embedding -> encoder; shared embedding -> decoder (attending to the encoder) -> head."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.shared = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.encoder = T5Stack(cfg, cfg.n_layers, decoder=False)
        self.decoder = T5Stack(cfg, cfg.n_decoder_layers, decoder=True)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.apply(self._init_weights)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share the embedding with the output head when cfg.tie_embeddings (original T5)."""
        if self.cfg.tie_embeddings:
            self.lm_head.weight = self.shared.weight

    def _init_weights(self, module: nn.Module) -> None:
        """HF `T5PreTrainedModel._init_weights` (Mesh TF's): the embedding N(0, 1); every projection N(0, 1/fan_in),
        except q, which also carries the 1/sqrt(head_dim) that the scores never get; norms 1. An untied head is
        N(0, 1/dim) as Mesh TF's `dense` default (HF draws N(0, 1), which starts an untied model at a loss of ~25)."""
        cfg = self.cfg
        if isinstance(module, T5Attention):
            nn.init.normal_(module.q.weight, std=(cfg.dim * cfg.head_dim) ** -0.5)
            for lin in (module.k, module.v):
                nn.init.normal_(lin.weight, std=cfg.dim**-0.5)
            nn.init.normal_(module.o.weight, std=(cfg.n_heads * cfg.head_dim) ** -0.5)
            if hasattr(module, "relative_attention_bias"):
                nn.init.normal_(module.relative_attention_bias.weight, std=cfg.dim**-0.5)
        elif isinstance(module, DenseReluDense):
            for name in ("wi", "wi_0", "wi_1"):
                if hasattr(module, name):
                    nn.init.normal_(getattr(module, name).weight, std=cfg.dim**-0.5)
            nn.init.normal_(module.wo.weight, std=cfg.ffn_dim**-0.5)
        elif module is self:
            nn.init.normal_(self.shared.weight, std=1.0)
            nn.init.normal_(self.lm_head.weight, std=cfg.dim**-0.5)

    # ---- the three steps: encode, cross-attention cache, decode ----

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B, S) -> encoder states (B, S, C). attention_mask (B, S): 1/True for real tokens, 0 for
        padding (either side: positions are relative, so a row's real tokens compute what they would alone)."""
        _check_ids("input_ids", input_ids)
        B, S = input_ids.shape
        x = self.shared(input_ids)  # (B, S, C)
        pos = torch.arange(S, device=input_ids.device)
        bias = self.encoder.position_bias(pos[None], pos)  # (1, H, S, S)
        if attention_mask is not None:
            bias = bias + self._key_mask(attention_mask, input_ids, x.dtype)  # (B, H, S, S)
        for block in self.encoder.block:
            x = block(x, bias)
        return self.encoder.final_layer_norm(x)

    def cross_attention_cache(self, hidden: torch.Tensor,
                              attention_mask: torch.Tensor | None = None) -> CrossAttentionCache:
        """Every decoder layer's cross-attention keys and values of the encoder states hidden (B, S, C), and the
        padding mask: computed once, then read by every decode step."""
        if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3 or hidden.shape[-1] != self.cfg.dim:
            got = tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else type(hidden).__name__
            raise LmforgeError(f"encoder states must be (B, S, {self.cfg.dim}), got {got}")
        B, S, _ = hidden.shape
        if attention_mask is None:
            mask = hidden.new_zeros(B, 1, 1, S)
        else:
            mask = self._key_mask(attention_mask, hidden[..., 0], hidden.dtype)
        kv = [block.layer[1].EncDecAttention.project_kv(hidden) for block in self.decoder.block]
        return CrossAttentionCache(kv, mask)

    def decode(self, decoder_input_ids: torch.Tensor, memory: CrossAttentionCache,
               input_pos: torch.Tensor | None = None, cache: Any = None) -> torch.Tensor:
        """decoder_input_ids (B, T) -> logits (B, T, V) float32, attending causally to themselves and to `memory`.

        Without a cache the T tokens are positions 0..T-1 (input_pos is ignored). With one (docs/internals.md,
        the KV-cache hook; a KVCache of (n_decoder_layers, n_heads, head_dim)), input_pos (B, T) gives each
        token's position.
        """
        return self._logits(self._decoder_states(decoder_input_ids, memory, input_pos, cache))

    def _decoder_states(self, ids: torch.Tensor, memory: CrossAttentionCache, input_pos: torch.Tensor | None,
                        cache: Any) -> torch.Tensor:
        _check_ids("decoder_input_ids", ids)
        B, T = ids.shape
        if memory.mask.shape[0] != B:
            raise LmforgeError(f"decoder_input_ids has batch {B} but the encoder output has {memory.mask.shape[0]}")
        x = self.shared(ids)  # (B, T, C)
        if cache is not None:
            if input_pos is None or input_pos.shape != ids.shape:
                raise LmforgeError(f"a KV cache needs input_pos shaped like decoder_input_ids {tuple(ids.shape)}")
            allowed = cache.attn_mask(input_pos)  # (B, 1, T, S) bool, once per forward
            keys = torch.arange(allowed.shape[-1], device=ids.device)
            bias = self.decoder.position_bias(input_pos.clamp(min=0), keys)  # (B, H, T, S)
            bias = bias.masked_fill(~allowed, _neg_inf(x.dtype))
        else:  # positions 0..T-1: a whole sequence, as in training
            pos = torch.arange(T, device=ids.device)
            causal = torch.ones(T, T, dtype=torch.bool, device=ids.device).triu(1)  # True = a future key
            bias = self.decoder.position_bias(pos[None], pos).masked_fill(causal, _neg_inf(x.dtype))  # (1, H, T, T)
        for block, kv in zip(self.decoder.block, memory.kv):
            x = block(x, bias, cache, input_pos, (kv, memory.mask))
        return self.decoder.final_layer_norm(x)

    def forward(self, input_ids: torch.Tensor, decoder_input_ids: torch.Tensor | None = None, *,
                attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                ignore_index: int = -100) -> torch.Tensor:
        """input_ids (B, S), decoder_input_ids (B, T) -> logits (B, T, V) float32; with labels (B, T) the mean
        cross-entropy over labels != ignore_index instead (fused head + loss, the logits never formed). Without
        decoder_input_ids they are the labels shifted right behind decoder_start_token_id (HF `_shift_right`)."""
        if decoder_input_ids is None:
            if labels is None:
                raise LmforgeError("T5.forward needs decoder_input_ids or labels")
            decoder_input_ids = self.shift_right(labels)
        hidden = self.encode(input_ids, attention_mask)
        x = self._decoder_states(decoder_input_ids, self.cross_attention_cache(hidden, attention_mask), None, None)
        if labels is None:
            return self._logits(x)
        _check_ids("labels", labels)
        if labels.shape != decoder_input_ids.shape:
            raise LmforgeError(f"labels must be an integer tensor shaped like decoder_input_ids "
                               f"{tuple(decoder_input_ids.shape)}, got {tuple(labels.shape)}")
        x = self._scale(x)
        head = self.lm_head
        if type(head) is nn.Linear and head.bias is None:
            return linear_cross_entropy(x, head.weight, labels, ignore_index=ignore_index)
        logits = head(x).float()  # a swapped head (LoRA, quantized) makes its own logits
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=ignore_index)

    def shift_right(self, labels: torch.Tensor) -> torch.Tensor:
        """Teacher-forcing decoder input: decoder_start_token_id, then labels[:, :-1] with -100 read as padding."""
        _check_ids("labels", labels)
        shifted = labels.new_full(labels.shape, self.cfg.decoder_start_token_id)
        shifted[:, 1:] = labels[:, :-1]
        return shifted.masked_fill(shifted < 0, self.cfg.pad_token_id)

    def _scale(self, x: torch.Tensor) -> torch.Tensor:
        # Mesh TF rescales before a tied softmax so the embedding's N(0, 1) scale suits both ends (HF does the same)
        return x * self.cfg.dim**-0.5 if self.cfg.rescale_head else x

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return linears(self._scale(x), self.lm_head)[0].float()  # (B, T, V)

    @staticmethod
    def _key_mask(attention_mask: torch.Tensor, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """attention_mask (B, S) of 1/0 or bool -> additive (B, 1, 1, S): 0 on real keys, dtype-min on padding."""
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != ids.shape:
            got = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask)
            raise LmforgeError(f"attention_mask must be shaped like input_ids {tuple(ids.shape)}, got {got}")
        real = attention_mask.to(torch.bool)[:, None, None, :]
        return torch.zeros(real.shape, dtype=dtype, device=ids.device).masked_fill(~real, _neg_inf(dtype))


def _check_ids(name: str, ids: Any) -> None:
    """Token ids must be an integer (B, T) tensor with T >= 1."""
    if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int64, torch.int32):
        got = ids.dtype if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise LmforgeError(f"T5 expects {name} as an int64 tensor (B, T), got {got}")
    if ids.dim() != 2 or ids.shape[1] == 0:
        raise LmforgeError(f"T5 expects {name} of shape (B, T) with T >= 1, got {tuple(ids.shape)}")
