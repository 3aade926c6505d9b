"""Data: tokenizers, text sources, memory-mapped shards, deterministic batching, long-context tasks."""

from titans.data.dataloader import TokenBatcher, build_data, eval_batches
from titans.data.dataset import ShardDataset, iter_documents, prepare_shards, read_corpus_text, stdlib_source_files
from titans.data.preprocessing import ByteTokenizer, HFTokenizer, Tokenizer, load_tokenizer

__all__ = [
    "ByteTokenizer", "HFTokenizer", "ShardDataset", "TokenBatcher", "Tokenizer", "build_data", "eval_batches",
    "iter_documents", "load_tokenizer", "prepare_shards", "read_corpus_text", "stdlib_source_files",
]
