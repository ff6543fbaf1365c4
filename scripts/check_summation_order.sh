#!/usr/bin/env bash
# The suite's check of its own robustness to summation order: the tests marked cross_path (two
# computations equal only in exact arithmetic, compared with a stated tolerance) run again at two
# compute threads and with ATEN_CPU_CAPABILITY=default (scalar kernels, no AVX2/AVX-512). Each
# changes how a sum is split and vectorised. `make test` itself runs them at one thread a worker.
# ATEN_CPU_CAPABILITY is read when torch is imported, so each setting is its own pytest process.
# Usage: scripts/check_summation_order.sh [extra pytest arguments, e.g. -n 2]
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
failed=()
# Inductor's kernel cache does not key on ATEN_CPU_CAPABILITY: kernels cached by an AVX-512 run
# fail to build (at::vec undeclared) under "default", so that run keeps a cache of its own.
default_cache=${TMPDIR:-/tmp}/fashion_func_inductor_default_isa
for setting in "FF_TEST_THREADS=2" \
    "FF_TEST_THREADS=1 ATEN_CPU_CAPABILITY=default TORCHINDUCTOR_CACHE_DIR=$default_cache"; do
    start=$SECONDS
    # shellcheck disable=SC2086  # the setting is meant to split into NAME=VALUE words
    env $setting "$PY" -m pytest -p no:cacheprovider -q -m cross_path "$@" tests | tail -3
    code=${PIPESTATUS[0]}
    echo "== $setting: exit $code in $((SECONDS - start)) s"
    [ "$code" -eq 0 ] || failed+=("$setting")
done
if [ ${#failed[@]} -gt 0 ]; then
    echo "cross_path tests failed under: ${failed[*]}" >&2
    exit 1
fi
