#!/usr/bin/env bash
# A whole GPU session in one command: the test suite on the GPU (bf16 included),
# then `python -m bench.report --quick`, both inside one deadline, every result
# under one folder. Run it from anywhere on a machine with a CUDA GPU:
#
#   bash bench/gpu_session.sh --out DIR                  # both phases, 9 minutes at most
#   bash bench/gpu_session.sh --out DIR tests            # the test phase alone
#   bash bench/gpu_session.sh --out DIR --full report    # the report alone, its full plan
#
# Options:
#   --out DIR             where the results go (default bench/results/gpu-session-<date-time>)
#   --deadline SECONDS    the whole session's deadline (default 540)
#   --full                the report's full plan instead of --quick
#   --tiktoken-cache DIR  a folder holding tiktoken's cache of the gpt2 files, for a
#                         machine without network (or set TIKTOKEN_CACHE_DIR)
#   --commit REV          the commit being measured, recorded where the tree has no .git
#   PYTHON=...            the interpreter holding torch and triton (default python3)
#
# DIR then holds environment.txt, pytest.log, report.log and report/ (results.json,
# results.md, two plots). Commit it as bench/results/<gpu>-<date>/, whatever it shows.
#
# Why it is shaped this way: compiling every autotune configuration dominates the
# test phase, so the tests run in 8 pytest-xdist workers when xdist is installed
# (each worker compiles in its own process; Triton's on-disk cache is shared); the
# report then runs alone on the GPU, so that nothing else competes with its timing,
# and rewrites its tables after every comparison. The deadline sends SIGINT: pytest
# prints its summary, the report writes what it measured and marks the rest
# "skipped: interrupted". The tail of the output is the verdicts, not the logs.
set -u
repo="$(cd "$(dirname "$0")/.." && pwd)"
usage="usage: bash bench/gpu_session.sh [--out DIR] [--deadline SECONDS] [--full] [--tiktoken-cache DIR] [--commit REV] [all|tests|report]"
out="" deadline_s=540 full=0 commit="" phase=all tiktoken_cache=""
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out="${2:?$usage}"; shift 2 ;;
    --deadline) deadline_s="${2:?$usage}"; shift 2 ;;
    --full) full=1; shift ;;
    --tiktoken-cache) tiktoken_cache="${2:?$usage}"; shift 2 ;;
    --commit) commit="${2:?$usage}"; shift 2 ;;
    all|tests|report) phase="$1"; shift ;;
    -h|--help) echo "$usage"; exit 0 ;;
    *) echo "$usage" >&2; exit 2 ;;
  esac
done
case "$deadline_s" in ''|*[!0-9]*) echo "gpu_session: --deadline takes whole seconds, got '$deadline_s'" >&2; exit 2 ;; esac
started=$(date +%s)
left() { echo $(( deadline_s - ($(date +%s) - started) )); }
# Paths given on the command line are relative to where it was run; then the repo root.
if [ -n "$tiktoken_cache" ]; then
  TIKTOKEN_CACHE_DIR="$(cd "$tiktoken_cache" 2>/dev/null && pwd)" || {
    echo "gpu_session: --tiktoken-cache: no folder $tiktoken_cache" >&2; exit 2; }
  export TIKTOKEN_CACHE_DIR
fi
[ -n "$out" ] || out="$repo/bench/results/gpu-session-$(date +%Y%m%d-%H%M%S)"
mkdir -p "$out" && out="$(cd "$out" && pwd)"
cd "$repo"
py="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if [ -z "${TIKTOKEN_CACHE_DIR:-}" ]; then
  echo "note: TIKTOKEN_CACHE_DIR is not set: without network the gpt2-tokenizer tests skip" >&2
fi
[ -n "$commit" ] || commit="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"

have_xdist=0
"$py" -c "import xdist, pytest_timeout" 2>/dev/null && have_xdist=1
{
  date -u +"date: %Y-%m-%dT%H:%M:%SZ"
  echo "commit: $commit"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>&1
  "$py" -c "import sys, torch, triton, numpy; print('python', sys.version.split()[0], '| torch', torch.__version__, 'cuda', torch.version.cuda, '| triton', triton.__version__, '| numpy', numpy.__version__)"
  if [ "$have_xdist" = 1 ]; then echo "pytest-xdist and pytest-timeout: present"
  else echo "pytest-xdist or pytest-timeout: missing (tests run in one process)"; fi
  echo "cpus: $(nproc)"
} > "$out/environment.txt" 2>&1
cat "$out/environment.txt"

status=0
if [ "$phase" != report ]; then
  # All phases: the tests get what the report's ~330 s leave, at most 240 s.
  if [ "$phase" = all ]; then tests_s=$(( $(left) - 330 )); else tests_s=$(( $(left) - 10 )); fi
  [ "$tests_s" -gt 240 ] && [ "$phase" = all ] && tests_s=240
  parallel=()
  [ "$have_xdist" = 1 ] && parallel=(-n 8 --timeout 180)
  # The ahead-of-time compile check compiles every kernel serially; here the real
  # launches compile (and run) them all anyway.
  [ -f tests/test_sm90_compile.py ] && parallel+=(--ignore=tests/test_sm90_compile.py)
  echo "== tests: pytest tests ${parallel[*]} (${tests_s} s at most)"
  timeout -s INT --kill-after=20 "$tests_s" "$py" -m pytest tests "${parallel[@]}" -v --tb=short \
    -p no:cacheprovider --durations=25 > "$out/pytest.log" 2>&1
  rc=$?
  [ "$rc" -ne 0 ] && status=1
  [ "$rc" -ge 124 ] && echo "tests: stopped at the ${tests_s} s deadline (exit $rc)" | tee -a "$out/pytest.log"
fi
if [ "$phase" != tests ]; then
  report_s=$(( $(left) - 10 ))
  # Comparisons are not started past --budget; the hard deadline stops one that overruns.
  budget_s=$(( report_s - 60 ))
  mode=(--quick)
  [ "$full" = 1 ] && mode=()
  echo "== report: $py -m bench.report ${mode[*]} --budget ${budget_s} (${report_s} s at most)"
  TRITON_PRINT_AUTOTUNING=1 timeout -s INT --kill-after=20 "$report_s" "$py" -m bench.report "${mode[@]}" \
    --budget "$budget_s" --out "$out/report" > "$out/report.log" 2>&1
  rc=$?
  [ "$rc" -ne 0 ] && status=1
  [ "$rc" -ge 124 ] && echo "report: stopped at the ${report_s} s deadline (exit $rc)" | tee -a "$out/report.log"
fi

echo "== results in $out"
if [ -f "$out/pytest.log" ]; then
  echo "== tests (full log: pytest.log)"
  grep -E "^(FAILED|ERROR)" "$out/pytest.log" | cut -c1-300 | head -n 40
  grep -E "^[0-9]+ skipped: " "$out/pytest.log" | head -n 10
  grep -E "(passed|failed|error).* in [0-9.]+s" "$out/pytest.log" | tail -n 1
  grep -E "^tests: stopped" "$out/pytest.log"
fi
if [ -f "$out/report/results.md" ]; then
  echo "== report (full tables: report/results.md)"
  grep -E "^\| " "$out/report/results.md" | cut -c1-260
elif [ -f "$out/report.log" ]; then
  tail -n 30 "$out/report.log"
fi
echo "== done in $(( $(date +%s) - started )) s, exit $status"
exit "$status"
