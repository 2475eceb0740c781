"""LayerNorm and residual-add + LayerNorm, forward and forward+backward, bf16:
ours against F.layer_norm (and x + r then F.layer_norm) and Liger-Kernel's
LayerNorm (skipped with the reason where liger-kernel is not installed; for the
fused op, x + r then Liger's LayerNorm). Memory-bound: GB/s."""
import pytest

from bench.cases import LN_VARIANTS, LN_WIDTHS, layernorm_case
from bench.harness import run_benchmark

pytestmark = pytest.mark.gpu


@pytest.mark.benchmark(group="layernorm")
@pytest.mark.parametrize("kind", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("width", LN_WIDTHS)
@pytest.mark.parametrize("variant", LN_VARIANTS)
def test_layernorm(benchmark, bench_registry, ceilings, kind, width, variant):
    run_benchmark(benchmark, layernorm_case(kind, width), variant, bench_registry, ceilings)


@pytest.mark.benchmark(group="add_layernorm")
@pytest.mark.parametrize("kind", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("width", LN_WIDTHS)
@pytest.mark.parametrize("variant", LN_VARIANTS)
def test_add_layernorm(benchmark, bench_registry, ceilings, kind, width, variant):
    run_benchmark(benchmark, layernorm_case(kind, width, fused=True), variant, bench_registry, ceilings)
