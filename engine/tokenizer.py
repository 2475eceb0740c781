"""Tokenizers: GPT-2 BPE (through tiktoken) and a byte-level fallback.

Both expose the same small interface: `name`, `vocab_size`, `eot_token`,
`encode(text) -> list[int]`, `encode_batch(texts) -> list[list[int]]` and
`decode(ids) -> str`.

tiktoken downloads the GPT-2 BPE files (`vocab.bpe`, `encoder.json`) on first
use and caches them under `$TIKTOKEN_CACHE_DIR`. Offline machines need that
cache; without it `get_tokenizer("gpt2")` raises `TokenizerUnavailableError`
saying how to provide it, and `load_tokenizer("auto")` falls back to bytes.
"""
from __future__ import annotations

import os

from engine.errors import UserInputError

TOKENIZER_NAMES = ("gpt2", "bytes")


class TokenizerUnavailableError(UserInputError):
    """The GPT-2 BPE files could not be loaded (offline and no tiktoken cache)."""


def _as_int_list(ids) -> list[int]:
    # Accept lists, numpy arrays and torch tensors alike: `tolist` turns the
    # last two into plain Python ints, which tiktoken requires.
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    if isinstance(ids, int):
        return [ids]
    return [int(i) for i in ids]


class ByteTokenizer:
    """UTF-8 bytes as tokens: vocab 256, no end-of-text token, never unavailable."""

    name = "bytes"
    vocab_size = 256
    eot_token = None

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts, num_threads: int = 8) -> list[list[int]]:
        return [list(t.encode("utf-8")) for t in texts]

    def decode(self, ids) -> str:
        ids = _as_int_list(ids)
        bad = [i for i in ids if not 0 <= i < 256]
        if bad:
            raise ValueError(f"ByteTokenizer.decode: id {bad[0]} is outside the vocabulary 0..255")
        # Sampled byte sequences are often not valid UTF-8; show them anyway.
        return bytes(ids).decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=256)"


class GPT2Tokenizer:
    """GPT-2's byte-pair encoding via `tiktoken.get_encoding("gpt2")`.

    `encode` is `encode_ordinary`: the text `<|endoftext|>` in user data is
    ordinary text, never the special token; documents are separated by
    inserting `eot_token` explicitly.
    """

    name = "gpt2"

    def __init__(self, encoding):
        self._enc = encoding
        self.vocab_size = encoding.n_vocab
        self.eot_token = encoding.eot_token

    def encode(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(text)

    def encode_batch(self, texts, num_threads: int = 8) -> list[list[int]]:
        # tiktoken releases the GIL, so threads give real parallelism here.
        return self._enc.encode_ordinary_batch(list(texts), num_threads=num_threads)

    def decode(self, ids) -> str:
        ids = _as_int_list(ids)
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            # A model with a padded vocabulary (e.g. 50304) can sample ids that
            # GPT-2 never defined; tiktoken would raise a bare KeyError.
            raise ValueError(
                f"GPT2Tokenizer.decode: id {bad[0]} is outside the GPT-2 vocabulary "
                f"0..{self.vocab_size - 1}")
        return self._enc.decode(ids)

    def __repr__(self) -> str:
        return f"GPT2Tokenizer(vocab_size={self.vocab_size})"


def _unavailable_message(cause: BaseException) -> str:
    cache = os.environ.get("TIKTOKEN_CACHE_DIR")
    where = (f"TIKTOKEN_CACHE_DIR={cache} does not hold them" if cache
             else "TIKTOKEN_CACHE_DIR is not set")
    return (
        "gpt2 tokenizer: tiktoken could not load the GPT-2 BPE files vocab.bpe and "
        f"encoder.json ({type(cause).__name__}: {cause}); {where} and they cannot be "
        "downloaded (no network?). Set TIKTOKEN_CACHE_DIR to a folder holding "
        "tiktoken's cache for the gpt2 encoding (copy it from a machine where "
        "tiktoken.get_encoding('gpt2') worked), or choose the byte-level tokenizer "
        "with --tokenizer bytes.")


def _load_gpt2() -> GPT2Tokenizer:
    try:
        import tiktoken
    except ImportError as e:
        raise TokenizerUnavailableError(
            f"gpt2 tokenizer: the tiktoken package is not installed ({e}); "
            "run `pip install tiktoken`, or choose --tokenizer bytes.") from e
    try:
        encoding = tiktoken.get_encoding("gpt2")
    # requests' errors derive from OSError; ImportError covers a missing
    # `requests`; ValueError is tiktoken's hash check of a corrupt download.
    except (OSError, ImportError, ValueError) as e:
        raise TokenizerUnavailableError(_unavailable_message(e)) from e
    return GPT2Tokenizer(encoding)


def get_tokenizer(name: str):
    """The tokenizer called `name`: "gpt2" (GPT-2 BPE, vocab 50257, eot 50256)
    or "bytes" (UTF-8 bytes, vocab 256, no eot).

    Raises `TokenizerUnavailableError` when the GPT-2 files cannot be had and
    `UserInputError` (a ValueError) for an unknown name.
    """
    if name == "gpt2":
        return _load_gpt2()
    if name == "bytes":
        return ByteTokenizer()
    raise UserInputError(
        f"get_tokenizer: unknown tokenizer {name!r}; choose one of: {', '.join(TOKENIZER_NAMES)}")


def load_tokenizer(name: str = "auto"):
    """(tokenizer, reason): `name` is "gpt2", "bytes" or "auto".

    "auto" prefers GPT-2 BPE and falls back to bytes when its files are
    unavailable; `reason` says which was chosen and why, for the run's log.
    """
    if name != "auto":
        tok = get_tokenizer(name)
        return tok, f"{tok.name} tokenizer (requested)"
    try:
        tok = _load_gpt2()
    except TokenizerUnavailableError as e:
        cause = e.__cause__
        short = f"{type(cause).__name__}: {cause}" if cause is not None else str(e)
        return ByteTokenizer(), f"GPT-2 BPE files unavailable offline ({short}); using bytes"
    return tok, "GPT-2 BPE via tiktoken"
