#!/usr/bin/env bash
# The test suite under every CPU kernel set this machine can run and 1 or 2 threads: a test's
# verdict must not depend on which x86 CPU runs it. torch picks its vectorised kernels from
# ATEN_CPU_CAPABILITY (default | avx2 | avx512: different rounding in reductions and
# transcendental functions) and its reduction split from OMP_NUM_THREADS.
#
#   bash tests/matrix.sh [PYTHON] [pytest args...]      (make test-matrix)
#
# A capability the CPU lacks is skipped and named (avx512 on a CPU without AVX-512 dies with
# SIGILL). Prints one line per combination and exits non-zero if any combination failed.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${1:-.venv/bin/python}
shift || true
flags=$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null || true)
caps=(default)
[[ $flags == *" avx2 "* ]] && caps+=(avx2)
if [[ $flags == *" avx512f "* && $flags == *" avx512bw "* && $flags == *" avx512vl "* ]]; then
  caps+=(avx512)
else
  echo "matrix: this CPU has no AVX-512: ATEN_CPU_CAPABILITY=avx512 not run"
fi
status=0
summary=()
for cap in "${caps[@]}"; do
  for threads in 1 2; do
    log=$(mktemp)
    start=$(date +%s)
    ATEN_CPU_CAPABILITY=$cap OMP_NUM_THREADS=$threads "$PY" -m pytest -q -p no:cacheprovider "$@" >"$log" 2>&1
    rc=$?
    line=$(grep -E '^(=+ )?[0-9]+ (passed|failed)' "$log" | tail -1)
    summary+=("ATEN_CPU_CAPABILITY=$cap OMP_NUM_THREADS=$threads: rc=$rc, $line ($(( $(date +%s) - start )) s)")
    if [[ $rc -ne 0 ]]; then
      status=1
      grep -E '^(FAILED|ERROR)' "$log" | sed 's/^/    /'
    fi
    echo "${summary[-1]}"
    rm -f "$log"
  done
done
echo "matrix:"
printf '  %s\n' "${summary[@]}"
exit $status
