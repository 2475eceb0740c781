#!/usr/bin/env bash
# A whole GPU session in one command: the test suite on the GPU (bf16 included),
# then `python -m bench.report --quick`, both inside one deadline, every result
# under one folder. Run it from anywhere on a machine with a CUDA GPU:
#
#   bash bench/gpu_session.sh --out DIR                  # both phases, 9 minutes at most
#   bash bench/gpu_session.sh --out DIR tests            # the test phase alone
#   bash bench/gpu_session.sh --out DIR --full report    # the report alone, its full plan
#   bash bench/gpu_session.sh --dry-run                  # the plan, the budgets, what is present
#   bash bench/gpu_session.sh prepare [--tiktoken-cache DIR] [--peers]   # before copying the tree
#
# Options:
#   --out DIR             where the results go (default bench/results/gpu-session-<date-time>)
#   --deadline SECONDS    the whole session's deadline (default 540); refused where it
#                         leaves a phase less than its minimum (see --dry-run)
#   --full                the report's full plan instead of --quick
#   --tiktoken-cache DIR  a folder holding tiktoken's cache of the gpt2 files, for a
#                         machine without network (or set TIKTOKEN_CACHE_DIR)
#   --commit REV          the commit being measured (default: git, else the prepared file)
#   --dry-run             print the plan, the budgets and the checks below; run nothing
#   PYTHON=...            the interpreter holding torch and triton (default python3)
#
# What a GPU machine may lack, and how to bring it. The machine needs python3 with
# torch (CUDA build) and triton, numpy, pytest, transformers, tiktoken and
# matplotlib; the rest is brought by `prepare`, run in the checkout on a machine
# with git and network before the tree is copied (it writes .gpu-session/, which
# git ignores; copy that folder along with the tree):
#   - the commit: a tree without .git records "unknown"; `prepare` writes
#     .gpu-session/commit (or pass --commit REV on the GPU machine);
#   - the GPT-2 BPE files (tiktoken downloads them on first use): without network
#     the tests that need them skip; `prepare --tiktoken-cache DIR` (or
#     TIKTOKEN_CACHE_DIR) copies a cache into .gpu-session/tiktoken, used when
#     TIKTOKEN_CACHE_DIR is not set;
#   - the peers' wheels (liger-kernel, for the LayerNorm and linear+cross-entropy
#     rows; those rows say "not installed" without it): `prepare --peers`
#     installs them, without dependencies, into .gpu-session/site, which the run
#     puts on PYTHONPATH;
#   - pytest-xdist and pytest-timeout (the test phase in 8 workers): without them
#     the tests run in one process and fewer finish inside the deadline.
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
prepared="$repo/.gpu-session"
usage="usage: bash bench/gpu_session.sh [--out DIR] [--deadline SECONDS] [--full] [--tiktoken-cache DIR] [--commit REV] [--dry-run] [all|tests|report]
       bash bench/gpu_session.sh prepare [--tiktoken-cache DIR] [--peers]   (--help: everything it needs)"
out="" deadline_s=540 full=0 commit="" phase=all tiktoken_cache="" dry_run=0 peers=0
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out="${2:?$usage}"; shift 2 ;;
    --deadline) deadline_s="${2:?$usage}"; shift 2 ;;
    --full) full=1; shift ;;
    --tiktoken-cache) tiktoken_cache="${2:?$usage}"; shift 2 ;;
    --commit) commit="${2:?$usage}"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    --peers) peers=1; shift ;;
    all|tests|report|prepare) phase="$1"; shift ;;
    -h|--help) sed -n '2,/^set -u$/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "$usage" >&2; exit 2 ;;
  esac
done
fail() { echo "gpu_session: $*" >&2; exit 2; }
case "$deadline_s" in ''|*[!0-9]*) fail "--deadline takes whole seconds, got '$deadline_s'" ;; esac
deadline_s=$((10#$deadline_s))
[ "$peers" = 1 ] && [ "$phase" != prepare ] && fail "--peers belongs to prepare"
# Paths given on the command line are relative to where it was run; then the repo root.
if [ -n "$tiktoken_cache" ]; then
  tiktoken_cache="$(cd "$tiktoken_cache" 2>/dev/null && pwd)" || fail "--tiktoken-cache: no folder $tiktoken_cache"
fi
py="${PYTHON:-python3}"

if [ "$phase" = prepare ]; then
  # On the machine the tree is copied from: record what a GPU machine cannot find out.
  cd "$repo"
  rev="$(git rev-parse HEAD 2>/dev/null)" || fail "prepare: $repo is not a git checkout"
  [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ] && rev="$rev (with uncommitted changes)"
  mkdir -p "$prepared"
  printf '%s\n' "$rev" > "$prepared/commit.tmp" && mv "$prepared/commit.tmp" "$prepared/commit"
  echo "prepare: commit $rev -> $prepared/commit"
  cache="${tiktoken_cache:-${TIKTOKEN_CACHE_DIR:-}}"
  if [ -n "$cache" ]; then
    rm -rf "$prepared/tiktoken.tmp" && cp -r "$cache" "$prepared/tiktoken.tmp" &&
      rm -rf "$prepared/tiktoken" && mv "$prepared/tiktoken.tmp" "$prepared/tiktoken" ||
      fail "prepare: could not copy $cache to $prepared/tiktoken"
    echo "prepare: tiktoken cache $cache -> $prepared/tiktoken ($(ls "$prepared/tiktoken" | wc -l) files)"
  else
    echo "prepare: no tiktoken cache given (--tiktoken-cache DIR or TIKTOKEN_CACHE_DIR): without network the GPT-2 BPE tests will skip"
  fi
  if [ "$peers" = 1 ]; then
    rm -rf "$prepared/site.tmp"
    "$py" -m pip install --quiet --no-deps --target "$prepared/site.tmp" "liger-kernel>=0.5" &&
      rm -rf "$prepared/site" && mv "$prepared/site.tmp" "$prepared/site" || fail "prepare: pip could not fetch liger-kernel"
    echo "prepare: liger-kernel -> $prepared/site"
  fi
  exit 0
fi

# Each phase needs a least amount of time to mean anything: the report ~330 s for
# its quick plan (60 s of it kept after its --budget for the comparison under way),
# the tests a minute. A deadline that leaves less is refused, not run short.
report_reserve_s=330 tests_min_s=60 tests_max_s=240 report_min_s=100 margin_s=10
case "$phase" in
  all) need=$(( report_reserve_s + tests_min_s )) ;;
  tests) need=$(( tests_min_s + margin_s )) ;;
  report) need=$(( report_min_s + margin_s )) ;;
esac
hint=""
[ "$phase" = all ] && hint=" (or run one phase: tests, report)"
[ "$deadline_s" -ge "$need" ] || fail "--deadline $deadline_s is too short for phase '$phase': it needs at least $need s$hint"
started=$(date +%s)
left() { echo $(( deadline_s - ($(date +%s) - started) )); }
at_least() { if [ "$1" -gt "$2" ]; then echo "$1"; else echo "$2"; fi; }
tests_budget() {  # what the tests get from what is left now
  local s
  if [ "$phase" = all ]; then s=$(( $1 - report_reserve_s )); [ "$s" -gt "$tests_max_s" ] && s=$tests_max_s
  else s=$(( $1 - margin_s )); fi
  at_least "$s" 1
}
report_budget() { at_least $(( $1 - margin_s )) 1; }

if [ -z "$tiktoken_cache" ] && [ -z "${TIKTOKEN_CACHE_DIR:-}" ] && [ -d "$prepared/tiktoken" ]; then
  tiktoken_cache="$prepared/tiktoken"
fi
[ -n "$tiktoken_cache" ] && export TIKTOKEN_CACHE_DIR="$tiktoken_cache"
extra_path=""
[ -d "$prepared/site" ] && extra_path="$prepared/site:"
commit_from="--commit"
if [ -z "$commit" ]; then
  if commit="$(git -C "$repo" rev-parse --short HEAD 2>/dev/null)"; then commit_from="git"
  elif [ -s "$prepared/commit" ]; then commit="$(head -n 1 "$prepared/commit")"; commit_from="$prepared/commit"
  else commit="unknown"; commit_from="nowhere: no .git, no --commit, no $prepared/commit (run prepare before copying the tree)"
  fi
fi
case "$out" in
  "") out="$repo/bench/results/gpu-session-$(date +%Y%m%d-%H%M%S)" ;;
  /*) ;;
  *) out="$PWD/$out" ;;
esac
cd "$repo"
export PYTHONPATH="$extra_path$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

have_xdist=0
"$py" -c "import xdist, pytest_timeout" 2>/dev/null && have_xdist=1
parallel=()
[ "$have_xdist" = 1 ] && parallel=(-n 8 --timeout 180)
# The ahead-of-time compile check compiles every kernel serially; here the real
# launches compile (and run) them all anyway.
[ -f tests/test_sm90_compile.py ] && parallel+=(--ignore=tests/test_sm90_compile.py)
mode=(--quick)
[ "$full" = 1 ] && mode=()

if [ "$dry_run" = 1 ]; then
  echo "== plan (dry run: nothing is run)"
  echo "deadline: $deadline_s s for phase '$phase'"
  if [ "$phase" != report ]; then
    echo "tests: $py -m pytest tests ${parallel[*]} -v --tb=short -p no:cacheprovider --durations=25 ($(tests_budget "$deadline_s") s at most)"
  fi
  if [ "$phase" != tests ]; then
    if [ "$phase" = all ]; then r=$(report_budget $(( deadline_s - $(tests_budget "$deadline_s") ))); else r=$(report_budget "$deadline_s"); fi
    echo "report: $py -m bench.report ${mode[*]} --budget $(( r - 60 > 0 ? r - 60 : 1 )) ($r s at most)"
  fi
  echo "results: $out"
  echo "== what is present"
  echo "commit: $commit (from $commit_from)"
  "$py" - <<'EOF'
import importlib.util, os, sys
def version(name):
    try:
        module = __import__(name)
    except Exception as e:  # whatever stops the import is what the reader needs to see
        return f"missing ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})"
    return getattr(module, "__version__", "present")
print("python:", sys.version.split()[0], "|", " | ".join(f"{n} {version(n)}" for n in ("torch", "triton", "numpy")))
try:
    import torch
    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (the session needs a CUDA GPU)"
except Exception:
    cuda = "unknown (torch does not import)"
print("cuda device:", cuda)
for name, why in (("pytest", "the test phase"), ("transformers", "the Hugging Face tests"),
                  ("tiktoken", "the GPT-2 BPE"), ("matplotlib", "the report's plots"),
                  ("xdist", "8 test workers (pytest-xdist)"), ("pytest_timeout", "per-test timeouts (pytest-timeout)"),
                  ("liger_kernel", "the Liger-Kernel rows (prepare --peers)")):
    found = importlib.util.find_spec(name) is not None
    print(f"{name}: {'present' if found else 'missing'} ({why})")
cache = os.environ.get("TIKTOKEN_CACHE_DIR")
if cache:
    files = len(os.listdir(cache)) if os.path.isdir(cache) else 0
    print(f"tiktoken cache: {cache} ({files} files; the gpt2 encoding needs 2)")
else:
    print("tiktoken cache: none (TIKTOKEN_CACHE_DIR unset, no .gpu-session/tiktoken): offline, the GPT-2 BPE tests skip")
EOF
  if command -v nvidia-smi >/dev/null 2>&1; then echo "nvidia-smi: present"; else echo "nvidia-smi: missing"; fi
  if command -v timeout >/dev/null 2>&1; then echo "timeout: present"; else echo "timeout: missing (coreutils; the deadline needs it)"; fi
  exit 0
fi

mkdir -p "$out" && out="$(cd "$out" && pwd)"
if [ -z "${TIKTOKEN_CACHE_DIR:-}" ]; then
  echo "note: TIKTOKEN_CACHE_DIR is not set: without network the gpt2-tokenizer tests skip" >&2
fi
{
  date -u +"date: %Y-%m-%dT%H:%M:%SZ"
  echo "commit: $commit (from $commit_from)"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>&1
  "$py" -c "import sys, torch, triton, numpy; print('python', sys.version.split()[0], '| torch', torch.__version__, 'cuda', torch.version.cuda, '| triton', triton.__version__, '| numpy', numpy.__version__)"
  if [ "$have_xdist" = 1 ]; then echo "pytest-xdist and pytest-timeout: present"
  else echo "pytest-xdist or pytest-timeout: missing (tests run in one process)"; fi
  echo "cpus: $(nproc)"
} > "$out/environment.txt" 2>&1
cat "$out/environment.txt"

status=0
if [ "$phase" != report ]; then
  tests_s=$(tests_budget "$(left)")
  echo "== tests: pytest tests ${parallel[*]} (${tests_s} s at most)"
  timeout -s INT --kill-after=20 "$tests_s" "$py" -m pytest tests "${parallel[@]}" -v --tb=short \
    -p no:cacheprovider --durations=25 > "$out/pytest.log" 2>&1
  rc=$?
  [ "$rc" -ne 0 ] && status=1
  [ "$rc" -ge 124 ] && echo "tests: stopped at the ${tests_s} s deadline (exit $rc)" | tee -a "$out/pytest.log"
fi
if [ "$phase" != tests ]; then
  report_s=$(report_budget "$(left)")
  # Comparisons are not started past --budget; the hard deadline stops one that overruns.
  budget_s=$(at_least $(( report_s - 60 )) 1)
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
