"""The root conftest's session decisions, seen from a child pytest that loads it as a
plugin on a test file written here: on a machine that reports CUDA the gpu-marked
tests are collected first (the marker alone decides, not the name); without CUDA
they are skipped with one reason; and the summary lists skips one line per reason
while failures keep their own lines."""
import pathlib
import subprocess
import sys

import pytest
import torch

from tests.helpers import child_env

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Marked and unmarked tests interleaved; names and parameter ids that mention the
# GPU on unmarked tests, and none on marked ones.
SAMPLE = '''
import pytest

pytestmark = []


def test_plain_first():
    pass


@pytest.mark.gpu
def test_marked_a():
    pass


@pytest.mark.parametrize("where", ["gpu", "cpu"])
def test_plain_gpu_named(where):
    pass


class TestGroup:
    pytestmark = pytest.mark.gpu

    def test_marked_in_class(self):
        pass


def test_skipped_for_a_reason():
    pytest.skip("no data here")


def test_skipped_for_the_same_reason():
    pytest.skip("no data here")


def test_fails():
    assert 1 == 2


@pytest.mark.gpu
def test_marked_last():
    pass
'''


def _run(tmp_path, *args, fake_cuda: bool) -> subprocess.CompletedProcess:
    plugins = tmp_path / "plugins"
    plugins.mkdir(parents=True, exist_ok=True)
    (plugins / "fake_cuda.py").write_text(
        "import torch\ntorch.cuda.is_available = lambda: True\n" if fake_cuda else "")
    (tmp_path / "test_sample.py").write_text(SAMPLE)
    env = child_env(plugins)
    env.pop("TRITON_INTERPRET", None)
    # The repository's conftest.py as a plugin (`-p conftest`), after the fake CUDA one.
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "fake_cuda", "-p", "conftest",
                           "-p", "no:cacheprovider", "-p", "no:benchmark", "--rootdir", str(tmp_path),
                           "-c", "/dev/null", "-ra", *args, str(tmp_path / "test_sample.py")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def _collected(proc) -> list[str]:
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return [line.split("::", 1)[1] for line in proc.stdout.splitlines() if "::" in line]


MARKED = ["test_marked_a", "TestGroup::test_marked_in_class", "test_marked_last"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="fakes CUDA on a machine without it")
def test_marked_gpu_tests_are_collected_first_where_cuda_is_reported(tmp_path):
    ids = _collected(_run(tmp_path, "--collect-only", "-q", fake_cuda=True))
    assert ids[:3] == MARKED, ids
    assert ids[3:] == ["test_plain_first", "test_plain_gpu_named[gpu]", "test_plain_gpu_named[cpu]",
                       "test_skipped_for_a_reason", "test_skipped_for_the_same_reason", "test_fails"]
    plain = _collected(_run(tmp_path / "again", "--collect-only", "-q", fake_cuda=False))
    assert plain[0] == "test_plain_first" and plain[-1] == "test_marked_last"  # file order without CUDA


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the summary of GPU tests skipped on CPU")
def test_summary_lists_skips_once_per_reason_and_failures_in_full(tmp_path):
    proc = _run(tmp_path, fake_cuda=False)
    assert proc.returncode == 1, proc.stdout[-2000:]
    out = proc.stdout
    assert "assert 1 == 2" in out[out.index("FAILURES"):]
    summary = out[out.index("short test summary info"):]
    assert "FAILED" in summary and "test_fails" in summary
    assert "SKIPPED [" not in out  # no per-location skip lines
    by_reason = out[out.index("skipped, by reason"):].splitlines()[1:3]
    assert by_reason == ["3 skipped: needs a CUDA GPU; this machine has none", "2 skipped: no data here"]
    # The per-location list is still there on request.
    full = _run(tmp_path / "full", "--skip-locations", fake_cuda=False).stdout
    assert "SKIPPED [" in full and "skipped, by reason" not in full
