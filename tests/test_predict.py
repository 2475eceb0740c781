"""bench/predict.py: the static model of the step's time, its calibration on
llm.c, and the predictions the GPU report prints beside what it measures."""
import dataclasses

import pytest

from bench import predict
from bench.harness import Case
from bench.timing import Ceilings

pytest.importorskip("triton", reason="the step is recorded on the triton backend (Linux only)")

H100 = predict.GPUS["H100"]


def _work(**kw):
    base = dict(tokens=65536, matmul_flops=4.9e13, attention_flops=3.7e12, bytes=3.7e10, launches=300.0)
    return predict.StepWork(**{**base, **kw})


def test_each_part_takes_its_own_rate():
    a = predict.Assumptions(matmul_efficiency=0.5, attention_ratio=0.5, copy_efficiency=0.8,
                            launch_gap_s=1e-6, interconnect_bytes_per_s=1e11)
    parts = _work(comm_bytes=1e9).seconds(H100, a)
    assert parts["matmuls"] == pytest.approx(4.9e13 / (798e12 * 0.5))
    assert parts["attention"] == pytest.approx(3.7e12 / (798e12 * 0.25))
    assert parts["memory-bound kernels"] == pytest.approx(3.7e10 / (3.0e12 * 0.8))
    assert parts["launch gaps"] == pytest.approx(300e-6) and parts["collectives"] == pytest.approx(1e-2)
    # One op: the longer of its arithmetic and its traffic, plus its launch.
    assert predict.op_seconds(1e12, 1e6, H100, a) == pytest.approx(1e12 / (798e12 * 0.5) + 1e-6)
    assert predict.op_seconds(0.0, 1e9, H100, a, launches=2) == pytest.approx(1e9 / 2.4e12 + 2e-6)


def test_calibration_fits_the_matmul_efficiency_alone():
    work = _work()
    fitted = predict.calibrate(work, target=400_000)
    assert work.tokens_per_s(H100, fitted) == pytest.approx(400_000, rel=1e-6)
    assert dataclasses.replace(fitted, matmul_efficiency=0.55) == predict.Assumptions()
    with pytest.raises(ValueError, match="^calibration: no matmul efficiency"):
        predict.calibrate(work, target=10_000_000)


@pytest.fixture(scope="module")
def lines():
    return predict.report_lines(16, 1024)


def test_the_cli_prints_assumptions_the_calibration_and_both_gpus(lines):
    text = "\n".join(lines)
    assert "matmul efficiency" in text and "copy efficiency" in text and "468,000 tokens/s per H100" in text
    steps = [line for line in lines if line.lstrip().startswith(("H100:", "H200:"))]
    assert len(steps) == 4  # two paths, two GPUs
    rate = {line: float(line.split(":")[1].split("tokens/s")[0].replace(",", "")) for line in steps}
    fused, before = list(rate.values())[:2], list(rate.values())[2:]
    # The fused step moves fewer bytes and launches less: predicted faster on both.
    assert fused[0] > before[0] and fused[1] > before[1]
    for op in ("layernorm-fwdbwd", "mlp-fwdbwd", "linear_cross_entropy-fwdbwd", "adamw-step",
               "attention-fwdbwd"):
        assert any(line.lstrip().startswith(op) and "H100" in line and "H200" in line for line in lines), op


def test_report_predictions_for_ours_and_the_training_variants(monkeypatch):
    monkeypatch.setattr(predict, "gpt2_work", lambda B, T, **kw: _work(tokens=B * T))
    p = predict.ReportPredictor(Ceilings(copy_bytes_per_s=3e12, matmul_flops_per_s=800e12),
                                predict.Assumptions(), device="cpu")
    op = Case("attention-fwd", "p", ["ours", "sdpa"], "sdpa", make=None, flops=1e12, bytes=1e6)
    assert p(op, "ours") == pytest.approx(predict.op_seconds(1e12, 1e6, p.gpu, p.assumptions, attention=True))
    assert p(op, "sdpa") is None
    step = Case("train-step", "p", ["triton", "triton-before", "torch-eager"], "torch-eager", make=None,
                subject="triton", meta=dict(preset="gpt2", batch_size=4, seq_len=256, dropout=0.0))
    assert p(step, "triton") == pytest.approx(1024 / _work(tokens=1024).tokens_per_s(p.gpu, p.assumptions))
    assert p(step, "triton-before") is not None and p(step, "torch-eager") is None
    step.meta["dropout"] = 0.1  # the anatomy records no dropout
    assert p(step, "triton") is None
