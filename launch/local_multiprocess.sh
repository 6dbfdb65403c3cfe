#!/usr/bin/env bash
# Starts N local CPU processes of `python -m warm_jax.train`, joined by jax.distributed on
# 127.0.0.1: the cheapest way to exercise multi-host code paths (per-process data shards,
# process-0-only writes, cross-process checkpoints) without a cluster.
set -euo pipefail

readonly PROG=${0##*/}

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

die() {
  echo "$PROG: error: $*" >&2
  echo "Run '$PROG --help' for usage." >&2
  exit 2
}

is_uint() { [[ $1 =~ ^[0-9]+$ ]]; }

# Joins words shell-quoted (POSIX single quotes where needed, readable and safe for a remote
# shell too), so that the printed line runs the same command when pasted.
quote_cmd() {
  local word out=() sq="'\\''"
  for word in "$@"; do
    if [[ $word =~ ^[A-Za-z0-9_./=:,@%+-]+$ ]]; then
      out+=("$word")
    else
      out+=("'${word//\'/$sq}'")
    fi
  done
  printf '%s\n' "${out[*]}"
}

num_procs=""
port=${WARM_COORDINATOR_PORT:-}
devices=""
kill_after=30
dry_run=0
python=${PYTHON:-python}
while (($#)); do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --port) (($# >= 2)) || die "--port needs a value"; port=$2; shift 2 ;;
    --port=*) port=${1#*=}; shift ;;
    --devices_per_process) (($# >= 2)) || die "--devices_per_process needs a value"; devices=$2; shift 2 ;;
    --devices_per_process=*) devices=${1#*=}; shift ;;
    --kill_after) (($# >= 2)) || die "--kill_after needs a value"; kill_after=$2; shift 2 ;;
    --kill_after=*) kill_after=${1#*=}; shift ;;
    --dry_run) dry_run=1; shift ;;
    --) shift; break ;;
    -*) die "unknown option '$1' (arguments for warm_jax.train go after '--')" ;;
    *)
      [[ -z $num_procs ]] || die "unexpected argument '$1' (arguments for warm_jax.train go after '--')"
      num_procs=$1; shift ;;
  esac
done
train_args=("$@")

[[ -n $num_procs ]] || die "the number of processes N is required"
{ is_uint "$num_procs" && ((num_procs >= 1)); } || die "N must be a positive integer, got '$num_procs'"
[[ -z $devices ]] || { is_uint "$devices" && ((devices >= 1)); } ||
  die "--devices_per_process must be a positive integer, got '$devices'"
is_uint "$kill_after" || die "--kill_after must be a whole number of seconds, got '$kill_after'"
if [[ -z $port ]]; then
  # A random unused port rather than a fixed one, so that concurrent local runs do not
  # collide: a port is taken when a connection to it succeeds.
  for _ in {1..50}; do
    port=$((20000 + RANDOM % 40000))
    (: <"/dev/tcp/127.0.0.1/$port") 2>/dev/null || break
  done
fi
{ is_uint "$port" && ((port >= 1 && port <= 65535)); } || die "--port must be in 1..65535, got '$port'"

xla_flags=""
if [[ -n $devices ]]; then
  # Keep the user's other XLA flags, replace any device count they set.
  read -r -a user_flags <<<"${XLA_FLAGS:-}"
  for flag in "${user_flags[@]}"; do
    [[ $flag == --xla_force_host_platform_device_count=* ]] || xla_flags+="$flag "
  done
  xla_flags+="--xla_force_host_platform_device_count=$devices"
fi

labels=()
cmds=()
for ((i = 0; i < num_procs; i++)); do
  cmd=(env JAX_PLATFORMS=cpu "JAX_COORDINATOR_ADDRESS=127.0.0.1:$port" "JAX_NUM_PROCESSES=$num_procs"
    "JAX_PROCESS_ID=$i")
  [[ -z $xla_flags ]] || cmd+=("XLA_FLAGS=$xla_flags")
  # Unbuffered, so that the interleaved logs of the processes appear as they happen.
  cmd+=(PYTHONUNBUFFERED=1 "$python" -m warm_jax.train "${train_args[@]}")
  labels+=("p$i")
  cmds+=("$(quote_cmd "${cmd[@]}")")
done

if ((dry_run)); then
  printf '%s\n' "${cmds[@]}"
  exit 0
fi

# ---------------------------------------------------------------------------------------
# Supervision: each process runs as its own job (process group, thanks to `set -m`) so that
# signals reach the whole pipeline 'command | prefixer', and the prefixer ignores them so
# that the last lines a stopping process prints are not lost.
set -m
# Our own messages go to fd 3, a copy of stderr that the `wait` redirections below leave alone.
exec 3>&2
log() { echo "$PROG: $*" >&3; }

prefix_lines() {
  trap '' INT TERM
  local line
  while IFS= read -r line || [[ -n $line ]]; do
    printf '[%s] %s\n' "$1" "$line"
  done
}

run_one() {
  # A handler (not an ignore) keeps this subshell alive until the command has exited,
  # while the command itself still gets the default dispositions on exec.
  trap ':' INT TERM
  exec 3>&-
  local label=$1 cmd_line=$2 rc
  set +e
  # exec: no intermediate shell between the pipe and the command, so the command's own exit
  # status (or signal) is what PIPESTATUS reports.
  eval "exec $cmd_line" 2>&1 | prefix_lines "$label"
  rc=${PIPESTATUS[0]}
  exit "$rc"
}

pids=()
status=()
watchdog=""
stopping=0

signal_running() {
  local sig=$1 i
  for i in "${!pids[@]}"; do
    [[ -n ${status[i]} ]] || kill -s "$sig" -- "-${pids[i]}" 2>/dev/null || true
  done
}

stop_all() {
  local sig=$1
  if ((stopping)); then
    signal_running KILL
    return
  fi
  stopping=1
  signal_running "$sig"
  # Processes blocked in a collective may not react to SIGTERM; escalate after a while.
  (sleep "$kill_after" && kill -s USR1 $$) &
  watchdog=$!
}

# shellcheck disable=SC2317  # invoked from the traps below
on_signal() {
  log "got SIG$1, stopping all processes"
  stop_all "$1"
}

trap 'on_signal INT' INT
trap 'on_signal TERM' TERM
trap 'log "processes still running ${kill_after}s after the stop signal, killing them"; signal_running KILL' USR1

log "starting $num_procs processes, coordinator 127.0.0.1:$port"
for i in "${!cmds[@]}"; do
  run_one "${labels[i]}" "${cmds[i]}" &
  pids[i]=$!
  status[i]=""
done

first_failure=""
running=${#pids[@]}
while ((running > 0)); do
  # Woken by any child or a trapped signal; statuses are collected below. stderr is dropped
  # because bash's own "Killed" job notices would interleave with the [pI] logs.
  { wait -n || true; } 2>/dev/null
  for i in "${!pids[@]}"; do
    [[ -z ${status[i]} ]] || continue
    kill -0 "${pids[i]}" 2>/dev/null && continue
    rc=0
    { wait "${pids[i]}" || rc=$?; } 2>/dev/null
    status[i]=$rc
    running=$((running - 1))
    if ((rc != 0)) && [[ -z $first_failure ]]; then
      first_failure=$i
      if ((!stopping)); then
        log "process $i failed with exit status $rc; stopping the others"
        stop_all TERM
      fi
    fi
  done
done
if [[ -n $watchdog ]]; then
  kill -- "-$watchdog" 2>/dev/null || true
  wait "$watchdog" 2>/dev/null || true
fi

failed=()
for i in "${!status[@]}"; do
  ((status[i] == 0)) || failed+=("p$i (exit ${status[i]})")
done
if ((${#failed[@]} == 0)); then
  log "all $num_procs processes finished"
  exit 0
fi
log "failed: ${failed[*]}"
exit "${status[first_failure]}"
