#!/usr/bin/env bash
# Runs `python -m warm_jax.train` on several GPU VMs over ssh, one process per VM (each
# process drives all GPUs of its VM), joined by jax.distributed with the first host as
# coordinator. Phases, each on all hosts in parallel and each finished before the next:
# ship the code (rsync), install (optional), train.
set -euo pipefail

readonly PROG=${0##*/}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
readonly ROOT
readonly PID_FILE=.warm_jax_train.pid

usage() {
  cat <<EOF
Usage: $PROG --hosts h1,h2,... [--port P] [--user U] [--workdir_remote DIR]
       [--coordinator_host H] [--python PY] [--install] [--kill_after S] [--dry_run] -- ARGS...

Ships this repository to every host with rsync and runs there, in DIR,
  JAX_COORDINATOR_ADDRESS=h1:P JAX_NUM_PROCESSES=N JAX_PROCESS_ID=i PY -m warm_jax.train ARGS
with i the host's position in --hosts (warm_jax.runtime reads these variables). Output lines
are prefixed with [host]. When one host fails, the processes on the others are stopped.

Options:
  --hosts h1,h2,...       hosts, comma-separated; the first runs the coordinator (process 0)
  --port P                coordinator port on h1 (default: \$WARM_COORDINATOR_PORT, else 12355)
  --user U                ssh/rsync login user (default: ssh's own default)
  --workdir_remote DIR    code directory on the hosts, absolute or relative to the login
                          home; its parent must exist (default: warm_jax). Relative paths in
                          ARGS (e.g. --workdir) are relative to it.
  --coordinator_host H    address of h1 as the other hosts reach it, when it differs from the
                          name used for ssh (e.g. an internal IP) (default: h1)
  --python PY             python on the hosts (default: python3)
  --install               before training, run 'PY -m pip install -e . jax[cuda12]' on each host
  --kill_after S          seconds between SIGTERM and SIGKILL when stopping (default 30)
  --dry_run               print every command, one per line, and exit 0
  -h, --help              this text

ssh runs with BatchMode=yes: set up keys (or ssh-agent) and host names in ~/.ssh/config first.

Example:
  $PROG --hosts gpu-a,gpu-b --install -- --gin_file=gin/repro.gin --gin_file=gin/mesh/gpu.gin \\
      --workdir=runs/repro
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

hosts_csv=""
port=${WARM_COORDINATOR_PORT:-12355}
user=""
remote_dir=warm_jax
coordinator_host=""
remote_python=python3
install=0
kill_after=30
dry_run=0
need_value() { (($1 >= 2)) || die "$2 needs a value"; }
while (($#)); do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --hosts) need_value $# "$1"; hosts_csv=$2; shift 2 ;;
    --hosts=*) hosts_csv=${1#*=}; shift ;;
    --port) need_value $# "$1"; port=$2; shift 2 ;;
    --port=*) port=${1#*=}; shift ;;
    --user) need_value $# "$1"; user=$2; shift 2 ;;
    --user=*) user=${1#*=}; shift ;;
    --workdir_remote) need_value $# "$1"; remote_dir=$2; shift 2 ;;
    --workdir_remote=*) remote_dir=${1#*=}; shift ;;
    --coordinator_host) need_value $# "$1"; coordinator_host=$2; shift 2 ;;
    --coordinator_host=*) coordinator_host=${1#*=}; shift ;;
    --python) need_value $# "$1"; remote_python=$2; shift 2 ;;
    --python=*) remote_python=${1#*=}; shift ;;
    --install) install=1; shift ;;
    --kill_after) need_value $# "$1"; kill_after=$2; shift 2 ;;
    --kill_after=*) kill_after=${1#*=}; shift ;;
    --dry_run) dry_run=1; shift ;;
    --) shift; break ;;
    *) die "unknown argument '$1' (arguments for warm_jax.train go after '--')" ;;
  esac
done
train_args=("$@")

[[ -n $hosts_csv ]] || die "--hosts is required"
IFS=, read -r -a hosts <<<"$hosts_csv"
declare -A seen=()
for h in "${hosts[@]}"; do
  [[ $h =~ ^[A-Za-z0-9._:-]+$ ]] || die "--hosts: bad host name '$h' in '$hosts_csv'"
  [[ -z ${seen[$h]:-} ]] || die "--hosts: '$h' appears twice; run one process per host"
  seen[$h]=1
done
{ is_uint "$port" && ((port >= 1 && port <= 65535)); } || die "--port must be in 1..65535, got '$port'"
is_uint "$kill_after" || die "--kill_after must be a whole number of seconds, got '$kill_after'"
[[ -n $remote_dir ]] || die "--workdir_remote must not be empty"
[[ $remote_dir != '~'* ]] || die "--workdir_remote: give a path relative to the home directory instead of '~'"
num_hosts=${#hosts[@]}
coordinator="${coordinator_host:-${hosts[0]}}:$port"

ssh_cmd=(ssh -o BatchMode=yes -o ServerAliveInterval=30)
target() { printf '%s\n' "${user:+$user@}$1"; }
q_dir=$(quote_cmd "$remote_dir")

# Phase commands, one per host, as shell-quoted lines: printed by --dry_run, eval'ed otherwise.
sync_cmds=()
install_cmds=()
run_cmds=()
for i in "${!hosts[@]}"; do
  t=$(target "${hosts[i]}")
  # The .gitignore filter keeps local work directories and caches off the wire.
  sync_cmds+=("$(quote_cmd rsync -az --exclude=.git --filter=':- .gitignore' \
    -e "${ssh_cmd[*]}" "$ROOT/" "$t:$remote_dir/")")
  install_cmds+=("$(quote_cmd "${ssh_cmd[@]}" "$t" \
    "cd $q_dir && $(quote_cmd "$remote_python" -m pip install -e . 'jax[cuda12]>=0.10,<0.11')")")
  # The remote shell writes its pid and then becomes python (exec), so that a stop request
  # can signal exactly that process: ssh without a tty does not forward signals.
  run_cmds+=("$(quote_cmd "${ssh_cmd[@]}" "$t" \
    "cd $q_dir && echo \$\$ > $PID_FILE && exec $(quote_cmd env "JAX_COORDINATOR_ADDRESS=$coordinator" \
      "JAX_NUM_PROCESSES=$num_hosts" "JAX_PROCESS_ID=$i" PYTHONUNBUFFERED=1 \
      "$remote_python" -m warm_jax.train "${train_args[@]}")")")
done

if ((dry_run)); then
  printf '%s\n' "${sync_cmds[@]}"
  ((!install)) || printf '%s\n' "${install_cmds[@]}"
  printf '%s\n' "${run_cmds[@]}"
  exit 0
fi

# ---------------------------------------------------------------------------------------
# Supervision, as in local_multiprocess.sh: one job (process group) per host so that
# signals reach 'command | prefixer'; the prefixer ignores them so that no line is lost.
set -m
# Our own messages go to fd 3, a copy of stderr that the `wait` redirections leave alone.
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
  trap ':' INT TERM
  exec 3>&-
  local label=$1 cmd_line=$2 rc
  set +e
  eval "exec $cmd_line" 2>&1 | prefix_lines "$label"
  rc=${PIPESTATUS[0]}
  exit "$rc"
}

pids=()
status=()
phase=""
stopping=0
watchdog=""

# Signals the training processes on the hosts that have not finished (run phase only).
signal_remote() {
  local sig=$1 i t kills=()
  for i in "${!pids[@]}"; do
    [[ -z ${status[i]} ]] || continue
    t=$(target "${hosts[i]}")
    # sshd starts the command as a session (and group) leader, so the group id is the pid
    # written at start: signalling the group also reaches data-loader workers.
    local remote="cd $q_dir && p=\$(cat $PID_FILE)"
    remote+=" && { kill -s $sig -- -\$p || kill -s $sig \$p; } 2>/dev/null || true"
    "${ssh_cmd[@]}" -o ConnectTimeout=10 "$t" "$remote" </dev/null >&3 2>&1 &
    kills+=($!)
  done
  for i in "${kills[@]}"; do wait "$i" 2>/dev/null || true; done
}

signal_running() {
  local sig=$1 i
  # A local ssh that dies leaves its remote process running, so in the run phase ssh is
  # only killed together with the remote process, which normally ends it by itself.
  if [[ $phase == run ]]; then
    signal_remote "$sig"
    [[ $sig == KILL ]] || return 0
  fi
  for i in "${!pids[@]}"; do
    [[ -n ${status[i]} ]] || kill -s "$sig" -- "-${pids[i]}" 2>/dev/null || true
  done
}

stop_all() {
  if ((stopping)); then
    signal_running KILL
    return
  fi
  stopping=1
  signal_running "$1"
  (sleep "$kill_after" && kill -s USR1 $$) &
  watchdog=$!
}

interrupted=0
# shellcheck disable=SC2317  # invoked from the traps below
on_signal() {
  log "got SIG$1, stopping all hosts"
  [[ $1 == INT ]] && interrupted=130 || interrupted=143
  stop_all "$1"
}
trap 'on_signal INT' INT
trap 'on_signal TERM' TERM
trap 'log "hosts still running ${kill_after}s after the stop signal, killing them"; signal_running KILL' USR1

# Runs one command per host in parallel; returns the first failing exit status (0 if none).
run_phase() {
  phase=$1
  shift
  local cmds=("$@") i rc running first_failure="" failed=()
  pids=()
  status=()
  log "$phase on ${hosts[*]}"
  for i in "${!cmds[@]}"; do
    run_one "${hosts[i]}" "${cmds[i]}" &
    pids[i]=$!
    status[i]=""
  done
  running=${#pids[@]}
  while ((running > 0)); do
    { wait -n || true; } 2>/dev/null
    for i in "${!pids[@]}"; do
      [[ -z ${status[i]} ]] || continue
      kill -0 "${pids[i]}" 2>/dev/null && continue
      rc=0
      { wait "${pids[i]}" || rc=$?; } 2>/dev/null
      status[i]=$rc
      running=$((running - 1))
      if ((rc != 0)) && [[ -z $first_failure ]]; then
        first_failure=$rc
        if ((!stopping)); then
          log "$phase failed on ${hosts[i]} (process $i) with exit status $rc; stopping the others"
          stop_all TERM
        fi
      fi
    done
  done
  if [[ -n $watchdog ]]; then
    kill -- "-$watchdog" 2>/dev/null || true
    wait "$watchdog" 2>/dev/null || true
    watchdog=""
  fi
  for i in "${!status[@]}"; do
    ((status[i] == 0)) || failed+=("${hosts[i]} (exit ${status[i]})")
  done
  if ((${#failed[@]})); then
    log "$phase failed: ${failed[*]}"
    return "$first_failure"
  fi
  return 0
}

rc=0
run_phase sync "${sync_cmds[@]}" || rc=$?
if ((rc == 0 && install && !stopping)); then run_phase install "${install_cmds[@]}" || rc=$?; fi
if ((rc == 0 && !stopping)); then run_phase run "${run_cmds[@]}" || rc=$?; fi
((rc != 0)) || rc=$interrupted
((rc != 0)) || log "all $num_hosts hosts finished"
exit "$rc"
