"""The root conftest's session decisions, seen from a child pytest: on a machine that
reports CUDA, the gpu-marked tests are collected first (a deadline-bound GPU run
keeps their verdicts); without CUDA they are skipped with a reason."""
import pathlib
import subprocess
import sys

import pytest
import torch

from tests.helpers import child_env

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _collect(tmp_path, fake_cuda: bool) -> list[str]:
    plugin_dir = tmp_path / "plugins"
    plugin_dir.mkdir(parents=True)
    (plugin_dir / "fake_cuda.py").write_text(
        "import torch\ntorch.cuda.is_available = lambda: True\n" if fake_cuda else "")
    env = child_env(plugin_dir)
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "fake_cuda", "-p", "no:cacheprovider",
                           "--collect-only", "-q", "tests/test_layernorm.py"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return [line for line in proc.stdout.splitlines() if "::" in line]


@pytest.mark.skipif(torch.cuda.is_available(), reason="fakes CUDA on a machine without it")
def test_gpu_tests_are_collected_first_where_cuda_is_reported(tmp_path):
    ids = _collect(tmp_path, fake_cuda=True)
    gpu = [i for i, name in enumerate(ids) if "test_gpu_" in name]
    assert gpu and gpu == list(range(len(gpu))), ids[:len(gpu) + 2]
    plain = _collect(tmp_path / "again", fake_cuda=False)  # file order without CUDA
    assert "test_gpu_" not in plain[0] and any("test_gpu_" in name for name in plain)
