"""Tokenizers: GPT-2 BPE (through tiktoken) and a byte-level fallback.

Both expose the same small interface: `name`, `vocab_size`, `eot_token`,
`encode(text) -> list[int]`, `encode_batch(texts) -> list[list[int]]`,
`decode(ids) -> str` and `decode_bytes(ids) -> bytes` (for streaming: a token
may hold part of a UTF-8 character, which only the bytes keep exact).

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


def _utf8(text: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        # Lone surrogates (JSON escapes such as "\ud83d" make them): replaced by
        # U+FFFD, as tiktoken's encode does, so both tokenizers take any str.
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace").encode("utf-8")


class ByteTokenizer:
    """UTF-8 bytes as tokens: vocab 256, no end-of-text token, never unavailable."""

    name = "bytes"
    vocab_size = 256
    eot_token = None

    def encode(self, text: str) -> list[int]:
        return list(_utf8(text))

    def encode_batch(self, texts, num_threads: int = 8) -> list[list[int]]:
        return [list(_utf8(t)) for t in texts]

    def decode_bytes(self, ids) -> bytes:
        ids = _as_int_list(ids)
        bad = [i for i in ids if not 0 <= i < 256]
        if bad:
            raise ValueError(f"ByteTokenizer.decode: id {bad[0]} is outside the vocabulary 0..255")
        return bytes(ids)

    def decode(self, ids) -> str:
        # Sampled byte sequences are often not valid UTF-8; show them anyway.
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

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

    def _checked(self, ids) -> list[int]:
        ids = _as_int_list(ids)
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            # A model with a larger vocabulary than GPT-2's can sample ids that
            # GPT-2 never defined; tiktoken would raise a bare KeyError.
            raise ValueError(
                f"GPT2Tokenizer.decode: id {bad[0]} is outside the GPT-2 vocabulary "
                f"0..{self.vocab_size - 1}")
        return ids

    def decode(self, ids) -> str:
        return self._enc.decode(self._checked(ids))

    def decode_bytes(self, ids) -> bytes:
        return self._enc.decode_bytes(self._checked(ids))

    def __repr__(self) -> str:
        return f"GPT2Tokenizer(vocab_size={self.vocab_size})"


# The fix, said the same way wherever the GPT-2 BPE files are missing.
GPT2_BPE_FIX = ("set TIKTOKEN_CACHE_DIR to a folder holding tiktoken's gpt2 cache, "
                "or pass --tokenizer bytes")


def _unavailable_cause(cause: BaseException) -> str:
    # The cause's type says what failed (ConnectionError: offline; ValueError: a
    # corrupt cached file). Its text, often 400 characters of URL and retry
    # details, stays in the exception chain for whoever debugs it.
    cache = os.environ.get("TIKTOKEN_CACHE_DIR")
    where = f"TIKTOKEN_CACHE_DIR={cache} does not hold them" if cache else "TIKTOKEN_CACHE_DIR is not set"
    return f"{type(cause).__name__}; {where}"


def _load_gpt2() -> GPT2Tokenizer:
    try:
        import tiktoken
    except ImportError as e:
        raise TokenizerUnavailableError(
            "gpt2 tokenizer: the tiktoken package is not installed; "
            "run `pip install tiktoken`, or pass --tokenizer bytes") from e
    try:
        encoding = tiktoken.get_encoding("gpt2")
    # requests' errors derive from OSError; ImportError covers a missing
    # `requests`; ValueError is tiktoken's hash check of a corrupt download.
    except (OSError, ImportError, ValueError) as e:
        raise TokenizerUnavailableError(
            f"gpt2 tokenizer: cannot load the GPT-2 BPE files vocab.bpe and encoder.json "
            f"({_unavailable_cause(e)}); {GPT2_BPE_FIX}") from e
    return GPT2Tokenizer(encoding)


def get_tokenizer(name: str):
    """The tokenizer called `name`: "gpt2" (GPT-2 BPE, vocab 50257, eot 50256)
    or "bytes" (UTF-8 bytes, vocab 256, no eot).

    Raises `TokenizerUnavailableError` (one line, with the fix) when the GPT-2
    files cannot be had and `UserInputError` (a ValueError) for an unknown name.
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
    unavailable; `reason` says which was chosen and why (one short line, with
    how to get GPT-2 BPE back), for the run's log.
    """
    if name != "auto":
        tok = get_tokenizer(name)
        return tok, f"{tok.name} tokenizer (requested)"
    try:
        tok = _load_gpt2()
    except TokenizerUnavailableError as e:
        cause = e.__cause__
        why = _unavailable_cause(cause) if cause is not None else "tiktoken is not installed"
        return ByteTokenizer(), (f"GPT-2 BPE files unavailable ({why}), using bytes; for GPT-2 BPE set "
                                 "TIKTOKEN_CACHE_DIR to a folder holding tiktoken's gpt2 cache")
    return tok, "GPT-2 BPE via tiktoken"


def tokenizer_for_model(requested: str, model_tokenizer: str, source: str):
    """(tokenizer, reason) for a run that starts from a trained model: `requested`
    is the run's --tokenizer (auto | gpt2 | bytes), `model_tokenizer` the one the
    model was trained with (`engine.sources.source_tokenizer_name`, or a checkpoint's
    "tokenizer" entry), `source` names the model in messages (--init-from X,
    --resume Y).

    Call it before any training: "auto" means the model's tokenizer, never the
    byte fallback (a 50257-token model fed byte ids trains on nonsense and its
    samples cannot be decoded), so missing GPT-2 BPE files fail here, at once,
    with the one-line fix; an explicit tokenizer other than the model's is refused.
    """
    if model_tokenizer not in TOKENIZER_NAMES:
        raise UserInputError(f"{source}: trained with an unknown tokenizer {model_tokenizer!r}; "
                             f"known: {', '.join(TOKENIZER_NAMES)}")
    if requested not in ("auto", model_tokenizer):
        raise UserInputError(f"{source} was trained with the {model_tokenizer} tokenizer, but "
                             f"--tokenizer {requested} was given; use --tokenizer {model_tokenizer} "
                             "(or auto)")
    try:
        tok = get_tokenizer(model_tokenizer)
    except TokenizerUnavailableError as e:
        cause = e.__cause__
        why = f" ({_unavailable_cause(cause)})" if cause is not None else ""
        raise TokenizerUnavailableError(
            f"{source} was trained with the gpt2 tokenizer, whose BPE files cannot be loaded{why}; set "
            "TIKTOKEN_CACHE_DIR to a folder holding tiktoken's gpt2 cache (the byte-level tokenizer "
            "cannot stand in for it)") from cause
    return tok, f"the one {source} was trained with"


def check_encodable(text: str, what: str) -> None:
    """Refuse text that is not valid Unicode (lone surrogates, which Python makes
    of bytes that are not UTF-8 in command-line arguments): tiktoken would turn
    them into U+FFFD silently, the byte tokenizer would fail with a traceback."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise UserInputError(
            f"{what}: character {ascii(text[e.start])} at position {e.start} is not valid Unicode "
            "text (bytes that are not UTF-8?); give UTF-8 text") from None


# Vocabulary sizes that name their tokenizer (token shards record only the size).
TOKENIZER_OF_VOCAB = {50257: "gpt2", 256: "bytes"}


def data_tokenizer_mismatch(where: str, data_vocab: int, run_tokenizer: str, run_vocab: int,
                            requested: str = "") -> str:
    """The message for token data written by one tokenizer and read by a run with
    another: which tokenizer wrote the data, and the two fixes (train with that
    one, or prepare the data again with this run's). `requested` is the run's
    --tokenizer: "auto" that fell back to bytes says why, and how to get GPT-2 BPE."""
    data_name = TOKENIZER_OF_VOCAB.get(data_vocab)
    held = (f"{data_name} tokens (vocab {data_vocab:,})" if data_name
            else f"tokens of a {data_vocab:,}-id vocabulary")
    msg = (f"{where}: holds {held}, but this run uses the {run_tokenizer} tokenizer (vocab {run_vocab:,}); "
           + (f"train with --tokenizer {data_name}, or " if data_name else "")
           + f"prepare the data again with --tokenizer {run_tokenizer}")
    if requested == "auto" and run_tokenizer == "bytes" and data_name == "gpt2":
        msg += (" (--tokenizer auto chose bytes because the GPT-2 BPE files are unavailable: set "
                "TIKTOKEN_CACHE_DIR to a folder holding tiktoken's gpt2 cache)")
    return msg
