"""BERT run directories: save a Bert as an HF BERT checkpoint, load what transformers and sentence-transformers save.

    save_bert(model, cfg, "runs/enc", tokenizer=tok, sentence=SentenceConfig(pooling="mean"))
    model, cfg = load_bert("runs/enc")              # BertModel, BertForMaskedLM, or a sentence-transformers dir
    sentence = load_sentence_config("runs/enc")     # pooling mode, normalize, max_seq_length

Tensor names (HF ↔ ours; BertForMaskedLM and BertForPreTraining put "bert." before every body name):

    embeddings.word_embeddings / position_embeddings / token_type_embeddings   tok_emb / pos_emb / type_emb
    embeddings.LayerNorm                                                        emb_norm
    encoder.layer.{i}.attention.self.{query,key,value}                          layers.{i}.attn.{query,key,value}
    encoder.layer.{i}.attention.output.dense / .LayerNorm                       layers.{i}.attn.proj / attn_norm
    encoder.layer.{i}.intermediate.dense / output.dense / output.LayerNorm      layers.{i}.fc / proj / mlp_norm
    pooler.dense                                                                pooler
    cls.predictions.transform.dense / .LayerNorm, cls.predictions.bias          mlm.dense / mlm.norm / mlm.bias

Tensors that are copies or that we do not model are dropped on load: `embeddings.position_ids` (a buffer older
transformers saved), `cls.predictions.decoder.weight` (the tied embedding; it must equal it),
`cls.predictions.decoder.bias` (the same tensor as cls.predictions.bias), and BertForPreTraining's next-sentence
head `cls.seq_relationship.*`.

A sentence-transformers directory lists its modules in modules.json: the Transformer (this BERT, at path "" or
"0_Transformer"), a Pooling module (1_Pooling/config.json: which pooling), and optionally Normalize. Saving with
`sentence=` writes the same files, so `SentenceTransformer(run_dir)` opens our runs too.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmforge import __version__
from lmforge.checkpoint.run import (
    CONFIG,
    DEFAULT_SHARD_BYTES,
    INDEX,
    META,
    WEIGHTS,
    _existing_dir,
    _read_index,
    _read_json,
    _save_weights,
    _unwrap,
    load_tensors,
)
from lmforge.common import LmforgeError, atomic_write_text
from lmforge.model.encoder import POOLING_MODES, Bert, BertConfig

MODULES, POOLING_DIR, SENTENCE_CONFIG = "modules.json", "1_Pooling", "sentence_bert_config.json"
ST = "sentence_transformers.models."
PREFIX = "bert."  # BertForMaskedLM / BertForPreTraining keep the encoder under `bert`

# our name -> HF name, for the embedding and head tensors (".weight"/".bias" are appended as they come)
TOP_NAMES = {"tok_emb": "embeddings.word_embeddings", "pos_emb": "embeddings.position_embeddings",
             "type_emb": "embeddings.token_type_embeddings", "emb_norm": "embeddings.LayerNorm",
             "pooler": "pooler.dense", "mlm.dense": "cls.predictions.transform.dense",
             "mlm.norm": "cls.predictions.transform.LayerNorm", "mlm.bias": "cls.predictions.bias"}
# our name -> HF name inside layer i (layers.{i}. <-> encoder.layer.{i}.)
LAYER_NAMES = {"attn.query": "attention.self.query", "attn.key": "attention.self.key",
               "attn.value": "attention.self.value", "attn.proj": "attention.output.dense",
               "attn_norm": "attention.output.LayerNorm", "fc": "intermediate.dense", "proj": "output.dense",
               "mlp_norm": "output.LayerNorm"}
DROPPED = ("embeddings.position_ids", "cls.predictions.decoder.weight", "cls.predictions.decoder.bias",
           "cls.seq_relationship.weight", "cls.seq_relationship.bias")


@dataclass
class SentenceConfig:
    """How a sentence-embedding model turns token states into one vector (sentence-transformers' Pooling and
    Normalize modules, and its Transformer's max_seq_length / do_lower_case)."""

    pooling: str = "mean"
    normalize: bool = True
    max_seq_length: int | None = None  # None: the tokenizer's model_max_length, capped by the position table
    do_lower_case: bool = False  # lowercase the text before the tokenizer sees it


# ---- names ----


def to_hf_name(name: str, prefixed: bool) -> str:
    """Our state-dict name -> the HF name (with "bert." on body tensors when `prefixed`)."""
    head, _, leaf = name.rpartition(".")
    if name.startswith("layers."):
        _, i, rest = name.split(".", 2)
        base, _, leaf = rest.rpartition(".")
        hf = f"encoder.layer.{i}.{LAYER_NAMES[base]}.{leaf}"
    elif name == "mlm.bias":
        hf = TOP_NAMES[name]
    else:
        hf = f"{TOP_NAMES[head]}.{leaf}"
    return PREFIX + hf if prefixed and not hf.startswith("cls.") else hf


def hf_names(model: Bert, prefixed: bool) -> dict[str, str]:
    """HF name -> our name for every tensor of `model` (a meta-device model is enough)."""
    return {to_hf_name(n, prefixed): n for n in model.state_dict()}


# ---- save ----


def save_bert(model: torch.nn.Module, cfg: BertConfig, run_dir: str | os.PathLike, tokenizer: Any = None,
              sentence: SentenceConfig | None = None, meta: dict[str, Any] | None = None,
              max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Write `model` (a Bert built from `cfg`) as an HF BERT run directory; returns its path.

    With an MLM head the layout is BertForMaskedLM's ("bert." prefix, cls.predictions.*), else BertModel's.
    `tokenizer` is anything with `.save(dir)` (WordPieceTokenizer); `sentence` adds the sentence-transformers
    files (modules.json, 1_Pooling/config.json, sentence_bert_config.json).
    """
    run_dir = Path(run_dir)
    model = _unwrap(model)
    if not isinstance(model, Bert):
        raise LmforgeError(f"save_bert saves a Bert, got {type(model).__name__}")
    mlm, pooler = model.mlm is not None, model.pooler is not None
    with torch.device("meta"):
        expected = Bert(cfg, mlm_head=mlm, pooler=pooler).state_dict()
    state = model.state_dict()
    wrong = [n for n in expected if n not in state or state[n].shape != expected[n].shape]
    if wrong:
        raise LmforgeError(f"save_bert({run_dir}): the model does not match its config, e.g. {wrong[0]}")
    tensors = {to_hf_name(n, prefixed=mlm): t.detach().to("cpu").contiguous() for n, t in state.items()}
    dtype = str(state["tok_emb.weight"].dtype).removeprefix("torch.")
    run_dir.mkdir(parents=True, exist_ok=True)
    _save_weights(tensors, run_dir, max_shard_bytes)
    architecture = "BertForMaskedLM" if mlm else "BertModel"
    atomic_write_text(run_dir / CONFIG, json.dumps(cfg.to_hf(dtype=dtype, architecture=architecture), indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save(run_dir)
    if sentence is not None:
        _save_sentence_config(run_dir, cfg, sentence)
    info = {"lmforge_version": __version__, "stage": None, "args": {}, "metrics": {}, "parent": None, **(meta or {})}
    atomic_write_text(run_dir / META, json.dumps(info, indent=2, default=str) + "\n")
    return run_dir


def _save_sentence_config(run_dir: Path, cfg: BertConfig, s: SentenceConfig) -> None:
    if s.pooling not in POOLING_MODES:
        raise LmforgeError(f"unknown pooling mode {s.pooling!r}; choose one of {', '.join(POOLING_MODES)}")
    modules = [{"idx": 0, "name": "0", "path": "", "type": ST + "Transformer"},
               {"idx": 1, "name": "1", "path": POOLING_DIR, "type": ST + "Pooling"}]
    if s.normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": ST + "Normalize"})
    pooling = {"word_embedding_dimension": cfg.dim, "pooling_mode_cls_token": s.pooling == "cls",
               "pooling_mode_mean_tokens": s.pooling == "mean", "pooling_mode_max_tokens": False,
               "pooling_mode_mean_sqrt_len_tokens": False}
    (run_dir / POOLING_DIR).mkdir(exist_ok=True)
    atomic_write_text(run_dir / POOLING_DIR / CONFIG, json.dumps(pooling, indent=2) + "\n")
    st = {"max_seq_length": s.max_seq_length or cfg.max_seq_len, "do_lower_case": s.do_lower_case}
    atomic_write_text(run_dir / SENTENCE_CONFIG, json.dumps(st, indent=2) + "\n")
    atomic_write_text(run_dir / MODULES, json.dumps(modules, indent=2) + "\n")  # last: it marks the dir complete


# ---- load ----


def model_dir(run_dir: str | os.PathLike) -> Path:
    """The directory holding config.json and the weights: the run itself, or the Transformer module's path of a
    sentence-transformers directory (older ones keep it in 0_Transformer/)."""
    run_dir = _existing_dir(run_dir)
    modules = _read_modules(run_dir)
    for m in modules:
        if m.get("type", "").endswith("Transformer"):
            return _inside(run_dir, m.get("path", ""))
    return run_dir


def read_config(run_dir: str | os.PathLike) -> BertConfig:
    """The BertConfig of a run; a run of another architecture is a one-line error naming its model_type."""
    path = model_dir(run_dir) / CONFIG
    d = _read_json(path)
    kind = d.get("model_type") if isinstance(d, dict) else None
    if kind != "bert":
        raise LmforgeError(f"{path} has model_type {kind!r}: not a BERT encoder (model_type 'bert')")
    return BertConfig.from_hf(d)


def load_bert(run_dir: str | os.PathLike, device: str | torch.device = "cpu",
              dtype: torch.dtype | None = None) -> tuple[Bert, BertConfig]:
    """Build the Bert a run directory describes, with whatever heads its weights hold; (model, cfg) in eval mode.

    Every name and shape is checked against config.json before anything is assigned; a missing, extra or
    misshapen tensor, or a truncated file, is a one-line LmforgeError naming the file and the tensor.
    """
    mdir = model_dir(run_dir)
    cfg = read_config(run_dir)
    _check_complete(mdir)
    tensors = load_tensors(mdir, device=device)
    prefixed = any(n.startswith(PREFIX) for n in tensors)
    tensors = _drop_copies(tensors, prefixed, mdir)
    mlm = any(n.startswith("cls.predictions.") for n in tensors)
    pooler = any(n.startswith(f"{PREFIX if prefixed else ''}pooler.") for n in tensors)
    with torch.device("meta"):
        model = Bert(cfg, mlm_head=mlm, pooler=pooler)
    names = hf_names(model, prefixed)
    expected = model.state_dict()
    missing = sorted(set(names) - set(tensors))
    if missing:
        raise LmforgeError(f"{_file_of(mdir, missing[0])}: missing tensor {missing[0]} "
                           f"({len(missing)} missing in all) for this config.json")
    extra = sorted(set(tensors) - set(names))
    if extra:
        raise LmforgeError(f"{_file_of(mdir, extra[0])}: unexpected tensor {extra[0]} for a BERT checkpoint "
                           f"({len(extra)} in all)")
    for hf, ours in names.items():
        if tuple(tensors[hf].shape) != tuple(expected[ours].shape):
            raise LmforgeError(f"{_file_of(mdir, hf)}: tensor {hf} has shape {tuple(tensors[hf].shape)}, "
                               f"config.json implies {tuple(expected[ours].shape)}")
    state = {ours: tensors[hf] if dtype is None else tensors[hf].to(dtype) for hf, ours in names.items()}
    model.load_state_dict(state, assign=True)
    return model.eval(), cfg


def load_sentence_config(run_dir: str | os.PathLike) -> SentenceConfig:
    """Pooling, normalization and max length of a sentence-transformers directory; for a plain BERT run the
    defaults (mean pooling, normalized, max length from tokenizer_config.json's model_max_length if any)."""
    run_dir = _existing_dir(run_dir)
    modules = _read_modules(run_dir)
    out = SentenceConfig(normalize=not modules or any(m.get("type", "").endswith("Normalize") for m in modules))
    for m in modules:
        kind = m.get("type", "")
        if kind.endswith("Pooling"):
            out.pooling = _pooling_mode(_inside(run_dir, m.get("path", "")) / CONFIG)
        elif not kind.endswith(("Transformer", "Normalize")):
            raise LmforgeError(f"{run_dir / MODULES}: module {kind!r} is not supported (Transformer, Pooling and "
                               f"Normalize are)")
    mdir = model_dir(run_dir)
    st = _read_dict(mdir / SENTENCE_CONFIG) if (mdir / SENTENCE_CONFIG).is_file() else {}
    out.max_seq_length = st.get("max_seq_length")
    out.do_lower_case = bool(st.get("do_lower_case", False))
    if out.max_seq_length is None and (mdir / "tokenizer_config.json").is_file():
        limit = _read_dict(mdir / "tokenizer_config.json").get("model_max_length")  # 1e30 when "unlimited"
        out.max_seq_length = limit if isinstance(limit, int) and limit < 1_000_000 else None
    return out


def _pooling_mode(path: Path) -> str:
    """"mean" or "cls" from a sentence-transformers Pooling config; other or combined modes are errors."""
    d = _read_dict(path)
    on = sorted(k.removeprefix("pooling_mode_") for k, v in d.items() if k.startswith("pooling_mode_") and v is True)
    if isinstance(d.get("pooling_mode"), str):  # newer files may name the mode directly
        on = [d["pooling_mode"]]
    modes = {"mean_tokens": "mean", "mean": "mean", "cls_token": "cls", "cls": "cls"}
    if len(on) != 1 or on[0] not in modes:
        raise LmforgeError(f"{path}: pooling {'+'.join(on) or 'none'} is not supported (mean_tokens or cls_token)")
    return modes[on[0]]


def _read_dict(path: Path) -> dict[str, Any]:
    d = _read_json(path)
    if not isinstance(d, dict):
        raise LmforgeError(f"{path} must hold a JSON object")
    return d


def _read_modules(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / MODULES
    if not path.is_file():
        return []
    modules = _read_json(path)
    if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
        raise LmforgeError(f"{path} must be a JSON list of modules")
    return modules


def _inside(run_dir: Path, rel: str) -> Path:
    path = (run_dir / rel).resolve()
    if not path.is_relative_to(run_dir.resolve()) or not path.is_dir():
        raise LmforgeError(f"{run_dir / MODULES} names a module path outside the run or missing: {rel!r}")
    return path


def _drop_copies(tensors: dict[str, torch.Tensor], prefixed: bool, mdir: Path) -> dict[str, torch.Tensor]:
    """Remove the tensors we do not keep (see DROPPED); a saved decoder that is not the embedding is an error."""
    p = PREFIX if prefixed else ""
    decoder = tensors.get("cls.predictions.decoder.weight")
    embedding = tensors.get(p + "embeddings.word_embeddings.weight")
    if decoder is not None and embedding is not None and not torch.equal(decoder, embedding):
        raise LmforgeError(f"{_file_of(mdir, 'cls.predictions.decoder.weight')}: the MLM decoder differs from the "
                           f"word embeddings; an untied decoder is not supported")
    if "cls.predictions.bias" not in tensors and "cls.predictions.decoder.bias" in tensors:
        tensors["cls.predictions.bias"] = tensors["cls.predictions.decoder.bias"]
    drop = {p + n if n.startswith("embeddings.") else n for n in DROPPED} | set(DROPPED)
    return {n: t for n, t in tensors.items() if n not in drop}


def _file_of(mdir: Path, name: str) -> Path:
    """The weights file that holds (or should hold) tensor `name`."""
    if (mdir / INDEX).is_file() and not (mdir / WEIGHTS).is_file():
        return mdir / _read_index(mdir).get(name, INDEX)
    return mdir / WEIGHTS


def _check_complete(mdir: Path) -> None:
    """Name the first tensor a truncated safetensors file cuts off (safetensors itself only says the file is bad).

    The format: 8 bytes little-endian header length, a JSON header {name: {dtype, shape, data_offsets}}, data.
    """
    files = [mdir / WEIGHTS] if (mdir / WEIGHTS).is_file() else []
    if not files and (mdir / INDEX).is_file():
        files = [mdir / f for f in sorted(set(_read_index(mdir).values()))]
    for path in files:
        if not path.is_file():
            continue  # load_tensors names the missing shard
        size = path.stat().st_size
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little") if size >= 8 else -1
            if n < 0 or 8 + n > size:
                raise LmforgeError(f"{path}: truncated or not safetensors ({size} bytes, cut inside the header)")
            try:
                ends = {name: 8 + n + int(info["data_offsets"][1]) for name, info in json.loads(f.read(n)).items()
                        if name != "__metadata__"}
            except (ValueError, UnicodeDecodeError, TypeError, KeyError, IndexError, AttributeError):
                raise LmforgeError(f"{path}: corrupt safetensors header") from None
        for name, end in ends.items():
            if end > size:
                raise LmforgeError(f"{path}: truncated: tensor {name} needs bytes up to {end}, the file has {size}")
