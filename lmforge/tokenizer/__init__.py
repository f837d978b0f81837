"""Byte-level BPE tokenizers: train on your text, encode/decode fast, read and write HF and tiktoken files.

    from lmforge.tokenizer import train_bpe, load_tokenizer
    tok = train_bpe([Path("corpus.txt")], vocab_size=8192, pattern="gpt4", special_tokens=["<|endoftext|>"])
    tok.save("out/")                      # tokenizer.json + tokenizer_config.json
    ids = load_tokenizer("cl100k_base").encode("hello world")
"""

from lmforge.tokenizer.bpe import BPETokenizer, has_compiled_core
from lmforge.tokenizer.formats import (
    load_encoding,
    load_tiktoken,
    load_tokenizer,
    load_tokenizer_json,
    save_tiktoken,
    save_tokenizer,
    tokenizer_from_json,
    tokenizer_json,
)
from lmforge.tokenizer.train import train_bpe

__all__ = [
    "BPETokenizer",
    "has_compiled_core",
    "load_encoding",
    "load_tiktoken",
    "load_tokenizer",
    "load_tokenizer_json",
    "save_tiktoken",
    "save_tokenizer",
    "tokenizer_from_json",
    "tokenizer_json",
    "train_bpe",
]
