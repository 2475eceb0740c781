"""The data-preparation group: `engine.data.prepare` against build-nanogpt's recipe
(bench/prepare.py) on the same Parquet rows with the same number of processes.

Plain `pytest` runs both recipes once, here, on a small corpus and checks that
they write the same tokens. `pytest --benchmark-only` runs them in fresh
processes, in alternating pairs on a 16 MB corpus, and reports tokens/s of each,
ours / theirs, and peak memory (extra_info, and a section after the tables);
`python -m bench.prepare` does the same from the command line."""
import numpy as np
import pytest

from bench import prepare as bench_prepare

WORKERS = 2
SMOKE_SHARD_TOKENS = 20_000


@pytest.fixture
def gpt2_available():
    from engine.tokenizer import TokenizerUnavailableError, get_tokenizer
    try:
        get_tokenizer("gpt2")
    except TokenizerUnavailableError as e:
        pytest.skip(f"GPT-2 BPE files unavailable here (set TIKTOKEN_CACHE_DIR): {e}")


@pytest.mark.benchmark(group="cpu-prepare")
def test_prepare_against_build_nanogpt(benchmark, bench_registry, tmp_path, gpt2_available):
    pytest.importorskip("pyarrow", reason="the data extra (pyarrow) is not installed")
    benchmark.group = f"cpu-prepare {WORKERS} processes"
    if benchmark.disabled:
        corpus = bench_prepare.write_corpus(tmp_path / "corpus.parquet", megabytes=0.3)

        def both():
            return {recipe: run([corpus], tmp_path / recipe, WORKERS, SMOKE_SHARD_TOKENS)
                    for recipe, run in bench_prepare.RUNNERS.items()}
        tokens = benchmark.pedantic(both, rounds=1, iterations=1)
        assert tokens["ours"] == tokens["build-nanogpt"] > 3 * SMOKE_SHARD_TOKENS
        streams = [bench_prepare.token_stream(tmp_path / recipe) for recipe in bench_prepare.RECIPES]
        np.testing.assert_array_equal(*streams)
        return
    corpus = bench_prepare.write_corpus(tmp_path / "corpus.parquet", megabytes=16)
    result = benchmark.pedantic(lambda: bench_prepare.compare([corpus], WORKERS, rounds=3, log=lambda s: None),
                                rounds=1, iterations=1)
    benchmark.extra_info.update(result)
    bench_registry.sections["data preparation: ours against build-nanogpt's recipe (bench.prepare)"] = \
        bench_prepare.summary_lines(result)
