"""Per-process bytes of the weights and the AdamW state under DDP and FSDP
(bench.memory), measured from the tensors each process holds, beside the
arithmetic. The suite runs GPT-2 124M at 1 and 3 processes (uneven shards) and
prints the table; `python -m bench.memory` gives gpt2-xl at 1, 2, 4 and 8."""
import pytest

from bench import memory


@pytest.mark.benchmark(group="memory")
def test_params_and_optimizer_bytes_per_process(benchmark, bench_registry):
    results = benchmark.pedantic(memory.rows, kwargs=dict(preset="gpt2", world_sizes=(1, 3)), rounds=1,
                                 iterations=1)
    bench_registry.sections["parameters + AdamW state per process (bench.memory, gpt2, measured on meta)"] = (
        memory.table(results))
    by = {(r["parallel"], r["world_size"]): r for r in results}
    for r in results:
        # Exact but for FSDP's padding of shards that do not divide evenly (rank 0 holds the larger one).
        assert r["arithmetic_bytes"] <= r["measured_bytes"] <= r["arithmetic_bytes"] * 1.001, r
    assert by["ddp", 3]["measured_bytes"] == by["ddp", 1]["measured_bytes"] == by["ddp", 1]["arithmetic_bytes"]
    assert by["fsdp", 3]["measured_bytes"] < by["fsdp", 1]["measured_bytes"] / 2.9
    benchmark.extra_info.update({f"{p}_{n}_GB": by[p, n]["measured_bytes"] / 1e9 for p, n in by})
