"""Fixtures shared by the test modules. (Triton's mode and the `gpu` marker are
decided in the root conftest.py, which serves tests/ and bench/ alike.)"""
import os
from pathlib import Path

import pytest

# tests/installed/ checks a non-editable install from outside the checkout; `.ci/run`
# runs it there. Inside the checkout it would import the checkout itself.
collect_ignore = ["installed"]


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """~150 KB of English prose that ships with CPython (pydoc_data): always present, offline."""
    from pydoc_data.topics import topics
    text = "\n\n".join(topics[k] for k in sorted(topics))[:150_000]
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tinyshakespeare() -> Path:
    """The real corpus (tiny-shakespeare, 1.1 MB): the file TINYSHAKESPEARE names, else
    the copy the engine keeps in its cache (`python train.py` downloads it there where
    there is network); skipped where neither exists."""
    from engine.data.corpus import default_cache_dir
    env = os.environ.get("TINYSHAKESPEARE")
    path = Path(env) if env else default_cache_dir() / "tinyshakespeare.txt"
    if not path.is_file():
        pytest.skip(f"tiny-shakespeare not found at {path} (set TINYSHAKESPEARE to its input.txt, or run "
                    "`python train.py` once with network)")
    return path


@pytest.fixture(scope="session")
def gpt2():
    """GPT-2's BPE tokenizer; skipped with the fix where its files cannot be loaded."""
    from engine.tokenizer import TokenizerUnavailableError, get_tokenizer
    try:
        return get_tokenizer("gpt2")
    except TokenizerUnavailableError as e:
        pytest.skip(f"GPT-2 BPE files unavailable here (set TIKTOKEN_CACHE_DIR): {e}")


@pytest.fixture(autouse=True)
def _isolate_process_wide_torch_state(request):
    """A test must not leak process-wide switches into the next one: the trainer
    turns on TF32 for fp32 matmuls on CUDA, which would loosen every later fp32
    check (gpt2_kernels/linear_gelu.py follows that switch). The GPU tests' large buffers are
    handed back too, since several pytest-xdist workers may share the card."""
    import gc

    import torch

    def precision():
        try:
            return torch.get_float32_matmul_precision()
        except RuntimeError:  # the legacy allow_tf32 flag and the new API were mixed
            return None
    before, tf32 = precision(), torch.backends.cuda.matmul.allow_tf32
    yield
    if before is not None:
        if precision() != before:  # resets every backend's switch, CUDA's and oneDNN's
            torch.set_float32_matmul_precision(before)
    elif torch.backends.cuda.matmul.allow_tf32 != tf32:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    if torch.cuda.is_available() and request.node.get_closest_marker("gpu"):
        gc.collect()
        torch.cuda.empty_cache()
