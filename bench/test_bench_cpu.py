"""The CPU group (runs anywhere, marks nothing gpu), on one torch thread: the
engine's forward+backward on the torch path against transformers' GPT2LMHeadModel
with the same weights, data-loader batches/sec from a memory-mapped shard against
in-memory tokens, and tokenizer throughput (tiktoken's GPT-2 BPE and bytes, each
timed alone: they are not alternatives to each other).
Each peer is timed in paired rounds with the subject; plain `pytest` runs each
variant once."""
import pytest

from bench.cases import cpu_loader_case, cpu_model_case, cpu_tokenizer_case
from bench.harness import run_benchmark


@pytest.mark.benchmark(group="cpu-model")
@pytest.mark.parametrize("variant", ["engine-torch", "transformers"])
def test_cpu_model_fwdbwd(benchmark, bench_registry, tmp_path, variant):
    run_benchmark(benchmark, cpu_model_case(tmp_path), variant, bench_registry)


@pytest.mark.benchmark(group="cpu-data-loader")
@pytest.mark.parametrize("variant", ["shard", "text"])
def test_cpu_data_loader(benchmark, bench_registry, tmp_path, variant):
    run_benchmark(benchmark, cpu_loader_case(tmp_path), variant, bench_registry)


@pytest.mark.smoke
@pytest.mark.benchmark(group="cpu-tokenizer")
@pytest.mark.parametrize("variant", ["gpt2", "bytes"])
def test_cpu_tokenizer(benchmark, bench_registry, variant):
    run_benchmark(benchmark, cpu_tokenizer_case(variant), variant, bench_registry)
