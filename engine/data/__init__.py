"""Training data: text or token shards in, (B, T) int64 batches out.

- `shards`: the uint16 shard format (llm.c's), written atomically, checked on read;
  build-nanogpt's `.npy` shards, read;
- `text`: text files to tokens (UTF-8 checks, folder walks, exact piecewise tokenization);
- `documents`, `hub`: what prepare reads (text, Parquet, JSON lines, Hugging Face
  datasets) cut into tasks for the tokenizing processes;
- `prepare`: `python -m engine.data prepare` (documents -> shards in several
  processes, resumable through `work_folder`);
- `loader`: `TokenLoader` / `build_loader`, rank-aware and resumable;
- `corpus`: the default corpus when no --data is given.
"""
from engine.data.corpus import TINY_SHAKESPEARE_URL, default_cache_dir, resolve_default_corpus
from engine.data.loader import TokenLoader, build_loader
from engine.data.prepare import PrepareSettings, main, prepare
from engine.data.shards import open_shard, read_shard_header, write_shard
from engine.data.text import find_text_files, tokenize_file

__all__ = ["PrepareSettings", "TINY_SHAKESPEARE_URL", "TokenLoader", "build_loader", "default_cache_dir",
           "find_text_files", "main", "open_shard", "prepare", "read_shard_header", "resolve_default_corpus",
           "tokenize_file", "write_shard"]
