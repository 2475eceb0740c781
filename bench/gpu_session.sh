#!/usr/bin/env bash
# One device call of a GPU session, as issue "On a real GPU" asks: run from the repo
# root on the GPU machine, results under $OUT (the device tool brings $OUT back).
#
#   bash bench/gpu_session.sh tests    # GPU tests + kernel tests in bf16 (pytest -m gpu)
#   bash bench/gpu_session.sh report   # python -m bench.report (< 8 minutes)
#   bash bench/gpu_session.sh all      # both, when the call's time limit allows
#
# The GPU machine has no network: the gpt2 BPE cache must travel in a git-ignored
# folder (device_cache/tiktoken, named in the call's `carry`), and PYTHONPATH=.
# replaces `pip install -e .` there.
set -u
cd "$(dirname "$0")/.."
phase="${1:-all}"
out="${OUT:-bench/results/local-$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$out"
export PYTHONPATH=.
if [ -d device_cache/tiktoken ]; then export TIKTOKEN_CACHE_DIR="$PWD/device_cache/tiktoken"; fi

{
  date -u +"date: %Y-%m-%dT%H:%M:%SZ"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1
  python3 -c "import torch, triton, numpy; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| triton', triton.__version__, '| numpy', numpy.__version__)"
} > "$out/environment.txt" 2>&1
cat "$out/environment.txt"

status=0
if [ "$phase" = tests ] || [ "$phase" = all ]; then
  timeout 420 python3 -m pytest tests -m gpu -q -p no:cacheprovider -x --durations=20 \
    --junitxml="$out/pytest_gpu.xml" > "$out/pytest_gpu.log" 2>&1 || status=1
  tail -n 25 "$out/pytest_gpu.log"
fi
if [ "$phase" = report ] || [ "$phase" = all ]; then
  timeout 500 python3 -m bench.report --out "$out/report" > "$out/report.log" 2>&1 || status=1
  tail -n 40 "$out/report.log"
fi
exit "$status"
