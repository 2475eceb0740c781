#!/usr/bin/env bash
# The one device call of a GPU session (issue "On a real GPU"): the whole test suite
# on the GPU (bf16 included), then `python -m bench.report --quick`, inside one
# deadline. Run from the repo root on the GPU machine; results go under $OUT.
#
#   bash bench/gpu_session.sh            # both phases, about 9 minutes at most
#   bash bench/gpu_session.sh tests      # the test phase alone
#   bash bench/gpu_session.sh report     # the report alone (add GPU_SESSION_FULL=1: full plan)
#
# Why it is shaped this way: a session gets 15 minutes of device time, a machine
# start included, so one call of under 10 minutes is all there is; compiling
# every autotune configuration dominates the test phase, so the tests run in
# 8 pytest-xdist workers (Triton compiles in each worker's process; the on-disk
# cache is shared) when xdist is there; the report runs alone on the GPU after
# them and rewrites its tables after every comparison, so a phase cut off by
# its deadline keeps what it measured. At most 8 files come back from $OUT:
# environment.txt, pytest.log, report.log, report/{results.json, results.md,
# 2 plots}.
#
# The GPU machine has no network and no .git: before the call, here,
#   mkdir -p device_cache && cp -r ../shared/tiktoken device_cache/ && git rev-parse --short HEAD > device_cache/commit.txt
# and name device_cache (git-ignored) in the call's `carry`; PYTHONPATH=. replaces
# `pip install -e .` there.
set -u
cd "$(dirname "$0")/.."
phase="${1:-all}"
case "$phase" in all|tests|report) ;; *) echo "usage: bash bench/gpu_session.sh [all|tests|report]" >&2; exit 2 ;; esac
deadline_s="${GPU_SESSION_SECONDS:-540}"   # the call's timeout_s should leave a minute beyond it
started=$(date +%s)
left() { echo $(( deadline_s - ($(date +%s) - started) )); }
out="${OUT:-bench/results/local-$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$out"
py="${PYTHON:-python3}"   # the GPU machine's python3 holds torch and triton
export PYTHONPATH=. PYTHONUNBUFFERED=1
if [ -d device_cache/tiktoken ]; then
  export TIKTOKEN_CACHE_DIR="$PWD/device_cache/tiktoken"
else
  # tiktoken would try to download the gpt2 BPE (no timeout) on a machine without network.
  echo "WARNING: device_cache/tiktoken is missing: gpt2-tokenizer tests will try the network" >&2
fi

have_xdist=0
"$py" -c "import xdist, pytest_timeout" 2>/dev/null && have_xdist=1
{
  date -u +"date: %Y-%m-%dT%H:%M:%SZ"
  echo "commit: $(git rev-parse --short HEAD 2>/dev/null || cat device_cache/commit.txt 2>/dev/null || echo unknown)"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>&1
  "$py" -c "import sys, torch, triton, numpy; print('python', sys.version.split()[0], '| torch', torch.__version__, 'cuda', torch.version.cuda, '| triton', triton.__version__, '| numpy', numpy.__version__)"
  if [ "$have_xdist" = 1 ]; then echo "pytest-xdist and pytest-timeout: present"
  else echo "pytest-xdist or pytest-timeout: missing (tests run in one process)"; fi
  echo "cpus: $(nproc)"
} > "$out/environment.txt" 2>&1
cat "$out/environment.txt"

status=0
if [ "$phase" != report ]; then
  if [ "$phase" = all ]; then tests_s=$(( $(left) - 330 )); else tests_s=$(( $(left) - 10 )); fi
  [ "$tests_s" -gt 240 ] && [ "$phase" = all ] && tests_s=240
  parallel=()
  [ "$have_xdist" = 1 ] && parallel=(-n 8 --timeout 180)
  # test_sm90_compile.py compiles every kernel ahead of time, serially: on a GPU
  # the real launches below compile (and run) them all anyway.
  echo "== tests: pytest tests ${parallel[*]} (${tests_s} s at most)"
  timeout -s INT --kill-after=20 "$tests_s" "$py" -m pytest tests "${parallel[@]}" -v --tb=short -p no:cacheprovider \
    --ignore=tests/test_sm90_compile.py -rfEs --durations=25 > "$out/pytest.log" 2>&1
  rc=$?
  [ "$rc" -ne 0 ] && status=1
  [ "$rc" -ge 124 ] && echo "tests: stopped at the ${tests_s} s deadline (exit $rc)" | tee -a "$out/pytest.log"
fi
if [ "$phase" != tests ]; then
  report_s=$(( $(left) - 10 ))
  # Comparisons are not started past --budget; the hard deadline stops one that overruns.
  budget_s=$(( report_s - 60 ))
  mode=(--quick)
  [ "${GPU_SESSION_FULL:-0}" = 1 ] && mode=()
  echo "== report: python3 -m bench.report ${mode[*]} --budget ${budget_s} (${report_s} s at most)"
  TRITON_PRINT_AUTOTUNING=1 timeout -s INT --kill-after=20 "$report_s" "$py" -m bench.report "${mode[@]}" \
    --budget "$budget_s" --out "$out/report" > "$out/report.log" 2>&1
  rc=$?
  [ "$rc" -ne 0 ] && status=1
  [ "$rc" -ge 124 ] && echo "report: stopped at the ${report_s} s deadline (exit $rc)" | tee -a "$out/report.log"
fi

# What the reply's output tail should hold: the verdicts, not the logs.
if [ -f "$out/pytest.log" ]; then
  echo "== tests (full log: pytest.log)"
  grep -E "^(FAILED|ERROR)" "$out/pytest.log" | cut -c1-300 | head -n 40
  grep -E "(passed|failed|error).* in [0-9.]+s" "$out/pytest.log" | tail -n 1
  grep -E "^tests: stopped" "$out/pytest.log"
fi
if [ -f "$out/report/results.md" ]; then
  echo "== report (full table: report/results.md)"
  grep -E "^\| " "$out/report/results.md" | cut -c1-260
elif [ -f "$out/report.log" ]; then
  tail -n 30 "$out/report.log"
fi
echo "== done in $(( $(date +%s) - started )) s, exit $status"
exit "$status"
