"""`lmforge convert`: turn a GGUF file or a Hugging Face Llama directory into an lmforge run directory.

    lmforge convert --from SmolLM2-135M-Instruct.Q4_1.gguf --out runs/smollm2
    lmforge convert --from hf_llama_dir --out runs/llama --dtype bfloat16

    from lmforge.checkpoint.convert import convert
    convert("model.gguf", "runs/model")            # -> Path("runs/model")

A GGUF (`general.architecture == "llama"`) becomes an HF Llama checkpoint:
- config.json from the `llama.*` metadata; weights dequantized to float32 (bfloat16 on request);
- tensor names mapped to HF's (`blk.N.attn_q.weight` -> `model.layers.N.self_attn.q_proj.weight`, ...); the
  head is tied when the file has no `output.weight`;
- q/k rows put back in HF order: llama.cpp's converter interleaves each head's two rotary halves (its RoPE
  rotates adjacent pairs, HF's `rotate_half` rotates halves), and we undo that exactly as transformers'
  GGUF loader does (`LlamaTensorProcessor._reverse_permute_weights`);
- the byte-level BPE tokenizer (`tokenizer.ggml.model == "gpt2"`) as tokenizer.json + tokenizer_config.json,
  the chat template as chat_template.jinja (and in tokenizer_config.json, where transformers v4 reads it).
An HF directory is loaded with the run loader and saved again, tokenizer files carried across.

Everything is written into a temporary directory beside `--out`, which is renamed into place only when
complete: an interrupted convert leaves no half-written run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import sys
import tempfile
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from lmforge.checkpoint.gguf import GGUFFile, read_gguf
from lmforge.checkpoint.hf import LM_HEAD
from lmforge.checkpoint.run import CONFIG, llama_from_hf_tensors, load_run, save_run
from lmforge.common import LmforgeError, atomic_write_text, read_text_file
from lmforge.model.config import LlamaConfig
from lmforge.model.decoder import Llama
from lmforge.tokenizer import BPETokenizer, pretokenize, tokenizer_from_json
from lmforge.tokenizer.formats import bytes_to_unicode, unicode_to_bytes

SUPPORTED_ARCHITECTURES = ("llama",)
SUPPORTED_TOKENIZERS = ("gpt2",)  # llama.cpp's name for byte-level BPE
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
CHAT_TEMPLATE = "chat_template.jinja"
# Files of an HF directory that are not weights or config and that a run directory keeps as they are.
CARRIED_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                 CHAT_TEMPLATE, "chat_template.json", "generation_config.json", "vocab.json", "merges.txt",
                 "tokenizer.model")

# ---- GGUF metadata -> LlamaConfig ----

# llama.cpp's Llama 3.1-style RoPE scaling is not in the metadata: its converter stores the per-frequency
# factors it computed as a `rope_freqs.weight` tensor. We recognise the published settings by recomputing
# those factors (convert_hf_to_gguf.py `LlamaModel.generate_extra_tensors`).
KNOWN_LLAMA3_ROPE = (
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 8192},  # Llama 3.1
    {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 8192},  # Llama 3.2
)


def _float32_decimal(x: float) -> float:
    """The shortest decimal that is the same float32 (9.999999747378752e-06 -> 1e-05): GGUF stores float32."""
    return float(str(np.float32(x)))


def _meta_int(g: GGUFFile, key: str, default: int | None = None) -> int:
    """An integer metadata value; a per-layer list (some files write head counts so) must be uniform."""
    value = g.metadata.get(key, default)
    if isinstance(value, list) and value and all(v == value[0] for v in value):
        value = value[0]
    if value is None:
        raise LmforgeError(f"{g.path}: metadata key {key!r} is missing")
    if isinstance(value, bool) or not isinstance(value, int):
        raise LmforgeError(f"{g.path}: metadata key {key!r} must be one integer, got {str(value)[:80]}")
    return value


def _meta_float(g: GGUFFile, key: str, default: float) -> float:
    value = g.metadata.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise LmforgeError(f"{g.path}: metadata key {key!r} must be a number, got {str(value)[:80]}")
    return _float32_decimal(value)


def check_architecture(g: GGUFFile) -> str:
    arch = g.metadata.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise LmforgeError(f"{g.path}: GGUF architecture {arch!r} is not supported; lmforge converts "
                           f"{', '.join(SUPPORTED_ARCHITECTURES)}")
    if g.metadata.get(f"{arch}.expert_count", 0):
        raise LmforgeError(f"{g.path}: mixture-of-experts {arch} GGUFs are not supported (dense Llama only)")
    return arch


def config_from_gguf(g: GGUFFile) -> LlamaConfig:
    """LlamaConfig from a llama GGUF's metadata (names as in transformers' GGUF_CONFIG_MAPPING["llama"])."""
    a = check_architecture(g)
    dim, n_heads = _meta_int(g, f"{a}.embedding_length"), _meta_int(g, f"{a}.attention.head_count")
    head_dim = dim // n_heads if n_heads else 0
    for key in (f"{a}.rope.dimension_count", f"{a}.attention.key_length", f"{a}.attention.value_length"):
        if key in g.metadata and _meta_int(g, key) != head_dim:
            raise LmforgeError(f"{g.path}: {key}={g.metadata[key]} but embedding_length/head_count={head_dim}; "
                               f"partial rotary or a decoupled head size is not supported")
    scaling_type = g.metadata.get(f"{a}.rope.scaling.type", "none")
    if scaling_type != "none":
        raise LmforgeError(f"{g.path}: RoPE scaling {scaling_type!r} is not supported (plain RoPE, or Llama 3 "
                           f"scaling via rope_freqs)")
    embedding = g.tensors.get("token_embd.weight")
    vocab_size = g.metadata.get(f"{a}.vocab_size") or len(g.metadata.get("tokenizer.ggml.tokens") or []) or (
        embedding.shape[0] if embedding is not None else 0)
    if embedding is not None and embedding.shape[0] != vocab_size:
        raise LmforgeError(f"{g.path}: token_embd.weight has {embedding.shape[0]} rows but the vocabulary has "
                           f"{vocab_size} tokens")
    rope_theta = _meta_float(g, f"{a}.rope.freq_base", 10000.0)
    fields = dict(
        vocab_size=vocab_size, dim=dim, n_layers=_meta_int(g, f"{a}.block_count"), n_heads=n_heads,
        n_kv_heads=_meta_int(g, f"{a}.attention.head_count_kv", n_heads),
        ffn_dim=_meta_int(g, f"{a}.feed_forward_length"), max_seq_len=_meta_int(g, f"{a}.context_length", 2048),
        rope_theta=rope_theta, rope_scaling=_rope_scaling(g, rope_theta, head_dim),
        norm_eps=_meta_float(g, f"{a}.attention.layer_norm_rms_epsilon", 1e-5),
        tie_embeddings="output.weight" not in g.tensors, eos_token_id=g.metadata.get("tokenizer.ggml.eos_token_id"),
        # textgen prepends bos_token_id to every prompt, so it is set only where the file asks for a BOS
        bos_token_id=g.metadata.get("tokenizer.ggml.bos_token_id") if _adds_bos(g) else None)
    try:
        return LlamaConfig(**fields)
    except LmforgeError as e:  # an inconsistent shape, say: name the file
        raise LmforgeError(f"{g.path}: {e}") from None


def _rope_scaling(g: GGUFFile, theta: float, head_dim: int) -> dict[str, Any] | None:
    """None for plain RoPE; a known Llama 3 scaling dict when `rope_freqs.weight` matches one exactly."""
    if "rope_freqs.weight" not in g.tensors:
        return None
    stored = g.tensor("rope_freqs.weight").reshape(-1)
    if torch.all(stored == 1):  # factors of one: plain RoPE
        return None
    for scaling in KNOWN_LLAMA3_ROPE:
        expected = llama3_rope_factors(scaling, theta, head_dim)
        if expected.shape == stored.shape and torch.allclose(expected, stored, rtol=1e-5, atol=0):
            return dict(scaling)
    raise LmforgeError(f"{g.path}: rope_freqs.weight matches no known Llama 3 RoPE scaling "
                       f"(factors {stored[:3].tolist()} ... {stored[-3:].tolist()})")


def llama3_rope_factors(scaling: dict[str, Any], theta: float, head_dim: int) -> torch.Tensor:
    """The per-frequency divisors llama.cpp stores as rope_freqs.weight for a Llama 3 `rope_scaling` dict."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_ctx = scaling["original_max_position_embeddings"]
    out = []
    for freq in freqs.tolist():
        wavelen = 2 * torch.pi / freq
        if wavelen < old_ctx / high:
            out.append(1.0)
        elif wavelen > old_ctx / low:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32)


def _adds_bos(g: GGUFFile) -> bool:
    """Whether prompts get a BOS: the file's flag, else llama.cpp's default for its pre-tokenizer."""
    flag = g.metadata.get("tokenizer.ggml.add_bos_token")
    if flag is not None:
        return bool(flag)
    return PRE_TOKENIZERS.get(g.metadata.get("tokenizer.ggml.pre"), (None, False, False))[2]


# ---- GGUF tensors -> HF tensors ----

GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                "output.weight": LM_HEAD}
LAYER_NAMES = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
               "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
               "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
               "ffn_down": "mlp.down_proj"}
DERIVED = ("rope_freqs.weight",)  # read into the config, not a weight
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.weight")


def hf_tensor_name(gguf_name: str) -> str | None:
    """HF name of a llama GGUF tensor (None for one we do not know)."""
    if gguf_name in GLOBAL_NAMES:
        return GLOBAL_NAMES[gguf_name]
    m = _LAYER_TENSOR.fullmatch(gguf_name)
    if m and m.group(2) in LAYER_NAMES:
        return f"model.layers.{int(m.group(1))}.{LAYER_NAMES[m.group(2)]}.weight"
    return None


def unpermute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation (convert_hf_to_gguf.py `LlamaModel.permute`).

    llama.cpp turns each head's rows [first half; second half] into interleaved pairs (row 2i = first[i],
    row 2i+1 = second[i]) because its RoPE rotates adjacent elements; HF's rotate_half needs halves back.
    Same as transformers' `LlamaTensorProcessor._reverse_permute_weights`.
    """
    out_dim, in_dim = w.shape
    return w.reshape(n_heads, out_dim // n_heads // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def hf_tensors_from_gguf(g: GGUFFile, cfg: LlamaConfig, dtype: torch.dtype = torch.float32,
                         progress: bool | None = None) -> dict[str, torch.Tensor]:
    """Every weight of a llama GGUF, dequantized, q/k unpermuted, cast to `dtype`, under its HF name."""
    unknown = [n for n in g.tensors if hf_tensor_name(n) is None and n not in DERIVED]
    if unknown:
        raise LmforgeError(f"{g.path}: {len(unknown)} tensor(s) a dense Llama does not have (biases, experts, ...): "
                           f"{', '.join(unknown[:4])}")
    out: dict[str, torch.Tensor] = {}
    names = [n for n in g.tensors if n not in DERIVED]
    for name in tqdm(names, desc="dequantizing", unit="tensor", disable=_no_bar(progress)):
        w = g.tensor(name)
        if name.endswith((".attn_q.weight", ".attn_k.weight")):
            heads = cfg.n_heads if ".attn_q." in name else cfg.n_kv_heads
            if w.ndim != 2 or w.shape[0] % (2 * heads):
                raise LmforgeError(f"{g.path}: tensor {name!r} of shape {tuple(w.shape)} does not split into "
                                   f"{heads} heads")
            w = unpermute_qk(w, heads)
        out[hf_tensor_name(name)] = w.to(dtype)
    return out


def model_from_hf_tensors(cfg: LlamaConfig, tensors: dict[str, torch.Tensor], where: str) -> Llama:
    """A Llama holding `tensors` (HF names), after checking every name and shape against `cfg`."""
    return llama_from_hf_tensors(cfg, tensors, where)


# ---- GGUF tokenizer -> tokenizer.json ----

# GPT-2's split with every digit on its own, equal to HF's Sequence[Digits(individual), ByteLevel] (and to
# llama.cpp's two-pass "\p{N}" then GPT-2): whitespace before a digit ends a piece as it would at the end of text.
DIGITS_GPT2_PATTERN = (r"""\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?=\p{N})|\s+(?!\S)"""
                       r"""|\s+""")
QWEN2_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                 r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
# tokenizer.ggml.pre -> (split pattern, ignore_merges, adds BOS by default), as llama.cpp's llama-vocab.cpp.
PRE_TOKENIZERS: dict[str | None, tuple[str, bool, bool]] = {
    **dict.fromkeys(("gpt-2", "phi-2", "roberta-bpe", "mpt", "olmo", "jais"), (pretokenize.GPT2_PATTERN, False,
                                                                                False)),
    **dict.fromkeys(("starcoder", "refact", "smollm", "codeshell", "command-r", "exaone", "minerva-7b"),
                    (DIGITS_GPT2_PATTERN, False, False)),
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3"), (pretokenize.GPT4_PATTERN, True, True)),
    **dict.fromkeys(("dbrx", "smaug-bpe"), (pretokenize.GPT4_PATTERN, False, False)),
    **dict.fromkeys(("qwen2", "megrez", "stablelm2", "deepseek-r1-qwen"), (QWEN2_PATTERN, False, False)),
    **dict.fromkeys(("gpt-4o", "llama4"), (pretokenize.O200K_PATTERN, False, False)),
    None: (pretokenize.GPT2_PATTERN, False, False),  # no pre-tokenizer named: ByteLevel's GPT-2 split, as transformers
}
CONTROL, USER_DEFINED = 3, 4  # llama_token_type values that are added tokens, not BPE pieces


def tokenizer_json_from_gguf(g: GGUFFile) -> dict[str, Any]:
    """The HF tokenizer.json document of a GGUF's byte-level BPE tokenizer (`tokenizer.ggml.*` metadata).

    Tokens are stored in GPT-2's printable byte spelling, merges as "left right" in the same spelling, so both
    go into tokenizer.json as they are. Control and user-defined tokens become added tokens (matched whole,
    never merged into), listed in the vocab as well (as HF's own files do). The layout is otherwise
    `lmforge.tokenizer.formats.tokenizer_json`'s, so lmforge reads it back.
    """
    model = g.metadata.get("tokenizer.ggml.model")
    if model not in SUPPORTED_TOKENIZERS:
        raise LmforgeError(f"{g.path}: tokenizer model {model!r} is not supported; lmforge converts "
                           f"byte-level BPE ('gpt2') tokenizers only")
    pre = g.metadata.get("tokenizer.ggml.pre")
    if pre not in PRE_TOKENIZERS:
        known = sorted(k for k in PRE_TOKENIZERS if k)
        raise LmforgeError(f"{g.path}: pre-tokenizer {pre!r} is not supported; known: {', '.join(known)}")
    pattern, ignore_merges, _ = PRE_TOKENIZERS[pre]
    spelled = _string_list(g, "tokenizer.ggml.tokens")
    types = g.metadata.get("tokenizer.ggml.token_type") or [1] * len(spelled)
    if len(types) != len(spelled):
        raise LmforgeError(f"{g.path}: {len(types)} token types for {len(spelled)} tokens")
    alphabet = unicode_to_bytes()
    vocab: dict[str, int] = {}
    added = []
    for i, (text, kind) in enumerate(zip(spelled, types)):
        if kind in (CONTROL, USER_DEFINED):
            # in the vocab too: HF `tokenizers` gives an added token missing from the vocab a new id past its end
            added.append({"id": i, "content": text, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": kind == CONTROL})
        elif not all(c in alphabet for c in text):  # not in the byte spelling: its UTF-8 bytes, as transformers
            text = "".join(bytes_to_unicode()[b] for b in text.encode("utf-8"))
        if text in vocab or not text:
            raise LmforgeError(f"{g.path}: token {i} ({text!r}) is empty or repeats token {vocab.get(text)}")
        vocab[text] = i
    merges = _string_list(g, "tokenizer.ggml.merges")
    for k, m in enumerate(merges):
        left, sep, right = m.partition(" ")
        if not sep or left not in vocab or right not in vocab:
            raise LmforgeError(f"{g.path}: merge {k} ({m!r}) names a token missing from the vocabulary")
    prefix_space = bool(g.metadata.get("tokenizer.ggml.add_space_prefix", False))
    byte_level = {"type": "ByteLevel", "add_prefix_space": prefix_space, "trim_offsets": True, "use_regex": True}
    if pattern == pretokenize.GPT2_PATTERN:  # ByteLevel's built-in split
        pre_tokenizer = byte_level
    else:
        pre_tokenizer = {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False},
            {**byte_level, "use_regex": False}]}
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": _post_processor(g, vocab, spelled),
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": ignore_merges, "vocab": vocab, "merges": merges},
    }


def _post_processor(g: GGUFFile, ids: dict[str, int], spelled: list[str]) -> dict[str, Any]:
    """ByteLevel offsets, plus a TemplateProcessing adding BOS/EOS when the file says llama.cpp adds them."""
    byte_level = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True}
    before = [spelled[_token_id(g, "bos_token_id", len(spelled))]] if _adds_bos(g) else []
    after = [spelled[_token_id(g, "eos_token_id", len(spelled))]] if _adds_eos(g) else []
    if not before and not after:
        return byte_level

    def seq(name: str, type_id: int) -> list[dict[str, Any]]:
        return ([{"SpecialToken": {"id": t, "type_id": type_id}} for t in before]
                + [{"Sequence": {"id": name, "type_id": type_id}}]
                + [{"SpecialToken": {"id": t, "type_id": type_id}} for t in after])

    specials = {t: {"id": t, "ids": [ids[t]], "tokens": [t]} for t in before + after}
    template = {"type": "TemplateProcessing", "single": seq("A", 0), "pair": seq("A", 0) + seq("B", 1),
                "special_tokens": specials}
    return {"type": "Sequence", "processors": [byte_level, template]}


def _token_id(g: GGUFFile, key: str, n_tokens: int) -> int:
    i = g.metadata.get(f"tokenizer.ggml.{key}")
    if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n_tokens:
        raise LmforgeError(f"{g.path}: tokenizer.ggml.{key}={i!r} is not a token id (vocabulary of {n_tokens})")
    return i


def _adds_eos(g: GGUFFile) -> bool:
    return bool(g.metadata.get("tokenizer.ggml.add_eos_token", False))


def _string_list(g: GGUFFile, key: str) -> list[str]:
    value = g.metadata.get(key)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise LmforgeError(f"{g.path}: metadata key {key!r} must be an array of strings")
    return value


def tokenizer_from_gguf(g: GGUFFile) -> BPETokenizer:
    """lmforge's tokenizer for a GGUF: its tokenizer.json read back (so what we write is what we use)."""
    try:
        return tokenizer_from_json(tokenizer_json_from_gguf(g), source=str(g.path))
    except LmforgeError as e:
        msg = str(e)
        raise LmforgeError(msg if msg.startswith(str(g.path)) else f"{g.path}: {msg}") from None


def tokenizer_config_from_gguf(g: GGUFFile, max_seq_len: int) -> dict[str, Any]:
    """tokenizer_config.json: special-token roles, BOS/EOS flags and chat template of a GGUF."""
    spelled = _string_list(g, "tokenizer.ggml.tokens")
    config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
                              "model_max_length": max_seq_len, "add_bos_token": _adds_bos(g),
                              "add_eos_token": _adds_eos(g)}
    for role, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"), ("unk_token", "unknown_token_id"),
                      ("pad_token", "padding_token_id")):
        if f"tokenizer.ggml.{key}" in g.metadata:
            config[role] = spelled[_token_id(g, key, len(spelled))]
    template = g.metadata.get("tokenizer.chat_template")
    if template is not None:
        if not isinstance(template, str):
            raise LmforgeError(f"{g.path}: tokenizer.chat_template must be a string")
        config["chat_template"] = template
    return config


def save_gguf_tokenizer(doc: dict[str, Any], config: dict[str, Any], out_dir: Path) -> str | None:
    """Write tokenizer.json, tokenizer_config.json and chat_template.jinja (from `tokenizer_json_from_gguf` and
    `tokenizer_config_from_gguf`).

    Returns None, or why lmforge's own tokenizer cannot read the vocabulary (transformers still can): e.g. a
    vocabulary without a token for every single byte (SmolLM2 has none for 21 bytes that never occur in text).
    """
    atomic_write_text(out_dir / "tokenizer.json", json.dumps(doc, ensure_ascii=False, indent=1))
    atomic_write_text(out_dir / "tokenizer_config.json", json.dumps(config, ensure_ascii=False, indent=1) + "\n")
    if "chat_template" in config:
        atomic_write_text(out_dir / CHAT_TEMPLATE, config["chat_template"])
    try:
        tokenizer_from_json(doc)
    except LmforgeError as e:
        return str(e)
    return None


# ---- conversion ----


def convert(src: str | os.PathLike, out: str | os.PathLike, dtype: str | None = None, overwrite: bool = False,
            progress: bool | None = None) -> Path:
    """Convert a GGUF file or an HF Llama directory into the run directory `out`; returns its path.

    dtype: "float32" or "bfloat16"; default float32 for a GGUF (dequantized values are exact in float32), the
    stored dtype for an HF directory. `out` must not exist (or be empty) unless `overwrite`. progress: a tqdm bar
    over tensors (None: only on a terminal). Tokenizer problems that do not stop the conversion are warnings.
    """
    src, out = Path(src), Path(out)
    torch_dtype = _parse_dtype(dtype)
    kind = _source_kind(src)
    _check_out(src, out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        if kind == "gguf":
            problem = _convert_gguf(src, tmp, torch_dtype or torch.float32, dtype, progress)
            if problem:
                warnings.warn(f"{out}: {problem}", stacklevel=2)
        else:
            _convert_hf_dir(src, tmp, torch_dtype, dtype, progress)
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _convert_gguf(src: Path, tmp: Path, dtype: torch.dtype, dtype_arg: str | None,
                  progress: bool | None) -> str | None:
    """Write the run for a GGUF into `tmp`; returns a warning about its tokenizer, if there is one to give."""
    g = read_gguf(src)
    cfg = config_from_gguf(g)
    doc = config = None
    if "tokenizer.ggml.model" in g.metadata:  # checked before the slow part
        doc, config = tokenizer_json_from_gguf(g), tokenizer_config_from_gguf(g, cfg.max_seq_len)
        n_tokens = len(g.metadata["tokenizer.ggml.tokens"])
        if n_tokens > cfg.vocab_size:
            raise LmforgeError(f"{src}: the tokenizer has {n_tokens} tokens but the model embeds {cfg.vocab_size}")
    model = model_from_hf_tensors(cfg, hf_tensors_from_gguf(g, cfg, dtype, progress), where=str(src))
    types = Counter(info.ggml_type.name for info in g.tensors.values())
    source = {"format": "gguf", "file": src.name, "version": g.version, "name": g.metadata.get("general.name"),
              "tensor_types": dict(types.most_common())}
    save_run(model, cfg, tmp, meta={"stage": "convert", "args": {"from": str(src), "dtype": dtype_arg},
                                    "parent": str(src), "source": source})
    if doc is None:
        return "the GGUF has no tokenizer metadata, so the run has no tokenizer"
    problem = save_gguf_tokenizer(doc, config, tmp)
    return f"lmforge's tokenizer cannot use this tokenizer.json yet ({problem}); transformers can" if problem else None


def _convert_hf_dir(src: Path, tmp: Path, dtype: torch.dtype | None, dtype_arg: str | None,
                    progress: bool | None) -> None:
    model, cfg = load_run(src)  # every family load_run knows; names and shapes checked there
    if dtype is not None:
        params = list(model.parameters())  # a tied head is one parameter, so it stays tied
        for p in tqdm(params, desc="casting", unit="tensor", disable=_no_bar(progress)):
            p.data = p.data.to(dtype)
    save_run(model, cfg, tmp, meta={"stage": "convert", "args": {"from": str(src), "dtype": dtype_arg},
                                    "parent": str(src), "source": {"format": "hf"}})
    for name in CARRIED_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, tmp / name)
    _chat_template_in_both_places(tmp)


def _chat_template_in_both_places(run: Path) -> None:
    """transformers v5 reads chat_template.jinja, v4 (< 4.47) only tokenizer_config.json: keep one in each."""
    config_path, jinja_path = run / "tokenizer_config.json", run / CHAT_TEMPLATE
    if not config_path.is_file():
        return
    try:
        config = json.loads(read_text_file(config_path))
    except json.JSONDecodeError as e:
        raise LmforgeError(f"invalid JSON in {config_path}: {e}") from None
    template = read_text_file(jinja_path) if jinja_path.is_file() else config.get("chat_template")
    if isinstance(template, str):
        if config.get("chat_template") != template:
            config["chat_template"] = template
            atomic_write_text(config_path, json.dumps(config, ensure_ascii=False, indent=2) + "\n")
        if not jinja_path.is_file():
            atomic_write_text(jinja_path, template)


def _parse_dtype(dtype: str | None) -> torch.dtype | None:
    if dtype is None:
        return None
    if dtype not in DTYPES:
        raise LmforgeError(f"unsupported dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _source_kind(src: Path) -> str:
    """'gguf' for a GGUF file (by its magic), 'hf' for a directory with config.json."""
    if src.is_dir():
        if not (src / CONFIG).is_file():
            raise LmforgeError(f"{src} has no {CONFIG}: expected a .gguf file or an HF Llama directory")
        return "hf"
    if not src.is_file():
        raise LmforgeError(f"input not found: {src}")
    with open(src, "rb") as f:
        if f.read(4) != b"GGUF":
            raise LmforgeError(f"{src} is not a GGUF file (no GGUF magic) nor an HF directory")
    return "gguf"


def _check_out(src: Path, out: Path, overwrite: bool) -> None:
    if out.resolve() == src.resolve():
        raise LmforgeError(f"--out {out} is the input itself; choose another directory")
    if out.exists() and not out.is_dir():
        raise LmforgeError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise LmforgeError(f"--out {out} already exists and is not empty (pass --force to replace it)")


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished temp directory to `out`; an existing `out` is moved aside first, then removed."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; give the run the mode mkdir would have
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
        os.replace(out, old / out.name)
    try:
        os.replace(tmp, out)
    except BaseException:
        if old is not None:  # put the previous run back
            os.replace(old / out.name, out)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    with contextlib.suppress(OSError):  # make the rename durable where the platform allows it
        fd = os.open(out.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _no_bar(progress: bool | None) -> bool | None:
    """tqdm's `disable`: None lets tqdm show the bar only on a terminal."""
    return None if progress is None else not progress


# ---- command line ----


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lmforge convert",
        description="Convert a GGUF file (llama architecture, byte-level BPE tokenizer) or a Hugging Face Llama "
                    "directory into an lmforge run directory (an HF checkpoint transformers loads too).")
    p.add_argument("--from", dest="src", required=True, metavar="PATH", help="a .gguf file or an HF Llama directory")
    p.add_argument("--out", required=True, metavar="RUN", help="run directory to create")
    p.add_argument("--dtype", choices=list(DTYPES), default=None,
                   help="weight dtype (default: float32 for GGUF, as stored for an HF directory)")
    p.add_argument("--force", action="store_true", help="replace RUN if it already exists")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = convert(args.src, args.out, dtype=args.dtype, overwrite=args.force)
        config = json.loads(read_text_file(out / CONFIG))
    except (LmforgeError, OSError) as e:
        print(f"lmforge convert: error: {e}", file=sys.stderr)
        return 2
    for w in caught:
        print(f"lmforge convert: warning: {w.message}", file=sys.stderr)
    layers = config.get("num_hidden_layers", config.get("n_layer"))
    print(f"converted {args.src} -> {out} ({config.get('model_type')}, {layers} layers, "
          f"{config.get('torch_dtype', config.get('dtype'))})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
