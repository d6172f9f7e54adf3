#!/usr/bin/env bash
# One GPU session in one command: build fastaspp._C with CUDA, run the test suite on CUDA tensors
# (triton and cuda backends; slow cases included), then benchmark. Everything lands in $OUT:
#   env.txt, build.log, tests-first.log, tests.log, bench-{aspp,conv}.log and the benches' JSON + markdown.
# Stages are bounded by timeouts so that a hang in one still leaves the others' files.
#   STAGES     which stages to run, in order (default "build tests bench profile")
#   TEST_S     seconds for the test suite (default 150) after TEST_FIRST (the cuda backend's test files,
#              TEST_FIRST_S seconds, default 90; their log is tests-first.log); TEST_ARGS extra pytest arguments
#   BENCH_S    seconds for each benchmark (default 120); BENCH_OPS which (default "overhead aspp conv";
#              "model" adds the whole models, eval rows with and without CUDA graphs); BENCH_TAG a suffix
#              for the logs' names (bench-<op><tag>.log) when one run benches twice
#   PROFILE_S  seconds for benchmarks/gpu_profile.py (stage "profile", not in the default list); BENCH_ARGS extra `fastaspp bench` arguments
#   SANITIZE_S seconds for each compute-sanitizer tool (stage "sanitize", not in the default list:
#              memcheck, racecheck and synccheck over SANITIZE_TESTS, default the cuda kernels' test
#              file; SANITIZE_ARGS extra pytest arguments); logs sanitize-<tool>.log
#   FASTASPP_COMMIT  the commit the tree was copied from (the copy has no .git)
#   PACK_TO    a directory that receives OUT as one archive, results.tgz, after each stage
# Stage "tests" is "tests_first tests_rest"; naming those two apart lets benches run in between.
# The CUDA build is for sm_90a (TORCH_CUDA_ARCH_LIST "9.0a"): the CuTe kernels' wgmma path exists only
# in an arch-specific image; FASTASPP_CUDA_CONV=sm80 runs their mma.sync path in the same build.
# The CUDA build needs CUTLASS's headers (setup.py). The device has no package index: where its
# python lacks nvidia-cutlass, carry the wheel in .whl/ (here: `pip download --no-deps -d .whl
# nvidia-cutlass==4.2.0.0`; .gitignore lists .whl), named in the run's carry; stage build unpacks it.
set -u
OUT=${OUT:-/tmp/fastaspp-gpu-run}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a} MAX_JOBS=${MAX_JOBS:-16}
PY=${PY:-python3}

stage_build() {
    { nvidia-smi -L; nvidia-smi --query-gpu=driver_version,clocks.sm,clocks.max.sm --format=csv
      $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
      echo "commit ${FASTASPP_COMMIT:-unknown}"; } >"$OUT/env.txt" 2>&1
    cat "$OUT/env.txt"
    local t0=$SECONDS
    # No package index there (pip install -e wants one for its build deps): build in place, and map
    # fastaspp.kernels onto kernels/ as setup.py's package_dir does for an install.
    ln -sfn ../kernels fastaspp/kernels
    if [ -z "${FASTASPP_CUTLASS_INCLUDE:-}" ] && ls .whl/nvidia_cutlass-*.whl >/dev/null 2>&1 &&
       ! $PY -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('cutlass_library') is None)"; then
        $PY -m zipfile -e .whl/nvidia_cutlass-*.whl /tmp/fastaspp-cutlass
        export FASTASPP_CUTLASS_INCLUDE=/tmp/fastaspp-cutlass/cutlass_library/source/include
    fi
    # setup.py stops where the C++ compiler would link libstdc++ statically (the H200 image's
    # CXX=/opt/gcc/bin/g++ finds only libstdc++.a); take the system compiler there.
    if [[ "$(${CXX:-c++} -print-file-name=libstdc++.so 2>/dev/null)" != /* ]] && [ -x /usr/bin/g++ ]; then
        export CXX=/usr/bin/g++ CC=/usr/bin/gcc
        echo "build: CXX=$CXX (the default compiler finds no libstdc++.so)"
    fi
    if ! timeout 300 $PY setup.py build_ext --inplace >"$OUT/build.log" 2>&1; then
        echo "BUILD FAILED"; tail -40 "$OUT/build.log"; exit 1
    fi
    grep -m1 "fastaspp: building" "$OUT/build.log"
    echo "build: $((SECONDS - t0)) s"
    $PY -c "import fastaspp; print('backends', fastaspp.backends())"
}

# The cuda backend's own tests, run before the rest so that a time limit still leaves their results.
TEST_FIRST=${TEST_FIRST:-"tests/test_cuda_tensor_core_conv.py tests/test_env_switches.py tests/test_kept_weights.py \
tests/test_aspp_train.py"}

run_pytest() {  # log, seconds, then pytest arguments
    local log=$1 seconds=$2 t0=$SECONDS
    shift 2
    # One Triton config per kind: the suite's many shapes would otherwise each autotune.
    # -v logs each result as it lands; SIGINT at the time limit still prints the failure summary.
    # -k: a process stuck in a kernel ignores SIGINT; KILL it 15 s later so the next stage can run.
    # --timeout-method thread: a test stuck in a kernel (or a synchronize) never returns to Python
    # for the signal method; the thread method dumps its stacks and ends the worker, which xdist
    # reports and replaces, so one hang costs one test, not the stage.
    FASTASPP_TRITON_AUTOTUNE=0 timeout -s INT -k 15 "$seconds" $PY -m pytest "$@" -v -p no:cacheprovider \
        -n "${TEST_WORKERS:-16}" --timeout 120 --timeout-method thread -rfE --tb=short ${TEST_ARGS:-} \
        >"$OUT/$log" 2>&1
    echo "$log: exit $? after $((SECONDS - t0)) s"
    grep -E "^(FAILED|ERROR)" "$OUT/$log" | cut -c1-200 | head -60
    tail -3 "$OUT/$log"
}

# Stage tests = tests_first then tests_rest; naming the two apart lets benches run between them.
stage_tests_first() {
    # shellcheck disable=SC2086  # word splitting of the file list is intended
    run_pytest tests-first.log "${TEST_FIRST_S:-90}" $TEST_FIRST
}

stage_tests_rest() {
    local ignore="" f
    for f in $TEST_FIRST; do ignore="$ignore --ignore=$f"; done
    # shellcheck disable=SC2086
    run_pytest tests.log "${TEST_S:-150}" tests $ignore
}

stage_tests() {
    stage_tests_first
    stage_tests_rest
}

stage_bench() {
    # The fixed cost per call first (tiny inputs: host time), then the ASPP and the single convs;
    # each writes its own JSON + markdown.
    local op
    for op in ${BENCH_OPS:-overhead aspp conv}; do
        local t0=$SECONDS
        timeout -k 15 "${BENCH_S:-120}" $PY -m fastaspp bench --op $op --device cuda --dtype bfloat16 --out "$OUT" \
            ${BENCH_ARGS:-} >"$OUT/bench-$op${BENCH_TAG:-}.log" 2>&1
        echo "bench $op: exit $? after $((SECONDS - t0)) s"
        tail -25 "$OUT/bench-$op${BENCH_TAG:-}.log"
    done
}

# The cuda backend's kernels under compute-sanitizer: out-of-range or misaligned accesses (memcheck),
# shared-memory hazards between threads (racecheck: the cp.async pipeline's barriers, the staged
# epilogue) and misused barriers (synccheck). One process per tool, no pytest-xdist under it.
stage_sanitize() {
    local sanitizer tool
    sanitizer=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null)
    if [ -z "$sanitizer" ]; then echo "sanitize: compute-sanitizer not found"; return; fi
    for tool in memcheck racecheck synccheck; do
        local t0=$SECONDS
        # shellcheck disable=SC2086  # word splitting of the test list and arguments is intended
        FASTASPP_TRITON_AUTOTUNE=0 timeout -s INT "${SANITIZE_S:-120}" "$sanitizer" --tool "$tool" --error-exitcode 9 \
            $PY -m pytest ${SANITIZE_TESTS:-tests/test_cuda_tensor_core_conv.py} -q -p no:cacheprovider -x \
            ${SANITIZE_ARGS:-} >"$OUT/sanitize-$tool.log" 2>&1
        echo "sanitize $tool: exit $? after $((SECONDS - t0)) s"
        grep -m5 -E "========= (Invalid|Race|Barrier|Error|ERROR)|RACECHECK SUMMARY|ERROR SUMMARY" "$OUT/sanitize-$tool.log"
        tail -2 "$OUT/sanitize-$tool.log"
    done
}

stage_profile() {
    timeout "${PROFILE_S:-90}" $PY benchmarks/gpu_profile.py 2>&1 | tee "$OUT/profile.log" | cut -c1-300
}

for stage in ${STAGES:-build tests bench profile}; do
    "stage_$stage"
    # The device tool returns at most 8 files: with PACK_TO (its $OUT, while OUT is elsewhere), all of
    # OUT as one archive, rewritten after each stage so that a time limit still leaves the earlier ones.
    if [ -n "${PACK_TO:-}" ]; then tar czf "$PACK_TO/results.tgz" -C "$OUT" .; fi
done
