"""Training data: read documents (txt / jsonl / parquet), tokenize them into token shards, stream batches.

    from lmforge.data import build_shards, TokenShards, BatchStream
    build_shards([Path("corpus/")], tok, "shards/")           # train.bin, val.bin, meta.json
    train = TokenShards("shards/", split="train")
    x, y = train.sample_batch(8, 256, generator)             # (B, T) int64, y = x shifted by one
    stream = BatchStream(train, batch_size=8, seq_len=256, seed=0)   # endless, resumable: state_dict()
"""

from lmforge.data.pretrain import BatchStream, TokenShards, build_shards, check_vocab, tokenizer_hash
from lmforge.data.sources import Corpus, list_files, read_documents

__all__ = [
    "BatchStream",
    "Corpus",
    "TokenShards",
    "build_shards",
    "check_vocab",
    "list_files",
    "read_documents",
    "tokenizer_hash",
]
