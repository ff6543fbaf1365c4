#!/usr/bin/env bash
# The device checks, in one call on a lent GPU machine (its own torch; data copied into the
# git-ignored .device_data/, named in the call's carry): the CUDA tests, the speedrun preset and
# the benchmark's CUDA table. Each part has its own time limit so one slow part cannot eat the rest.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD FASHION_MNIST_DIR=$PWD/.device_data XLA_PYTHON_CLIENT_PREALLOCATE=false
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi -L
python3 -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
python3 -c "import jax, flax, optax; print('jax', jax.__version__, jax.devices(), 'flax', flax.__version__)" 2>&1 | tail -1
for part in "$@"; do
  case $part in
    tests) timeout 110 python3 -m pytest -q -p no:cacheprovider -m cuda tests 2>&1 | tee "$OUT/cuda_tests.log" | tail -15 ;;
    speedrun) timeout 240 python3 scripts/speedrun.py --runs "${RUNS:-10}" --data-dir .device_data --json 2>&1 | tee "$OUT/speedrun.log" | grep -v Warning ;;
    bench) timeout 170 python3 scripts/bench.py --device cuda --data-dir .device_data --epochs 3 --precisions fp32,bf16 --json 2>&1 | tee "$OUT/bench.log" | grep -v Warning | tail -30 ;;
    explore*) timeout 300 python3 .device_data/explore.py ${EXPLORE:-} 2>&1 | tee "$OUT/explore.log" | grep -v Warning ;;
  esac
done
