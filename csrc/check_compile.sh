#!/usr/bin/env bash
# Compile-check every csrc/*.cu for sm_80 and sm_90a (no GPU needed) and fail on errors or register spills.
#
#   bash csrc/check_compile.sh            # from the repository root (or anywhere: paths are relative to this file)
#   NVCC=/path/to/nvcc bash csrc/check_compile.sh
#
# Each (file, arch) pair is one nvcc run with -Xptxas -v; the two archs run in parallel (CI machines have 2 cores).
# Exit status: 0 when every compile succeeds with "0 bytes spill stores" and "0 bytes stack frame" for every kernel,
# 1 otherwise; 2 when nvcc is missing.  The ptxas lines are printed so CI logs show registers per instantiation.
set -u -o pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
nvcc="${NVCC:-nvcc}"
if ! command -v "$nvcc" >/dev/null 2>&1; then
    echo "check_compile.sh: nvcc not found (set NVCC or put it on PATH)" >&2
    exit 2
fi
"$nvcc" --version | tail -n 1

archs=("compute_80,code=sm_80" "compute_90a,code=sm_90a")
# PYQUANT_PTXAS_LOG_DIR: keep the ptxas logs there (with each run's exit status and the source's sha256), so the
# compile tests of tests/test_cuda_ext.py read them instead of compiling everything a second time (.ci/run sets it).
if [ -n "${PYQUANT_PTXAS_LOG_DIR:-}" ]; then
    out="$PYQUANT_PTXAS_LOG_DIR"
    mkdir -p "$out"
else
    out="$(mktemp -d)"
    trap 'rm -rf "$out"' EXIT
fi

status=0
shopt -s nullglob
cus=("$here"/*.cu)
if [ "${#cus[@]}" -eq 0 ]; then
    echo "check_compile.sh: no .cu files in $here" >&2
    exit 1
fi

for cu in "${cus[@]}"; do
    name="$(basename "$cu" .cu)"
    pids=()
    for arch in "${archs[@]}"; do
        sm="${arch##*=}"
        log="$out/$name.$sm.log"
        "$nvcc" -c -o "$out/$name.$sm.o" "-gencode=arch=$arch" -std=c++17 -O3 -Xptxas -v -I"$here" "$cu" \
            >"$log" 2>&1 &
        pids+=("$!")
    done
    i=0
    for arch in "${archs[@]}"; do
        sm="${arch##*=}"
        log="$out/$name.$sm.log"
        rc=0
        wait "${pids[$i]}" || rc=$?
        echo "$rc" >"$out/$name.$sm.rc"
        sha256sum "$cu" | cut -d' ' -f1 >"$out/$name.$sm.sha256"
        if [ "$rc" != "0" ]; then
            echo "FAIL  $name.cu [$sm]: nvcc failed" >&2
            cat "$log" >&2
            status=1
        else
            kernels=$(grep -c "Compiling entry function" "$log" || true)
            bad=$(grep -E "bytes stack frame" "$log" \
                  | grep -vcE "^\s*0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads" || true)
            regs=$(grep -oE "Used [0-9]+ registers" "$log" | awk '{print $2}' | sort -n | uniq | tr '\n' ' ')
            echo "ok    $name.cu [$sm]: $kernels kernels, registers used: ${regs:-?}"
            if [ "$bad" != "0" ]; then
                echo "FAIL  $name.cu [$sm]: $bad function(s) spill registers or use a stack frame" >&2
                grep -B1 -E "[1-9][0-9]* bytes (spill|stack)" "$log" >&2
                status=1
            fi
        fi
        i=$((i + 1))
    done
done
exit $status
