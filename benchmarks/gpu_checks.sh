#!/usr/bin/env bash
# The accelerator checks, as one script for one GPU (H100/H200): cuDNN attention parity, the
# vmapped-vs-sequential ensemble ratio at the CPU preset's sizes, and bf16 MFU of the ensemble step
# at SmolLM2-135M and 1B shapes. Each step has its own time limit so one slow compile cannot eat
# the rest; each step's log (its JSON lines included) lands in $OUT (default ./gpu_results).
#
#   bash benchmarks/gpu_checks.sh            # needs jax[cuda], flax, optax, orbax, gin-config
set -uo pipefail
OUT="${OUT:-gpu_results}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"
PY="${PYTHON:-python3}"
step() {  # step SECONDS NAME CMD...
    local limit=$1 name=$2
    shift 2
    echo "== $name (limit ${limit}s) $(date +%T)"
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log" | grep -v -E "^\s*$|^W[0-9]{4}|^I[0-9]{4}"
    echo "== $name rc=${PIPESTATUS[0]} $(date +%T)"
}
$PY -c "import jax, flax, optax, orbax.checkpoint as o; print('jax', jax.__version__, 'flax', flax.__version__, \
'optax', optax.__version__, jax.devices())"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
step 60 attention_parity "$PY" benchmarks/attention_parity.py --impl cudnn
step 75 ensemble_small "$PY" benchmarks/ensemble_step.py --preset cpu
for attention in cudnn xla; do
    step 130 "mfu_135m_$attention" "$PY" benchmarks/ensemble_step.py --preset gpu_mfu --only smollm2 \
        --attention "$attention" --no_sequential
done
step 130 mfu_1b "$PY" benchmarks/ensemble_step.py --preset gpu_mfu --only 1B --attention cudnn \
    --no_sequential
