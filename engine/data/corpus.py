"""The default corpus: what `python train.py` trains on when no --data is given."""
from __future__ import annotations

import os
from pathlib import Path

from engine.errors import UserInputError
from engine.fileio import atomic_write

TINY_SHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt")


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "gpt2-engine"


def download(url: str, timeout: float) -> bytes:
    """The bytes at `url` (urllib's errors are OSErrors)."""
    import urllib.request
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read()


def resolve_default_corpus(cache_dir=None, *, cwd=None, fetch=None, url: str = TINY_SHAKESPEARE_URL,
                           timeout: float = 5.0) -> tuple[Path, str]:
    """(path, description) of the text to train on when no --data is given.

    `input.txt` in the current directory if present; else tiny-shakespeare,
    downloaded once into the cache (`$XDG_CACHE_HOME/gpt2-engine` or
    `~/.cache/gpt2-engine`); offline, the English documentation topics that
    ship with CPython (`pydoc_data.topics`), written once into the cache.
    `fetch(url, timeout) -> bytes` is injectable so tests never touch the network.
    """
    local = Path(cwd if cwd is not None else os.getcwd()) / "input.txt"
    if local.is_file():
        return local, f"{local} (input.txt in the current directory)"
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserInputError(
            f"{cache}: cannot create the default-corpus cache ({e.strerror or e}); pass --data FILE") from e
    shakespeare = cache / "tinyshakespeare.txt"
    if shakespeare.is_file() and shakespeare.stat().st_size:
        return shakespeare, f"tiny-shakespeare ({shakespeare}, cached)"
    fetch = fetch or download
    try:
        data = fetch(url, timeout)
        if not data:
            raise OSError("empty download")
        data.decode("utf-8")
    except (OSError, ValueError) as e:  # URLError and timeouts are OSErrors
        reason = f"{type(e).__name__}: {e}"
    else:
        try:
            atomic_write(shakespeare, lambda f: f.write(data))
        except OSError as e:
            raise UserInputError(f"{shakespeare}: cannot write the downloaded corpus: {e}") from e
        return shakespeare, f"tiny-shakespeare (downloaded from {url} into {shakespeare})"

    from pydoc_data.topics import topics
    fallback = cache / "pydoc_topics.txt"
    if not (fallback.is_file() and fallback.stat().st_size):
        text = "\n\n".join(topics[k].strip() for k in sorted(topics)) + "\n"
        try:
            atomic_write(fallback, lambda f: f.write(text.encode("utf-8")))
        except OSError as e:
            raise UserInputError(f"{fallback}: cannot write the offline corpus: {e}") from e
    return fallback, (f"CPython's documentation topics from pydoc_data ({len(topics)} topics, "
                      f"{fallback}): tiny-shakespeare could not be downloaded ({reason})")
