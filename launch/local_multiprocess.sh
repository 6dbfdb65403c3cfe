#!/usr/bin/env bash
# Starts N local CPU processes of `python -m warm_jax.train`, joined by jax.distributed on
# 127.0.0.1: the cheapest way to exercise multi-host code paths (per-process data shards,
# process-0-only writes, cross-process checkpoints) without a cluster.
set -euo pipefail

readonly PROG=${0##*/}
# shellcheck source=lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"

usage() {
  cat <<EOF
Usage: $PROG N [--port P] [--devices_per_process D] [--kill_after S] [--dry_run] -- ARGS...

Starts N processes of '\${PYTHON:-python} -m warm_jax.train ARGS' on this machine, process i
with the environment
  JAX_PLATFORMS=cpu JAX_COORDINATOR_ADDRESS=127.0.0.1:P JAX_NUM_PROCESSES=N JAX_PROCESS_ID=i
(warm_jax.runtime reads these), prefixes every output line with [pI], and waits for all.

Options:
  N                          number of processes (>= 1)
  --port P                   coordinator port (default: \$WARM_COORDINATOR_PORT, else a free port)
  --devices_per_process D    simulated CPU devices per process:
                             XLA_FLAGS=--xla_force_host_platform_device_count=D
  --kill_after S             seconds between SIGTERM and SIGKILL when stopping (default 30)
  --dry_run                  print the N commands, one per line, and exit 0
  -h, --help                 this text

When a process fails the others are stopped (they would otherwise block in a collective
until jax's timeout); the exit status is the first failing process's. SIGINT and SIGTERM
are forwarded to all processes; a second one kills them.

Example:
  $PROG 2 --devices_per_process 4 -- --gin_file=gin/quickstart.gin --workdir=/tmp/wj
EOF
}

num_procs=""
port=${WARM_COORDINATOR_PORT:-}
devices_per_process=""
kill_after=30
dry_run=0
python=${PYTHON:-python}
parse_args "port devices_per_process kill_after" dry_run num_procs "$@"

[[ -n $num_procs ]] || die "the number of processes N is required"
check_positive N "$num_procs"
[[ -z $devices_per_process ]] || check_positive --devices_per_process "$devices_per_process"
check_seconds kill_after "$kill_after"
if [[ -z $port ]]; then
  # A random unused port rather than a fixed one, so that concurrent local runs do not
  # collide: a port is taken when a connection to it succeeds.
  for _ in {1..50}; do
    port=$((20000 + RANDOM % 40000))
    (: <"/dev/tcp/127.0.0.1/$port") 2>/dev/null || break
  done
fi
check_port "$port"

xla_flags=""
if [[ -n $devices_per_process ]]; then
  # Keep the user's other XLA flags, replace any device count they set.
  read -r -a user_flags <<<"${XLA_FLAGS:-}"
  for flag in "${user_flags[@]}"; do
    [[ $flag == --xla_force_host_platform_device_count=* ]] || xla_flags+="$flag "
  done
  xla_flags+="--xla_force_host_platform_device_count=$devices_per_process"
fi

# The jobs for supervise_jobs (lib/common.sh): command lines, output labels, failure messages.
job_cmds=()
job_labels=()
job_failures=()
for ((i = 0; i < num_procs; i++)); do
  cmd=(env JAX_PLATFORMS=cpu "JAX_COORDINATOR_ADDRESS=127.0.0.1:$port" "JAX_NUM_PROCESSES=$num_procs"
    "JAX_PROCESS_ID=$i")
  [[ -z $xla_flags ]] || cmd+=("XLA_FLAGS=$xla_flags")
  # Unbuffered, so that the interleaved logs of the processes appear as they happen.
  cmd+=(PYTHONUNBUFFERED=1 "$python" -m warm_jax.train "${train_args[@]}")
  job_cmds+=("$(quote_cmd "${cmd[@]}")")
  job_labels+=("p$i")
  job_failures+=("process $i failed")
done

if ((dry_run)); then
  printf '%s\n' "${job_cmds[@]}"
  exit 0
fi

# Supervision (lib/common.sh): one job per process; a failure or a signal stops them all.
supervise_init processes "$kill_after"
log "starting $num_procs processes, coordinator 127.0.0.1:$port"
rc=0
supervise_jobs "failed:" || rc=$?
((rc != 0)) || log "all $num_procs processes finished"
exit "$rc"
