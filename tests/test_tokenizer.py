"""Tokenizers: GPT-2 BPE ids, byte level, and the offline (no BPE files) path."""
import numpy as np
import pytest
import torch

from engine.errors import UserInputError
from engine.tokenizer import (ByteTokenizer, GPT2Tokenizer, TokenizerUnavailableError, check_encodable,
                              get_tokenizer, load_tokenizer, tokenizer_for_model)

TEXTS = [
    "Hello world",
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\n",
    "  leading spaces, tabs\tand  double  spaces ",
    "unicode: héllo wörld, 日本語, emoji 🎉, nbsp\u00a0here",
    "",
]


@pytest.fixture
def gpt2():
    try:
        return get_tokenizer("gpt2")
    except TokenizerUnavailableError as e:
        pytest.skip(f"GPT-2 BPE files unavailable here (set TIKTOKEN_CACHE_DIR): {e}")


@pytest.fixture
def offline_tiktoken(monkeypatch, tmp_path):
    """tiktoken with an empty cache and a network that always fails; never
    touches the real network. Yields the calls made to the download function."""
    import requests
    import tiktoken.load
    import tiktoken.registry

    cache = tmp_path / "empty-cache"
    cache.mkdir()
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    # tiktoken keeps loaded encodings in-process; hide them for this test.
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})
    calls = []

    def no_network(blobpath):
        calls.append(blobpath)
        raise requests.exceptions.ConnectionError(f"network disabled in tests ({blobpath})")

    def forbidden(*args, **kwargs):
        raise AssertionError("test tried to reach the network")

    monkeypatch.setattr(tiktoken.load, "read_file", no_network)
    monkeypatch.setattr(requests, "get", forbidden)
    yield calls, cache


@pytest.mark.smoke
def test_gpt2_known_ids(gpt2):
    assert isinstance(gpt2, GPT2Tokenizer)
    assert gpt2.name == "gpt2"
    assert gpt2.encode("Hello world") == [15496, 995]
    assert gpt2.vocab_size == 50257
    assert gpt2.eot_token == 50256
    assert gpt2.decode([50256]) == "<|endoftext|>"


def test_gpt2_special_text_is_ordinary(gpt2):
    # User text that spells the special token must not become the eot id.
    ids = gpt2.encode("a<|endoftext|>b")
    assert 50256 not in ids
    assert gpt2.decode(ids) == "a<|endoftext|>b"


@pytest.mark.parametrize("text", TEXTS)
def test_gpt2_round_trip(gpt2, text):
    ids = gpt2.encode(text)
    assert all(isinstance(i, int) and 0 <= i < 50257 for i in ids)
    assert gpt2.decode(ids) == text


def test_gpt2_batch_matches_single(gpt2):
    assert gpt2.encode_batch(TEXTS) == [gpt2.encode(t) for t in TEXTS]


def test_gpt2_decode_accepts_arrays_and_rejects_unknown_ids(gpt2):
    ids = gpt2.encode("Hello world")
    assert gpt2.decode(torch.tensor(ids)) == "Hello world"
    assert gpt2.decode(np.array(ids, dtype=np.int64)) == "Hello world"
    with pytest.raises(ValueError, match="50300"):
        gpt2.decode([15496, 50300])  # a padded-vocab id (50304-wide models)


@pytest.mark.parametrize("text", TEXTS)
def test_bytes_round_trip(text):
    tok = get_tokenizer("bytes")
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.encode_batch([text, "x"]) == [ids, [120]]


def test_bytes_properties_and_invalid_utf8():
    tok = get_tokenizer("bytes")
    assert isinstance(tok, ByteTokenizer)
    assert (tok.name, tok.vocab_size, tok.eot_token) == ("bytes", 256, None)
    assert tok.encode("é") == [0xC3, 0xA9]
    # A sampled sequence may cut a character: shown with U+FFFD, not an error.
    assert tok.decode([0x41, 0xC3]) == "A\ufffd"
    assert tok.decode(torch.tensor([104, 105])) == "hi"
    with pytest.raises(ValueError, match="256"):
        tok.decode([256])


def test_unknown_tokenizer_name():
    with pytest.raises(UserInputError, match="'sentencepiece'") as info:
        get_tokenizer("sentencepiece")
    assert isinstance(info.value, ValueError)
    assert "gpt2" in str(info.value) and "bytes" in str(info.value)
    with pytest.raises(ValueError, match="'nope'"):
        load_tokenizer("nope")


def test_gpt2_unavailable_offline(offline_tiktoken):
    calls, cache = offline_tiktoken
    with pytest.raises(TokenizerUnavailableError) as info:
        get_tokenizer("gpt2")
    msg = str(info.value)
    assert isinstance(info.value, UserInputError)
    assert "TIKTOKEN_CACHE_DIR" in msg and str(cache) in msg
    assert "--tokenizer bytes" in msg
    assert "vocab.bpe" in msg and "ConnectionError" in msg
    # one short line: the download error's own text (URLs, retries) stays out of it
    assert "\n" not in msg and "network disabled" not in msg
    assert len(msg) - len(str(cache)) < 260, msg
    assert calls, "the failing download function was never reached"
    assert list(cache.iterdir()) == []
    with pytest.raises(TokenizerUnavailableError):
        load_tokenizer("gpt2")


def test_auto_falls_back_to_bytes_offline(offline_tiktoken):
    calls, cache = offline_tiktoken
    tok, reason = load_tokenizer("auto")
    assert isinstance(tok, ByteTokenizer)
    assert "unavailable" in reason and "using bytes" in reason and "ConnectionError" in reason
    assert "TIKTOKEN_CACHE_DIR" in reason and "network disabled" not in reason  # the fix, not the trace
    assert len(reason) - len(str(cache)) < 220, reason


def test_tokenizer_for_model(offline_tiktoken):
    """A model trained with GPT-2 BPE never falls back to bytes: without the BPE
    files it fails at once, with the fix; an explicit other tokenizer is refused."""
    calls, cache = offline_tiktoken
    with pytest.raises(TokenizerUnavailableError) as info:
        tokenizer_for_model("auto", "gpt2", "--init-from runs/x")
    msg = str(info.value)
    assert msg.startswith("--init-from runs/x was trained with the gpt2 tokenizer")
    assert "TIKTOKEN_CACHE_DIR" in msg and "ConnectionError" in msg and "network disabled" not in msg
    with pytest.raises(UserInputError, match="--tokenizer bytes was given; use --tokenizer gpt2"):
        tokenizer_for_model("bytes", "gpt2", "--resume runs/x")
    with pytest.raises(UserInputError, match="use --tokenizer bytes"):
        tokenizer_for_model("gpt2", "bytes", "--resume runs/x")
    with pytest.raises(UserInputError, match="unknown tokenizer 'sentencepiece'"):
        tokenizer_for_model("auto", "sentencepiece", "--resume runs/x")
    tok, reason = tokenizer_for_model("auto", "bytes", "--resume runs/x")
    assert tok.name == "bytes" and "--resume runs/x" in reason


def test_check_encodable():
    check_encodable("héllo 日本語 🎉", "--prompt")
    with pytest.raises(UserInputError, match=r"--prompt: character '\\udcff' at position 2 is not valid"):
        check_encodable("ab\udcffcd", "--prompt")


def test_decode_bytes_keeps_partial_characters(gpt2):
    text = "naïve 日本語 🎉"
    ids = gpt2.encode(text)
    assert b"".join(gpt2.decode_bytes([i]) for i in ids) == text.encode("utf-8")
    assert ByteTokenizer().decode_bytes(list("é".encode())) == "é".encode()
    with pytest.raises(ValueError, match="outside"):
        gpt2.decode_bytes([50257])


def test_auto_prefers_gpt2(gpt2):
    tok, reason = load_tokenizer()
    assert tok.name == "gpt2" and "GPT-2" in reason
    tok, reason = load_tokenizer("bytes")
    assert tok.name == "bytes" and "requested" in reason


def test_data_tokenizer_mismatch_names_the_fix():
    from engine.tokenizer import data_tokenizer_mismatch
    msg = data_tokenizer_mismatch("data/gpt2_train_000000.bin", 50257, "bytes", 256, requested="auto")
    assert msg.startswith("data/gpt2_train_000000.bin: holds gpt2 tokens (vocab 50,257), but this run uses "
                          "the bytes tokenizer (vocab 256); train with --tokenizer gpt2, or prepare the data "
                          "again with --tokenizer bytes")
    assert "auto chose bytes" in msg and "TIKTOKEN_CACHE_DIR" in msg
    msg = data_tokenizer_mismatch("d.bin", 256, "gpt2", 50257, requested="gpt2")
    assert msg.endswith("train with --tokenizer bytes, or prepare the data again with --tokenizer gpt2")
    msg = data_tokenizer_mismatch("d.bin", 32000, "gpt2", 50257)
    assert "tokens of a 32,000-id vocabulary" in msg and "train with" not in msg
