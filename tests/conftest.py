"""Fixtures shared by the test modules. (Triton's mode and the `gpu` marker are
decided in the root conftest.py, which serves tests/ and bench/ alike.)"""
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """~150 KB of English prose that ships with CPython (pydoc_data): always present, offline."""
    from pydoc_data.topics import topics
    text = "\n\n".join(topics[k] for k in sorted(topics))[:150_000]
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    return path
