"""The BERT encoder: embeddings -> n post-norm bidirectional blocks -> token states, plus its two heads.

    cfg = BertConfig(vocab_size=30522, dim=384, n_layers=6, n_heads=12)      # all-MiniLM-L6-v2's shape
    model = Bert(cfg)
    hidden = model(idx, attention_mask)                 # (B, T) int64 -> (B, T, C) token states
    vectors = model.embed(idx, attention_mask)          # (B, C) sentence embeddings: masked mean, L2-normalized
    logits = Bert(cfg, mlm_head=True).mlm_logits(idx, attention_mask)    # (B, T, V) masked-LM logits

Computes what HF `BertModel` / `BertForMaskedLM` compute (Devlin et al. 2019; transformers'
`models/bert/modeling_bert.py`): learned absolute positions, token-type (segment) embeddings, LayerNorm after
each residual add (post-norm, as in Vaswani et al. 2017), exact erf GELU, biases everywhere, and an MLM head
whose decoder is the word-embedding matrix. Attention is bidirectional; padding keys are masked out.

Module names follow the math, not HF's TF-era scopes (`attention.self.query`, `attention.output.LayerNorm`,
`intermediate.dense`, ...): the table that maps the two lives in lmforge/checkpoint/bert.py.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.common import LmforgeError

POOLING_MODES = ("mean", "cls")


@dataclass
class BertConfig:
    """Shape and numerics of a BERT-family encoder (BERT, MiniLM, bge/e5-style sentence encoders)."""

    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    ffn_dim: int | None = None  # None -> 4 * dim, BERT's rule
    max_seq_len: int = 512  # max_position_embeddings: the length of the learned position table
    type_vocab_size: int = 2  # segments A and B of a sentence pair
    norm_eps: float = 1e-12
    dropout: float = 0.1  # HF hidden_dropout_prob: embeddings and every residual branch
    attn_dropout: float = 0.1  # HF attention_probs_dropout_prob
    pad_token_id: int | None = 0

    def __post_init__(self) -> None:
        if self.ffn_dim is None and isinstance(self.dim, int):
            self.ffn_dim = 4 * self.dim
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def validate(self) -> None:
        """Raise LmforgeError naming the first inconsistent field (so a bad config fails before allocation)."""
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "ffn_dim", "max_seq_len", "type_vocab_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise LmforgeError(f"BertConfig.{name} must be a positive integer, got {value!r}")
        if not isinstance(self.norm_eps, (int, float)) or isinstance(self.norm_eps, bool) or not self.norm_eps > 0:
            raise LmforgeError(f"BertConfig.norm_eps must be a positive number, got {self.norm_eps!r}")
        for name in ("dropout", "attn_dropout"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < 1:
                raise LmforgeError(f"BertConfig.{name} must be in [0, 1), got {value!r}")
        if self.dim % self.n_heads:
            raise LmforgeError(f"BertConfig: dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
        pad = self.pad_token_id
        if pad is not None and (not isinstance(pad, int) or isinstance(pad, bool) or not 0 <= pad < self.vocab_size):
            raise LmforgeError(f"BertConfig.pad_token_id must be None or an id below vocab_size, got {pad!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # ---- Hugging Face config.json ----

    def to_hf(self, dtype: str = "float32", architecture: str = "BertModel") -> dict[str, Any]:
        """HF `config.json` (model_type "bert"); `architecture` is BertModel or BertForMaskedLM."""
        return {
            "architectures": [architecture],
            "model_type": "bert",
            "vocab_size": self.vocab_size,
            "hidden_size": self.dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "intermediate_size": self.ffn_dim,
            "hidden_act": "gelu",
            "max_position_embeddings": self.max_seq_len,
            "type_vocab_size": self.type_vocab_size,
            "layer_norm_eps": self.norm_eps,
            "hidden_dropout_prob": self.dropout,
            "attention_probs_dropout_prob": self.attn_dropout,
            "pad_token_id": self.pad_token_id,
            "position_embedding_type": "absolute",
            "tie_word_embeddings": True,
            "initializer_range": 0.02,
            "dtype": dtype,  # v5 name
            "torch_dtype": dtype,  # v4 name
        }

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> BertConfig:
        """Read an HF BERT `config.json` dict; a feature this model does not implement is an error, not a guess."""
        if not isinstance(d, dict):
            raise LmforgeError(f"config.json must hold a JSON object, got {type(d).__name__}")
        if d.get("model_type") != "bert":
            raise LmforgeError(f"config.json has model_type {d.get('model_type')!r}; the BERT encoder reads 'bert'")
        only = {"hidden_act": "gelu", "position_embedding_type": "absolute", "tie_word_embeddings": True,
                "is_decoder": False, "add_cross_attention": False}  # key -> the one value (and default) we model
        for key, wanted in only.items():
            if d.get(key, wanted) != wanted:
                raise LmforgeError(f"config.json: {key}={d[key]!r} is not supported (only {wanted!r})")
        try:
            fields = dict(vocab_size=d["vocab_size"], dim=d["hidden_size"], n_layers=d["num_hidden_layers"],
                          n_heads=d["num_attention_heads"], ffn_dim=d["intermediate_size"])
        except KeyError as e:
            raise LmforgeError(f"config.json (bert) is missing {e.args[0]!r}") from None
        return cls(**fields, max_seq_len=d.get("max_position_embeddings", 512),
                   type_vocab_size=d.get("type_vocab_size", 2), norm_eps=d.get("layer_norm_eps", 1e-12),
                   dropout=d.get("hidden_dropout_prob", 0.1), attn_dropout=d.get("attention_probs_dropout_prob", 0.1),
                   pad_token_id=d.get("pad_token_id", 0))


# ---- attention and block ----


class SelfAttention(nn.Module):
    """Bidirectional multi-head attention with biases: every query sees every real (unpadded) key."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.n_heads, self.head_dim, self.attn_dropout = cfg.n_heads, cfg.head_dim, cfg.attn_dropout
        self.query = nn.Linear(cfg.dim, cfg.dim)
        self.key = nn.Linear(cfg.dim, cfg.dim)
        self.value = nn.Linear(cfg.dim, cfg.dim)
        self.proj = nn.Linear(cfg.dim, cfg.dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """x (B, T, C); mask (B, 1, 1, T) bool, True = a real key (None = no padding) -> (B, T, C)."""
        B, T, C = x.shape
        q, k, v = (lin(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
                   for lin in (self.query, self.key, self.value))
        p = self.attn_dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)  # (B, H, T, D)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class Block(nn.Module):
    """Post-norm transformer layer (BERT): x = LN(x + attn(x)), then x = LN(x + mlp(x))."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.attn = SelfAttention(cfg)
        self.attn_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.fc = nn.Linear(cfg.dim, cfg.ffn_dim)
        self.proj = nn.Linear(cfg.ffn_dim, cfg.dim)
        self.mlp_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:  # (B, T, C) -> (B, T, C)
        x = self.attn_norm(x + self.drop(self.attn(x, mask)))
        return self.mlp_norm(x + self.drop(self.proj(F.gelu(self.fc(x)))))  # exact (erf) GELU, as HF "gelu"


class MLMHead(nn.Module):
    """Masked-LM head: dense -> GELU -> LayerNorm, then the (tied) word-embedding matrix plus a bias."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.dim, cfg.dim)
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, x: torch.Tensor, decoder_weight: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, T, V)
        return F.linear(self.norm(F.gelu(self.dense(x))), decoder_weight, self.bias)


# ---- the model ----


class Bert(nn.Module):
    """BERT encoder; `mlm_head` adds the masked-LM head, `pooler` HF's tanh(dense(h_CLS)) pooler (both as the
    checkpoint holds them: the loader builds whatever heads it finds, so saving loses nothing)."""

    def __init__(self, cfg: BertConfig, mlm_head: bool = False, pooler: bool = False):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.dim, padding_idx=cfg.pad_token_id)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.dim)
        self.type_emb = nn.Embedding(cfg.type_vocab_size, cfg.dim)
        self.emb_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.pooler = nn.Linear(cfg.dim, cfg.dim) if pooler else None
        self.mlm = MLMHead(cfg) if mlm_head else None
        if not self.tok_emb.weight.is_meta:  # a loader builds on the meta device and assigns every tensor
            self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        """BERT's init (HF `BertPreTrainedModel._init_weights`): N(0, 0.02) weights, zero biases, the padding row
        of the embedding zeroed, LayerNorm at identity (nn.LayerNorm's own init)."""
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()

    def forward(self, idx: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """idx (B, T) int64 -> token states (B, T, C). attention_mask (B, T): 1 = real token, 0 = padding (rows
        padded on the right, as BERT tokenizers do: positions count from 0 at the first token).
        token_type_ids (B, T): segment of each token (default all 0)."""
        B, T = idx.shape
        if T > self.cfg.max_seq_len:
            raise LmforgeError(f"sequence of {T} tokens exceeds the model's {self.cfg.max_seq_len} positions")
        types = torch.zeros_like(idx) if token_type_ids is None else token_type_ids
        pos = torch.arange(T, device=idx.device)  # (T,)
        x = self.tok_emb(idx) + self.type_emb(types) + self.pos_emb(pos)  # (B, T, C)
        x = self.drop(self.emb_norm(x))
        mask = None if attention_mask is None else key_mask(attention_mask)
        for block in self.layers:
            x = block(x, mask)
        return x

    def mlm_logits(self, idx: torch.Tensor, attention_mask: torch.Tensor | None = None,
                   token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Masked-LM logits (B, T, V) for every position (the model must have been built with mlm_head=True)."""
        if self.mlm is None:
            raise LmforgeError("this Bert has no masked-LM head (build it with mlm_head=True)")
        return self.mlm(self(idx, attention_mask, token_type_ids), self.tok_emb.weight)

    def pooled_output(self, hidden: torch.Tensor) -> torch.Tensor:
        """HF's `pooler_output`: tanh(dense(h_CLS)), (B, T, C) -> (B, C); trained for next-sentence prediction,
        so a poor sentence embedding on its own (use `embed`)."""
        if self.pooler is None:
            raise LmforgeError("this Bert has no pooler (its checkpoint held no pooler.dense weights)")
        return torch.tanh(self.pooler(hidden[:, 0]))

    def embed(self, idx: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None,
              pooling: str = "mean", normalize: bool = True) -> torch.Tensor:
        """Sentence embeddings (B, C): the token states pooled (see `pool`), unit length when `normalize`."""
        return pool(self(idx, attention_mask, token_type_ids), attention_mask, pooling, normalize)


def key_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) 0/1 padding mask -> (B, 1, 1, T) bool for SDPA: every query may see every real key. A row with no
    real token at all attends everywhere instead of nowhere (softmax over nothing is NaN)."""
    mask = attention_mask.bool()
    mask = mask | ~mask.any(dim=-1, keepdim=True)
    return mask[:, None, None, :]


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, mode: str = "mean",
         normalize: bool = True) -> torch.Tensor:
    """Token states (B, T, C) -> one vector per row (B, C), as sentence-transformers' Pooling + Normalize.

    "mean": the average of the real tokens' states, [CLS] and [SEP] included (Reimers & Gurevych 2019 found it
    beats [CLS] for sentence similarity); "cls": the first token's state. `normalize` scales to unit L2 norm, so
    a dot product is the cosine.
    """
    if mode == "mean":
        m = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
        vec = (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)  # clamp as sentence-transformers: no 0/0
    elif mode == "cls":
        vec = hidden[:, 0]
    else:
        raise LmforgeError(f"unknown pooling mode {mode!r}; choose one of {', '.join(POOLING_MODES)}")
    return F.normalize(vec, p=2, dim=-1) if normalize else vec
