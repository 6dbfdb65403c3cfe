#!/usr/bin/env bash
# Reruns every CPU figure of BENCHMARKS.md's summary and rewrites its generated sections.
#
#   bash benchmarks/run_all.sh            # the summary's figures, 3 repetitions each (~18 min on 2 CPU cores)
#   ALL=1 bash benchmarks/run_all.sh      # + the supplementary tables (huge pages, streaming averaging)
#   REPS=5 OUT=/tmp/bench bash benchmarks/run_all.sh
#   ONLY="rm_throughput sampler_vs_hf" bash benchmarks/run_all.sh
#
# Each script writes its JSON (with machine and versions) to $OUT/<name>.json and its stdout to
# $OUT/<name>.txt; the table at the end of that stdout replaces the block between
# <!-- BEGIN generated:<name> --> and <!-- END generated:<name> --> in BENCHMARKS.md.
# Needs the peers: pip install "trl>=1.16" "mergekit>=0.1.5" (torch stays as installed).
set -euo pipefail
cd "$(dirname "$0")/.."
REPS="${REPS:-3}"
OUT="${OUT:-/tmp/warm_jax_bench}"
MD="${MD:-BENCHMARKS.md}"
ONLY="${ONLY:-}"
mkdir -p "$OUT"
# One JAX CPU device, as a user's single-host run on a laptop would see (tests force 8).
unset XLA_FLAGS
export JAX_PLATFORMS=cpu TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
# A persistent compilation cache: reruns skip compiling (the 135M rows use the scanned layer stack,
# ~20 s to compile on 2 cores; the unrolled one took minutes).
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$OUT/jax_cache}"
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=2

want() { [[ -z "$ONLY" || " $ONLY " == *" $1 "* ]]; }
# Supplementary tables (no summary figure of their own): with ALL=1 or when ONLY names them.
want_extra() { [[ "${ALL:-0}" == 1 && -z "$ONLY" || " $ONLY " == *" $1 "* ]]; }

run() {  # run NAME ARGS... : time one script, keep its output, splice its table
  local name="$1"; shift
  want "$name" || return 0
  local t0=$SECONDS
  echo "== $name" >&2
  python "benchmarks/$name.py" "$@" --output="$OUT/$name.json" >"$OUT/$name.txt" 2>"$OUT/$name.log" || {
    echo "!! $name failed; see $OUT/$name.log" >&2; tail -5 "$OUT/$name.log" >&2; FAILED+=("$name"); return 0; }
  python benchmarks/common.py splice "$MD" "$name" "$OUT/$name.txt"
  echo "   $name: $((SECONDS - t0)) s" >&2
}

T0=$SECONDS
FAILED=()
# The machine block describes the run that made the tables: rewritten only when every table is.
if [[ -z "$ONLY" ]]; then python benchmarks/common.py machine "$MD"; fi
run rm_throughput --reps="$REPS"
run sampler_vs_hf --reps="$REPS"
run warm_vs_ens --reps="$REPS"
run reinforce_step --reps="$REPS"
run averaging_vs_mergekit --reps="$REPS"
# The 135M row of the huge-page table is left out (~10 min: a fresh process per block); run it by hand.
want_extra hugepages && run hugepages --reps="$REPS" --cases=tiny
if want ensemble_step; then  # the lead's scripts: JSON / plain tables
  python benchmarks/ensemble_step.py --steps="$REPS" --output="$OUT/ensemble_step.json" \
    >"$OUT/ensemble_step.txt" 2>"$OUT/ensemble_step.log" \
    && python benchmarks/common.py splice-ensemble "$MD" ensemble_step "$OUT/ensemble_step.json"
fi
# benchmarks/sampler.py (KV cache vs a no-cache loop) is left out: its 135M no-cache baseline alone takes
# > 10 min on 2 cores, and its table also holds H200 rows that a CPU rerun would overwrite. Run it by hand.
if want_extra averaging; then
  python benchmarks/averaging.py --reps="$REPS" --ks=4,8 >"$OUT/averaging.txt" 2>"$OUT/averaging.log" \
    && python benchmarks/common.py splice "$MD" averaging "$OUT/averaging.txt"
fi
echo "all figures: $((SECONDS - T0)) s; results in $OUT, tables in $MD" >&2
if ((${#FAILED[@]})); then echo "failed: ${FAILED[*]}" >&2; exit 1; fi
