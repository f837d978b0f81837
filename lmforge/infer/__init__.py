"""Inference: an explicit KV cache, logits processors, and generation as small functions around them.

`infer` sees token ids and logits, never the tokenizer (docs/internals.md).
"""

from lmforge.infer.kv_cache import KVCache

__all__ = ["KVCache"]
