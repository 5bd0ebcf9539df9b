#!/usr/bin/env bash
# The GPU check, one command for a CUDA machine (H100/H200) that already has torch and Triton and
# no network. Installs the project without downloading, then runs each step within a time budget,
# the most important first:
#
#   install  pip install --no-deps --no-build-isolation -e .
#   wheels   the peers' wheels carried along (--wheels DIR: scripts/peer_wheels.sh fetches them)
#   suite    pytest tests (pytest-xdist when importable), every result written as it comes
#            (-v, unbuffered) and the failures named at the end (-rf): a timeout still leaves
#            what passed and what failed in logs/suite.log
#   xent, rl, linear, distill
#            bench/report.py, one section each under its own budget (peers where importable)
#   host     bench/host_time.py: host time per step against the eager recipes (no launch)
#   tune     bench/tune_launch.py: the launch table's choice for short and medium rows against
#            its neighbours (block, warps), each checked then timed, under its own --budget
#   longrows bench/long_rows.py: the two-pass kernel and the split-row kernel (opt-in, never run
#            on a GPU before) side by side at 8192 x 128256 and 4096 x 256000, each checked
#   memcheck compute-sanitizer memcheck on scripts/memcheck_target.py (targets outside [0, C))
#   large    scripts/check_large.py: bf16 16400 x 131072, more than 2^31 logits
#   graph    the CUDA-graph capture test of tests/test_training_loops.py
#   example  examples/train_tiny_lm.py, 100 steps
#
# and prints one summary (ok / FAILED / skipped, with the seconds of each step). Exits 1 if a step
# failed. A step may use its own budget plus what the steps before it left unused; the whole run
# stops within --budget seconds (default 540, 9 minutes of a 15-minute device lease). The budgets
# are estimates, not measurements: adjust BUDGET below after a run.
#
#   bash scripts/gpu_check.sh [--out DIR] [--dry] [--budget SECONDS] [--wheels DIR]
#
# --wheels: a folder of wheels installed with --no-index --no-deps before the suite (the device
#   has no network); default shared/wheels, then bench/wheels, where present.
# --out: where summary.txt, logs.tar.gz (every step's log; the logs/ folder itself if the run is
#   killed before its end) and report/SECTION/ (report.md, report.json, report.png for xent) go;
#   default $OUT when set, else bench/out/gpu_check.
# --dry: the same steps on a CPU, small, for CI: the suite's `-k seed` tests, report.py --quick,
#   the memcheck target and a tiny shape of the large check under Triton's interpreter (the
#   sanitizer and the CUDA graph need a GPU), the example for 3 steps.
# PYTHON: the interpreter (default python3).
# shellcheck disable=SC2317  # finish (the EXIT trap) and install (run by bash -c) look unreachable
set -uo pipefail
CALLER_DIR=$PWD
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2

DRY=0
WHEELS=""
OUT_DIR="${OUT:-bench/out/gpu_check}"
TOTAL=""
while [ $# -gt 0 ]; do
    case "$1" in
        --dry) DRY=1 ;;
        --out) OUT_DIR="$2"; [[ "$2" = /* ]] || OUT_DIR="$CALLER_DIR/$2"; shift ;;
        --budget) TOTAL="$2"; shift ;;
        --wheels) WHEELS="$2"; [[ "$2" = /* ]] || WHEELS="$CALLER_DIR/$2"; shift ;;
        -h | --help) sed -n '2,/^# shellcheck/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu_check: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done
PY="${PYTHON:-python3}"
STEPS=(install wheels suite xent rl linear distill host tune longrows memcheck large graph
    example)
SECTIONS=(xent rl linear distill)
# Seconds per step (estimates); with --dry a safety net only (CI on two cores).
if [ "$DRY" = 1 ]; then
    declare -A BUDGET=([install]=120 [wheels]=60 [suite]=300 [xent]=90 [rl]=60 [linear]=90
        [distill]=90 [host]=120 [tune]=60 [longrows]=60 [memcheck]=90 [large]=60 [graph]=30
        [example]=120)
else
    # 540 s in all (9 minutes of a 15-minute lease, machine start included): the suite first,
    # then each report section under its own budget, so one slow section cannot eat the rest.
    declare -A BUDGET=([install]=20 [wheels]=15 [suite]=185 [xent]=50 [rl]=35 [linear]=55
        [distill]=35 [host]=20 [tune]=40 [longrows]=30 [memcheck]=20 [large]=15 [graph]=10
        [example]=10)
fi
SUM=0
for s in "${STEPS[@]}"; do SUM=$((SUM + BUDGET[$s])); done
TOTAL="${TOTAL:-$SUM}"
if [ "$TOTAL" -lt "$SUM" ]; then  # a shorter --budget shrinks every step's share alike
    for s in "${STEPS[@]}"; do BUDGET[$s]=$((BUDGET[$s] * TOTAL / SUM)); done
fi
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
LOGS="$OUT_DIR/logs"
rm -rf "$LOGS" "$OUT_DIR/report" "$OUT_DIR/logs.tar.gz" "$OUT_DIR/summary.txt"
mkdir -p "$LOGS"
START=$SECONDS
DEADLINE=$((START + TOTAL))
declare -A STATUS SECS NOTE
ENV_LINE=""

note_of() {  # the last non-empty line of a log, shortened
    grep -v '^[[:space:]]*$' "$1" 2>/dev/null | tail -n 1 | sed 's/^=* *//; s/ *=*$//' | cut -c1-110
}

budget_of() {  # seconds left for step $1: up to the deadline, less the later steps' budgets
    local later=0 seen=0 s
    for s in "${STEPS[@]}"; do
        [ "$seen" = 1 ] && later=$((later + BUDGET[$s]))
        [ "$s" = "$1" ] && seen=1
    done
    echo $((DEADLINE - SECONDS - later))
}

skip() {  # name reason
    STATUS[$1]=skipped
    SECS[$1]=0
    NOTE[$1]="$2"
    echo "[gpu_check] $1: skipped ($2)"
}

step() {  # name command...: runs it within its budget, logs to $LOGS/name.log
    local name=$1 t rc t0
    shift
    t=$(budget_of "$name")
    if [ "$t" -lt 5 ]; then
        skip "$name" "no time left"
        return 1
    fi
    echo "[gpu_check] $name (budget ${t} s): $*"
    t0=$SECONDS
    timeout -k 10 "$t" "$@" >"$LOGS/$name.log" 2>&1
    rc=$?
    SECS[$name]=$((SECONDS - t0))
    if [ "$rc" = 0 ]; then
        STATUS[$name]=ok
        NOTE[$name]="$(note_of "$LOGS/$name.log")"
    else
        STATUS[$name]=FAILED
        if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
            NOTE[$name]="timed out after ${t} s"
        else
            NOTE[$name]="exit $rc: $(note_of "$LOGS/$name.log")"
        fi
        echo "[gpu_check] $name FAILED; the end of $name.log:"
        tail -n 30 "$LOGS/$name.log" | sed 's/^/    /'
    fi
    echo "[gpu_check] $name: ${STATUS[$name]} (${SECS[$name]} s)"
    return "$rc"
}

finish() {  # the summary, then the logs into one tarball (the GPU tool brings back few files)
    local s line
    {
        echo "gpu_check summary ($([ "$DRY" = 1 ] && echo "--dry, CPU" || echo GPU)," \
            "$((SECONDS - START)) s of $TOTAL):"
        echo "  $ENV_LINE"
        for s in "${STEPS[@]}"; do
            line=$(printf '  %-9s %-8s %5s s  %s' "$s" "${STATUS[$s]:-not run}" \
                "${SECS[$s]:--}" "${NOTE[$s]:-}")
            echo "$line"
        done
    } >"$OUT_DIR/summary.txt"
    cp "$OUT_DIR/summary.txt" "$LOGS/"
    tar -czf "$OUT_DIR/logs.tar.gz" -C "$OUT_DIR" logs && rm -rf "$LOGS"
    echo
    cat "$OUT_DIR/summary.txt"
    echo "  output: $OUT_DIR (summary.txt, logs.tar.gz, report/)"
}
trap finish EXIT

if ! command -v "$PY" >/dev/null 2>&1; then
    echo "gpu_check: no $PY (set PYTHON)" >&2
    ENV_LINE="no python"
    exit 1
fi
ENV_LINE=$("$PY" - <<'EOF' 2>&1 | tail -n 1
import platform, torch
try:
    import triton
    tv = triton.__version__
except Exception as exc:
    tv = f"not importable ({type(exc).__name__})"
dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
print(f"{dev} | torch {torch.__version__} (CUDA {torch.version.cuda}) | triton {tv} | "
      f"python {platform.python_version()}")
EOF
)
echo "[gpu_check] $ENV_LINE"
HAS_CUDA=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
if [ "$DRY" = 0 ] && [ "$HAS_CUDA" != 1 ]; then
    echo "gpu_check: torch sees no CUDA device; on a CPU run with --dry" >&2
    for s in "${STEPS[@]}"; do skip "$s" "torch sees no CUDA device"; done
    exit 1
fi

# install: nothing is downloaded (--no-index); a system Python that refuses (PEP 668) is retried
# with PIP_BREAK_SYSTEM_PACKAGES, which only lets pip add this editable install.
install() {
    "$PY" -m pip install --no-index --no-deps --no-build-isolation -e . && return 0
    echo "gpu_check: retrying with PIP_BREAK_SYSTEM_PACKAGES=1"
    PIP_BREAK_SYSTEM_PACKAGES=1 "$PY" -m pip install --no-index --no-deps --no-build-isolation -e .
}
export -f install
export PY
step install bash -c install

# wheels: the peers (Liger-Kernel, cut-cross-entropy, TRL: pure Python) for the report.
if [ -z "$WHEELS" ]; then
    for d in shared/wheels bench/wheels; do [ -d "$d" ] && WHEELS="$PWD/$d" && break; done
fi
if [ -n "$WHEELS" ] && compgen -G "$WHEELS/*.whl" >/dev/null; then
    step wheels "$PY" -m pip install --no-index --no-deps "$WHEELS"/*.whl
else
    skip wheels "no wheels folder (scripts/peer_wheels.sh makes one)"
fi

# suite: pytest-xdist when importable (the GPU machine may lack it, and hypothesis: those tests
# skip themselves); the test modules need nothing else beyond torch, triton and numpy. Each
# result is written as it comes (-v, unbuffered), the failures named again at the end (-rf).
PYTEST=(env PYTHONUNBUFFERED=1 "$PY" -m pytest tests -v -rf -p no:cacheprovider --durations=15
    --junitxml="$LOGS/suite.xml")
if [ "$DRY" = 1 ]; then
    PYTEST+=(-k seed)
elif "$PY" -c "import xdist" 2>/dev/null; then
    PYTEST+=(-n "${FUSED_XENT_TEST_WORKERS:-8}")
fi
step suite "${PYTEST[@]}"

for section in "${SECTIONS[@]}"; do
    REPORT=(env PYTHONUNBUFFERED=1 "$PY" bench/report.py --sections "$section"
        --out "$OUT_DIR/report/$section")
    [ "$DRY" = 1 ] && REPORT+=(--quick)
    step "$section" "${REPORT[@]}"
done

if [ "$DRY" = 1 ]; then
    skip host "bench/host_time.py runs in CI itself"
else
    step host "$PY" bench/host_time.py
fi

if [ "$DRY" = 1 ]; then
    step tune "$PY" bench/tune_launch.py --dry
else  # (its own budget two thirds of the step's, so the last candidate and the summary fit)
    step tune "$PY" bench/tune_launch.py --budget $(($(budget_of tune) * 2 / 3)) \
        --out "$OUT_DIR/tune_launch.json"
fi

if [ "$DRY" = 1 ]; then
    step longrows "$PY" bench/long_rows.py --dry
else
    step longrows "$PY" bench/long_rows.py --out "$OUT_DIR/long_rows.json"
fi

SANITIZER=$(command -v compute-sanitizer)
if [ -z "$SANITIZER" ]; then
    for f in /usr/local/cuda*/bin/compute-sanitizer; do [ -x "$f" ] && SANITIZER=$f; done
fi
if [ "$DRY" = 0 ] && [ -n "$SANITIZER" ]; then
    step memcheck env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool memcheck \
        --error-exitcode 1 --report-api-errors no --print-limit 20 "$PY" scripts/memcheck_target.py
elif step memcheck "$PY" scripts/memcheck_target.py; then
    # The target alone still checks the NaN rows (under the interpreter with --dry); the
    # sanitizer did not run, so the step counts as skipped.
    STATUS[memcheck]=skipped
    why="no compute-sanitizer on PATH nor in /usr/local/cuda*/bin"
    [ "$DRY" = 1 ] && why="no GPU for compute-sanitizer"
    NOTE[memcheck]="$why; the target alone: ${NOTE[memcheck]}"
fi

if [ "$DRY" = 1 ]; then
    step large "$PY" scripts/check_large.py --rows 6 --cols 300 &&
        NOTE[large]="tiny shape under the interpreter: ${NOTE[large]}"
else
    step large "$PY" scripts/check_large.py
fi

if [ "$DRY" = 1 ]; then
    skip graph "CUDA graphs need a GPU"
else
    step graph "$PY" -m pytest -q -p no:cacheprovider tests/test_training_loops.py -k cuda_graph
fi

if [ "$DRY" = 1 ]; then
    step example "$PY" examples/train_tiny_lm.py --steps 3 --device cpu --quiet
else
    step example "$PY" examples/train_tiny_lm.py --steps 100 --quiet
fi

for s in "${STEPS[@]}"; do
    [ "${STATUS[$s]:-}" = FAILED ] && exit 1
done
exit 0
