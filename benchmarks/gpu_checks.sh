#!/usr/bin/env bash
# The accelerator checks, as one script for one GPU (H100/H200): cuDNN attention parity, the
# vmapped-vs-sequential ensemble ratio at the CPU preset's sizes, and bf16 MFU of the ensemble step
# at SmolLM2-135M (per-layer and scanned layouts) and 1B shapes. Each step has its own time limit so
# one slow compile cannot eat the rest; each step's log (its JSON lines included) lands in $OUT
# (default ./gpu_results). STEPS picks a subset (default: all, in the order below).
#
#   bash benchmarks/gpu_checks.sh                          # needs jax[cuda], flax, optax, orbax, gin-config
#   STEPS="mfu_135m_scan mfu_1b" bash benchmarks/gpu_checks.sh
set -uo pipefail
OUT="${OUT:-gpu_results}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"
PY="${PYTHON:-python3}"
ALL="attention_parity ensemble_small mfu_135m_cudnn mfu_135m_xla mfu_135m_scan mfu_1b"
# Not in ALL (diagnostics): profile_135m_scan traces 3 steps (kernel totals, Perfetto trace, optimized HLO
# into $OUT; PROFILE_ARGS adds ensemble_step.py arguments); mfu_135m_scan_nodrop times the same step without
# dropout masks, mfu_135m_scan_32 with 32 pairs per member, mfu_135m_scan_noremat without remat.
step() {  # step SECONDS NAME CMD...
    local limit=$1 name=$2
    shift 2
    echo "== $name (limit ${limit}s) $(date +%T)"
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log" | grep -v -E "^\s*$|^W[0-9]{4}|^I[0-9]{4}"
    echo "== $name rc=${PIPESTATUS[0]} $(date +%T)"
}
mfu() {  # mfu SECONDS NAME ONLY ATTENTION [EXTRA ARGS...]
    local limit=$1 name=$2 only=$3 attention=$4
    shift 4
    step "$limit" "$name" "$PY" benchmarks/ensemble_step.py --preset gpu_mfu --only "$only" --attention "$attention" \
        --no_sequential "$@"
}
$PY -c "import jax, flax, optax, orbax.checkpoint as o; print('jax', jax.__version__, 'flax', flax.__version__, \
'optax', optax.__version__, jax.devices())"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
for s in ${STEPS:-$ALL}; do
    case "$s" in
        attention_parity) step 60 "$s" "$PY" benchmarks/attention_parity.py --impl cudnn ;;
        ensemble_small) step 75 "$s" "$PY" benchmarks/ensemble_step.py --preset cpu ;;
        mfu_135m_cudnn) mfu 180 "$s" "smollm2-135m shape" cudnn ;;
        mfu_135m_xla) mfu 180 "$s" "smollm2-135m shape" xla ;;
        mfu_135m_scan) mfu 150 "$s" "smollm2-135m scan" cudnn,xla ;;
        mfu_1b) mfu 130 "$s" "1B" cudnn ;;
        profile_135m_scan)
            mfu 200 "$s" "smollm2-135m scan" cudnn --profile "$OUT/profile" ${PROFILE_ARGS:-}
            # Flat copies: only files two folders down come back from a device session.
            find "$OUT/profile" -name perfetto_trace.json.gz -exec cp {} "$OUT/profile_trace.json.gz" \;
            find "$OUT/profile" \( -name kernels.json -o -name step.hlo.txt.gz \) -exec cp {} "$OUT/" \;
            rm -rf "$OUT/profile" ;;
        mfu_135m_scan_nodrop) mfu 120 "$s" "smollm2-135m scan" cudnn --dropout 0 ;;
        mfu_135m_scan_32) mfu 150 "$s" "smollm2-135m scan" cudnn --pairs 32 ;;
        mfu_135m_scan_noremat) mfu 150 "$s" "smollm2-135m scan" cudnn --remat_policy none ;;
        *) echo "unknown step $s (known: $ALL profile_135m_scan mfu_135m_scan_nodrop mfu_135m_scan_32" \
            "mfu_135m_scan_noremat)"; exit 2 ;;
    esac
done
